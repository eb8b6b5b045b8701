"""Checkpoints reshard across every parallel layout: a training state (model + AdamW) saved under one layout
loads under another bit-exactly, and the next step's loss is the same.

The chain (default suite): trained and saved under TP=2 x PP=2 x EP=2 (4 Gloo ranks: EP folded onto tp) ->
loaded in one process (every parameter and AdamW moment equal, bit for bit; next loss equal) and saved again ->
loaded under FSSDP + FSDP2 (2 ranks; equal; next loss equal) and saved again -> loaded in one process once more:
still bit-equal to what the first layout saved. The slow matrix adds TP x EP, FSDP2 x TP, expert TP, HSDP and PP x EP.
Every run starts from the same seed and reads the same global batches (each data-parallel stream its rows).
"""

from __future__ import annotations

import pytest
import torch

from tests._dist import run_workers

DIM, LAYERS, HEADS, EXPERTS, VOCAB, SEQ, GLOBAL_BATCH = 32, 4, 4, 4, 64, 8, 4
LOSS_RTOL = 1e-5

LAYOUTS: dict[str, dict] = {
    "single": {},
    "tp2_ep2": dict(tp=2, ep=2),
    "fssdp_fsdp": dict(expert_mode="fssdp", dense="fsdp"),
    "fsdp_tp2": dict(dense="fsdp", tp=2),
    "expert_tp2_ep2": dict(tp=2, ep=2, expert_tp=True),
    "hsdp_ep2": dict(dense="fsdp", dp_replicate=2, ep=2),
    "pp2_tp2_ep2": dict(pp=2, tp=2, ep=2),
    "pp2_ep2": dict(pp=2, ep=2),
}


def _configs():
    from system.config.model import ModelConfig
    from system.config.moe import MoEConfig
    from system.config.training import TrainingConfig

    model = ModelConfig(dim=DIM, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=2, ffn_dim=64, vocab_size=VOCAB,
                        max_seq_len=SEQ)
    moe = MoEConfig(num_experts=EXPERTS, top_k=2, expert_dim=32, interleave=2, aux_loss_coef=0.01)
    model.tie_embeddings = False  # pipeline stages cannot share the embedding with the head
    train = TrainingConfig(lr=1e-2, warmup_steps=0, steps=10, batch_size=GLOBAL_BATCH, seq_len=SEQ)
    return model, moe, train


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _phase(rank: int, world: int, layout: str, load_from: str | None, save_to: str | None, train_before: int,
           next_steps: int) -> dict:
    """Build the layout, optionally load, train, optionally save; the full state at the save and the next losses."""
    import torch.distributed as dist

    from system.checkpoint.api import load, save
    from system.checkpoint.model_io import full_state_dict
    from system.checkpoint.storage import read_metadata, Storage
    from system.checkpoint.train_state import load_optimizer_extra, optimizer_extra, sharded_train_state
    from system.config.parallel import ParallelConfig
    from system.distributed import ParallelDims
    from system.models.model import MoETransformer
    from system.models.parallelize import parallelize_model
    from system.train.optim import build_lr_scheduler, build_optimizer
    from system.train.step import pipeline_train_step, train_step

    mcfg, moecfg, tcfg = _configs()
    par = ParallelConfig(**LAYOUTS[layout])
    torch.manual_seed(0)
    model = MoETransformer(mcfg, moecfg)
    model.init_weights(seed=0)
    dims = ParallelDims.from_parallel_config(par, world)
    dims.build_mesh("cpu")
    if par.pp > 1:
        from system.parallel.pp import build_pipeline

        runner = build_pipeline(model, dims, par, torch.device("cpu"),
                                parallelize=lambda stage: parallelize_model(stage, dims, par))
        parts = runner.model
    else:
        runner = None
        parallelize_model(model, dims, par)
        parts = model
    opt = build_optimizer(parts, tcfg)
    sched = build_lr_scheduler(opt, tcfg)
    out: dict = {}
    if load_from is not None:
        load(sharded_train_state(parts, opt), load_from)
        meta = read_metadata(Storage(load_from))
        load_optimizer_extra(opt, meta.extra["optimizer"])
        sched.load_state_dict(meta.extra["scheduler"])
    start = int(read_metadata(Storage(load_from)).extra["step"]) if load_from else 0
    streams, me = dims.dp_degree, dims.dp_rank(rank)
    rows = GLOBAL_BATCH // streams

    def step(s: int) -> float:
        x, y = _batch(s)
        x, y = x[me * rows:(me + 1) * rows], y[me * rows:(me + 1) * rows]
        if runner is not None:
            st = pipeline_train_step(runner, opt, sched, [(x, y)], max_grad_norm=tcfg.max_grad_norm)
        else:
            st = train_step(model, opt, sched, [(x, y)], max_grad_norm=tcfg.max_grad_norm)
        loss = torch.tensor([st.loss], dtype=torch.float64)
        if dist.is_initialized() and world > 1:
            dist.all_reduce(loss)
            loss /= world  # every rank of a stream reports its stream's loss
        return float(loss)

    for s in range(start, start + train_before):
        step(s)
    if save_to is not None:
        save(sharded_train_state(parts, opt), save_to,
             extra={"optimizer": optimizer_extra(opt), "step": start + train_before,
                    "scheduler": sched.state_dict()})
        out["saved"] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in _full_train_state(save_to).items()}
    full = full_state_dict(parts)
    if runner is not None:  # every stage's tensors, from one rank of each stage
        parts_all = [None] * world
        dist.all_gather_object(parts_all, full)
        full = {k: v for part in parts_all for k, v in part.items()}
    out["loaded"] = {k: v.clone() for k, v in full.items()}  # on CPU these alias the live parameters
    out["next"] = [step(s) for s in range(start + train_before, start + train_before + next_steps)]
    return out if rank == 0 else {}


