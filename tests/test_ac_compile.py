"""Activation checkpointing (full, selective) and per-block ``torch.compile`` equal eager training.

One process: a tiny model with MoE and dense blocks, same seed and data; logits, losses, MoE statistics,
every gradient and the parameters after AdamW steps within 1e-5 (fp32), parameter names unchanged; the
stochastic uncertainty router included. Two Gloo processes: AC under expert parallelism (EP=2) and
FSSDP (with and without prefetch / re-materialization) and FSDP2 equal the single-process eager
reference, and FSSDP's statistics are not counted twice. Compile runs inductor on the CPU (skipped, with
the reason, where no C++ compiler is found): one small case by default (an empty inductor cache costs
about a minute of CPU time); three-block models, compile without AC and with full AC, and compile under
EP/FSDP2/FSSDP on two ranks are marked slow.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from _dist import run_workers
from ep_scenarios import SCENARIOS, configs, forced_routing, fssdp_config, global_batches, reference_run, set_routing
from system.config import ModelConfig, MoEConfig
from system.models import MoETransformer
from system.models.model import Block
from system.parallel.ac import SAVE_OPS, apply_ac, sac_policy
from system.parallel.compile import apply_compile, compile_regions, compile_unavailable_reason

TOL = dict(rtol=1e-5, atol=1e-5)
VOCAB, SEQ, STEPS = 40, 12, 2


def _model(router: str = "topk", small: bool = False) -> MoETransformer:
    """Blocks: MoE (with a shared expert), dense, MoE; ``small``: MoE (no shared expert), dense."""
    cfg = ModelConfig(dim=16, n_layers=2 if small else 3, n_heads=2, ffn_dim=24, vocab_size=VOCAB, max_seq_len=16)
    moe = MoEConfig(num_experts=4, top_k=2, expert_dim=8, interleave=2, num_shared_experts=0 if small else 1,
                    aux_loss_coef=0.01, z_loss_coef=0.001, router=router)
    model = MoETransformer(cfg, moe)
    model.init_weights(0)
    assert [b.moe is not None for b in model.layers] == [True, False, True][: cfg.n_layers]
    return model


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randint(0, VOCAB, (2, SEQ), generator=g), torch.randint(0, VOCAB, (2, SEQ), generator=g))
            for _ in range(STEPS)]


def _train(model: MoETransformer) -> list[dict]:
    """STEPS AdamW steps from a fixed global seed; per step what the comparisons read."""
    torch.manual_seed(11)  # the uncertainty router's dropout draws from the global generator
    # AdamW's first step moves an element by lr * g / (|g| + eps): with the default eps = 1e-8, a gradient of
    # ~1e-9 that differs in its last bits (compiled kernels round differently) moves the parameter by up to lr.
    # eps = 1e-6 bounds that amplification (lr / eps = 1e3) so updated parameters compare within 1e-5.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.1)
    out = []
    for x, y in _batches():
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()) + model.aux_loss()
        stats = [m.last_stats for m in model.moe_layers()]
        loss.backward()
        # the statistics the loss used are still the layer's (the recomputation does not replace them)
        assert all(a is b for a, b in zip(stats, [m.last_stats for m in model.moe_layers()]))
        opt.step()
        out.append({
            "logits": logits.detach(), "loss": loss.detach(),
            "stats": [{"aux_loss": s.aux_loss.detach(), "z_loss": s.z_loss.detach(), "router_std": s.router_std,
                       "tokens_per_expert": s.tokens_per_expert, "expert_tokens": s.expert_tokens} for s in stats],
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "rng": torch.get_rng_state(),
        })
    return out


def _assert_same(run: list[dict], ref: list[dict]) -> None:
    for step, (a, b) in enumerate(zip(run, ref, strict=True)):
        torch.testing.assert_close(a["logits"], b["logits"], **TOL, msg=lambda m: f"step {step} logits: {m}")
        torch.testing.assert_close(a["loss"], b["loss"], **TOL)
        for layer_a, layer_b in zip(a["stats"], b["stats"], strict=True):
            torch.testing.assert_close(layer_a, layer_b, **TOL)  # MoEStats fields (aux and z losses, loads)
        assert a["grads"].keys() == b["grads"].keys()
        for key in b["grads"]:
            torch.testing.assert_close(a["grads"][key], b["grads"][key], **TOL,
                                       msg=lambda m: f"step {step} grad {key}: {m}")
            torch.testing.assert_close(a["params"][key], b["params"][key], **TOL,
                                       msg=lambda m: f"step {step} param {key}: {m}")
        # the recomputation restores the generator: training continues with the eager random stream
        assert torch.equal(a["rng"], b["rng"])


@pytest.fixture(scope="module")
def eager_runs() -> dict[str, list[dict]]:
    return {router: _train(_model(router)) for router in ("topk", "uncertainty")}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_names_and_state_dict_unchanged(mode: str) -> None:
    eager, model = _model(), _model()
    apply_ac(model, mode)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in eager.named_parameters()]
    assert list(model.state_dict()) == list(eager.state_dict())
    assert all(isinstance(b, Block) and b.ac_mode == mode for b in model.layers)
    model.load_state_dict(eager.state_dict())  # checkpoints of the single-device names load as they are


@pytest.mark.parametrize("router", ["topk", "uncertainty"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_ac_matches_eager(mode: str, router: str, eager_runs) -> None:
    model = _model(router)
    apply_ac(model, mode)
    _assert_same(_train(model), eager_runs[router])


def test_uncertainty_router_is_stochastic() -> None:
    """The uncertainty router's comparison above is not vacuous: its routing depends on the RNG draw."""
    model = _model("uncertainty")
    x = _batches()[0][0]
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(model(x), a)


