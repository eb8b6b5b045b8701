"""The hierarchical all-to-all (SE-MoE) equals the flat one bit for bit (4 Gloo ranks as 2 nodes x 2).

Same inputs through :class:`AllToAllDispatcher` and :class:`HierarchicalAllToAllDispatcher`: a dispatch ->
per-expert function -> combine with skewed routing (idle experts, a rank receiving nothing, a rank sending
nothing, everything on one expert), and a full :class:`MoELayer` forward/backward; outputs and gradients
compared with ``torch.equal``. Plus the ``ranks_per_node`` resolution and its errors.
"""

from __future__ import annotations

import os

import pytest
import torch

from _dist import run_workers
from system.moe.hierarchical_a2a import resolve_ranks_per_node

WORLD, PER_NODE, E, D = 4, 2, 8, 6

# Per scenario: tokens per rank, and routing probabilities over the E experts (rank j holds experts 2j, 2j+1).
SCENARIOS = {
    "uniform": ([5, 9, 3, 7], [1.0] * E),
    # experts 2, 3 (all of rank 1) and 7 idle; rank 3 sends nothing
    "skewed": ([11, 4, 6, 0], [6.0, 1.0, 0.0, 0.0, 0.5, 4.0, 1.0, 0.0]),
    # everything to expert 6 (rank 3, on the other node for ranks 0 and 1)
    "one_expert": ([4, 5, 6, 3], [0.0] * 6 + [1.0, 0.0]),
}


def _exchange_run(rank: int, dispatcher, tokens: list[int], probs: list[float], seed: int) -> dict:
    """Route random rows, dispatch, scale each row by its expert's weight (and tanh), combine, backward.

    ``rank`` is the EP rank (it picks the token count, the expert rows and, with ``seed``, the data).
    """
    g = torch.Generator().manual_seed(seed * 100 + rank)
    x = torch.randn(tokens[rank], D, generator=g, requires_grad=True)
    experts = torch.multinomial(torch.tensor(probs), tokens[rank], replacement=True, generator=g) if tokens[rank] \
        else torch.zeros(0, dtype=torch.long)
    order = torch.argsort(experts, stable=True)
    counts = torch.bincount(experts, minlength=E)
    w_global = torch.randn(E, D, generator=torch.Generator().manual_seed(seed))
    per = E // WORLD
    w = w_global[rank * per:(rank + 1) * per].clone().requires_grad_()
    grad_out = torch.randn(tokens[rank], D, generator=g)

    x_local, local_counts = dispatcher.dispatch(x[order], counts)
    y_local = torch.tanh(x_local * w.repeat_interleave(local_counts, dim=0))
    out = dispatcher.combine(y_local)
    (out * grad_out).sum().backward()
    return {"x_local": x_local.detach(), "local_counts": local_counts, "out": out.detach(),
            "x_grad": x.grad.clone() if x.grad is not None else torch.zeros_like(x), "w_grad": w.grad.clone()}


