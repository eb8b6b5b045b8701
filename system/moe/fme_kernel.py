"""Fused feature modulation ``silu((1 + s_g) * a + t_g [+ e])`` over rows grouped by expert, in row chunks.

The element-wise work of feature-modulated experts (:mod:`system.moe.fme`) on ``[M, f]`` rows is
memory-bound. Written with plain tensor ops it gathers ``s``/``t`` per row (two ``[M, f]`` tensors)
and keeps several ``[M, f]`` intermediates for autograd; on CPU every such tensor of tens of MiB is a
fresh ``mmap`` whose pages fault in on each pass (see :mod:`system.moe.swiglu`). This autograd
function walks each expert's rows in chunks of at most ``chunk_bytes``, broadcasts the expert's
vectors instead of gathering them, writes into preallocated outputs, saves only its inputs, and
recomputes the pre-activation in backward. Exact: the same element-wise arithmetic as
:func:`fme_modulate_reference` up to the rounding of the fused ``addcmul``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from system.moe.dispatch import to_device_async
from system.moe.swiglu import DEFAULT_CHUNK_BYTES, _chunks


def fme_modulate_reference(a: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, counts: torch.Tensor,
                           extra: torch.Tensor | None = None) -> torch.Tensor:
    """Vectorised plain-ops version of :func:`fme_modulate` (per-row gathers of the expert vectors).

    ``counts`` may live on the host: it is uploaded without a host sync, and the row count is passed
    to ``repeat_interleave`` (``output_size``), which would otherwise read the sum back from the device.
    """
    counts_t = to_device_async(torch.as_tensor(counts, dtype=torch.long), a.device)
    expert_of_row = torch.repeat_interleave(torch.arange(counts_t.numel(), device=a.device), counts_t,
                                            output_size=a.shape[0])
    z = a * (1 + scale[expert_of_row]) + shift[expert_of_row]
    return F.silu(z if extra is None else z + extra)


class _FMEModulate(torch.autograd.Function):
    """Forward/backward of :func:`fme_modulate`; temporaries live in per-call chunk workspaces."""

    @staticmethod
    def forward(ctx, a, scale, shift, extra, counts: list[int], chunk_rows: int):  # noqa: D102
        gamma = scale + 1
        out = torch.empty_like(a)
        for g, s, e in _chunks(counts, chunk_rows):
            z = torch.addcmul(shift[g], a[s:e], gamma[g], out=out[s:e])
            if extra is not None:
                z.add_(extra[s:e])
            F.silu(z, inplace=True)
        ctx.save_for_backward(a, gamma, shift, extra)
        ctx.counts, ctx.chunk_rows = counts, chunk_rows
        return out

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        a, gamma, shift, extra = ctx.saved_tensors
        dy = dy.contiguous()
        da = torch.empty_like(a)
        dextra = torch.empty_like(a) if extra is not None else None
        acc = torch.promote_types(a.dtype, torch.float32)  # weight gradients: at least float32 sums
        dgamma = torch.zeros(gamma.shape, dtype=acc, device=a.device)
        dshift = torch.zeros(shift.shape, dtype=acc, device=a.device)
        ws = a.new_empty(3, min(ctx.chunk_rows, a.shape[0]), a.shape[1])
        for g, s, e in _chunks(ctx.counts, ctx.chunk_rows):
            n = e - s
            z = torch.addcmul(shift[g], a[s:e], gamma[g], out=ws[0, :n])
            if extra is not None:
                z.add_(extra[s:e])
            sig = torch.sigmoid(z, out=ws[1, :n])
            # silu'(z) = sig * (1 + z * (1 - sig)) = sig + silu * (1 - sig), silu = z * sig
            dz = torch.mul(z, sig, out=ws[2, :n])
            dz.addcmul_(dz, sig, value=-1.0).add_(sig).mul_(dy[s:e])
            torch.mul(dz, gamma[g], out=da[s:e])
            if dextra is not None:
                dextra[s:e].copy_(dz)
            dshift[g] += dz.sum(0, dtype=acc)
            dgamma[g] += torch.mul(dz, a[s:e], out=ws[0, :n]).sum(0, dtype=acc)
        return da, dgamma.to(gamma.dtype), dshift.to(shift.dtype), dextra, None, None


def fme_modulate(a: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, counts: torch.Tensor | list[int],
                 extra: torch.Tensor | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """``silu((1 + scale[g]) * a + shift[g] (+ extra))`` for the rows of each expert g.

    Args:
        a: ``[M, f]`` rows sorted by expert.
        scale, shift: ``[G, f]`` per-expert vectors.
        counts: ``[G]`` rows per expert (sums to M).
        extra: optional ``[M, f]`` term added before the activation (FME's low-rank map).
        chunk_bytes: upper bound on the bytes of one ``[rows, f]`` chunk.

    Returns:
        ``[M, f]``, differentiable in ``a``, ``scale``, ``shift`` and ``extra``; with ``M == 0``
        empty but still connected to them (zero gradients). Weight gradients are accumulated in
        at least float32.

    Raises:
        ValueError: ``counts`` does not match ``scale`` or does not sum to M.
    """
    counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    if len(counts) != scale.shape[0] or sum(counts) != a.shape[0]:
        raise ValueError(f"counts {counts} must have {scale.shape[0]} entries summing to the {a.shape[0]} rows of a")
    chunk_rows = max(1, chunk_bytes // (a.shape[1] * a.element_size()))
    return _FMEModulate.apply(a, scale, shift, extra, counts, chunk_rows)