class _CountMatmuls(TorchDispatchMode):
    """Counts ``aten.mm`` / ``aten.addmm`` calls that reach the dispatcher (SAC-cached ones do not)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_recomputation_happens_as_configured(mode: str) -> None:
    """Full AC runs every block's forward again in backward; selective AC reuses the saved matmuls."""
    model = _model()
    calls = []
    model.layers[0].attention.register_forward_hook(lambda *_: calls.append(1))
    apply_ac(model, mode)
    x, y = _batches()[0]
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert len(calls) == 1
    counter = _CountMatmuls()
    with counter:
        loss.backward()
    assert len(calls) == (1 if mode == "none" else 2)
    eager = _model()
    eager_loss = F.cross_entropy(eager(x).flatten(0, 1), y.flatten())
    eager_counter = _CountMatmuls()
    with eager_counter:
        eager_loss.backward()
    if mode == "full":
        assert counter.count > eager_counter.count
    else:  # no AC, or selective: no matmul runs again
        assert counter.count == eager_counter.count


def test_sac_policy() -> None:
    a = torch.randn(3, 4)
    assert sac_policy(None, torch.ops.aten.mm.default, a, a.t()) == CheckpointPolicy.MUST_SAVE
    assert sac_policy(None, torch.ops.aten.topk.default, a, 2) == CheckpointPolicy.MUST_SAVE
    assert sac_policy(None, torch.ops.aten.add.Tensor, a, a) == CheckpointPolicy.PREFER_RECOMPUTE
    assert sac_policy(None, torch.ops.aten.mm.out, a, a.t(), out=a) == CheckpointPolicy.PREFER_RECOMPUTE
    to_copy = torch.ops.aten._to_copy.default
    assert sac_policy(None, to_copy, a, device=torch.device("cpu")) == CheckpointPolicy.PREFER_RECOMPUTE
    assert sac_policy(None, to_copy, torch.empty(2, device="meta"), device="cpu") == CheckpointPolicy.MUST_SAVE
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default in SAVE_OPS


