"""Single-process tests of ``system.moe``: router, losses, grouped matmul, experts, MoE layer, capacity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from system.config import MoEConfig
from system.moe import GroupedExperts, MoELayer, TopKRouter, grouped_matmul, load_balancing_loss, router_z_loss
from system.moe.dispatch import _segment_gather_index

RTOL, ATOL = 1e-5, 1e-6
DIM, HIDDEN = 8, 16  # multiples of 4: torch._grouped_mm needs 16-byte strides in fp32


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------
# router


def _router(num_experts=6, top_k=2, score_func="softmax", norm=True, seed=0) -> TopKRouter:
    torch.manual_seed(seed)
    r = TopKRouter(DIM, num_experts, top_k, score_func, norm)
    torch.nn.init.normal_(r.gate.weight, std=1.0)
    return r


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_router_topk_and_normalisation(score_func: str, top_k: int) -> None:
    r = _router(top_k=top_k, score_func=score_func)
    x = torch.randn(20, DIM)
    out = r(x)
    logits = x @ r.gate.weight.t()
    _close(out.logits, logits)
    scores = torch.softmax(logits, -1) if score_func == "softmax" else torch.sigmoid(logits)
    _close(out.scores, scores)
    if score_func == "softmax":
        _close(out.scores.sum(-1), torch.ones(20))
    assert out.indices.shape == (20, top_k) and out.indices.dtype == torch.int64
    assert out.weights.shape == (20, top_k) and out.weights.dtype == torch.float32
    assert (out.weights >= 0).all()
    # indices are the top-k of the scores: every chosen score >= every unchosen score, no repeats
    chosen = torch.zeros(20, 6, dtype=torch.bool).scatter_(1, out.indices, True)
    assert (chosen.sum(-1) == top_k).all()
    min_chosen = scores.masked_fill(~chosen, math.inf).min(-1).values
    max_other = scores.masked_fill(chosen, -math.inf).max(-1).values
    assert (min_chosen >= max_other).all()
    picked = scores.gather(1, out.indices)
    if top_k > 1:
        _close(out.weights.sum(-1), torch.ones(20))
        _close(out.weights, picked / picked.sum(-1, keepdim=True))
    else:  # a single weight is not renormalised (it would be 1 and carry no router gradient)
        _close(out.weights, picked)


def test_router_without_norm_returns_raw_scores() -> None:
    r = _router(top_k=3, norm=False, score_func="sigmoid")
    x = torch.randn(10, DIM)
    out = r(x)
    _close(out.weights, torch.sigmoid(x @ r.gate.weight.t()).gather(1, out.indices))
    assert not torch.allclose(out.weights.sum(-1), torch.ones(10))


def test_router_computes_in_fp32() -> None:
    r = _router()
    out = r(torch.randn(4, DIM, dtype=torch.bfloat16))
    assert out.logits.dtype == out.scores.dtype == out.weights.dtype == torch.float32


def test_router_bad_score_func() -> None:
    with pytest.raises(ValueError, match="score_func"):
        TopKRouter(DIM, 4, 2, "relu")


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_forced_indices(score_func: str) -> None:
    r = _router(num_experts=5, top_k=2, score_func=score_func)
    x = torch.randn(7, DIM)
    forced = torch.tensor([[4, 0], [1, 2], [3, 3], [0, 1], [2, 4], [4, 3], [1, 0]])
    r.forced_indices = forced.to(torch.int32)  # any integer dtype, converted to int64
    out = r(x)
    assert out.indices.dtype == torch.int64
    assert torch.equal(out.indices, forced)
    picked = out.scores.gather(1, forced)
    _close(out.weights, picked / picked.sum(-1, keepdim=True))
    # gradients reach the router weights through the forced experts' scores
    out.weights[:, 0].sum().backward()
    assert r.gate.weight.grad is not None and r.gate.weight.grad.abs().sum() > 0
    # clearing it restores the learned choice
    r.forced_indices = None
    assert torch.equal(r(x).indices, torch.topk(r(x).scores, 2, dim=-1).indices)


@pytest.mark.parametrize("shape", [(7, 1), (6, 2), (7, 3), (14,)])
def test_forced_indices_wrong_shape(shape: tuple[int, ...]) -> None:
    r = _router(num_experts=5, top_k=2)
    r.forced_indices = torch.zeros(shape, dtype=torch.int64)
    with pytest.raises(ValueError, match="forced_indices"):
        r(torch.randn(7, DIM))


# ------------------------------------------------------------------------------------------
# auxiliary losses


@pytest.mark.parametrize(("num_experts", "top_k"), [(4, 1), (8, 2), (6, 3)])
def test_load_balancing_loss_uniform_is_one(num_experts: int, top_k: int) -> None:
    tokens = num_experts * 5
    scores = torch.full((tokens, num_experts), 1.0 / num_experts)
    counts = torch.full((num_experts,), tokens * top_k / num_experts)
    loss = load_balancing_loss(scores, counts, tokens, top_k)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(1.0, rel=1e-6)


def test_load_balancing_loss_grows_with_imbalance() -> None:
    num_experts, tokens, top_k = 4, 40, 1
    values = []
    for alpha in (0.0, 0.3, 0.6, 0.9, 1.0):  # mix uniform with "all on expert 0"
        p = (1 - alpha) * torch.full((num_experts,), 1 / num_experts) + alpha * torch.eye(num_experts)[0]
        scores = p.expand(tokens, num_experts).clone()
        counts = p * tokens * top_k
        values.append(load_balancing_loss(scores, counts, tokens, top_k).item())
    assert values[0] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(num_experts)  # fully collapsed: E


def test_load_balancing_loss_hand_value_and_gradient() -> None:
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], requires_grad=True)
    counts = torch.tensor([1.0, 2.0, 1.0])  # top_k = 2 over 2 tokens
    loss = load_balancing_loss(scores, counts, 2, 2)
    f = counts / 4
    p = scores.detach().mean(0)
    assert loss.item() == pytest.approx(3 * float((f * p).sum()), rel=1e-6)
    loss.backward()
    _close(scores.grad, (3 * f / 2).expand(2, 3))  # counts carry no gradient


def test_router_z_loss_hand_computation() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 5.0, 0.5]])
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 3
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    assert router_z_loss(logits.to(torch.bfloat16)).dtype == torch.float32


# ------------------------------------------------------------------------------------------
# grouped matmul and experts


@pytest.mark.parametrize(
    "counts",
    [[3, 1, 4, 2], [0, 5, 0, 5], [10, 0, 0, 0], [0, 0, 0, 10], [2, 0, 0, 8], [1, 1, 1, 7]],
)
def test_grouped_matmul_grouped_equals_loop(counts: list[int]) -> None:
    torch.manual_seed(1)
    m = sum(counts)
    x0 = torch.randn(m, DIM)
    w0 = torch.randn(len(counts), DIM, HIDDEN)
    g = torch.randn(m, HIDDEN)
    results = []
    for use in (True, False):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = grouped_matmul(x, w, torch.tensor(counts), use)
        (y * g).sum().backward()
        results.append((y.detach(), x.grad, w.grad))
    for a, b in zip(*results):
        _close(a, b)
    # and both equal the definition
    y_ref = torch.cat([c @ w0[i] for i, c in enumerate(x0.split(counts))])
    _close(results[0][0], y_ref)
    # experts without rows get exactly zero gradient
    for i, c in enumerate(counts):
        if c == 0:
            assert results[0][2][i].abs().max() == 0


def test_grouped_matmul_plain_sum_backward() -> None:
    """``.sum()`` gives an expanded (stride-0) gradient; the grouped path must accept it."""
    x = torch.randn(6, DIM, requires_grad=True)
    w = torch.randn(3, DIM, HIDDEN, requires_grad=True)
    grouped_matmul(x, w, torch.tensor([2, 0, 4]), True).sum().backward()
    _close(x.grad, torch.cat([w[0].sum(1).expand(2, DIM), w[2].sum(1).expand(4, DIM)]).detach())


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_grouped_experts_zero_rows(mode: str) -> None:
    torch.manual_seed(0)
    ex = GroupedExperts(4, DIM, HIDDEN, grouped_mm=mode)
    ex.init_weights(0.1, 0.1)
    x = torch.zeros(0, DIM, requires_grad=True)
    y = ex(x, torch.zeros(4, dtype=torch.int64))
    assert y.shape == (0, DIM)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, DIM)
    for p in (ex.w1, ex.w2, ex.w3):
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.abs().max() == 0


def _swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ w1) * (x @ w3)) @ w2


@pytest.mark.parametrize("mode", ["on", "off"])
def test_grouped_experts_equals_per_expert_swiglu(mode: str) -> None:
    torch.manual_seed(0)
    ex = GroupedExperts(3, DIM, HIDDEN, grouped_mm=mode, num_global_experts=6, expert_offset=3)
    ex.init_weights(0.3, 0.3)
    assert ex.num_local_experts == 3 and ex.num_global_experts == 6 and ex.expert_offset == 3
    counts = [2, 0, 5]
    x = torch.randn(7, DIM)
    y = ex(x, torch.tensor(counts))
    ref = torch.cat([_swiglu(c, ex.w1[e], ex.w2[e], ex.w3[e]) for e, c in enumerate(x.split(counts))])
    _close(y, ref)


def test_grouped_experts_on_unsupported_dtype_raises() -> None:
    ex = GroupedExperts(2, DIM, HIDDEN, grouped_mm="on").double()
    with pytest.raises(RuntimeError, match="grouped_mm"):
        ex(torch.randn(3, DIM, dtype=torch.float64), torch.tensor([1, 2]))


# ------------------------------------------------------------------------------------------
# MoE layer against a naive per-token reference


def _layer(seed: int = 0, **kw) -> MoELayer:
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_dim": HIDDEN, **kw})
    torch.manual_seed(seed)
    layer = MoELayer(DIM, cfg)
    layer.init_weights(0.5, 0.3)
    return layer


def _reference(layer: MoELayer, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Loop over tokens; for each kept (token, choice) run that expert's SwiGLU and sum weighted."""
    d = x.shape[-1]
    xf = x.reshape(-1, d)
    k = layer.top_k
    r = layer.router
    logits = xf @ r.gate.weight.t()
    scores = torch.softmax(logits, -1) if r.score_func == "softmax" else torch.sigmoid(logits)
    if r.forced_indices is not None:
        idx = r.forced_indices.long()
    else:
        idx = torch.topk(scores.detach(), k, dim=-1).indices
    w = scores.gather(1, idx)
    if r.norm_topk_prob and k > 1:
        w = w / w.sum(-1, keepdim=True)
    ex = layer.experts
    rows = []
    for t in range(xf.shape[0]):
        acc = torch.zeros(d)
        for j in range(k):
            if keep is not None and not bool(keep[t * k + j]):
                continue
            e = int(idx[t, j])
            acc = acc + w[t, j] * _swiglu(xf[t], ex.w1[e], ex.w2[e], ex.w3[e])
        if layer.shared_experts is not None:
            s = layer.shared_experts
            acc = acc + s.w2(F.silu(s.w1(xf[t])) * s.w3(xf[t]))
        rows.append(acc)
    return torch.stack(rows).view(x.shape)


