"""Tensor parallelism equals the single-process model (real Gloo processes on CPU).

For the same seed and data, one optimizer step through :func:`system.train.step.train_step` under TP=2 (tied and
untied heads, with and without loss parallelism, per-head qk-norm with grouped-query attention, two micro-batches,
MLA, two pipeline stages' boundaries), TP=2 x EP=2, FSDP2 x TP=2 (x EP=2), FSSDP with TP=2 dense layers, and expert
tensor parallelism (TP=2, TP=2 x EP=2) gives the same logits, loss, routing losses, expert loads, gradient norm,
gradients (gathered to global shapes from the layout records) and updated parameters as one process reading the
concatenation of every data-parallel stream's batch (fp32). Slow: MLA, tied head without loss parallelism, FSDP2
x TP=2 without EP, FSDP2 x expert TP x EP.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard

from _dist import run_workers
from system.config.fssdp import FSSDPConfig
from system.config.loader import ConfigError
from system.config.model import ModelConfig
from system.config.moe import MoEConfig
from system.config.parallel import ParallelConfig
from system.config.training import TrainingConfig
from system.models.model import MoETransformer

SEQ, BATCH_PER_STREAM, SEED, VOCAB = 8, 2, 7, 64
RTOL, ATOL = 1e-5, 1e-6
# Updated parameters, tensor-wise. AdamW's first step moves an element by lr * g / (|g| + eps): around |g| ~ eps
# (1e-8 by default, and many gradients here are ~1e-9) a 1e-9 difference of summation order in g moves the
# parameter by up to lr / 10. The tests raise eps to 1e-5, where the update is a smooth function of g
# (slope <= lr / eps), so gradients equal within float noise give parameters equal within 1e-5.
PARAM_RTOL, ADAM_EPS = 1e-5, 1e-5

SCENARIOS: dict[str, dict] = {
    "tp2": dict(world=2, tp=2),
    "tp2_untied_gqa_qknorm": dict(world=2, tp=2, tie=False, loss_parallel=False, n_kv_heads=2, qk_norm="head",
                                  qkv_bias=True, shared=1),
    "tp2_untied_loss_parallel_2micro": dict(world=2, tp=2, tie=False, o_bias=True, micro=2),
    "etp2": dict(world=2, tp=2, expert_tp=True, shared=1),
    # two pipeline stages (block 0 | block 1 and the head) run one after the other on the same TP=2 ranks
    "stages_tp2": dict(world=2, tp=2, tie=False, stages=True),
    "tp2_ep2": dict(world=4, tp=2, ep=2, shared=1),
    "fsdp_tp2_ep2": dict(world=4, tp=2, ep=2, dense="fsdp", tie=False),
    "fssdp_tp2": dict(world=4, tp=2, mode="fssdp"),
    "etp2_ep2": dict(world=4, tp=2, ep=2, expert_tp=True),
}
SLOW = {
    "tp2_mla": dict(world=2, tp=2, mla=True),
    "tp2_mla_qlora": dict(world=2, tp=2, mla=True, q_lora=16, tie=False, loss_parallel=False),
    "tp2_tied_no_loss_parallel": dict(world=2, tp=2, loss_parallel=False),
    "fsdp_tp2": dict(world=4, tp=2, dense="fsdp"),
    "fsdp_etp2_ep2": dict(world=4, tp=2, ep=2, dense="fsdp", expert_tp=True, tie=False),
}


def configs(s: dict) -> tuple[ModelConfig, MoEConfig, ParallelConfig, TrainingConfig]:
    """Tiny model: dim 32, 4 heads, one dense block then one MoE block (8 experts, top-2)."""
    mla = dict(attention_type="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
               q_lora_rank=s.get("q_lora", 0)) if s.get("mla") else {}
    model = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=s.get("n_kv_heads", 0), ffn_dim=64,
                        vocab_size=VOCAB, max_seq_len=SEQ, tie_embeddings=s.get("tie", True),
                        qk_norm=s.get("qk_norm", "none"), qkv_bias=s.get("qkv_bias", False),
                        o_bias=s.get("o_bias", False), **mla)
    moe = MoEConfig(num_experts=8, top_k=2, expert_dim=48, first_dense_layers=1, num_shared_experts=s.get("shared", 0),
                    shared_expert_dim=32 if s.get("shared") else 0, aux_loss_coef=0.01, z_loss_coef=0.001)
    par = ParallelConfig(ep=s.get("ep", 1), tp=s["tp"], expert_tp=s.get("expert_tp", False),
                         dense=s.get("dense", "replicate"), expert_mode=s.get("mode", "ep"),
                         loss_parallel=s.get("loss_parallel", True))
    train = TrainingConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=0.5, warmup_steps=0, steps=1)
    return model, moe, par, train


def build(s: dict) -> MoETransformer:
    model_cfg, moe_cfg, _, _ = configs(s)
    model = MoETransformer(model_cfg, moe_cfg)
    model.init_weights(seed=SEED)
    return model


def streams(s: dict) -> int:
    """Data-parallel streams: ranks reading different batches."""
    return s["world"] // s["tp"]


def global_batch(s: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenation of every stream's batch ``[streams * B, S]``."""
    g = torch.Generator().manual_seed(SEED)
    rows = BATCH_PER_STREAM * streams(s)
    return torch.randint(0, VOCAB, (rows, SEQ), generator=g), torch.randint(0, VOCAB, (rows, SEQ), generator=g)