def test_apply_ac_errors() -> None:
    model = _model()
    with pytest.raises(ValueError, match="training.activation_checkpoint"):
        apply_ac(model, "some")
    apply_ac(model, "none")
    assert type(model.layers[0]) is Block
    apply_ac(model, "full")
    with pytest.raises(ValueError, match="already checkpointed"):
        apply_ac(model, "selective")


# --- expert parallelism and FSSDP: 2 Gloo processes vs the single-process eager reference -------------

AC_SCENARIOS = [("ep2", "full"), ("ep2", "selective"), ("fssdp2", "none"), ("fssdp2", "full"), ("fssdp2", "selective"),
                ("fssdp2_rm", "selective"), ("fsdp_ep2", "selective")]


def _full_grads(model) -> dict[str, torch.Tensor]:
    """Global-shape gradients (a collective): FSDP2's DTensors in full, the rest read through the layout
    records like the parameters (:func:`~system.checkpoint.model_io.full_state_dict` on the gradients)."""
    from system.checkpoint.model_io import full_state_dict

    out = {n: p.grad.full_tensor() for n, p in model.named_parameters() if isinstance(p.grad, DTensor)}
    params = [p for p in model.parameters() if not isinstance(p, DTensor)]
    saved = [p.data for p in params]
    for p in params:
        p.data = p.grad if p.grad is not None else torch.zeros_like(p)
    try:  # clone: clipping later scales the gradients in place
        out.update({k: v.clone() for k, v in full_state_dict(model).items() if k not in out})
    finally:
        for p, d in zip(params, saved):
            p.data = d
    return out


def _counting(gather, out: dict):
    def counted():
        out["gathers"] += 1
        return gather()

    return counted


def _ac_distributed_run(rank: int, world: int, cases: list[tuple[str, str]], compile: bool = False) -> dict:
    from system.checkpoint.model_io import full_state_dict
    from system.distributed import ParallelDims
    from system.models.parallelize import parallelize_model
    from system.parallel.grads import clip_grad_norm_, sync_gradients
    from system.train.optim import build_optimizer

    from ep_scenarios import BATCH_PER_RANK, build

    results = {}
    for name, mode in cases:
        s = SCENARIOS[name]
        _, _, par, train_cfg = configs(s)
        mesh = ParallelDims.from_config(par.dp, par.ep, world).build_mesh("cpu")
        model = build(s)
        fssdp = parallelize_model(model, mesh, par, fssdp=fssdp_config(s), activation_checkpoint=mode, compile=compile)
        opt = build_optimizer(model, train_cfg)
        out = {"loss": [], "grad_norm": [], "metrics": [], "gathers": 0}
        if fssdp is not None:  # count SparseAllGathers (forward, and the recomputation under AC)
            for moe in model.moe_layers():
                moe.experts.gather = _counting(moe.experts.gather, out)
        rows = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
        for step, (x, y) in enumerate(global_batches(s)):
            forced = forced_routing(s, step, x.numel())
            if forced is not None:
                forced = forced.view(x.shape[0], x.shape[1], -1)[rows].flatten(0, 1)
            set_routing(model, forced)
            opt.zero_grad(set_to_none=True)
            if fssdp is not None:
                fssdp.begin_step()
            logits = model(x[rows])
            ce = F.cross_entropy(logits.flatten(0, 1), y[rows].flatten())
            (ce + model.aux_loss()).backward()
            sync_gradients(model, mesh)
            if step == 0:
                out["logits"] = logits.detach().clone()
                out["grads"] = _full_grads(model)
            out["grad_norm"].append(float(clip_grad_norm_(model, mesh, train_cfg.max_grad_norm)))
            opt.step()
            if fssdp is not None:
                fssdp.end_step(opt)
                out["metrics"].append(fssdp.metrics())
            loss = ce.detach().clone()
            dist.all_reduce(loss)
            out["loss"].append(loss.item() / world)
        out["params"] = full_state_dict(model)
        results[(name, mode)] = out
        dist.barrier()
    return results


@pytest.fixture(scope="module")
def distributed_ac() -> dict:
    per_rank = run_workers(_ac_distributed_run, 2, AC_SCENARIOS)
    return {case: [r[case] for r in per_rank] for case in AC_SCENARIOS}


