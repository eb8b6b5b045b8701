"""Check an offload plan before anything runs: the checkpoint, the slots and the memory budget.

Every failure is a :class:`PlanError` whose message names the tensor or the quantity and gives the
numbers in bytes. The memory the device tier needs is, for the three modes:

- ``none`` (resident): every weight + KV cache + activations;
- ``ring`` (SE-MoE, arXiv 2205.10034, sec. 3.3.2): resident weights + ``K`` slots of the largest
  section + KV cache + activations;
- ``experts`` (expert-granular): resident weights + dense FFN sections + ``C`` expert slots + KV cache +
  activations.

Activations are an upper estimate (:func:`activation_bytes`) of what one forward pass of the
planned batch and sequence length keeps alive at once.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from system.config.model import ModelConfig
from system.config.moe import MoEConfig
from system.inference.mmap_file import WeightFiles
from system.inference.sections import ModelLayout, align_up
from system.errors import MoesysError

logger = logging.getLogger(__name__)

MODES = ("none", "ring", "experts")
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class PlanError(MoesysError, ValueError):
    """The offload plan cannot run: names the tensor or quantity and the numbers (bytes)."""


def parse_bytes(value: str | int | float | None) -> int | None:
    """``"4GiB"`` -> 4294967296. Decimal ``k/M/G/T`` (``kB``, ``GB``), binary ``KiB/MiB/GiB/TiB``;
    a trailing ``/s`` is allowed (bandwidths). ``None`` or ``""`` -> ``None``.

    Raises:
        PlanError: the text is not a size.
    """
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*(?:/s)?\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise PlanError(f"cannot read {value!r} as a size (examples: 4GiB, 512MiB, 2GB, 1e9)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: int) -> str:
    """``n`` bytes as ``"<n> B (<x> MiB)"``."""
    return f"{n} B ({n / 2**20:.2f} MiB)"


def check_checkpoint(expected: dict[str, tuple[int, ...]], ckpt: WeightFiles) -> None:
    """Every expected tensor is in the checkpoint with its shape (ours: for a Hugging Face folder, the
    shape after the mapping of :mod:`system.hf.weights`).

    Raises:
        PlanError: naming the first missing tensor, or a tensor whose shape differs (both shapes
            and the byte sizes given).
    """
    for name, shape in expected.items():
        if name not in ckpt:
            raise PlanError(f"tensor {name!r} (shape {list(shape)}) is missing from the checkpoint {ckpt.path}")
        info = ckpt.source(name)
        if info.shape != tuple(shape):
            n_exp = info.dtype.itemsize
            for s in shape:
                n_exp *= s
            raise PlanError(
                f"tensor {name!r} in {ckpt.path} has shape {list(info.shape)} ({info.nbytes} B), the model "
                f"config expects {list(shape)} ({n_exp} B)"
            )


def kv_cache_bytes(cfg: ModelConfig, batch: int, seq: int, elem: int) -> int:
    """Bytes of the KV cache ``[L, B, H_kv, S, Dh]`` keys + ``[L, B, H_kv, S, Dv]`` values (MLA: expanded per head)."""
    kv_heads = cfg.n_heads if cfg.attention_type == "mla" else cfg.n_kv_heads or cfg.n_heads
    v_dim = cfg.v_head_dim if cfg.attention_type == "mla" else cfg.attn_head_dim()
    return cfg.n_layers * batch * kv_heads * seq * (cfg.attn_head_dim() + v_dim) * elem


def activation_bytes(cfg: ModelConfig, moe: MoEConfig, batch: int, seq: int, elem: int) -> int:
    """Upper estimate of the activations alive during one forward of ``batch x seq`` tokens.

    Counts, for ``T = batch * seq`` tokens: the residual stream, norms and projections (``12 T d``),
    q/k/v and their rotary copies (``3 T (d + 2 d_kv)``), attention scores of the math SDPA kernel
    (``2 B H S^2``, float32), the MoE gather/scatter rows and the two saved ``[rows, f]``
    pre-activations (``T k (3 d + 2 f)``), router scores (``3 T E``, float32), the dense FFN or shared
    experts' hidden (``3 T max(ffn, f_shared)``), the chunked expert kernel's workspaces (12 MiB) and the
    last-position logits (``2 B V``, float32).
    """
    tokens = batch * seq
    kv_heads = cfg.n_heads if cfg.attention_type == "mla" else cfg.n_kv_heads or cfg.n_heads
    d, kv_dim = cfg.dim, kv_heads * cfg.attn_head_dim()
    hidden = max(cfg.ffn_dim, moe.shared_hidden_dim())
    n = 12 * tokens * d + 3 * tokens * (d + 2 * kv_dim)
    n += tokens * moe.top_k * (3 * d + 2 * moe.expert_dim) + 3 * tokens * hidden
    f32 = 2 * batch * cfg.n_heads * seq * seq + 3 * tokens * moe.num_experts + 2 * batch * cfg.vocab_size
    return n * elem + f32 * 4 + 12 * 2**20


@dataclass
class MemoryPlan:
    """What the device tier will hold (bytes), checked against the budget.

    Attributes:
        mode: ``"none"``, ``"ring"`` or ``"experts"``.
        slots_requested: K (or C) as asked; ``slots``: slots allocated (``min(K, N)`` in ring mode,
            ``min(C, routed experts over all MoE blocks)`` in experts mode).
        slot_bytes: bytes of one slot (ring: the largest section; experts: one expert).
        resident_bytes: weights that stay on the device.
        kv_cache_bytes, activation_bytes: for ``batch`` sequences of ``seq`` tokens.
        streamed_bytes_per_forward: bytes the ring moves per forward pass (0 when all sections fit).
        budget_bytes: the device-memory budget (``None``: unchecked).
    """

    mode: str
    slots_requested: int
    slots: int
    slot_bytes: int
    resident_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    batch: int
    seq: int
    streamed_bytes_per_forward: int
    budget_bytes: int | None
    section_bytes: list[int] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Resident + slots + KV cache + activations."""
        return self.resident_bytes + self.slots * self.slot_bytes + self.kv_cache_bytes + self.activation_bytes

    def describe(self) -> str:
        """One line: the terms of :attr:`total_bytes` and the budget."""
        budget = "unchecked" if self.budget_bytes is None else format_bytes(self.budget_bytes)
        return (
            f"mode={self.mode} resident {format_bytes(self.resident_bytes)} + {self.slots} slots x "
            f"{format_bytes(self.slot_bytes)} + KV cache {format_bytes(self.kv_cache_bytes)} + activations "
            f"{format_bytes(self.activation_bytes)} (batch {self.batch} x {self.seq} tokens) = "
            f"{format_bytes(self.total_bytes)}; budget {budget}"
        )


