"""A training state (model + AdamW) as shards of parallelism-agnostic global tensors.

ByteCheckpoint (arXiv 2407.20143) sec. 3.1: a checkpoint stores every tensor under one global name
and global shape, and each rank contributes the boxes it holds. This module turns a model
parallelised by :mod:`system.parallel` into that form, whatever the layout:

- dense parameters, replicated: one plain tensor (every rank holds all of it; written once);
- dense parameters under FSDP2 (``DTensor``): this rank's shard and its global offset;
- experts under expert parallelism (any :class:`~system.moe.experts.ExpertModule`: SwiGLU
  ``w1``/``w2``/``w3``, FME ``scale``/``shift``/...): the ``[E_local, ...]`` block at
  ``expert_offset`` on the global expert axis ``[E, ...]`` (data-parallel replicas hold the same
  box; it is written once);
- experts under FSSDP (:class:`~system.parallel.fssdp.layer.FSSDPExperts`): each owned row of
  the flat ``[n_owned, P]`` buffer unflattened, by the expert kind's layout, into one box per
  expert tensor (``w1``/``w2``/``w3`` for SwiGLU).

AdamW moments (``exp_avg``, ``exp_avg_sq``) have the parameter's layout and are described by the
same boxes, so they reshard exactly like the weights. Names: ``model.<fqn>``,
``optim.exp_avg.<fqn>``, ``optim.exp_avg_sq.<fqn>``, where ``<fqn>`` is the single-device model's
parameter name (``layers.0.moe.experts.w1``). The same description serves loading: its shard
tensors are views into the live parameters and optimizer state, filled in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from system.checkpoint.sharding import Shard, ShardedEntry
from system.parallel.layout import FSSDPRows, dtensor_box, has_layout, named_layouts, single_process_layout

MOMENTS = ("exp_avg", "exp_avg_sq")

Slicer = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Piece:
    """One global tensor that (part of) a local parameter contributes to.

    Attributes:
        name: global name (the single-device fqn).
        global_shape: its shape in the single-device model.
        boxes: ``(slicer, offsets)``: ``slicer(local)`` is the view of a tensor laid out like the
            local parameter (the parameter or one of its AdamW moments) holding the box at
            ``offsets``. ``None`` means replicated: the whole local tensor is the global tensor.
    """

    name: str
    global_shape: tuple[int, ...]
    boxes: list[tuple[Slicer, tuple[int, ...]]] | None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _dtensor_pieces(name: str, p: DTensor) -> list[Piece]:
    shape, offset = dtensor_box(p)
    if any(s == 0 for s in shape) and p.dim() > 0:
        return [Piece(name, tuple(p.shape), [])]
    return [Piece(name, tuple(p.shape), [(lambda t: _local(t), tuple(offset))])]


def _fssdp_pieces(prefix: str, rows: FSSDPRows) -> list[Piece]:
    owned = rows.owned()
    pieces, start = [], 0
    for wname, shape in rows.layout:
        width = math.prod(shape)
        boxes = []
        for row, expert in enumerate(owned):
            def slicer(t, row=row, start=start, width=width, shape=shape):
                return _local(t)[row, start : start + width].view(1, *shape)
            boxes.append((slicer, (int(expert),) + (0,) * len(shape)))
        pieces.append(Piece(f"{prefix}.{wname}", (rows.num_experts, *shape), boxes))
        start += width
    return pieces


def parameter_pieces(model: nn.Module) -> list[tuple[nn.Parameter, list[Piece]]]:
    """Every trainable parameter of ``model`` with the global tensors it holds boxes of, read from its layout
    record (:class:`~system.parallel.layout.ParamLayout`; a model never parallelised is recorded as held
    whole first).

    Returns:
        ``(parameter, pieces)`` in ``model.named_parameters()`` order.
    """
    if not all(has_layout(p) for p in model.parameters()):
        single_process_layout(model)
    out = []
    for name, p, lay in named_layouts(model):
        if lay.rows is not None:
            out.append((p, _fssdp_pieces(name.rpartition(".")[0], lay.rows)))
        elif isinstance(p, DTensor):
            out.append((p, _dtensor_pieces(name, p)))
        elif lay.offsets is None or tuple(p.shape) == tuple(lay.global_shape):  # held whole
            out.append((p, [Piece(name, tuple(p.shape), None)]))
        else:
            out.append((p, [Piece(name, lay.global_shape, [(lambda t: _local(t), lay.offsets)])]))
    return out


def _entries(prefix: str, tensor: torch.Tensor, pieces: list[Piece], out: dict) -> None:
    for piece in pieces:
        key = f"{prefix}{piece.name}"
        if piece.boxes is None:
            out[key] = _local(tensor).detach()
        else:
            shards = [Shard(slicer(tensor.detach()), offsets) for slicer, offsets in piece.boxes]
            out[key] = ShardedEntry(piece.global_shape, shards)


def ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's lazily-built state (``step`` 0, zero moments) for every parameter lacking it.

    After this, :func:`sharded_train_state` describes the moments even before the first step, so a
    checkpoint can be loaded into a freshly built optimizer (AdamW then continues from the loaded
    state: it only initialises state that is missing).
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                for k in MOMENTS:
                    state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)


def sharded_train_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """The model's parameters and persistent buffers, and AdamW's moments, as checkpoint entries.

    Args:
        model: a model parallelised by :func:`system.models.parallelize.parallelize_model` (or not).
        optimizer: its AdamW (``None``: model only). Missing state is created first
            (:func:`ensure_optimizer_state`).

    Returns:
        ``{name: ShardedEntry | Tensor}`` whose tensors are views of the live state (so
        :func:`system.checkpoint.load` fills it in place); plain tensors are replicated.
    """
    out: dict = {}
    pieces = parameter_pieces(model)
    for p, ps in pieces:
        _entries("model.", p, ps, out)
    for name, buf in model.named_buffers():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if leaf not in module._non_persistent_buffers_set:
            out[f"model.{name}"] = _local(buf).detach()
    if optimizer is not None:
        ensure_optimizer_state(optimizer)
        for p, ps in pieces:
            state = optimizer.state[p]
            for k in MOMENTS:
                _entries(f"optim.{k}.", state[k], ps, out)
    return out


def optimizer_extra(optimizer: torch.optim.Optimizer) -> dict:
    """JSON-able AdamW state that is not a tensor: the step count and each group's hyper-parameters.

    Raises:
        ValueError: parameters at different step counts (the trainer steps all of them together).
    """
    ensure_optimizer_state(optimizer)
    steps = {float(optimizer.state[p]["step"]) for g in optimizer.param_groups for p in g["params"]}
    if len(steps) > 1:
        raise ValueError(f"AdamW parameters are at different step counts {sorted(steps)}")
    groups = [{k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, bool, tuple, list, str))}
              for g in optimizer.param_groups]
    return {"step": steps.pop() if steps else 0.0, "param_groups": groups}


def load_optimizer_extra(optimizer: torch.optim.Optimizer, extra: dict) -> None:
    """Restore :func:`optimizer_extra` (step count and group hyper-parameters such as ``lr``).

    Raises:
        ValueError: a different number of parameter groups.
    """
    ensure_optimizer_state(optimizer)
    groups = extra["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"checkpoint has {len(groups)} optimizer parameter groups, the optimizer {len(optimizer.param_groups)}")
    for group, saved in zip(optimizer.param_groups, groups):
        for k, v in saved.items():
            group[k] = tuple(v) if isinstance(group.get(k), tuple) else v
        for p in group["params"]:
            optimizer.state[p]["step"].fill_(float(extra["step"]))
