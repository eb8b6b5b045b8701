"""MoFME (Zhang et al., AAAI'24, arXiv 2312.16610): feature-modulated experts and the uncertainty-aware router.

- The FME layer equals a plain per-token reference with the same weights (outputs and gradients), for
  both modulations, with shared experts, sigmoid scores, forced routing and capacity drops; only the
  top-k modulations of each token run.
- The uncertainty router follows its documented formula; it is deterministic in eval mode (the plain
  top-k router); in training with dropout 0 it is exactly the top-k router; its weights are finite,
  non-negative and sum to 1; it works with the aux and z losses, forced routing and MoEStats.
- An FME training checkpoint saved under EP=2 reshards bit-exactly to one process and to FSSDP; the
  consolidated model file loads under any layout; offloaded inference equals the resident model.

EP=2 and FSSDP training equal to one process: scenarios ``fme_*`` of ``tests/ep_scenarios.py``, run by
``tests/test_expert_parallel.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from system.config import JobConfig, MoEConfig, config_to_dict
from system.moe import FeatureModulatedExperts, MoELayer, TopKRouter, UncertaintyRouter
from system.moe.router import mc_moments, uncertainty_weights
from tests._dist import run_workers

RTOL, ATOL = 1e-5, 1e-6
# The layer sums a token's k modulated hidden rows before the shared W2 (once per token); the reference
# applies W2 to each copy: float32 re-association, so layer-vs-reference absolute errors scale with the
# tensors (about 1e-6 relative to their largest element).
REASSOC = 1e-5
DIM, HIDDEN, RANK = 8, 16, 4  # multiples of 4: torch._grouped_mm needs 16-byte strides in fp32


# ------------------------------------------------------------------------------------------
# feature-modulated experts


def _fme_layer(modulation: str, seed: int = 0, **kw) -> MoELayer:
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_dim": HIDDEN, "expert_type": "fme",
                       "fme_modulation": modulation, "fme_rank": RANK, **kw})
    torch.manual_seed(seed)
    layer = MoELayer(DIM, cfg)
    layer.init_weights(0.5, 0.3)
    with torch.no_grad():  # make every modulation non-trivial (init leaves the low-rank map at 0)
        for p in layer.experts.parameters():
            p.normal_(std=0.3)
    return layer


def _reference(layer: MoELayer, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per token, per chosen expert e: ``W2 (silu((1 + s_e) a + t_e [+ (a D_e) U_e]) * b)``, weighted."""
    d = x.shape[-1]
    xf = x.reshape(-1, d)
    k, r = layer.top_k, layer.router
    logits = xf @ r.gate.weight.t()
    scores = torch.softmax(logits, -1) if r.score_func == "softmax" else torch.sigmoid(logits)
    idx = r.forced_indices.long() if r.forced_indices is not None else torch.topk(scores.detach(), k, dim=-1).indices
    w = scores.gather(1, idx)
    if r.norm_topk_prob and k > 1:
        w = w / w.sum(-1, keepdim=True)
    sh, ex = layer.fme_shared, layer.experts
    lowrank = ex.kind().modulation == "lowrank"
    rows = []
    for t in range(xf.shape[0]):
        acc = torch.zeros(d)
        a, b = sh.w1(xf[t]), sh.w3(xf[t])
        for j in range(k):
            if keep is not None and not bool(keep[t * k + j]):
                continue
            e = int(idx[t, j])
            z = a * (1 + ex.scale[e]) + ex.shift[e]
            if lowrank:
                z = z + (a @ ex.down[e]) @ ex.up[e]
            acc = acc + w[t, j] * sh.w2(F.silu(z) * b)
        if layer.shared_experts is not None:
            s = layer.shared_experts
            acc = acc + s.w2(F.silu(s.w1(xf[t])) * s.w3(xf[t]))
        rows.append(acc)
    return torch.stack(rows).view(x.shape)