def _compare_with_reference(layer: MoELayer, x0: torch.Tensor, keep: torch.Tensor | None = None) -> MoELayer:
    g = torch.randn(x0.shape)
    x = x0.clone().requires_grad_()
    y = layer(x)
    assert y.shape == x0.shape and y.dtype == x0.dtype
    (y * g).sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    got_x = x.grad.clone()
    layer.zero_grad(set_to_none=True)

    xr = x0.clone().requires_grad_()
    yr = _reference(layer, xr, keep)
    (yr * g).sum().backward()
    _close(y.detach(), yr.detach())
    _close(got_x, xr.grad)
    for n, p in layer.named_parameters():
        _close(got[n], p.grad, atol=1e-6)
    return layer


@pytest.mark.parametrize("mode", ["on", "off"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"num_shared_experts": 2},
        {"score_func": "sigmoid"},
        {"score_func": "sigmoid", "norm_topk_prob": False, "top_k": 3},
        {"top_k": 1},
        {"num_experts": 6, "top_k": 4, "num_shared_experts": 1},
    ],
    ids=["dropless", "shared", "sigmoid", "sigmoid-nonorm-k3", "top1", "e6k4-shared"],
)
def test_moe_layer_matches_reference(mode: str, kw: dict) -> None:
    layer = _layer(grouped_mm=mode, **kw)
    torch.manual_seed(1)
    x0 = torch.randn(2, 6, DIM)
    _compare_with_reference(layer, x0)
    st = layer.last_stats
    assert st.dropped == 0 and st.assignments == 12 * layer.top_k
    assert st.tokens_per_expert.sum().item() == 12 * layer.top_k
    idx = layer.router(x0.reshape(-1, DIM)).indices
    assert torch.equal(st.tokens_per_expert, torch.bincount(idx.flatten(), minlength=layer.num_experts).float())


