"""Does a job's model match the one a checkpoint was saved from?

Resuming loads tensors by name and global shape, so a change that keeps every shape (``model.n_heads``
4 -> 8 with the same ``dim``, ``moe.top_k``, ``moe.score_func``, ``model.rope_theta``) would load and
train on silently as a different model. :func:`model_config_diff` lists every ``[model]`` and ``[moe]``
field whose value differs from the saved config, except the few that do not change what the model
computes (:data:`FREE_TO_CHANGE`); the callers turn a non-empty list into an error.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from system.config.job import JobConfig

FREE_TO_CHANGE: dict[str, frozenset[str]] = {
    # init_std: only the initialisation, which a resume overwrites; max_seq_len: the rotary table's
    # length (positions below both values get the same angles); grouped_mm: the kernel, same math.
    "model": frozenset({"init_std", "max_seq_len"}),
    "moe": frozenset({"grouped_mm"}),
}


def model_config_diff(saved: dict[str, Any], cfg: JobConfig) -> list[str]:
    """``["model.n_heads: checkpoint 4, now 8", ...]``: the math-changing fields that differ.

    Args:
        saved: the job config saved with the checkpoint, as a dict (``{"model": {...}, "moe": {...}}``);
            a key it lacks (a checkpoint older than the key) is taken at the key's default.
        cfg: the job about to resume. ``model.vocab_size = 0`` (take the tokenizer's) is compared
            only once resolved; pass a resolved config to compare it.

    Returns:
        One entry per differing field, in field order; empty when the models are the same.
    """
    out: list[str] = []
    for section in ("model", "moe"):
        now = getattr(cfg, section)
        default = type(now)()
        before = saved.get(section) or {}
        for f in dataclasses.fields(now):
            if f.name in FREE_TO_CHANGE[section]:
                continue
            value = getattr(now, f.name)
            old = before.get(f.name, getattr(default, f.name))
            if section == "model" and f.name == "vocab_size" and (value == 0 or old == 0):
                continue
            if isinstance(value, float) or isinstance(old, float):
                same = float(old) == float(value)
            else:
                same = old == value
            if not same:
                out.append(f"{section}.{f.name}: checkpoint {old!r}, now {value!r}")
    return out


def describe_mismatch(path: str, diff: list[str]) -> str:
    """The one-line error for :func:`model_config_diff`'s non-empty result."""
    return (
        f"checkpoint {path} was saved from a different model: {'; '.join(diff)}. Resume with the checkpoint's "
        f"values (moesys ckpt inspect {path} --json shows its config), or start a new run"
    )
