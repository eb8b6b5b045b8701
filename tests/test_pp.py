"""Pipeline parallelism equals the single-process model (real Gloo processes on CPU).

For the same seed and data, PP=2 with 1F1B (two schedule runs accumulated per optimizer step), PP=2 with
Interleaved1F1B (two stages per rank), PP=2 x EP=2 (4 ranks) and, marked slow, ZBVZeroBubble give the same
losses, logged MoE statistics (auxiliary and z-losses, per-layer expert loads), global gradient norms,
gradients and updated parameters as :func:`~system.train.step.train_step` on one process over the same
micro-batches, with the MoE auxiliary losses in the gradient (``aux_loss_coef`` 0.1: leaving out an earlier
stage's auxiliary loss changes its router's gradient far beyond the tolerance). The 1F1B run also checks
the forward-only pipeline (logits, greedy sampling), a training checkpoint written by ranks holding
different tensors, and the consolidated export, all against the one-process model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from pathlib import Path

import pytest
import torch

from _dist import run_workers

from system.config.model import ModelConfig
from system.config.moe import MoEConfig
from system.config.parallel import ParallelConfig
from system.config.training import TrainingConfig
from system.config.loader import ConfigError
from system.models.model import MoETransformer
from system.parallel.layout import single_process_layout
from system.train.optim import build_lr_scheduler, build_optimizer
from system.train.step import train_step

RTOL, ATOL = 1e-5, 1e-6
PARAM_RTOL = 1e-5
SEQ, BATCH, STEPS, SEED = 8, 4, 2, 11  # BATCH: rows per data-parallel stream and schedule run

SCENARIOS: dict[str, dict] = {
    "1f1b": dict(world=2, schedule="1F1B", accum=2, extras=True),
    "interleaved": dict(world=2, schedule="Interleaved1F1B", spr=2),
    "pp2_ep2": dict(world=4, schedule="1F1B", ep=2),
    "zbv": dict(world=2, schedule="ZBVZeroBubble", spr=2, slow=True),
    "pp2_fsdp": dict(world=4, schedule="1F1B", dense="fsdp", extras=True, slow=True),
    "pp2_tp2": dict(world=4, schedule="1F1B", tp=2, extras=True, slow=True),
    "pp2_fssdp": dict(world=4, schedule="1F1B", mode="fssdp", slow=True),
}


def configs(s: dict) -> tuple[ModelConfig, MoEConfig, ParallelConfig, TrainingConfig]:
    model = ModelConfig(dim=32, n_layers=4, n_heads=2, ffn_dim=64, vocab_size=64, max_seq_len=SEQ,
                        tie_embeddings=False)
    moe = MoEConfig(num_experts=4, top_k=2, expert_dim=32, first_dense_layers=1, aux_loss_coef=0.1, z_loss_coef=0.01)
    par = ParallelConfig(ep=s.get("ep", 1), pp=2, pp_schedule=s["schedule"], pp_microbatches=2,
                         pp_stages_per_rank=s.get("spr", 0), dense=s.get("dense", "replicate"), tp=s.get("tp", 1),
                         expert_mode=s.get("mode", "ep"))
    train = TrainingConfig(lr=1e-3, weight_decay=0.1, max_grad_norm=0.5, warmup_steps=0, steps=STEPS)
    return model, moe, par, train


def build(s: dict) -> MoETransformer:
    model_cfg, moe_cfg, _, _ = configs(s)
    model = MoETransformer(model_cfg, moe_cfg)
    model.init_weights(seed=SEED)
    return model


def streams(s: dict) -> int:
    """Data-parallel streams: world / (pp x tp)."""
    return s["world"] // (2 * s.get("tp", 1))


def data(s: dict) -> list[list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """``data[step][stream][run]``: ``(inputs, targets)`` ``[BATCH, SEQ]`` of each schedule run."""
    g = torch.Generator().manual_seed(SEED)
    return [[[(torch.randint(0, 64, (BATCH, SEQ), generator=g), torch.randint(0, 64, (BATCH, SEQ), generator=g))
              for _ in range(s.get("accum", 1))] for _ in range(streams(s))] for _ in range(STEPS)]


def reference_micro_batches(s: dict, step_data) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The one-process micro-batches: micro-batch ``j`` of run ``b`` of every stream, concatenated (what one
    forward of the stage ranks of EP sees, so the load-balancing loss has the same global counts)."""
    mb = BATCH // 2
    out = []
    for b in range(s.get("accum", 1)):
        for j in range(2):
            rows = slice(j * mb, (j + 1) * mb)
            out.append((torch.cat([step_data[k][b][0][rows] for k in range(streams(s))]),
                        torch.cat([step_data[k][b][1][rows] for k in range(streams(s))])))
    return out