def test_moe_layer_stats_losses() -> None:
    layer = _layer(num_experts=4, top_k=2)
    x = torch.randn(3, 5, DIM)
    layer(x)
    route = layer.router(x.reshape(-1, DIM))
    counts = torch.bincount(route.indices.flatten(), minlength=4).float()
    _close(layer.last_stats.aux_loss, load_balancing_loss(route.scores, counts, 15, 2))
    _close(layer.last_stats.z_loss, router_z_loss(route.logits))
    assert layer.last_stats.aux_loss.requires_grad and layer.last_stats.z_loss.requires_grad


def test_moe_layer_idle_expert_and_single_expert() -> None:
    """Forced routing: all tokens on experts 0/1 (experts 2, 3 idle) matches the reference."""
    layer = _layer()
    torch.manual_seed(2)
    t = 10
    forced = torch.stack([torch.zeros(t, dtype=torch.long), torch.ones(t, dtype=torch.long)], 1)
    layer.router.forced_indices = forced
    _compare_with_reference(layer, torch.randn(1, t, DIM))
    assert torch.equal(layer.last_stats.tokens_per_expert, torch.tensor([10.0, 10.0, 0.0, 0.0]))


# ------------------------------------------------------------------------------------------
# capacity mode


def _naive_capacity_keep(indices: torch.Tensor, num_experts: int, cf: float, groups: int) -> torch.Tensor:
    """GShard priority: per group, all first choices in token order, then all second choices, ..."""
    tokens, k = indices.shape
    tg = tokens // groups
    cap = math.ceil(cf * tg * k / num_experts)
    keep = [False] * (tokens * k)
    for g in range(groups):
        fill = [0] * num_experts
        for j in range(k):
            for t in range(g * tg, (g + 1) * tg):
                e = int(indices[t, j])
                if fill[e] < cap:
                    fill[e] += 1
                    keep[t * k + j] = True
    return torch.tensor(keep)


