"""Next-token choice from logits: greedy, or nucleus (top-p) sampling with temperature.

Nucleus sampling: Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", sec. 3.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("greedy", "top-p")


@dataclass
class SamplingConfig:
    """How to pick the next token.

    Attributes:
        method: ``"greedy"`` (argmax) or ``"top-p"``.
        top_p: keep the smallest set of tokens whose probability reaches ``top_p`` (0 < p <= 1).
        temperature: logits are divided by it before the softmax (> 0).
        seed: seed of the sampler's own generator (reproducible, independent of the global RNG).
    """

    method: str = "greedy"
    top_p: float = 0.9
    temperature: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value is out of range."""
        if self.method not in METHODS:
            raise ValueError(f"sampling must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


class Sampler:
    """Callable ``logits [B, V] -> tokens int64 [B]`` per :class:`SamplingConfig`.

    Args:
        cfg: the method and its parameters.
        vocab_limit: only ids ``< vocab_limit`` can be chosen (the tokenizer's vocabulary; the
            model's may be padded to a multiple of 64).
        device: where the logits live (the generator is created there).
    """

    def __init__(self, cfg: SamplingConfig, vocab_limit: int | None = None, device: torch.device | str = "cpu"):
        cfg.validate()
        self.cfg = cfg
        self.vocab_limit = vocab_limit
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(cfg.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:  # noqa: D102
        logits = logits.float()
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits = logits[:, : self.vocab_limit]
        if self.cfg.method == "greedy":
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / self.cfg.temperature, dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the tokens ranked above each one
        sorted_p = sorted_p.masked_fill(before >= self.cfg.top_p, 0.0)
        choice = torch.multinomial(sorted_p, 1, generator=self.generator)
        return order.gather(-1, choice).squeeze(-1)