@pytest.mark.parametrize("case", [c for c in AC_SCENARIOS if c[1] != "none"], ids=lambda c: f"{c[0]}-{c[1]}")
def test_ac_distributed_matches_single_process(case, distributed_ac) -> None:
    name, _ = case
    ref = reference_run(SCENARIOS[name])
    ranks = distributed_ac[case]
    first = ranks[0]
    torch.testing.assert_close(torch.cat([r["logits"] for r in ranks]), ref["logits"], **TOL)
    assert first["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert first["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    for key, g in ref["grads"].items():
        torch.testing.assert_close(first["grads"][key], g, **TOL, msg=lambda m: f"grad {key}: {m}")
    for key, p in ref["params"].items():  # tensor-wise, as tests/test_expert_parallel.py (AdamW amplifies noise)
        err = (first["params"][key].double() - p.double()).norm() / p.double().norm().clamp_min(1e-12)
        assert err <= 5e-5, f"param {key}: relative error {err:.3g}"


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_ac_fssdp_statistics(mode: str, distributed_ac) -> None:
    """Under FSSDP, AC leaves the per-step counters as without AC (expert tokens, prefetched gathers), and the
    recomputation gathers the experts once more (replaying the forward's prefetch)."""
    for rank in range(2):
        plain = distributed_ac[("fssdp2", "none")][rank]
        checkpointed = distributed_ac[("fssdp2", mode)][rank]
        for a, b in zip(checkpointed["metrics"], plain["metrics"], strict=True):
            assert a["fssdp/expert_tokens_per_step"] == b["fssdp/expert_tokens_per_step"] > 0
            assert a["fssdp/prefetched_gathers_per_step"] == b["fssdp/prefetched_gathers_per_step"] > 0
            assert a["fssdp/reduce_bytes_per_step"] == b["fssdp/reduce_bytes_per_step"]
            assert a["fssdp/gather_bytes_per_step"] == 2 * b["fssdp/gather_bytes_per_step"]
        # one SparseAllGather per MoE layer and step, one more in the recomputation (and no second recomputation)
        assert plain["gathers"] == 2 * 3 and checkpointed["gathers"] == 2 * plain["gathers"]


# --- torch.compile (inductor on the CPU) ------------------------------------------------------------------

_NO_COMPILER = compile_unavailable_reason("cpu")


def test_compile_keeps_names_and_regions() -> None:
    eager, model = _model(), _model()
    apply_ac(model, "selective")
    apply_compile(model)  # lazy: nothing is compiled before the first forward
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in eager.named_parameters()]
    assert list(model.state_dict()) == list(eager.state_dict())
    moe_block, dense_block = model.layers[0], model.layers[1]
    assert compile_regions(dense_block) == [dense_block]
    assert compile_regions(moe_block) == [moe_block.attention, moe_block.moe.router, moe_block.moe.shared_experts]


def test_compile_unavailable_is_a_clear_error(monkeypatch) -> None:
    import system.parallel.compile as compile_mod

    monkeypatch.setattr(compile_mod, "compile_unavailable_reason", lambda device: "no C++ compiler (test)")
    with pytest.raises(RuntimeError, match="training.compile=true cannot run on cpu: no C\\+\\+ compiler"):
        apply_compile(_model())


def _compiled_run(mode: str, router: str, small: bool) -> list[dict]:
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = _model(router, small)
    apply_ac(model, mode)
    apply_compile(model)
    run = _train(model)
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert not breaks, f"compiled regions broke their graphs: {list(breaks)}"
    regions = sum(len(compile_regions(b)) for b in model.layers)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= (3 if small else 4)  # identical regions share
    assert regions == (2 + 1 if small else 3 + 1 + 3)
    return run