def _skewed_indices(tokens: int, num_experts: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0, 0.0][:num_experts] + [0.05] * max(0, num_experts - 6))
    probs = probs + 0.01
    return torch.multinomial(probs.expand(tokens, num_experts), k, replacement=False, generator=gen)


def test_capacity_mask_hand_case_first_choices_before_second() -> None:
    layer = _layer(num_experts=2, top_k=2, capacity_factor=0.5)  # capacity ceil(0.5*4*2/2) = 2
    idx = torch.tensor([[0, 1], [1, 0], [0, 1], [0, 1]])
    keep = layer._capacity_mask(idx)
    # expert 0: first choices of tokens 0, 2 fit, token 3 and the second choice of token 1 drop;
    # expert 1: first choice of token 1, then the second choice of token 0 fit.
    expected = torch.tensor([True, True, True, False, True, False, False, False])
    assert torch.equal(keep, expected)
    assert torch.equal(keep, _naive_capacity_keep(idx, 2, 0.5, 1))


@pytest.mark.parametrize(
    ("tokens", "num_experts", "k", "cf", "groups"),
    [(16, 4, 2, 1.0, 1), (16, 4, 2, 1.0, 2), (24, 4, 1, 1.25, 3), (20, 6, 3, 0.5, 1), (32, 4, 2, 0.7, 4),
     (12, 4, 2, 10.0, 1)],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_capacity_mask_matches_naive(tokens: int, num_experts: int, k: int, cf: float, groups: int, seed: int) -> None:
    layer = _layer(num_experts=num_experts, top_k=k, capacity_factor=cf)
    layer.capacity_groups = groups
    idx = _skewed_indices(tokens, num_experts, k, seed)
    keep = layer._capacity_mask(idx)
    assert keep.dtype == torch.bool and keep.shape == (tokens * k,)
    assert torch.equal(keep, _naive_capacity_keep(idx, num_experts, cf, groups))


@pytest.mark.parametrize("mode", ["on", "off"])
@pytest.mark.parametrize(("cf", "groups"), [(1.0, 1), (1.0, 2), (0.5, 4)])
def test_capacity_drops_contribute_nothing(mode: str, cf: float, groups: int) -> None:
    layer = _layer(grouped_mm=mode, capacity_factor=cf, num_shared_experts=1)
    layer.capacity_groups = groups
    tokens = 16
    idx = _skewed_indices(tokens, 4, 2, seed=3)
    layer.router.forced_indices = idx
    keep = _naive_capacity_keep(idx, 4, cf, groups)
    assert (~keep).sum() > 0, "the case must drop something"
    torch.manual_seed(4)
    _compare_with_reference(layer, torch.randn(2, 8, DIM), keep=keep)
    st = layer.last_stats
    assert st.dropped == int((~keep).sum())
    assert st.assignments == tokens * 2
    # routing statistics count all assignments, dropped ones included
    assert torch.equal(st.tokens_per_expert, torch.bincount(idx.flatten(), minlength=4).float())


def test_capacity_large_factor_equals_dropless() -> None:
    layer = _layer(capacity_factor=100.0)
    torch.manual_seed(5)
    x = torch.randn(2, 5, DIM)
    y = layer(x)
    assert layer.last_stats.dropped == 0
    layer.capacity_factor = 0.0
    _close(y, layer(x))


def test_capacity_groups_must_divide_tokens() -> None:
    layer = _layer(capacity_factor=1.0)
    layer.capacity_groups = 3
    with pytest.raises(ValueError, match="capacity_groups"):
        layer(torch.randn(2, 4, DIM))  # 8 tokens
    with pytest.raises(ValueError, match="capacity_groups"):
        layer._capacity_mask(torch.zeros(8, 2, dtype=torch.long))


# ------------------------------------------------------------------------------------------
# dispatch helper


@pytest.mark.parametrize(
    ("starts", "sizes", "expected"),
    [
        ([0], [3], [0, 1, 2]),
        ([5, 0, 2], [2, 0, 3], [5, 6, 2, 3, 4]),
        ([4, 1], [0, 0], []),
        ([], [], []),
        ([7, 3, 9, 0], [0, 1, 0, 2], [3, 0, 1]),
        ([2, 0], [3, 2], [2, 3, 4, 0, 1]),
    ],
)
def test_segment_gather_index(starts: list[int], sizes: list[int], expected: list[int]) -> None:
    out = _segment_gather_index(torch.tensor(starts, dtype=torch.long), torch.tensor(sizes, dtype=torch.long))
    assert out.dtype == torch.long
    assert out.tolist() == expected


def test_segment_gather_index_random() -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(0, 4, (12,), generator=gen)
    starts = torch.randint(0, 50, (12,), generator=gen)
    expected = [s + i for s, n in zip(starts.tolist(), sizes.tolist()) for i in range(n)]
    assert _segment_gather_index(starts, sizes).tolist() == expected


@pytest.mark.parametrize("counts", [[5, 0, 70, 3], [0, 0, 0, 0], [1, 1, 1, 1], [0, 33, 0, 0]])
def test_chunked_swiglu_kernel_gradcheck(counts: list[int]) -> None:
    """The fused chunked kernel (forward and hand-written backward) is exact, across chunk boundaries."""
    from system.moe.swiglu import swiglu_experts

    torch.manual_seed(0)
    g, d, f = 4, 6, 8
    x = torch.randn(sum(counts), d, dtype=torch.float64, requires_grad=True)
    w1, w3 = (torch.randn(g, d, f, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w2 = torch.randn(g, f, d, dtype=torch.float64, requires_grad=True)
    chunk = 16 * f * 8  # 16 rows per chunk: the 70-row expert spans 5 chunks
    assert torch.autograd.gradcheck(lambda *a: swiglu_experts(*a, counts, chunk_bytes=chunk), (x, w1, w2, w3))


def test_expert_kernels_agree() -> None:
    """``grouped_mm`` on/off/auto give the same outputs and gradients (fp32)."""
    from system.moe.experts import expert_kernel, expert_swiglu

    torch.manual_seed(1)
    counts = torch.tensor([30, 0, 17, 81])
    x = torch.randn(int(counts.sum()), 32)
    ws = [torch.randn(4, 32, 48) * 0.1, torch.randn(4, 48, 32) * 0.1, torch.randn(4, 32, 48) * 0.1]
    results = []
    modes = ["off", "auto"] + (["on"] if expert_kernel(x.device, x.dtype, "auto") == "chunked" and hasattr(torch, "_grouped_mm") else [])
    for mode in modes:
        xs = x.clone().requires_grad_()
        w = [t.clone().requires_grad_() for t in ws]
        y = expert_swiglu(xs, *w, counts, mode)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y, xs.grad, *(t.grad for t in w)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