class TwoStages(nn.Module):
    """The model split as a pipeline splits it (``layers`` a ``ModuleDict`` keyed by block index; the first stage
    without the final norm and head, the second without the embedding), the stages run one after the other."""

    def __init__(self, model: MoETransformer):
        super().__init__()
        self.a, self.b = copy.deepcopy(model), copy.deepcopy(model)
        self.a.layers = nn.ModuleDict({"0": self.a.layers[0]})
        self.a.norm = self.a.output = None
        self.b.layers = nn.ModuleDict({"1": self.b.layers[1]})
        self.b.tok_embeddings = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.b(self.a(tokens))

    def aux_loss(self) -> torch.Tensor:  # noqa: D102
        return self.a.aux_loss() + self.b.aux_loss()

    def moe_layers(self) -> list:  # noqa: D102
        return self.a.moe_layers() + self.b.moe_layers()


def _unstaged(tensors: dict) -> dict:
    """``{name: tensor}`` of :class:`TwoStages` under the single model's names."""
    return {k.split(".", 1)[1] if k.startswith(("a.", "b.")) else k: v for k, v in tensors.items()}


def _step(model, s: dict, x: torch.Tensor, y: torch.Tensor, mesh, fssdp) -> dict:
    """One ``train_step``; the logits of its forward, its statistics, gradients and parameters (global shapes)."""
    from system.checkpoint.model_io import full_state_dict
    from system.train.optim import build_lr_scheduler, build_optimizer
    from system.train.step import train_step
    from tests._dist import full_grads

    train_cfg = configs(s)[3]
    opt = build_optimizer(model, train_cfg)
    for group in opt.param_groups:
        group["eps"] = ADAM_EPS
    captured = []
    hook = model.register_forward_hook(lambda mod, inp, out: captured.append(out.detach()))
    micro = s.get("micro", 1)  # micro-batch j: row j of every stream's batch (x holds streams x B rows)
    batches = [(x.view(-1, micro, SEQ)[:, j], y.view(-1, micro, SEQ)[:, j]) for j in range(micro)]
    stats = train_step(model, opt, build_lr_scheduler(opt, train_cfg), batches, mesh=mesh,
                       max_grad_norm=train_cfg.max_grad_norm, fssdp=fssdp)
    hook.remove()
    logits = torch.stack([c.full_tensor() if isinstance(c, DTensor) else c for c in captured], dim=1).flatten(0, 1)
    return {
        "logits": logits,
        "logits_layout": getattr(captured[0], "placements", "local"),
        "loss": stats.loss, "aux": stats.aux_loss, "z": stats.z_loss, "grad_norm": float(stats.grad_norm),
        "tokens_per_expert": stats.tokens_per_expert[0],
        "grads": _unstaged(full_grads(model)), "params": _unstaged(full_state_dict(model)),
    }


def _distributed_run(rank: int, world: int, names: list[str]) -> dict:
    import torch.distributed as dist

    from system.distributed import ParallelDims
    from system.models.parallelize import parallelize_model

    results = {}
    for name in names:
        s = ALL[name]
        par = configs(s)[2]
        dims = ParallelDims.from_parallel_config(par, world)
        dims.build_mesh("cpu")
        model = build(s)
        if s.get("stages"):
            model = TwoStages(model)
            fssdp = None
            for stage in (model.a, model.b):
                parallelize_model(stage, dims, par)
        else:
            fssdp = parallelize_model(model, dims, par, fssdp=FSSDPConfig(reshard_interval=100, ranks_per_node=2))
        x, y = global_batch(s)
        rows = slice(dims.dp_rank(rank) * BATCH_PER_STREAM, (dims.dp_rank(rank) + 1) * BATCH_PER_STREAM)
        local = {n: (type(p).__name__, tuple(p.to_local().shape if isinstance(p, DTensor) else p.shape))
                 for n, p in model.named_parameters()}
        out = _step(model, s, x[rows], y[rows], dims.mesh, fssdp)
        out["local"] = _unstaged(local)
        out["stream"] = dims.dp_rank(rank)
        results[name] = out
        dist.barrier()
    return results