def _layer_run(rank: int, mesh, dispatcher_of) -> dict:
    """A full MoELayer (experts sliced as apply_ep does) forward/backward with forced skewed routing."""
    import torch.distributed as dist

    from system.config.moe import MoEConfig
    from system.moe.layer import MoELayer

    torch.manual_seed(3)
    layer = MoELayer(12, MoEConfig(num_experts=E, top_k=2, expert_dim=10, num_shared_experts=1))
    layer.init_weights(0.2, 0.2)
    per = E // WORLD
    layer.experts.keep_experts_(rank * per, (rank + 1) * per)
    layer.dispatcher = dispatcher_of(mesh["ep"])
    layer.stats_group = dist.group.WORLD
    g = torch.Generator().manual_seed(50 + rank)
    x = torch.randn(2, 5, 12, generator=g, requires_grad=True)
    # rank 0: only experts 0 and 5; rank 2: only its own experts 4, 5 (sends nothing away); experts 2, 3 idle
    choices = torch.tensor({0: [0, 5], 1: [1, 6, 7, 0], 2: [4, 5], 3: [6, 1, 5, 4]}[rank])
    first = torch.randint(len(choices), (10,), generator=g)
    second = (first + torch.randint(1, len(choices), (10,), generator=g)) % len(choices)  # distinct from first
    layer.router.forced_indices = choices[torch.stack([first, second], dim=1)]
    out = layer(x)
    ((out * torch.randn(out.shape, generator=g)).sum() + layer.last_stats.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return {"out": out.detach(), "x_grad": x.grad.clone(), "grads": grads,
            "expert_tokens": layer.last_stats.expert_tokens}


def _worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from system.moe.dispatch import AllToAllDispatcher
    from system.moe.hierarchical_a2a import HierarchicalAllToAllDispatcher, build_ep_dispatcher

    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "ep"))
    ep_mesh = mesh["ep"]
    res: dict = {"exchange": {}}

    def flat():
        return AllToAllDispatcher(ep_mesh.get_group(), E)

    hier = build_ep_dispatcher(ep_mesh, E, "hierarchical", PER_NODE)
    second = build_ep_dispatcher(mesh["ep"], E, "hierarchical", PER_NODE)  # a second layer: groups reused
    res["types"] = (type(hier).__name__, type(second).__name__)
    res["groups_shared"] = hier.intra is second.intra and hier.inter is second.inter
    res["group_sizes"] = (hier.intra.size(), hier.inter.size())
    for seed, (name, (tokens, probs)) in enumerate(SCENARIOS.items()):
        res["exchange"][name] = {
            "flat": _exchange_run(rank, flat(), tokens, probs, seed),
            "hier": _exchange_run(rank, hier, tokens, probs, seed),
            # degenerate shapes: one node of 4 (intra stage only), 4 nodes of 1 (inter stage only)
            "hier_4x1": _exchange_run(rank, HierarchicalAllToAllDispatcher(ep_mesh, E, world), tokens, probs, seed),
            "hier_1x4": _exchange_run(rank, HierarchicalAllToAllDispatcher(ep_mesh, E, 1), tokens, probs, seed),
        }
    res["layer"] = {"flat": _layer_run(rank, mesh, lambda m: AllToAllDispatcher(m.get_group(), E)),
                    "hier": _layer_run(rank, mesh, lambda m: build_ep_dispatcher(m, E, "hierarchical", PER_NODE))}

    os.environ["LOCAL_WORLD_SIZE"] = "2"  # ranks_per_node=0: from LOCAL_WORLD_SIZE
    res["auto_2"] = build_ep_dispatcher(ep_mesh, E, "hierarchical", 0).ranks_per_node
    os.environ["LOCAL_WORLD_SIZE"] = str(world)  # one node: flat
    res["auto_world"] = type(build_ep_dispatcher(ep_mesh, E, "hierarchical", 0)).__name__
    res["errors"] = []
    for a2a, per_node in (("hierarchical", 3), ("ring", 2)):  # raised before any collective: no rank hangs
        try:
            build_ep_dispatcher(ep_mesh, E, a2a, per_node)
        except ValueError as e:
            res["errors"].append(str(e))
    return res


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_workers(_worker, WORLD)


def _assert_equal(a: dict, b: dict, where: str) -> None:
    for key, va in a.items():
        vb = b[key]
        if isinstance(va, dict):
            _assert_equal(va, vb, f"{where}.{key}")
        elif isinstance(va, torch.Tensor):
            assert va.shape == vb.shape and torch.equal(va, vb), f"{where}.{key} differs"
        else:
            assert va == vb, f"{where}.{key}: {va} != {vb}"


