"""Fused SwiGLU experts over rows grouped by expert, computed in cache-sized row chunks.

``y_g = (silu(x_g W1[g]) * (x_g W3[g])) W2[g]`` for every group g of rows. The forward and the
backward are one autograd function that walks each expert's rows in chunks of at most
``chunk_rows`` and writes straight into preallocated outputs (``torch.mm(..., out=)`` /
``addmm_``). It saves only the input rows and the two ``[rows, f]`` pre-activations per chunk.

Why: on CPU a single grouped matmul over all rows materialises several ``[M, f]`` intermediates of
tens of MiB per step; glibc serves allocations that large with fresh ``mmap`` pages, so every
elementwise pass pays page faults and cache misses (measured: the SwiGLU elementwise ops took 12x
longer than on 4 MiB chunks, see ``benchmarks/results/moe_layer_cpu_profiled.md``). Chunks small
enough to stay in the allocator's heap and in cache remove that cost; the matmuls are the same
(exact per-group products, no padding). On CUDA the single ``torch._grouped_mm`` kernel is used
instead (:func:`system.moe.experts.grouped_matmul`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_BYTES = 4 << 20
"""Target size of one ``[rows, f]`` intermediate (bytes)."""


def _chunks(counts: list[int], chunk_rows: int):
    """Yield ``(group, start, stop)`` row ranges: each group's rows split into chunks of <= chunk_rows."""
    start = 0
    for g, n in enumerate(counts):
        stop_g = start + n
        while start < stop_g:
            stop = min(start + chunk_rows, stop_g)
            yield g, start, stop
            start = stop


class _SwiGLUExperts(torch.autograd.Function):
    """Forward/backward of :func:`swiglu_experts`; temporaries live in per-call chunk workspaces."""

    @staticmethod
    def forward(ctx, x, w1, w2, w3, counts: list[int], chunk_rows: int):  # noqa: D102
        y = x.new_empty(x.shape[0], w2.shape[-1])
        ws = x.new_empty(min(chunk_rows, x.shape[0]), w1.shape[-1])
        saved_a, saved_b = [], []
        for g, s, e in _chunks(counts, chunk_rows):
            xc = x[s:e]
            a = torch.mm(xc, w1[g])
            b = torch.mm(xc, w3[g])
            h = torch.sigmoid(a, out=ws[: e - s]).mul_(a).mul_(b)  # silu(a) * b
            torch.mm(h, w2[g], out=y[s:e])
            saved_a.append(a)
            saved_b.append(b)
        ctx.save_for_backward(x, w1, w2, w3, *saved_a, *saved_b)
        ctx.counts, ctx.chunk_rows, ctx.n = counts, chunk_rows, len(saved_a)
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, w1, w2, w3, *ab = ctx.saved_tensors
        saved_a, saved_b = ab[: ctx.n], ab[ctx.n :]
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        dw1, dw2, dw3 = torch.zeros_like(w1), torch.zeros_like(w2), torch.zeros_like(w3)
        ws = x.new_empty(4, min(ctx.chunk_rows, x.shape[0]), w1.shape[-1])
        for i, (g, s, e) in enumerate(_chunks(ctx.counts, ctx.chunk_rows)):
            a, b, r = saved_a[i], saved_b[i], e - s
            xc, dyc = x[s:e], dy[s:e]
            sig = torch.sigmoid(a, out=ws[0, :r])
            silu = torch.mul(a, sig, out=ws[1, :r])
            h = torch.mul(silu, b, out=ws[2, :r])
            dw2[g].addmm_(h.t(), dyc)
            dh = torch.mm(dyc, w2[g].t(), out=ws[2, :r])
            db = torch.mul(dh, silu, out=ws[3, :r])
            # silu'(a) = sig * (1 + a * (1 - sig)) = sig + silu * (1 - sig)
            dsilu = silu.addcmul_(silu, sig, value=-1.0).add_(sig)
            da = dh.mul_(b).mul_(dsilu)
            dw1[g].addmm_(xc.t(), da)
            dw3[g].addmm_(xc.t(), db)
            torch.mm(da, w1[g].t(), out=dx[s:e])
            dx[s:e].addmm_(db, w3[g].t())
        return dx, dw1, dw2, dw3, None, None


def swiglu_experts(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    counts: torch.Tensor | list[int],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """SwiGLU experts on rows sorted by expert, exact per-group products in row chunks.

    Args:
        x: ``[M, d]`` rows sorted by group.
        w1, w3: ``[G, d, f]``; w2: ``[G, f, d]`` (same dtype and device as ``x``).
        counts: ``[G]`` rows per group (sums to M).
        chunk_bytes: upper bound on the bytes of one ``[rows, f]`` intermediate.

    Returns:
        ``[M, d]``. Differentiable with respect to ``x``, ``w1``, ``w2`` and ``w3``; with ``M == 0``
        the output is empty but still connected to the inputs (the weights get zero gradients).

    Raises:
        ValueError: ``counts`` does not sum to ``M`` or has the wrong length.
    """
    counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    if len(counts) != w1.shape[0] or sum(counts) != x.shape[0]:
        raise ValueError(f"counts {counts} must have {w1.shape[0]} entries summing to the {x.shape[0]} rows of x")
    chunk_rows = max(1, chunk_bytes // (w1.shape[-1] * x.element_size()))
    return _SwiGLUExperts.apply(x, w1, w2, w3, counts, chunk_rows)