def reference_run(s: dict) -> dict:
    """One process, the global batch, the same ``train_step``."""
    from system.parallel.layout import single_process_layout

    model = build(s)
    single_process_layout(model)
    x, y = global_batch(s)
    out = _step(model, s, x, y, None, None)
    out["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out


ALL = {**SCENARIOS, **SLOW}


def _run(scenarios: dict[str, dict]) -> dict[str, list[dict]]:
    """Per scenario, the results of its ranks (one set of processes per world size)."""
    results: dict[str, list[dict]] = {}
    for world in sorted({s["world"] for s in scenarios.values()}):
        names = [n for n, s in scenarios.items() if s["world"] == world]
        per_rank = run_workers(_distributed_run, world, names)
        results.update({name: [r[name] for r in per_rank] for name in names})
    return results


@pytest.fixture(scope="module")
def distributed_results() -> dict[str, list[dict]]:
    return _run(SCENARIOS)


@pytest.fixture(scope="module")
def slow_results() -> dict[str, list[dict]]:
    return _run(SLOW)


def _check_layout(s: dict, local: dict[str, tuple[str, tuple]]) -> None:
    """Dense weights outside the MoE layers are DTensors; experts are split over ep (and tp with expert_tp)."""
    plain = [n for n, (kind, _) in local.items() if kind != "DTensor" and ".moe." not in n]
    assert not plain, f"dense parameters left plain: {plain}"
    if s.get("mode", "ep") == "ep":
        f = 48 // s["tp"] if s.get("expert_tp") else 48
        assert local["layers.1.moe.experts.w1"][1] == (8 // s.get("ep", 1), 32, f)
        assert local["layers.1.moe.experts.w2"][1] == (8 // s.get("ep", 1), f, 32)


def _check(name: str, ranks: list[dict]) -> None:
    s = ALL[name]
    ref = reference_run(s)
    for r in ranks:
        _check_layout(s, r["local"])
    n = streams(s)
    rows = lambda i: slice(i * BATCH_PER_STREAM, (i + 1) * BATCH_PER_STREAM)  # noqa: E731
    for r in ranks:
        torch.testing.assert_close(r["logits"], ref["logits"][rows(r["stream"])], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(r["tokens_per_expert"], ref["tokens_per_expert"], rtol=0, atol=0)
    # the mean over streams of each stream's losses is the global batch's
    for key in ("loss", "aux", "z"):
        per_stream = {r["stream"]: r[key] for r in ranks}
        assert len(per_stream) == n
        assert sum(per_stream.values()) / n == pytest.approx(ref[key], rel=RTOL), key
    # loss parallelism: vocabulary-sharded logits; else whole local logits
    expected = (Shard(2),) if s.get("loss_parallel", True) else "local"
    assert all(r["logits_layout"] == expected for r in ranks), [r["logits_layout"] for r in ranks]
    for r in ranks:
        assert set(r["grads"]) == set(ref["grads"])
        for key, g in ref["grads"].items():
            torch.testing.assert_close(r["grads"][key], g, rtol=RTOL, atol=ATOL, msg=lambda m: f"grad {key}: {m}")
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL)
        for key, p in ref["params"].items():
            err = (r["params"][key].double() - p.double()).norm() / p.double().norm().clamp_min(1e-12)
            assert err <= PARAM_RTOL, f"param {key}: relative error {err:.3g}"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_matches_single_process(name: str, distributed_results) -> None:
    _check(name, distributed_results[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW))
def test_matches_single_process_more_layouts(name: str, slow_results) -> None:
    _check(name, slow_results[name])


def test_validation_names_the_keys() -> None:
    from system.parallel.tp import check_tp

    with pytest.raises(ConfigError, match=r"model\.n_heads=4 does not divide by parallel\.tp=3"):
        check_tp(build(dict(tp=3)), 3)
    with pytest.raises(ConfigError, match=r"model\.n_kv_heads=2 does not divide by parallel\.tp=4"):
        check_tp(build(dict(tp=4, n_kv_heads=2)), 4)
    with pytest.raises(ConfigError, match=r"model\.qk_norm='full'.*parallel\.tp=2"):
        check_tp(build(dict(tp=2, qk_norm="full")), 2)
    check_tp(build(dict(tp=2, n_kv_heads=2, qk_norm="head")), 2)
