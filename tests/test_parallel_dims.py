"""ParallelDims: degrees validated against the world size with errors naming the keys, and the world and
expert meshes on real Gloo ranks (coordinates, groups, EP folded onto dp_shard x tp)."""

from __future__ import annotations

import pytest

from system.config.loader import ConfigError
from system.distributed.parallel_dims import ParallelDims
from tests._dist import run_workers


@pytest.mark.parametrize("kwargs, world, needle", [
    (dict(dp=-1, ep=3), 4, "does not divide by parallel.pp=1 x parallel.ep=3"),
    (dict(dp=2, ep=2), 8, "set --parallel.dp -1"),
    (dict(dp=-1, ep=1, tp=3), 4, "parallel.tp=3 = 3"),
    (dict(dp=-1, ep=4, tp=2, dp_replicate=2, expert_tp=True), 8,
     "parallel.ep=4 does not divide the ranks expert parallelism folds onto, parallel.dp_shard=2"),
    (dict(dp=-1, ep=1, pp=2, dp_shard=3), 4, "pp=2 x dp_replicate=1 x dp_shard=3 x tp=1 = 6"),
    (dict(dp=-1, ep=0), 4, "parallel.ep must be >= 1"),
])
def test_invalid_degrees_name_the_keys(kwargs, world, needle):
    with pytest.raises(ConfigError) as e:
        ParallelDims.from_config(world_size=world, **kwargs)
    assert needle in str(e.value)


def test_derived_degrees():
    d = ParallelDims.from_config(-1, 4, 16, pp=2, tp=2)
    assert (d.dp_shard, d.dp, d.dp_degree, d.etp) == (4, 2, 4, 1)
    d = ParallelDims.from_config(-1, 2, 16, pp=2, tp=2, expert_tp=True)
    assert (d.dp_shard, d.dp, d.etp) == (4, 2, 2)
    assert d.world_coords(13) == {"pp": 1, "dp_replicate": 0, "dp_shard": 2, "tp": 1}
    assert d.dp_rank(13) == 2


def _meshes(rank, world, kwargs):
    dims = ParallelDims.from_config(world_size=world, **kwargs)
    emesh = dims.build_mesh("cpu")
    wmesh = dims.world_mesh
    import torch.distributed as dist

    out = {"coords": {n: wmesh[n].get_local_rank() for n in wmesh.mesh_dim_names}}
    out["expected"] = dims.world_coords(rank)
    for name in ("dp", "ep", "etp"):
        out[f"e_{name}"] = dist.get_process_group_ranks(emesh[name].get_group())
    out["dp_group"] = dist.get_process_group_ranks(dims.submesh("dp_replicate", "dp_shard").get_group())
    out["coords_ep"] = dims.coords(rank)
    out["ep_local"] = emesh["ep"].get_local_rank()
    out["dp_local"] = emesh["dp"].get_local_rank()
    return out


@pytest.mark.parametrize("kwargs, ep_groups", [
    (dict(dp=-1, ep=2, tp=2), {0: [0, 1], 2: [2, 3]}),                      # EP folded onto tp: contiguous
    pytest.param(dict(dp=-1, ep=2, pp=2), {0: [0, 1], 2: [2, 3]}, marks=pytest.mark.slow),  # one EP group per stage
    (dict(dp=-1, ep=2, tp=2, expert_tp=True), {0: [0, 2], 1: [1, 3]}),      # EP over dp_shard, stride tp
])
def test_meshes_on_four_ranks(kwargs, ep_groups):
    res = run_workers(_meshes, 4, kwargs)
    for rank, r in enumerate(res):
        assert r["coords"] == r["expected"]
        assert r["coords_ep"] == (r["dp_local"], r["ep_local"])
        if rank in ep_groups:
            assert r["e_ep"] == ep_groups[rank]
        # data-parallel ranks: same pp and tp coordinates
        assert all(res[o]["coords"]["pp"] == r["coords"]["pp"] and res[o]["coords"]["tp"] == r["coords"]["tp"]
                   for o in r["dp_group"])


def _records(rank, world):
    import torch

    from system.config.model import ModelConfig
    from system.config.moe import MoEConfig
    from system.config.parallel import ParallelConfig
    from system.models.model import MoETransformer
    from system.models.parallelize import parallelize_model
    from system.parallel.layout import layout_of

    cfg = ModelConfig(dim=16, n_layers=2, n_heads=2, ffn_dim=32, vocab_size=64, max_seq_len=8)
    moe = MoEConfig(num_experts=4, top_k=2, expert_dim=8, interleave=2)
    torch.manual_seed(0)
    model = MoETransformer(cfg, moe)
    model.init_weights(seed=0)
    par = ParallelConfig(ep=2, dense="fsdp")
    dims = ParallelDims.from_parallel_config(par, world)
    dims.build_mesh("cpu")
    parallelize_model(model, dims, par)
    return {name: (layout_of(p).kind, layout_of(p).offsets, layout_of(p).global_shape, layout_of(p).replicas,
                   layout_of(p).grad_divisor, layout_of(p).grad_group is not None)
            for name, p in model.named_parameters()}


def test_every_parameter_is_recorded_where_it_lives():
    """EP=2 x FSDP2 on 2 ranks: experts recorded as Shard(0) blocks at their EP offset, their gradient summed
    over no replica (dp = 1) and divided by the 2 data streams; FSDP2 parameters held once, nothing left to do."""
    r0, r1 = run_workers(_records, 2)
    w1 = "layers.0.moe.experts.w1"
    assert r0[w1][:3] == ("expert", (0, 0, 0), (4, 16, 8)) and r1[w1][1] == (2, 0, 0)
    assert r0[w1][3:] == (1, 2, False)
    emb = r0["tok_embeddings.weight"]
    assert emb == ("dense", None, (64, 16), 1, 1, False)
    assert set(r0) == set(r1)