def _compare_with_reference(layer: MoELayer, x0: torch.Tensor, keep: torch.Tensor | None = None) -> None:
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
    def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        atol = max(ATOL, REASSOC * float(b.abs().max()))
        torch.testing.assert_close(a, b, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")

    close(y.detach(), yr.detach(), "output")
    close(got_x, xr.grad, "input gradient")
    for n, p in layer.named_parameters():
        close(got[n], p.grad, f"grad {n}")


@pytest.mark.parametrize("modulation", ["vector", "lowrank"])
@pytest.mark.parametrize("kw", [
    {},
    {"num_shared_experts": 1},
    {"score_func": "sigmoid", "norm_topk_prob": False, "top_k": 3},
    {"top_k": 1, "grouped_mm": "on"},
])
def test_fme_layer_matches_per_token_reference(modulation: str, kw: dict) -> None:
    layer = _fme_layer(modulation, **kw)
    x = torch.randn(2, 7, DIM)
    _compare_with_reference(layer, x)
    st = layer.last_stats
    # sparse: the experts computed exactly T*k rows (a dense FME would compute T*E)
    assert st.expert_tokens == 14 * layer.top_k == st.assignments
    assert st.tokens_per_expert.sum() == 14 * layer.top_k


def test_fme_layer_forced_routing_and_capacity_drops() -> None:
    layer = _fme_layer("lowrank", capacity_factor=0.5)
    x = torch.randn(2, 8, DIM)
    forced = torch.randint(0, 4, (16, 2), generator=torch.Generator().manual_seed(3))
    forced[:10, 0] = 1  # expert 1 overloaded: drops
    layer.router.forced_indices = forced
    keep = layer._capacity_mask(forced)
    assert (~keep).sum() > 0
    _compare_with_reference(layer, x, keep)
    assert layer.last_stats.dropped == int((~keep).sum())


def test_fme_idle_expert_gets_zero_gradient_and_parameter_counts() -> None:
    layer = _fme_layer("lowrank")
    layer.router.forced_indices = torch.tensor([[0, 1], [1, 3], [3, 0]])
    layer(torch.randn(1, 3, DIM)).sum().backward()
    for name, p in layer.experts.named_parameters():
        assert torch.count_nonzero(p.grad[2]) == 0, name  # expert 2 got no token
        assert torch.count_nonzero(p.grad[0]) > 0, name
    # per expert 2f (+ 2fr): a small fraction of an FFN expert's 3df
    assert sum(p.numel() for p in layer.experts.parameters()) == 4 * (2 * HIDDEN + 2 * HIDDEN * RANK)
    assert sum(p.numel() for p in layer.fme_shared.parameters()) == 3 * DIM * HIDDEN
    assert layer.experts.kind().numel == 2 * HIDDEN + 2 * HIDDEN * RANK


def test_fme_experts_slice_and_flatten_roundtrip() -> None:
    ex = FeatureModulatedExperts(6, HIDDEN, "lowrank", RANK)
    ex.init_weights(0.1)
    kind = ex.kind()
    rows = kind.flatten(dict(ex.expert_weights()))
    assert rows.shape == (6, kind.numel)
    for name, view in kind.unflatten(rows).items():
        assert torch.equal(view, getattr(ex, name)), name
    full = {k: v.detach().clone() for k, v in ex.expert_weights().items()}
    ex.keep_experts_(2, 4)
    assert ex.expert_offset == 2 and ex.num_local_experts == 2 and ex.num_global_experts == 6
    for name, p in ex.expert_weights().items():
        assert torch.equal(p, full[name][2:4]), name
    with pytest.raises(ValueError, match="not inside"):
        ex.keep_experts_(0, 2)
    with pytest.raises(ValueError, match="lowrank.*rank"):
        FeatureModulatedExperts(2, HIDDEN, "lowrank", 0)


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 0], [9]])
@pytest.mark.parametrize("with_extra", [False, True])
def test_fused_modulation_kernel_matches_plain_ops(counts: list[int], with_extra: bool) -> None:
    """The chunked CPU kernel (chunks of 2 rows here) against plain ops: values and gradients, float64."""
    from system.moe.fme_kernel import fme_modulate, fme_modulate_reference

    torch.manual_seed(0)
    m, f = sum(counts), 6
    a = torch.randn(m, f, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(len(counts), f, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(len(counts), f, dtype=torch.float64, requires_grad=True)
    extra = torch.randn(m, f, dtype=torch.float64, requires_grad=True) if with_extra else None
    inputs = [t for t in (a, scale, shift, extra) if t is not None]
    g = torch.randn(m, f, dtype=torch.float64)
    y = fme_modulate(a, scale, shift, counts, extra, chunk_bytes=2 * f * 8)
    ref = fme_modulate_reference(a, scale, shift, torch.tensor(counts), extra)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad((y * g).sum(), inputs)
    want = torch.autograd.grad((ref * g).sum(), inputs, allow_unused=True)
    for x, w in zip(got, want):
        torch.testing.assert_close(x, torch.zeros_like(x) if w is None else w, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="counts"):
        fme_modulate(a, scale, shift, counts + [1], extra)


# ------------------------------------------------------------------------------------------
# uncertainty-aware router


def _routers(num_experts=6, top_k=2, score_func="softmax", norm=True, dropout=0.3, passes=4, scale=1.0,
             std=1.0, seed=0) -> tuple[UncertaintyRouter, TopKRouter]:
    torch.manual_seed(seed)
    u = UncertaintyRouter(DIM, num_experts, top_k, score_func, norm, dropout=dropout, passes=passes, scale=scale)
    torch.nn.init.normal_(u.gate.weight, std=std)
    plain = TopKRouter(DIM, num_experts, top_k, score_func, norm)
    plain.load_state_dict(u.state_dict())
    return u, plain


def _assert_same_routing(a, b) -> None:
    for field in ("indices", "weights", "scores", "logits"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_uncertainty_router_eval_is_deterministic_top_k() -> None:
    u, plain = _routers(dropout=0.5, passes=8)
    x = torch.randn(30, DIM)
    u.eval()
    first, second = u(x), u(x)
    _assert_same_routing(first, second)
    _assert_same_routing(first, plain(x))
    assert first.uncertainty is None


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("forced", [False, True])
def test_uncertainty_router_dropout_zero_is_exactly_top_k(score_func: str, top_k: int, norm: bool,
                                                          forced: bool) -> None:
    u, plain = _routers(top_k=top_k, score_func=score_func, norm=norm, dropout=0.0, passes=5, scale=3.0)
    u.train()
    x = torch.randn(25, DIM)
    if forced:
        idx = torch.stack([torch.randperm(6)[:top_k] for _ in range(25)])
        u.forced_indices = plain.forced_indices = idx
    _assert_same_routing(u(x), plain(x))


def test_uncertainty_formula_with_identical_passes_is_exact() -> None:
    """The general path (M identical passes, as dropout 0 gives) returns the plain scores and weights bit-exactly."""
    s = torch.softmax(torch.randn(9, 5) * 3, -1)
    mean, var = mc_moments(s.unsqueeze(0).expand(7, 9, 5))
    assert torch.equal(mean, s) and torch.count_nonzero(var) == 0
    mu = torch.topk(s, 2, -1).values
    assert torch.equal(uncertainty_weights(mu, torch.zeros_like(mu), 5.0), mu)
    assert torch.equal(uncertainty_weights(mu, torch.rand_like(mu), 0.0), mu)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("norm", [True, False])
def test_uncertainty_router_follows_documented_formula(score_func: str, norm: bool) -> None:
    p, m, alpha, k = 0.3, 5, 2.0, 2
    u, _ = _routers(top_k=k, score_func=score_func, norm=norm, dropout=p, passes=m, scale=alpha)
    u.train()
    x = torch.randn(40, DIM)
    torch.manual_seed(11)
    out = u(x)
    torch.manual_seed(11)  # the same dropout masks
    dropped = F.dropout(x.unsqueeze(0).expand(m, *x.shape), p, training=True)
    logits = dropped @ u.gate.weight.t()
    s = torch.softmax(logits, -1) if score_func == "softmax" else torch.sigmoid(logits)
    mu, var = s.mean(0), s.var(0, unbiased=False)
    idx = torch.topk(mu, k, -1).indices
    mu_k, var_k = mu.gather(1, idx), var.gather(1, idx)
    w = mu_k / (1 + alpha * var_k / mu_k**2)
    w = w * mu_k.sum(-1, keepdim=True) / w.sum(-1, keepdim=True)
    if norm:
        w = w / w.sum(-1, keepdim=True)
    assert torch.equal(out.indices, idx)
    torch.testing.assert_close(out.scores, mu, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.logits, logits.mean(0), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.uncertainty, var.sqrt(), rtol=1e-4, atol=ATOL)
    torch.testing.assert_close(out.weights, w, rtol=RTOL, atol=ATOL)
    assert out.uncertainty.max() > 0
    # the calibration moves weight, within each token, towards the less uncertain expert
    ratio = (out.weights[:, 0] / out.weights[:, 1]) / (mu_k[:, 0] / mu_k[:, 1])
    more_certain_first = (var_k[:, 0] / mu_k[:, 0] ** 2) < (var_k[:, 1] / mu_k[:, 1] ** 2)
    assert (ratio[more_certain_first] >= 1 - 1e-6).all() and (ratio[~more_certain_first] <= 1 + 1e-6).all()


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("scale", [1.0, 1e6])
@pytest.mark.parametrize("std", [1.0, 40.0])  # 40: saturated scores, softmax probabilities underflow to 0
def test_uncertainty_router_weights_are_valid(score_func: str, top_k: int, scale: float, std: float) -> None:
    u, _ = _routers(top_k=top_k, score_func=score_func, dropout=0.5, passes=4, scale=scale, std=std)
    u.train()
    x = torch.randn(64, DIM, requires_grad=True)
    out = u(x)
    w = out.weights
    assert w.shape == (64, top_k) and torch.isfinite(w).all() and (w >= 0).all()
    if top_k > 1:
        torch.testing.assert_close(w.sum(-1), torch.ones(64), rtol=RTOL, atol=ATOL)
    assert torch.equal(out.indices, torch.topk(out.scores, top_k, -1).indices)  # top-k on the mean
    (w.sum() + out.scores.square().sum()).backward()
    assert torch.isfinite(u.gate.weight.grad).all() and torch.isfinite(x.grad).all()
    assert not torch.equal(u(x.detach()).scores, out.scores.detach())  # stochastic in training


def test_uncertainty_router_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="dropout"):
        UncertaintyRouter(DIM, 4, 2, dropout=1.0)
    with pytest.raises(ValueError, match="passes"):
        UncertaintyRouter(DIM, 4, 2, passes=0)
    with pytest.raises(ValueError, match="scale"):
        UncertaintyRouter(DIM, 4, 2, scale=-1.0)


@pytest.mark.parametrize("key, value", [
    ("expert_type", "dense"), ("fme_modulation", "matrix"), ("fme_rank", 0), ("router", "noisy"),
    ("router_dropout", 1.0), ("router_dropout", -0.1), ("router_passes", 0), ("router_uncertainty_scale", -1.0),
])
def test_config_validation_names_the_key(key: str, value) -> None:
    cfg = MoEConfig(**{key: value})
    with pytest.raises(ValueError, match=f"moe.{key}"):
        cfg.validate()


@pytest.mark.parametrize("expert_type", ["ffn", "fme"])
def test_uncertainty_router_in_the_layer(expert_type: str) -> None:
    """Aux and z losses, forced routing and MoEStats with the uncertainty router; eval equals the top-k layer."""
    cfg = dict(num_experts=4, top_k=2, expert_dim=HIDDEN, expert_type=expert_type, router="uncertainty",
               router_dropout=0.2, router_passes=3)
    torch.manual_seed(0)
    layer = MoELayer(DIM, MoEConfig(**cfg))
    layer.init_weights(0.5, 0.3)
    x = torch.randn(2, 6, DIM)
    layer.train()
    forced = torch.randint(0, 4, (12, 2), generator=torch.Generator().manual_seed(1))
    layer.router.forced_indices = forced
    y = layer(x)
    st = layer.last_stats
    assert torch.isfinite(st.aux_loss) and st.aux_loss > 0 and torch.isfinite(st.z_loss)
    assert st.router_std is not None and st.router_std > 0
    assert torch.equal(st.tokens_per_expert, torch.bincount(forced.flatten(), minlength=4).float())
    (y.square().mean() + 0.01 * st.aux_loss + 0.001 * st.z_loss).backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0
    layer.router.forced_indices = None
    plain = MoELayer(DIM, MoEConfig(**{**cfg, "router": "topk"}))
    plain.load_state_dict(layer.state_dict())
    layer.eval()
    plain.eval()
    with torch.no_grad():
        first, second = layer(x), layer(x)
        assert torch.equal(first, second) and torch.equal(first, plain(x))
    assert layer.last_stats.router_std is None


# ------------------------------------------------------------------------------------------
# checkpoints and inference


def test_fme_training_checkpoint_reshards() -> None:
    """Saved at EP=2 (FME, low-rank): loads bit-exactly in one process and under FSSDP, training continues."""
    import tempfile
    from pathlib import Path

    from tests.test_checkpoint_resharding import _assert_same_checkpoint, _run

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        reference = _run("fme_single", train_steps=4)["losses"]
        ep = str(root / "fme_ep2" / "step_00000002")
        first = _run("fme_ep2", save_to=ep, train_steps=2)["losses"]
        torch.testing.assert_close(first, reference[:2], rtol=1e-5, atol=0)
        single = str(root / "fme_single" / "step_00000002")
        resumed = _run("fme_single", load_from=ep, resave_to=single, train_steps=2)["losses"]
        _assert_same_checkpoint(ep, single)
        torch.testing.assert_close(resumed, reference[2:], rtol=1e-5, atol=0)
        fs = str(root / "fme_fssdp2" / "step_00000002")
        _run("fme_fssdp2", load_from=ep, resave_to=fs)
        _assert_same_checkpoint(ep, fs)


def _model_io_worker(rank: int, world: int, path: str) -> dict:
    from system.checkpoint.model_io import full_state_dict, load_model, save_model
    from system.distributed import ParallelDims
    from system.models.model import MoETransformer
    from system.models.parallelize import parallelize_model
    from tests.ep_scenarios import configs, fssdp_config

    out = {}
    for seed, s in ((1, dict(world=2, ep=2, expert_type="fme", modulation="lowrank")),
                    (2, dict(world=2, ep=1, mode="fssdp", expert_type="fme", modulation="lowrank"))):
        model_cfg, moe_cfg, par, _ = configs(s)
        mesh = ParallelDims.from_config(par.dp, par.ep, world).build_mesh("cpu")
        model = MoETransformer(model_cfg, moe_cfg)
        model.init_weights(seed=seed)
        parallelize_model(model, mesh, par, fssdp=fssdp_config(s))
        if seed == 1:
            save_model(model, mesh, path, {"note": "fme ep2"})
        else:
            load_model(model, path)  # FSSDP owned rows from the global tensors
        out[s.get("mode", "ep")] = full_state_dict(model, mesh)
    return out


def test_fme_model_file_loads_in_any_layout(tmp_path) -> None:
    from system.checkpoint.model_io import load_model
    from system.models.model import MoETransformer
    from tests.ep_scenarios import configs

    path = str(tmp_path / "fme_model")
    ranks = run_workers(_model_io_worker, 2, path)
    saved = ranks[0]["ep"]
    assert saved["layers.0.moe.experts.scale"].shape == (8, 48)
    assert saved["layers.0.moe.experts.down"].shape == (8, 48, 4)
    for r in ranks:
        for key, t in saved.items():
            assert torch.equal(r["fssdp"][key], t), key
    model_cfg, moe_cfg, _, _ = configs(dict(world=1, ep=1, expert_type="fme", modulation="lowrank"))
    single = MoETransformer(model_cfg, moe_cfg)
    single.init_weights(seed=3)
    load_model(single, path)
    state = single.state_dict()
    assert sorted(state) == sorted(saved)
    for key, t in saved.items():
        assert torch.equal(state[key], t), key


def test_fme_offloaded_inference_equals_resident(tmp_path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from system.checkpoint.model_io import save_model
    from system.inference import OffloadEngine, Sampler, SamplingConfig
    from system.models.model import MoETransformer

    job = JobConfig()
    for k, v in dict(dim=32, n_layers=3, n_heads=4, ffn_dim=48, vocab_size=320, max_seq_len=32,
                     tie_embeddings=False, init_std=0.3).items():
        setattr(job.model, k, v)
    for k, v in dict(num_experts=4, top_k=2, expert_dim=24, expert_type="fme", fme_modulation="lowrank",
                     fme_rank=4, num_shared_experts=1, router="uncertainty").items():
        setattr(job.moe, k, v)
    job.training.seq_len = job.model.max_seq_len
    job.validate()
    model = MoETransformer(job.model, job.moe)
    model.init_weights(0)
    with torch.no_grad():
        for layer in model.moe_layers():
            for param in layer.experts.parameters():
                param.normal_(std=0.3)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        save_model(model, init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "ep")), tmp_path / "m",
                   config_to_dict(job))
    finally:
        dist.destroy_process_group()
    prompts = [[5, 9, 2, 7, 1], [3, 4]]
    results = {}
    for mode, kw in (("none", {}), ("ring", {"slots": 2}), ("experts", {"expert_cache": 2})):
        logits: list[torch.Tensor] = []
        sampler = Sampler(SamplingConfig(), vocab_limit=257)

        def record(x, sampler=sampler, logits=logits):
            logits.append(x.clone())
            return sampler(x)

        with OffloadEngine(tmp_path / "m", offload=mode, max_batch_size=2, max_seq_len=12, **kw) as eng:
            out, _ = eng.generate_ids(prompts, 5, record, batch_size=2)
        results[mode] = (out, logits)
    for mode in ("ring", "experts"):  # on CPU both stream into slots and compute bit-for-bit like the resident model
        assert results[mode][0] == results["none"][0], mode
        assert all(torch.equal(a, b) for a, b in zip(results[mode][1], results["none"][1])), mode
    # the resident engine's first step equals the model's full forward (FME experts, eval router)
    with torch.no_grad():
        full = model.eval()(torch.tensor([prompts[0]]))[0, -1].float()
    torch.testing.assert_close(results["none"][1][0][0], full, rtol=1e-4, atol=1e-4)
    assert math.isfinite(float(full.sum()))
