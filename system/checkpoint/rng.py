"""RNG state as JSON, for ``rank_extra`` (non-tensor checkpoint state is JSON only, never pickle)."""

from __future__ import annotations

import base64
import random

import torch


def encode_rng_state(state: torch.Tensor) -> str:
    """A torch RNG state (uint8 tensor, e.g. ``torch.get_rng_state()``) as base64 text."""
    return base64.b64encode(state.cpu().contiguous().numpy().tobytes()).decode("ascii")


def decode_rng_state(text: str) -> torch.Tensor:
    """The uint8 tensor encoded by :func:`encode_rng_state`."""
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng() -> dict:
    """This process's RNG states (torch CPU, current CUDA device if any, Python ``random``) as JSON."""
    out = {"torch": encode_rng_state(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = encode_rng_state(torch.cuda.get_rng_state())
    version, internal, gauss = random.getstate()
    out["python"] = [version, list(internal), gauss]
    return out


def restore_rng(state: dict) -> None:
    """Restore what :func:`capture_rng` returned (keys that are absent are left alone)."""
    if "torch" in state:
        torch.set_rng_state(decode_rng_state(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(decode_rng_state(state["cuda"]))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
