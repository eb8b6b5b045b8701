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
instead where it has a fused kernel (:func:`system.moe.experts.grouped_matmul`); elsewhere on a GPU
this kernel runs with one chunk per group (``chunk_bytes=None``, :func:`chunk_bytes_for`): the cache
argument is a CPU one, and a GPU wants few large GEMMs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_BYTES = 4 << 20
"""Target size of one ``[rows, f]`` intermediate (bytes)."""


def chunk_bytes_for(device: torch.device) -> int | None:
    """The chunk size the experts use on ``device``: :data:`DEFAULT_CHUNK_BYTES` on CPU (cache-sized
    intermediates), ``None`` (one chunk per expert: one GEMM per expert and projection) elsewhere."""
    return DEFAULT_CHUNK_BYTES if device.type == "cpu" else None


def _chunk_rows(chunk_bytes: int | None, width: int, rows: torch.Tensor) -> int:
    """Rows per chunk: ``chunk_bytes`` worth of ``[rows, width]`` intermediates, all rows for ``None``."""
    if chunk_bytes is None:
        return max(1, rows.shape[0])
    return max(1, chunk_bytes // (width * rows.element_size()))


def _chunks(counts: list[int], chunk_rows: int):
    """Yield ``(group, start, stop)`` row ranges: each group's rows split into chunks of <= chunk_rows."""
    start = 0
    for g, n in enumerate(counts):
        stop_g = start + n
        while start < stop_g:
            stop = min(start + chunk_rows, stop_g)
            yield g, start, stop
            start = stop


def _forward(x, w1, w2, w3, counts: list[int], chunk_rows: int):
    """Outputs ``[M, d]`` and the per-chunk pre-activations ``a = x W1``, ``b = x W3`` (saved for backward)."""
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
    return y, saved_a, saved_b


def _backward(dy, x, w1, w2, w3, saved_a, saved_b, counts: list[int], chunk_rows: int, dw1, dw2, dw3):
    """Input gradient ``[M, d]``; weight gradients accumulated into ``dw1``/``dw2``/``dw3`` (zeroed by the caller)."""
    dy = dy.contiguous()
    dx = torch.empty_like(x)
    ws = x.new_empty(4, min(chunk_rows, x.shape[0]), w1.shape[-1])
    for i, (g, s, e) in enumerate(_chunks(counts, chunk_rows)):
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
    return dx


class _SwiGLUExperts(torch.autograd.Function):
    """Forward/backward of :func:`swiglu_experts`; temporaries live in per-call chunk workspaces."""

    @staticmethod
    def forward(ctx, x, w1, w2, w3, counts: list[int], chunk_rows: int):  # noqa: D102
        y, saved_a, saved_b = _forward(x, w1, w2, w3, counts, chunk_rows)
        ctx.save_for_backward(x, w1, w2, w3, *saved_a, *saved_b)
        ctx.counts, ctx.chunk_rows, ctx.n = counts, chunk_rows, len(saved_a)
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, w1, w2, w3, *ab = ctx.saved_tensors
        dw1, dw2, dw3 = torch.zeros_like(w1), torch.zeros_like(w2), torch.zeros_like(w3)
        dx = _backward(dy, x, w1, w2, w3, ab[: ctx.n], ab[ctx.n :], ctx.counts, ctx.chunk_rows, dw1, dw2, dw3)
        return dx, dw1, dw2, dw3, None, None


def unflatten_experts(rows: torch.Tensor, dim: int, hidden_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[n, 3*d*f]`` flat expert rows -> views ``w1 [n, d, f]``, ``w2 [n, f, d]``, ``w3 [n, d, f]``."""
    d, f, n = dim, hidden_dim, rows.shape[0]
    return (rows[:, : d * f].view(n, d, f), rows[:, d * f : 2 * d * f].view(n, f, d), rows[:, 2 * d * f :].view(n, d, f))


class _SwiGLUExpertsFlat(torch.autograd.Function):
    """:func:`swiglu_experts` on flat rows ``[n, 3*d*f]``: the weight gradient is one flat tensor,
    written in place (no per-view zero-fill, copy and sum that autograd would do for three views)."""

    @staticmethod
    def forward(ctx, x, rows, dim: int, hidden_dim: int, counts: list[int], chunk_rows: int):  # noqa: D102
        w1, w2, w3 = unflatten_experts(rows, dim, hidden_dim)
        y, saved_a, saved_b = _forward(x, w1, w2, w3, counts, chunk_rows)
        ctx.save_for_backward(x, rows, *saved_a, *saved_b)
        ctx.meta = (dim, hidden_dim, counts, chunk_rows, len(saved_a))
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, rows, *ab = ctx.saved_tensors
        dim, hidden_dim, counts, chunk_rows, n = ctx.meta
        drows = torch.zeros_like(rows, memory_format=torch.contiguous_format)
        dx = _backward(dy, x, *unflatten_experts(rows, dim, hidden_dim), ab[:n], ab[n:], counts, chunk_rows,
                       *unflatten_experts(drows, dim, hidden_dim))
        return dx, drows, None, None, None, None


def swiglu_experts_flat(
    x: torch.Tensor, rows: torch.Tensor, dim: int, hidden_dim: int, counts: torch.Tensor | list[int],
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """:func:`swiglu_experts` with the weights as flat rows ``[G, 3*d*f]`` (``[w1 | w2 | w3]`` per
    expert, the FSSDP buffer layout); the gradient of ``rows`` comes back as one ``[G, 3*d*f]``.

    Raises:
        ValueError: ``counts`` does not match, or ``rows`` is not ``[G, 3*dim*hidden_dim]``.
    """
    counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    if rows.dim() != 2 or rows.shape[1] != 3 * dim * hidden_dim:
        raise ValueError(f"rows must be [G, {3 * dim * hidden_dim}], got {list(rows.shape)}")
    if len(counts) != rows.shape[0] or sum(counts) != x.shape[0]:
        raise ValueError(f"counts {counts} must have {rows.shape[0]} entries summing to the {x.shape[0]} rows of x")
    chunk_rows = _chunk_rows(chunk_bytes, hidden_dim, x)
    return _SwiGLUExpertsFlat.apply(x, rows, dim, hidden_dim, counts, chunk_rows)


def swiglu_experts(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    counts: torch.Tensor | list[int],
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """SwiGLU experts on rows sorted by expert, exact per-group products in row chunks.

    Args:
        x: ``[M, d]`` rows sorted by group.
        w1, w3: ``[G, d, f]``; w2: ``[G, f, d]`` (same dtype and device as ``x``).
        counts: ``[G]`` rows per group (sums to M).
        chunk_bytes: upper bound on the bytes of one ``[rows, f]`` intermediate; ``None``: one chunk
            per group (no upper bound).

    Returns:
        ``[M, d]``. Differentiable with respect to ``x``, ``w1``, ``w2`` and ``w3``; with ``M == 0``
        the output is empty but still connected to the inputs (the weights get zero gradients).

    Raises:
        ValueError: ``counts`` does not sum to ``M`` or has the wrong length.
    """
    counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    if len(counts) != w1.shape[0] or sum(counts) != x.shape[0]:
        raise ValueError(f"counts {counts} must have {w1.shape[0]} entries summing to the {x.shape[0]} rows of x")
    chunk_rows = _chunk_rows(chunk_bytes, w1.shape[-1], x)
    return _SwiGLUExperts.apply(x, w1, w2, w3, counts, chunk_rows)