@contextlib.contextmanager
def one_thread():
    """Tiny tensors: one intra-op thread (several spin against each other on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def reference_run(name: str) -> dict:
    """The one-process run of scenario ``name``."""
    with one_thread():
        return _reference_run(SCENARIOS[name])


def _reference_run(s: dict) -> dict:
    model = build(s)
    single_process_layout(model)
    _, _, _, train_cfg = configs(s)
    opt = build_optimizer(model, train_cfg)
    sched = build_lr_scheduler(opt, train_cfg)
    out = {"stats": []}
    for step, step_data in enumerate(data(s)):
        st = train_step(model, opt, sched, reference_micro_batches(s, step_data), max_grad_norm=train_cfg.max_grad_norm)
        out["stats"].append(st)
        if step == 0:
            out["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            out["params1"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["params"] = {n: p.detach().clone() for n, p in model.state_dict().items()}
    x = data(s)[0][0][0][0]
    model.eval()
    with torch.no_grad():
        out["logits"] = model(x)
    from system.inference.generate import greedy_generate

    if s.get("tp", 1) == 1:  # (under TP the sample's window is trimmed to a multiple of tp: not comparable)
        out["sample"] = greedy_generate(model, x[:1, :4], 4, SEQ)
    return out


def _merge(parts: list[dict]) -> dict:
    out: dict = {}
    for p in parts:
        out.update(p)
    return out


def _distributed_run(rank: int, world: int, names: list[str], tmp: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from system.checkpoint.api import save
    from system.checkpoint.model_io import full_state_dict, save_model
    from system.checkpoint.train_state import sharded_train_state
    from system.distributed import ParallelDims
    from system.models.parallelize import parallelize_model
    from system.parallel.pp import build_pipeline
    from system.train.step import pipeline_train_step
    from tests._dist import full_grads

    results = {}
    for name in names:
        s = SCENARIOS[name]
        _, _, par, train_cfg = configs(s)
        dims = ParallelDims.from_parallel_config(par, world)
        dims.build_mesh("cpu")
        model = build(s)
        pipe = build_pipeline(model, dims, par, torch.device("cpu"),
                              parallelize=lambda part: parallelize_model(part, dims, par))
        del model
        opt = build_optimizer(pipe.model, train_cfg)
        sched = build_lr_scheduler(opt, train_cfg)
        stream = dims.dp_rank(rank)
        out = {"stats": [], "stages": [st.stage_index for st in pipe.stages], "stream": stream}
        for step, step_data in enumerate(data(s)):
            st = pipeline_train_step(pipe, opt, sched, step_data[stream], max_grad_norm=train_cfg.max_grad_norm)
            out["stats"].append(st)
            if step == 0:
                out["grads"] = _merge([full_grads(part) for part in pipe.model.parts])
                out["params1"] = {k: v.clone() for k, v in full_state_dict(pipe.model).items()}
        out["params"] = full_state_dict(pipe.model)
        if s.get("extras"):
            x = data(s)[0][0][0][0]
            pipe.model.eval()
            logits = pipe.forward(x)
            if isinstance(logits, DTensor):  # tensor parallelism: vocabulary-sharded
                logits = logits.full_tensor()
            out["logits"] = None if logits is None else logits.detach().clone()
            out["sample"] = pipe.greedy_generate(x[:1, :4], 4, SEQ, seq_multiple=dims.tp)
            save(sharded_train_state(pipe.model, opt), f"{tmp}/{name}/ckpt")
            save_model(pipe.model, None, f"{tmp}/{name}/export", {"test": True}, pp_group=pipe.group)
        results[name] = out
        dist.barrier()
    return results


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("pp")
    results: dict = {"_tmp": tmp}
    for world in (2, 4):
        names = [n for n, s in SCENARIOS.items() if s["world"] == world and not s.get("slow")]
        per_rank = run_workers(_distributed_run, world, names, str(tmp))
        for name in names:
            results[name] = [r[name] for r in per_rank]
    return results


def _check(name: str, ranks: list[dict]) -> None:
    ref = reference_run(name)
    for step, ref_st in enumerate(ref["stats"]):
        sts = [r["stats"][step] for r in ranks]
        by_stream: dict[int, list] = {}
        for r, st in zip(ranks, sts):
            by_stream.setdefault(r["stream"], []).append(st)
        for group in by_stream.values():  # the pp peers of a stream report the same whole-model values
            for st in group[1:]:
                assert st.loss == pytest.approx(group[0].loss, rel=1e-12)
                assert st.aux_loss == pytest.approx(group[0].aux_loss, rel=1e-12)
        mean = lambda key: sum(getattr(g[0], key) for g in by_stream.values()) / len(by_stream)  # noqa: E731
        assert mean("loss") == pytest.approx(ref_st.loss, rel=RTOL), f"step {step} loss"
        assert mean("aux_loss") == pytest.approx(ref_st.aux_loss, rel=RTOL), f"step {step} aux"
        assert mean("z_loss") == pytest.approx(ref_st.z_loss, rel=RTOL), f"step {step} z"
        assert ref_st.aux_loss > 0.0
        for st in sts:
            assert float(st.grad_norm) == pytest.approx(float(ref_st.grad_norm), rel=RTOL), f"step {step} grad norm"
            assert len(st.tokens_per_expert) == len(ref_st.tokens_per_expert) == 3
            for got, want in zip(st.tokens_per_expert, ref_st.tokens_per_expert):
                torch.testing.assert_close(got, want.float(), rtol=0, atol=0)
        # assignments are summed over the pp group: each pp peer reports its stream's (TP: its sequence shard's)
        assert sum(st.assignments for st in sts) == 2 * ref_st.assignments
    grads = _merge([r["grads"] for r in ranks])
    assert set(grads) == set(ref["grads"])
    for key, g in ref["grads"].items():
        torch.testing.assert_close(grads[key], g, rtol=RTOL, atol=ATOL, msg=lambda m: f"grad {key}: {m}")
    for which in ("params1", "params"):
        params = _merge([r[which] for r in ranks])
        assert set(params) == set(ref[which]), which
        for key, p in ref[which].items():
            err = (params[key].double() - p.double()).norm() / p.double().norm().clamp_min(1e-12)
            assert err <= PARAM_RTOL, f"{which} {key}: relative error {err:.3g}"


@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if not s.get("slow")])
def test_matches_single_process(name: str, distributed_results) -> None:
    _check(name, distributed_results[name])


def test_stage_placement(distributed_results) -> None:
    """1F1B: rank r holds stage r; Interleaved1F1B (loop): r and r + 2; PP x EP: both EP ranks of a stage."""
    assert [r["stages"] for r in distributed_results["1f1b"]] == [[0], [1]]
    assert [r["stages"] for r in distributed_results["interleaved"]] == [[0, 2], [1, 3]]
    assert [r["stages"] for r in distributed_results["pp2_ep2"]] == [[0], [0], [1], [1]]


def _check_extras(name: str, ranks: list[dict], tmp: Path) -> None:
    """The forward-only pipeline gives the one-process logits (whole, on the last stage's ranks) and greedy
    sample on every rank; a training checkpoint saved by ranks holding different tensors, and the export
    gathered over pp, hold every tensor of the one-process model after the same steps."""
    from safetensors.torch import load_file

    from system.checkpoint.api import load_full

    ref = reference_run(name)
    half = len(ranks) // 2  # pp-major: the first half of the ranks hold stage 0
    for r in ranks[:half]:
        assert r["logits"] is None
    for r in ranks[half:]:
        torch.testing.assert_close(r["logits"], ref["logits"], rtol=RTOL, atol=ATOL)
    for r in ranks:
        assert r["sample"].shape == (1, 8) and torch.equal(r["sample"], ranks[0]["sample"])
        if "sample" in ref:
            assert torch.equal(r["sample"], ref["sample"])
    saved, _ = load_full(tmp / name / "ckpt", prefix="model.")
    exported = load_file(str(tmp / name / "export" / "model.safetensors"))
    for tensors in (saved, exported):
        names = {k.removeprefix("model.") for k in tensors}
        assert names == set(ref["params"]) - {k for k in ref["params"] if k.endswith("rope")}
        for key in names:
            got = tensors[key] if key in tensors else tensors[f"model.{key}"]
            want = ref["params"][key].double()
            err = (got.double() - want).norm() / want.norm().clamp_min(1e-12)
            assert err <= PARAM_RTOL, f"{key}: relative error {err:.3g}"


def test_forward_sample_checkpoint_export(distributed_results) -> None:
    """1F1B: forward-only logits and sample, checkpoint and export (:func:`_check_extras`)."""
    _check_extras("1f1b", distributed_results["1f1b"], Path(distributed_results["_tmp"]))


@pytest.mark.slow
def test_zbv_matches_single_process(tmp_path) -> None:
    """ZBVZeroBubble (V placement: rank 0 holds stages 0 and 3, with split input/weight backward)."""
    ranks = [r["zbv"] for r in run_workers(_distributed_run, 2, ["zbv"], str(tmp_path))]
    assert [r["stages"] for r in ranks] == [[0, 3], [1, 2]]
    _check("zbv", ranks)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pp2_fsdp", "pp2_tp2", "pp2_fssdp"])
def test_composed_layouts_match_single_process(name: str, tmp_path) -> None:
    """PP=2 with FSDP2 over the two ranks of each stage, PP=2 x TP=2 (loss-parallel last stage, DTensor logits),
    and PP=2 with FSSDP experts over each stage's two ranks."""
    ranks = [r[name] for r in run_workers(_distributed_run, 4, [name], str(tmp_path))]
    _check(name, ranks)
    if SCENARIOS[name].get("extras"):
        _check_extras(name, ranks, tmp_path)


def test_split_errors_name_the_keys() -> None:
    from system.parallel.pp import check_microbatches, split_stage, stage_ids, stage_layer_ranges

    assert stage_layer_ranges(5, 2, 1) == [range(0, 3), range(3, 5)]
    assert stage_layer_ranges(4, 2, 2) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ConfigError, match=r"model.n_layers=3 .*parallel.pp=2 x parallel.pp_stages_per_rank=2"):
        stage_layer_ranges(3, 2, 2)
    with pytest.raises(ConfigError, match=r"training.batch_size=3 .*parallel.pp_microbatches"):
        check_microbatches(3, 2)
    assert stage_ids(1, 4, 2, "Interleaved1F1B") == (1, 5)
    assert stage_ids(1, 4, 2, "ZBVZeroBubble") == (1, 6)
    model = build(SCENARIOS["1f1b"])
    first = split_stage(model, range(0, 2), first=True, last=False)
    last = split_stage(model, range(2, 4), first=False, last=True)
    assert first.norm is None and first.output is None and last.tok_embeddings is None
    names = {n for n, _ in first.named_parameters()} | {n for n, _ in last.named_parameters()}
    assert names == {n for n, _ in model.named_parameters()}  # single-device names, nothing lost or doubled
    assert first.layers["1"] is model.layers[1]  # shared, not copied
    x = torch.randint(0, 64, (2, SEQ))
    with torch.no_grad(), one_thread():
        torch.testing.assert_close(last(first(x)), model(x), rtol=0, atol=0)