@pytest.mark.skipif(_NO_COMPILER is not None, reason=f"torch.compile on CPU: {_NO_COMPILER}")
def test_compile_with_selective_ac_matches_eager() -> None:
    """The default compile case, kept small (inductor's C++ builds take most of a minute on two cores):
    a MoE and a dense block, compiled regions under selective AC, the stochastic router (the recomputation
    runs the compiled parts again and must draw the same dropout masks)."""
    eager = _train(_model("uncertainty", small=True))
    _assert_same(_compiled_run("selective", "uncertainty", small=True), eager)


@pytest.mark.slow
@pytest.mark.skipif(_NO_COMPILER is not None, reason=f"torch.compile on CPU: {_NO_COMPILER}")
@pytest.mark.parametrize(("mode", "router"), [("none", "topk"), ("full", "topk"), ("selective", "uncertainty"),
                                              ("none", "uncertainty")])
def test_compile_matches_eager(mode: str, router: str, eager_runs) -> None:
    """Three blocks with shared experts: compile alone, with full and with selective AC."""
    _assert_same(_compiled_run(mode, router, small=False), eager_runs[router])


@pytest.mark.slow
@pytest.mark.skipif(_NO_COMPILER is not None, reason=f"torch.compile on CPU: {_NO_COMPILER}")
def test_compile_distributed_matches_single_process() -> None:
    """AC + compile under EP=2 (with FSDP2) and FSSDP through ``parallelize_model``, vs the single-process eager
    reference."""
    cases = [("ep2", "full"), ("fsdp_ep2", "selective"), ("fssdp2", "selective")]
    per_rank = run_workers(_ac_distributed_run, 2, cases, True, timeout=1200)
    for case in cases:
        ref = reference_run(SCENARIOS[case[0]])
        torch.testing.assert_close(torch.cat([r[case]["logits"] for r in per_rank]), ref["logits"], **TOL)
        assert per_rank[0][case]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        for key, g in ref["grads"].items():
            torch.testing.assert_close(per_rank[0][case]["grads"][key], g, **TOL, msg=lambda m: f"grad {key}: {m}")


def _dense_fsdp_run(rank: int, world: int) -> dict:
    """A dense block and an MoE block, EP=2 with FSDP2 dense parameters: eager, and AC + compile (the compiled
    dense block then runs FSDP2's hooks inside its graph)."""
    from system.config.parallel import ParallelConfig
    from system.distributed import ParallelDims
    from system.models.parallelize import parallelize_model
    from system.parallel.grads import clip_grad_norm_, sync_gradients

    out = {}
    for mode, compiled in (("none", False), ("selective", True), ("full", True)):
        cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, vocab_size=64, max_seq_len=16)
        model = MoETransformer(cfg, MoEConfig(num_experts=8, top_k=2, expert_dim=48, first_dense_layers=1))
        model.init_weights(seed=7)
        par = ParallelConfig(dp=-1, ep=2, dense="fsdp")
        mesh = ParallelDims.from_config(par.dp, par.ep, world).build_mesh("cpu")
        parallelize_model(model, mesh, par, activation_checkpoint=mode, compile=compiled)
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)
        steps = []
        for _ in range(2):
            logits = model(x)
            (F.cross_entropy(logits.flatten(0, 1), y.flatten()) + model.aux_loss()).backward()
            sync_gradients(model, mesh)
            norm = float(clip_grad_norm_(model, mesh, 1e9))
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
            steps.append((logits.detach(), norm))
        out[mode] = steps
        dist.barrier()
    return out


@pytest.mark.slow
@pytest.mark.skipif(_NO_COMPILER is not None, reason=f"torch.compile on CPU: {_NO_COMPILER}")
def test_compile_dense_block_under_fsdp2() -> None:
    for ranks in run_workers(_dense_fsdp_run, 2, timeout=1200):
        for mode in ("selective", "full"):
            for (logits, norm), (ref_logits, ref_norm) in zip(ranks[mode], ranks["none"], strict=True):
                torch.testing.assert_close(logits, ref_logits, **TOL)
                assert norm == pytest.approx(ref_norm, rel=1e-5)
