"""Saved models hold experts under their global index and load under any EP degree.

Regression test for the bug class where every rank numbers its local experts from 0, so a saved
model holds one rank's experts and a resumed or resharded run silently uses the wrong weights.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ep_scenarios import SCENARIOS, build, configs, global_batches
from _dist import run_workers
from system.checkpoint.model_io import MODEL_FILE, load_model, read_config, save_model


def _train_and_save(rank: int, world: int, path: str) -> None:
    import torch.nn.functional as F

    from system.distributed import ParallelDims
    from system.models.parallelize import parallelize_model
    from system.parallel.grads import clip_grad_norm_, sync_gradients
    from system.train.optim import build_optimizer

    s = dict(SCENARIOS["ep4"])
    _, _, par, train_cfg = configs(s)
    mesh = ParallelDims.from_config(par.dp, par.ep, world).build_mesh("cpu")
    model = build(s)
    parallelize_model(model, mesh, par)
    opt = build_optimizer(model, train_cfg)
    x, y = global_batches(s)[0]
    rows = slice(rank * 2, rank * 2 + 2)
    loss = F.cross_entropy(model(x[rows]).flatten(0, 1), y[rows].flatten()) + model.aux_loss()
    loss.backward()
    sync_gradients(model, mesh)
    clip_grad_norm_(model, mesh, train_cfg.max_grad_norm)
    opt.step()
    save_model(model, mesh, path, {"scenario": "ep4"})


def _load_local(rank: int, world: int, path: str, ep: int) -> dict:
    from system.distributed import ParallelDims
    from system.models.parallelize import parallelize_model

    s = dict(SCENARIOS["ep4"], ep=ep, world=world)
    _, _, par, _ = configs(s)
    par.ep, par.dp = ep, world // ep
    mesh = ParallelDims.from_config(par.dp, par.ep, world).build_mesh("cpu")
    model = build(s)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    parallelize_model(model, mesh, par)
    load_model(model, path)
    return {
        "offsets": [m.experts.expert_offset for m in model.moe_layers()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ckpt") / "model")
    run_workers(_train_and_save, 4, path)
    return path


def test_saved_experts_have_global_shape_and_differ(saved) -> None:
    tensors = load_file(f"{saved}/{MODEL_FILE}")
    w1 = tensors["layers.0.moe.experts.w1"]
    assert w1.shape == (8, 32, 48)
    # every expert slice is distinct: a save of one rank's experts repeated would fail this
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.equal(w1[i], w1[j])
    assert read_config(saved) == {"scenario": "ep4"}


def test_saved_model_equals_single_process_training(saved) -> None:
    from ep_scenarios import reference_run

    import ep_scenarios

    old = ep_scenarios.STEPS
    ep_scenarios.STEPS = 1
    try:
        ref = reference_run(dict(SCENARIOS["ep4"]))
    finally:
        ep_scenarios.STEPS = old
    tensors = load_file(f"{saved}/{MODEL_FILE}")
    for key, value in ref["params"].items():
        err = (tensors[key].double() - value.double()).norm() / value.double().norm()
        assert err < 5e-5, key  # AdamW's first step amplifies float noise (see tests/test_expert_parallel.py)


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2)])
def test_load_under_other_ep_degree(saved, world: int, ep: int) -> None:
    tensors = load_file(f"{saved}/{MODEL_FILE}")
    results = run_workers(_load_local, world, saved, ep)
    per = 8 // ep
    for rank, r in enumerate(results):
        lo = (rank % ep) * per
        assert set(r["offsets"]) == {lo}
        for key, value in r["state"].items():
            expected = tensors[key][lo : lo + per] if ".experts." in key else tensors[key]
            assert torch.equal(value, expected), f"rank {rank}: {key}"


def test_load_single_process_and_errors(saved, tmp_path) -> None:
    s = dict(SCENARIOS["ep4"])
    model = build(s)
    load_model(model, saved)
    tensors = load_file(f"{saved}/{MODEL_FILE}")
    for key, value in model.state_dict().items():
        assert torch.equal(value, tensors[key]), key

    bigger = dict(s)
    model_cfg, moe_cfg, _, _ = configs(bigger)
    moe_cfg.expert_dim = 64
    from system.models.model import MoETransformer

    with pytest.raises(ValueError, match=r"layers\.0\.moe\.experts\.w1.*shape"):
        load_model(MoETransformer(model_cfg, moe_cfg), saved)
    with pytest.raises(FileNotFoundError):
        load_model(model, tmp_path / "nothing")


def test_save_replaces_atomically(tmp_path) -> None:
    """A second save replaces the folder only with ``overwrite=True``; no temporary folders are left behind."""
    from system.checkpoint.errors import ExportTargetError

    from system.distributed import ParallelDims  # noqa: F401  (single process: no mesh collectives)

    class _Mesh:
        def __getitem__(self, key):
            return self

        def size(self):
            return 1

    model = build(dict(SCENARIOS["ep2"]))
    path = tmp_path / "m"
    save_model(model, _Mesh(), path, {"a": 1})
    with pytest.raises(ExportTargetError, match="--overwrite"):
        save_model(model, _Mesh(), path, {"a": 2})
    assert read_config(path) == {"a": 1}
    save_model(model, _Mesh(), path, {"a": 2}, overwrite=True)
    assert read_config(path) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in path.iterdir()) == [".moesys-export.json", "config.json", MODEL_FILE]