def test_tied_embeddings_refused() -> None:
    from system.parallel.pp import build_pipeline

    s = dict(SCENARIOS["1f1b"])
    model_cfg, moe_cfg, par, _ = configs(s)
    model = MoETransformer(dataclasses.replace(model_cfg, tie_embeddings=True), moe_cfg)
    with pytest.raises(ConfigError, match="model.tie_embeddings"):
        build_pipeline(model, None, par, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------- end to end

ROOT = Path(__file__).resolve().parents[1]
E2E = [
    "--model.dim", "32", "--model.n_layers", "4", "--model.n_heads", "2", "--model.tie_embeddings", "false",
    "--moe.num_experts", "4", "--moe.expert_dim", "32", "--training.seq_len", "16", "--training.batch_size", "4",
    "--training.steps", "6", "--training.log_interval", "1", "--training.eval_interval", "0",
    "--training.eval_batches", "2", "--training.sample_tokens", "4", "--training.warmup_steps", "1",
    "--metrics.progress", "false", "--parallel.pp", "2", "--parallel.ep", "1", "--parallel.pp_schedule", "1F1B",
    "--nproc-per-node", "2",
]


def _moesys_train(run_dir: Path, *extra: str) -> tuple[dict, dict[int, float]]:
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "system.cli", "train", "--config", str(ROOT / "configs/cpu-tiny.toml"), *E2E,
           "--metrics.run_dir", str(run_dir), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, records


def test_moesys_train_pp2_checkpoints_resumes_exports(tmp_path: Path) -> None:
    """``moesys train --parallel.pp 2`` (1F1B over 2 Gloo ranks): logs whole-model MoE metrics, checkpoints
    every 3 steps, evaluates, samples through the pipeline and exports one consolidated model; resuming step 3
    gives the uninterrupted run's losses."""
    from safetensors import safe_open

    summary, records = _moesys_train(tmp_path / "run", "--checkpoint.interval", "3")
    steps = {r["step"]: r for r in records if "loss" in r}
    assert sorted(steps) == list(range(1, 7)) and summary["pp"] == 2 and summary["world_size"] == 2
    for r in steps.values():
        assert r["aux_loss"] > 0 and r["z_loss"] > 0 and math.isfinite(r["grad_norm"])
        assert {f"moe/imbalance/layer{i}" for i in range(4)} <= set(r)  # every MoE layer, both stages
    assert math.isfinite(summary["val_loss"]) and isinstance(summary["sample"], str) and summary["sample"]
    with safe_open(str(tmp_path / "run" / "model" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"tok_embeddings.weight", "output.weight", "norm.weight", "layers.0.attention.wq.weight",
            "layers.3.moe.experts.w1"} <= names
    root = tmp_path / "run" / "checkpoints"
    resumed_summary, resumed = _moesys_train(tmp_path / "resumed", "--checkpoint.resume", str(root / "step_00000003"))
    losses = {r["step"]: r["loss"] for r in resumed if "loss" in r}
    assert sorted(losses) == [4, 5, 6] and resumed_summary["steps"] == 6
    for step, loss in losses.items():
        assert loss == pytest.approx(steps[step]["loss"], rel=1e-5), step