def make_plan(
    layout: ModelLayout,
    cfg: ModelConfig,
    moe: MoEConfig,
    *,
    mode: str,
    slots: int,
    batch: int,
    seq: int,
    elem: int,
    budget_bytes: int | None = None,
    slot_bytes: int | None = None,
    expert_cache: int | None = None,
) -> MemoryPlan:
    """Build and check the :class:`MemoryPlan`.

    Args:
        layout: resident tensors and sections (:func:`system.inference.sections.split_model`).
        cfg, moe: the model's shape.
        mode: ``"none"``, ``"ring"`` or ``"experts"``.
        slots: K, ring slots (ring mode; clamped to N, since N slots hold every section).
        batch, seq: the largest batch and sequence length (prompt + new tokens) to be run.
        elem: bytes per activation element (the weights' dtype).
        budget_bytes: device-memory budget; ``None`` skips the budget check.
        slot_bytes: fixed slot size (default: the largest section / one expert).
        expert_cache: C, expert slots of the experts mode (clamped, with a logged warning, to the
            number of routed experts over all MoE blocks, since that many slots hold every expert).

    Raises:
        PlanError: unknown mode; K < 1; C < 1; a section larger than a slot; the budget below the
            plan's total (every term named, in bytes).
    """
    if mode not in MODES:
        raise PlanError(f"offload must be one of {', '.join(MODES)}, got {mode!r}")
    n = len(layout.sections)
    kv = kv_cache_bytes(cfg, batch, seq, elem)
    act = activation_bytes(cfg, moe, batch, seq, elem)
    sizes = [s.nbytes for s in layout.sections]
    if mode == "none":
        plan = MemoryPlan(mode, 0, 0, 0, layout.resident_bytes + sum(sizes), kv, act, batch, seq, 0, budget_bytes, sizes)
    elif mode == "ring":
        if slots < 1:
            raise PlanError(f"the ring needs at least one slot: slots (K) = {slots}")
        size = layout.max_section_bytes if slot_bytes is None else slot_bytes
        for s in layout.sections:
            if s.nbytes > size:
                biggest = max(s.tensors, key=lambda t: t.nbytes)
                raise PlanError(
                    f"section {s.index} ({s.kind} FFN of layer {s.index}, {s.nbytes} B; largest tensor "
                    f"{biggest.name!r} {list(biggest.shape)} {biggest.nbytes} B) is larger than a slot of {size} B"
                )
        used = min(slots, n)
        streamed = 0 if used >= n else sum(sizes)
        plan = MemoryPlan(mode, slots, used, size, layout.resident_bytes, kv, act, batch, seq, streamed,
                          budget_bytes, sizes)
    else:
        if expert_cache is None or expert_cache < 1:
            raise PlanError(f"the experts mode needs at least one expert slot: expert_cache (C) = {expert_cache}")
        per_expert = 0
        dense = 0
        for s in layout.sections:
            routed = [t for t in s.tensors if ".moe.experts." in t.name]
            dense += sum(t.nbytes for t in s.tensors if t not in routed)
            if routed:  # one expert's tensors, each at an ALIGN-aligned offset (expert_cache.expert_slot_layout)
                offset = end = 0
                for t in routed:
                    end = offset + t.nbytes // t.shape[0]
                    offset = align_up(end)
                per_expert = max(per_expert, end)
        size = per_expert if slot_bytes is None else slot_bytes
        if per_expert > size:
            raise PlanError(f"one expert ({per_expert} B) is larger than an expert slot of {size} B")
        used = expert_cache
        moe_blocks = [next(t.shape[0] for t in s.tensors if ".moe.experts." in t.name)
                      for s in layout.sections if any(".moe.experts." in t.name for t in s.tensors)]
        total = sum(moe_blocks)
        if 0 < total < expert_cache:  # C slots hold every (block, expert) pair: more would stay empty
            used = total
            logger.warning("expert_cache (C) = %d exceeds the %d routed experts of the model (%d MoE blocks); "
                           "using %d expert slots", expert_cache, total, len(moe_blocks), total)
        plan = MemoryPlan(mode, expert_cache, used, size, layout.resident_bytes + dense, kv, act,
                          batch, seq, 0, budget_bytes, sizes)
    if budget_bytes is not None and plan.total_bytes > budget_bytes:
        raise PlanError(f"device memory budget {format_bytes(budget_bytes)} is below the plan: {plan.describe()}")
    return plan
