"""Training checkpoints reshard between parallel layouts (real Gloo processes).

Saved at EP=4 (4 processes), loaded at dp=2 x ep=2, EP=2 (2 processes), one process, FSSDP and
FSDP2+EP; saved under FSSDP (after a re-sharding moved expert ownership), loaded under EP and back.
Checks: every tensor, AdamW moments included, comes back bit-exactly (each load re-saves at once in
its own layout and the two checkpoints are compared tensor by tensor), and training resumed from
the checkpoint continues with the losses of uninterrupted training (same global batch).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests._dist import run_workers
from tests.ep_scenarios import SEED, SEQ, configs, forced_routing, set_routing

GLOBAL_ROWS = 4  # sequences per global batch: 1 per rank at world 4, 4 in one process
STEPS = 4

LAYOUTS = {
    "ep4": dict(world=4, ep=4),
    "dp2_ep2": dict(world=4, ep=2, dp=2),
    "ep2": dict(world=2, ep=2),
    "single": dict(world=1, ep=1),
    "fssdp2": dict(world=2, ep=1, mode="fssdp"),
    "fssdp4": dict(world=4, ep=1, mode="fssdp"),
    "fsdp_ep2": dict(world=2, ep=2, dense="fsdp"),
    # MoFME feature-modulated experts (used by tests/test_mofme.py)
    "fme_ep2": dict(world=2, ep=2, expert_type="fme", modulation="lowrank"),
    "fme_single": dict(world=1, ep=1, expert_type="fme", modulation="lowrank"),
    "fme_fssdp2": dict(world=2, ep=1, mode="fssdp", expert_type="fme", modulation="lowrank"),
}


class _Position:
    """A stand-in data loader: only its resumable position matters here."""

    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(SEED)
    return [(torch.randint(0, 64, (GLOBAL_ROWS, SEQ), generator=g), torch.randint(0, 64, (GLOBAL_ROWS, SEQ), generator=g))
            for _ in range(STEPS)]


def _worker(rank: int, world: int, layout: str, load_from: str, resave_to: str, save_to: str, train_steps: int,
            reshard_every: int) -> dict:
    from system.checkpoint.manager import CheckpointManager
    from system.config.fssdp import FSSDPConfig
    from system.distributed import ParallelDims
    from system.models.model import MoETransformer
    from system.models.parallelize import parallelize_model
    from system.parallel.grads import clip_grad_norm_, sync_gradients
    from system.train.optim import build_lr_scheduler, build_optimizer

    s = dict(LAYOUTS[layout], routing="skew")
    model_cfg, moe_cfg, par, train_cfg = configs(s)
    train_cfg.steps, train_cfg.warmup_steps = STEPS, 1
    dims = ParallelDims.from_config(par.dp, par.ep, world)
    mesh = dims.build_mesh("cpu")
    model = MoETransformer(model_cfg, moe_cfg)
    model.init_weights(seed=SEED if not load_from else SEED + 1)  # a loaded run must not depend on its init
    fssdp_cfg = FSSDPConfig(load_window=2, overlap_budget=1, memory_budget=2, reshard_interval=reshard_every,
                            ranks_per_node=2)
    fssdp = parallelize_model(model, mesh, par, fssdp=fssdp_cfg)
    opt = build_optimizer(model, train_cfg)
    sched = build_lr_scheduler(opt, train_cfg)
    loader = _Position()
    root = str(Path(save_to or resave_to or load_from).parent)
    mgr = CheckpointManager(root, model, opt, sched, loader, layout={"world_size": world, **LAYOUTS[layout]},
                            async_save=True, keep_last=0, extra_fn=lambda: {"config": {"layout": layout}})
    step = 0
    if load_from:
        step = mgr.load(load_from).step
        assert loader.position == step
        if resave_to:  # re-save at once, in this layout: must equal what was loaded
            assert Path(resave_to).name == f"step_{step:08d}"
            mgr.save(step)
            mgr.wait()
    rows = slice(rank * GLOBAL_ROWS // world, (rank + 1) * GLOBAL_ROWS // world)
    losses, resharded = [], False
    for x, y in _batches()[step:step + train_steps]:
        fwd = forced_routing(s, step, x.numel())
        if fwd is not None:
            set_routing(model, fwd.view(GLOBAL_ROWS, SEQ, -1)[rows].flatten(0, 1))
        x, y = x[rows], y[rows]
        opt.zero_grad(set_to_none=True)
        if fssdp is not None:
            fssdp.begin_step()
        ce = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        (ce + model.aux_loss()).backward()
        sync_gradients(model, mesh)
        clip_grad_norm_(model, mesh, train_cfg.max_grad_norm)
        opt.step()
        sched.step()
        if fssdp is not None:
            resharded |= fssdp.end_step(opt)
        step += 1
        loader.position = step
        loss = ce.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
    if save_to:
        assert Path(save_to).name == f"step_{step:08d}"
        mgr.save(step)
    mgr.close()
    return {"losses": losses, "resharded": resharded}


def _run(layout: str, load_from: str = "", resave_to: str = "", save_to: str = "", train_steps: int = 0,
         reshard_every: int = 0) -> dict:
    return run_workers(_worker, LAYOUTS[layout]["world"], layout, load_from, resave_to, save_to, train_steps,
                       reshard_every)[0]


def _assert_same_checkpoint(a: str, b: str) -> None:
    from system.checkpoint import load_full

    ta, ra = load_full(a)
    tb, rb = load_full(b)
    assert sorted(ta) == sorted(tb)
    assert any(k.startswith("optim.exp_avg_sq.") and ".experts." in k for k in ta)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert torch.equal(ta[k], tb[k]), f"{k} differs between {a} and {b}"
    assert ra.extra["step"] == rb.extra["step"]
    assert ra.extra["optimizer"] == rb.extra["optimizer"]
    assert ra.extra["scheduler"] == rb.extra["scheduler"]
    assert ra.extra["loader"] == rb.extra["loader"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ckpt")
    reference = _run("single", train_steps=STEPS)["losses"]
    first = _run("ep4", save_to=str(root / "ep4" / "step_00000002"), train_steps=2)["losses"]
    return {"root": root, "reference": reference, "first": first, "ep4": str(root / "ep4" / "step_00000002")}


def test_uninterrupted_ep4_matches_one_process(saved) -> None:
    torch.testing.assert_close(saved["first"], saved["reference"][:2], rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout", ["dp2_ep2", "ep2", "single", "fssdp2", "fsdp_ep2"])
def test_ep4_checkpoint_reshards(saved, layout: str) -> None:
    """Load the EP=4 checkpoint in another layout: same tensors bit-exactly, same next losses."""
    resaved = str(saved["root"] / layout / "step_00000002")
    out = _run(layout, load_from=saved["ep4"], resave_to=resaved, train_steps=2)
    _assert_same_checkpoint(saved["ep4"], resaved)
    torch.testing.assert_close(out["losses"], saved["reference"][2:], rtol=1e-5, atol=0)


def test_fssdp_checkpoint_to_ep_and_back(saved) -> None:
    """Save under FSSDP after ownership moved (re-sharding every step), load under EP=2, then FSSDP at 4."""
    root = saved["root"]
    fs = str(root / "fs" / "step_00000004")
    out = _run("fssdp2", load_from=saved["ep4"], save_to=fs, train_steps=2, reshard_every=1)
    assert out["resharded"], "ownership never moved: the test would not cover a re-sharded save"
    torch.testing.assert_close(out["losses"], saved["reference"][2:], rtol=1e-5, atol=0)
    ep = str(root / "fs_ep2" / "step_00000004")
    _run("ep2", load_from=fs, resave_to=ep)
    _assert_same_checkpoint(fs, ep)
    back = str(root / "fs_back" / "step_00000004")
    _run("fssdp4", load_from=ep, resave_to=back)
    _assert_same_checkpoint(ep, back)