def _full_train_state(path: str) -> dict:
    from system.checkpoint.api import load_full

    tensors, _ = load_full(path)
    return tensors


def _run(layout: str, world: int, *args) -> dict:
    return run_workers(_phase, world, layout, *args)[0]


def _assert_bit_equal(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), f"{what}: tensor names differ: {sorted(set(a) ^ set(b))[:5]}"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max {(a[k].double() - b[k].double()).abs().max():.3g})"


def _chain(tmp_path, first: tuple[str, int], second: tuple[str, int]) -> None:
    ck1, ck2, ck3 = (str(tmp_path / f"ck{i}") for i in (1, 2, 3))
    a = _run(first[0], first[1], None, ck1, 1, 1)
    b = _run("single", 1, ck1, ck2, 0, 1)
    _assert_bit_equal(b["saved"], a["saved"], f"{first[0]} -> single, re-saved")
    _assert_bit_equal({k: v for k, v in b["loaded"].items()}, {k[6:]: v for k, v in a["saved"].items()
                                                              if k.startswith("model.")}, "single loaded")
    assert b["next"] == pytest.approx(a["next"], rel=LOSS_RTOL)
    c = _run(second[0], second[1], ck2, ck3, 0, 1)
    _assert_bit_equal(c["saved"], a["saved"], f"single -> {second[0]}, re-saved")
    assert c["next"] == pytest.approx(a["next"], rel=LOSS_RTOL)
    d = _run("single", 1, ck3, None, 0, 1)
    _assert_bit_equal({k: v for k, v in d["loaded"].items()}, {k[6:]: v for k, v in a["saved"].items()
                                                              if k.startswith("model.")}, "and back")
    assert d["next"] == pytest.approx(a["next"], rel=LOSS_RTOL)


def test_tp_pp_ep_to_one_process_to_fssdp_and_back(tmp_path):
    _chain(tmp_path, ("pp2_tp2_ep2", 4), ("fssdp_fsdp", 2))


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [
    (("tp2_ep2", 4), ("fssdp_fsdp", 4)),
    (("fsdp_tp2", 4), ("expert_tp2_ep2", 4)),
    (("hsdp_ep2", 4), ("pp2_ep2", 4)),
])
def test_matrix(tmp_path, first, second):
    _chain(tmp_path, first, second)