def test_groups(results) -> None:
    for r in results:
        assert r["types"] == ("HierarchicalAllToAllDispatcher", "HierarchicalAllToAllDispatcher")
        assert r["groups_shared"], "the second layer's dispatcher created new groups"
        assert r["group_sizes"] == (PER_NODE, WORLD // PER_NODE)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_exchange_equals_flat(results, name: str) -> None:
    for rank, r in enumerate(results):
        runs = r["exchange"][name]
        for variant in ("hier", "hier_4x1", "hier_1x4"):
            _assert_equal(runs["flat"], runs[variant], f"rank {rank} {name} {variant}")
    # the scenarios do what they say
    received = [int(r["exchange"][name]["flat"]["local_counts"].sum()) for r in results]
    if name == "skewed":
        assert received[1] == 0 and received[0] > 0 and received[2] > 0
    if name == "one_expert":
        assert received == [0, 0, 0, sum(SCENARIOS[name][0])]


def test_moe_layer_equals_flat(results) -> None:
    for rank, r in enumerate(results):
        _assert_equal(r["layer"]["flat"], r["layer"]["hier"], f"rank {rank} layer")
        assert {"router.gate.weight", "shared_experts.w1.weight"} <= set(r["layer"]["flat"]["grads"])
    assert results[1]["layer"]["flat"]["expert_tokens"] == 0  # experts 2, 3 idle


def test_ranks_per_node_resolution_and_errors(results) -> None:
    for r in results:
        assert r["auto_2"] == 2
        assert r["auto_world"] == "AllToAllDispatcher"
        bad_split, bad_kind = r["errors"]
        assert "parallel.a2a_ranks_per_node=3" in bad_split and "parallel.ep=4" in bad_split
        assert "parallel.a2a" in bad_kind and "'ring'" in bad_kind


def _replicated_worker(rank: int, world: int) -> dict:
    """dp=2 x ep=4 on 8 ranks: two EP groups, whose node groups are all created together (collectively)."""
    from system.distributed import ParallelDims
    from system.moe.dispatch import AllToAllDispatcher
    from system.moe.hierarchical_a2a import build_ep_dispatcher

    ep_mesh = ParallelDims.from_config(2, 4, world).build_mesh("cpu")["ep"]
    ep_rank, dp_rank = ep_mesh.get_local_rank(), rank // 4
    hier = build_ep_dispatcher(ep_mesh, E, "hierarchical", PER_NODE)
    out = {"intra": dist_ranks(hier.intra), "inter": dist_ranks(hier.inter)}
    for seed, (name, (tokens, probs)) in enumerate(SCENARIOS.items()):
        seed += 10 * dp_rank  # the two EP groups exchange different data
        out[name] = {"flat": _exchange_run(ep_rank, AllToAllDispatcher(ep_mesh.get_group(), E), tokens, probs, seed),
                     "hier": _exchange_run(ep_rank, hier, tokens, probs, seed)}
    return out


def dist_ranks(group) -> list[int]:
    """Global ranks of ``group``."""
    import torch.distributed as dist

    return dist.get_process_group_ranks(group)


@pytest.mark.slow
def test_two_ep_groups_equal_flat() -> None:
    results = run_workers(_replicated_worker, 8)
    for rank, r in enumerate(results):
        base = rank - rank % 4  # this rank's EP group: [base, base + 4)
        assert r["intra"] == [base + i for i in range(4) if i // PER_NODE == (rank - base) // PER_NODE]
        assert r["inter"] == [base + i for i in range(4) if i % PER_NODE == (rank - base) % PER_NODE]
        for name in SCENARIOS:
            _assert_equal(r[name]["flat"], r[name]["hier"], f"rank {rank} {name}")


def test_resolve_ranks_per_node(monkeypatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_ranks_per_node([0, 1, 2, 3], 0) == 4  # unknown topology: one node (flat)
    assert resolve_ranks_per_node([0, 1, 2, 3], 2) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    # expert TP 2 on 8-rank nodes: EP ranks 0, 2, ..., 14 are 4 per node
    assert resolve_ranks_per_node(list(range(0, 16, 2)), 0) == 4
    assert resolve_ranks_per_node([4, 5, 6, 7], 0) == 4  # an EP group inside one node
    with pytest.raises(ValueError, match=r"parallel\.a2a_ranks_per_node=3 .*parallel\.ep=4"):
        resolve_ranks_per_node([0, 1, 2, 3], 3)
    with pytest.raises(ValueError, match=r"parallel\.a2a_ranks_per_node"):
        resolve_ranks_per_node([6, 7, 8, 9, 10, 11], 0)  # 2 + 4 ranks on two nodes: uneven
