"""FSSDP primitives (Hecate): ownership, placement, token routing, sparse collectives, resharding.

The collectives and ``reshard`` run on real Gloo processes: one spawn for world 2 and one for world
4 run every case (:func:`_worker`) and the parametrized tests compare each rank's result with a
single-process reference built from the full ``[E, ...]`` tensors.
"""

from __future__ import annotations

import json

import pytest
import torch

from _dist import run_workers
from system.parallel.fssdp import (
    LoadTracker,
    Ownership,
    estimate_overlap_budget,
    heterogeneous_sharding,
    materialized_ids,
    reshard,
    route_tokens,
    sparse_all_gather,
    sparse_materialization,
    sparse_reduce_scatter,
)

WORLDS = (2, 4)


# ---------------------------------------------------------------------------------------------
# Case builders (deterministic: the parent and every worker build the same cases)

def _random_ownership(E: int, W: int, gen: torch.Generator, empty: tuple[int, ...] = ()) -> Ownership:
    allowed = torch.tensor([r for r in range(W) if r not in empty])
    owner = allowed[torch.randint(len(allowed), (E,), generator=gen)]
    slot = torch.empty(E, dtype=torch.int64)
    for r in range(W):
        ids = torch.nonzero(owner == r).flatten()
        slot[ids] = torch.randperm(ids.numel(), generator=gen)
    return Ownership(owner=owner, slot=slot)


def _owner_only(own: Ownership, W: int) -> torch.Tensor:
    pl = torch.zeros(own.num_experts, W, dtype=torch.bool)
    pl[torch.arange(own.num_experts), own.owner] = True
    return pl


def _random_placement(own: Ownership, W: int, gen: torch.Generator, p: float = 0.4) -> torch.Tensor:
    return (torch.rand(own.num_experts, W, generator=gen) < p) | _owner_only(own, W)


def _values(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=gen).to(dtype)


def _collective_cases(W: int) -> list[dict]:
    """Each case: ownership, placement, full ``[E, *row]`` parameters, per-rank gradients ``[W, E, *row]``."""
    gen = torch.Generator().manual_seed(1000 + W)
    specs: list[tuple[str, Ownership, str, tuple[int, ...], torch.dtype, bool]] = []
    E_uneven = 5 if W == 2 else 7
    uni = Ownership.uniform(E_uneven, W)
    specs += [
        ("uniform_uneven_random", uni, "random", (7,), torch.float32, False),
        ("uniform_uneven_async", uni, "random", (7,), torch.float32, True),
        ("owner_only", uni, "owner", (5,), torch.float32, False),
        ("one_everywhere", uni, "one_everywhere", (5,), torch.float32, False),
        ("all_everywhere", uni, "all", (3,), torch.float32, True),
        ("fewer_experts_than_ranks", Ownership.uniform(W - 1, W), "random", (4,), torch.float32, False),
        ("single_expert", Ownership.uniform(1, W), "all", (6,), torch.float32, False),
        ("rank0_owns_nothing", _random_ownership(6, W, gen, empty=(0,)), "random", (9,), torch.float32, False),
        ("bf16", _random_ownership(8, W, gen), "random", (11,), torch.bfloat16, False),
        ("float64_row_2x3", _random_ownership(6, W, gen), "random", (2, 3), torch.float64, True),
        ("int64", _random_ownership(6, W, gen), "random", (4,), torch.int64, False),
        ("p1", _random_ownership(9, W, gen), "random", (1,), torch.float32, False),
        ("p0", _random_ownership(4, W, gen), "random", (0,), torch.float32, False),
        ("big_p", _random_ownership(6, W, gen), "random", (1000,), torch.float32, False),
        ("from_algorithm1", uni, "algorithm1", (8,), torch.float32, True),
    ]
    if W == 4:
        specs += [
            ("ranks_1_3_own_nothing", _random_ownership(7, W, gen, empty=(1, 3)), "random", (5,), torch.float32, False),
            ("all_on_rank2", _random_ownership(5, W, gen, empty=(0, 1, 3)), "random", (5,), torch.float32, True),
        ]
    for seed in range(3):
        specs.append((f"random_seed{seed}", _random_ownership(10, W, gen), "random", (6,), torch.float32, seed == 1))
    cases = []
    for name, own, kind, row, dtype, async_op in specs:
        E = own.num_experts
        if kind == "random":
            pl = _random_placement(own, W, gen)
        elif kind == "owner":
            pl = _owner_only(own, W)
        elif kind == "one_everywhere":
            pl = _owner_only(own, W)
            pl[E // 2] = True
        elif kind == "all":
            pl = torch.ones(E, W, dtype=torch.bool)
        else:
            load = torch.rand(E, generator=gen) * 100
            pl = sparse_materialization(load, own, W, ranks_per_node=2, overlap_budget=3, memory_budget=2)
        cases.append(dict(name=name, own=own, placement=pl, full=_values((E,) + row, dtype, gen),
                          grads=_values((W, E) + row, dtype, gen), async_op=async_op))
    return cases


def _reshard_cases(W: int) -> list[dict]:
    gen = torch.Generator().manual_seed(2000 + W)
    E = 7
    zipf = 1000.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
    uni = Ownership.uniform(E, W)
    pairs = [
        ("uniform_to_random", uni, _random_ownership(E, W, gen)),
        ("random_to_random", _random_ownership(E, W, gen), _random_ownership(E, W, gen)),
        ("to_rank0_empty", uni, _random_ownership(E, W, gen, empty=(0,))),
        ("from_rank_last_empty", _random_ownership(E, W, gen, empty=(W - 1,)), uni),
        ("all_to_one_rank", uni, _random_ownership(E, W, gen, empty=tuple(range(1, W)))),
        ("identity", uni, uni),
        ("uniform_to_algorithm2", uni, heterogeneous_sharding(zipf, W, previous=uni)),
    ]
    for seed in range(3):
        pairs.append((f"random_seed{seed}", _random_ownership(E, W, gen, empty=(seed % W,)), _random_ownership(E, W, gen)))
    out = []
    for name, old, new in pairs:
        fulls = [_values((E, 3, 4), torch.float32, gen), _values((E, 5), torch.bfloat16, gen),
                 _values((E,), torch.int64, gen), _values((E, 0), torch.float32, gen)]
        out.append(dict(name=name, old=old, new=new, fulls=fulls))
    return out


def _worker(rank: int, world: int) -> dict:
    res: dict = {"ag": {}, "rs": {}, "reshard": {}, "errors": {}}
    for c in _collective_cases(world):
        own, pl = c["own"], c["placement"]
        owned = c["full"][own.owned(rank)]
        got = sparse_all_gather(owned, own, pl, async_op=c["async_op"])
        if c["async_op"]:
            got = got.wait()
        res["ag"][c["name"]] = got
        res["rs"][c["name"]] = sparse_reduce_scatter(c["grads"][rank][materialized_ids(pl, rank)], own, pl)
    for c in _reshard_cases(world):
        local = [f[c["old"].owned(rank)] for f in c["fulls"]]
        res["reshard"][c["name"]] = reshard(local, c["old"], c["new"])
    # Wrong shapes fail before any communication, with the same error on every rank.
    own = Ownership.uniform(world + 1, world)
    for name, call in [
        ("ag_rows", lambda: sparse_all_gather(torch.zeros(9, 2), own, _owner_only(own, world))),
        ("rs_rows", lambda: sparse_reduce_scatter(torch.zeros(9, 2), own, _owner_only(own, world))),
        ("placement_shape", lambda: sparse_all_gather(torch.zeros(own.num_owned(rank), 2), own,
                                                      torch.ones(world + 1, world + 1, dtype=torch.bool))),
        ("reshard_rows", lambda: reshard([torch.zeros(9)], own, own)),
    ]:
        try:
            call()
            res["errors"][name] = None
        except ValueError as err:
            res["errors"][name] = str(err)
    return res


@pytest.fixture(scope="module")
def dist_results():
    cache: dict[int, list[dict] | Exception] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            try:
                cache[world] = run_workers(_worker, world, timeout=120.0)
            except Exception as err:  # noqa: BLE001 - reported by every test of this world, spawned once
                cache[world] = err
        if isinstance(cache[world], Exception):
            raise cache[world]
        return cache[world]

    return get


def _case(cases: list[dict], name: str) -> dict:
    return next(c for c in cases if c["name"] == name)


COLLECTIVE_IDS = [(w, c["name"]) for w in WORLDS for c in _collective_cases(w)]
RESHARD_IDS = [(w, c["name"]) for w in WORLDS for c in _reshard_cases(w)]


# ---------------------------------------------------------------------------------------------
# Sparse collectives and resharding (multi-process)

@pytest.mark.parametrize("world,name", COLLECTIVE_IDS)
def test_sparse_all_gather_bit_exact(dist_results, world, name):
    c = _case(_collective_cases(world), name)
    for rank, res in enumerate(dist_results(world)):
        got = res["ag"][name]
        want = c["full"][materialized_ids(c["placement"], rank)]
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), f"rank {rank}"


@pytest.mark.parametrize("world,name", COLLECTIVE_IDS)
def test_sparse_reduce_scatter_sums_copies(dist_results, world, name):
    c = _case(_collective_cases(world), name)
    pl, grads, own = c["placement"], c["grads"], c["own"]
    ref = torch.zeros_like(c["full"])
    for r in range(world):  # ascending source rank, as documented: bit-exact
        ref[pl[:, r]] += grads[r][pl[:, r]]
    for rank, res in enumerate(dist_results(world)):
        got = res["rs"][name]
        want = ref[own.owned(rank)]
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), f"rank {rank}"


@pytest.mark.parametrize("world,name", RESHARD_IDS)
def test_reshard_moves_rows_bit_exact(dist_results, world, name):
    c = _case(_reshard_cases(world), name)
    for rank, res in enumerate(dist_results(world)):
        got = res["reshard"][name]
        assert len(got) == len(c["fulls"])
        for g, full in zip(got, c["fulls"]):
            want = full[c["new"].owned(rank)]
            assert g.dtype == want.dtype and g.shape == want.shape
            assert torch.equal(g, want), f"rank {rank}"


@pytest.mark.parametrize("world", WORLDS)
def test_collectives_reject_wrong_shapes(dist_results, world):
    for res in dist_results(world):
        errors = res["errors"]
        assert "expected" in errors["ag_rows"] and "expected" in errors["rs_rows"]
        assert "placement must be bool" in errors["placement_shape"]
        assert "tensor 0" in errors["reshard_rows"]


# ---------------------------------------------------------------------------------------------
# Ownership

def test_uniform_ownership_uneven_and_empty_ranks():
    o = Ownership.uniform(7, 4)
    assert o.owner.tolist() == [0, 0, 1, 1, 2, 2, 3] and o.slot.tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert [o.num_owned(r) for r in range(4)] == [2, 2, 2, 1]
    o = Ownership.uniform(2, 4)
    assert [o.num_owned(r) for r in range(4)] == [1, 1, 0, 0] and o.owned(3).numel() == 0
    o.validate(4)
    with pytest.raises(ValueError, match="num_experts"):
        Ownership.uniform(0, 4)


def test_ownership_owned_by_slot_validate_and_dict():
    o = Ownership(owner=torch.tensor([1, 0, 1, 1]), slot=torch.tensor([2, 0, 0, 1]))
    o.validate(2)
    assert o.owned(1).tolist() == [2, 3, 0] and o.owned(0).tolist() == [1]
    back = Ownership.from_dict(json.loads(json.dumps(o.to_dict())))
    assert torch.equal(back.owner, o.owner) and torch.equal(back.slot, o.slot)
    with pytest.raises(ValueError, match="expert 3"):
        Ownership(owner=torch.tensor([1, 0, 1, 1]), slot=torch.tensor([2, 0, 0, 0])).validate(2)
    with pytest.raises(ValueError, match="expert 2 has owner 5"):
        Ownership(owner=torch.tensor([1, 0, 5]), slot=torch.tensor([0, 0, 0])).validate(2)
    with pytest.raises(ValueError, match="expert 0 has slot 3"):
        Ownership(owner=torch.tensor([0, 1]), slot=torch.tensor([3, 0])).validate(2)


# ---------------------------------------------------------------------------------------------
# Load tracking and budgets

def test_load_tracker_moving_average_and_state():
    t = LoadTracker(window=3, num_experts=2)
    assert torch.equal(t.load, torch.ones(2, dtype=torch.float64))
    for counts in ([3, 0], [6, 3], [9, 6], [12, 9]):
        t.update(torch.tensor(counts))
    assert t.load.dtype == torch.float64 and t.load.tolist() == [9.0, 6.0]  # mean of the last 3
    t2 = LoadTracker()
    t2.load_state_dict(json.loads(json.dumps(t.state_dict())))
    assert torch.equal(t2.load, t.load) and t2.window == 3
    t2.update(torch.tensor([0, 0]))
    assert t2.load.tolist() == [7.0, 5.0]
    with pytest.raises(ValueError, match="3 experts"):
        t2.update(torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeError):
        _ = LoadTracker().load
    one = LoadTracker(window=5)
    one.update(torch.tensor([4.0, 2.0, 0.0]))
    assert one.load.tolist() == [4.0, 2.0, 0.0]


def test_estimate_overlap_budget():
    assert estimate_overlap_budget(0.01, 1e9, 3_000_000) == 3
    assert estimate_overlap_budget(0.0, 1e9, 10) == 0
    with pytest.raises(ValueError, match="expert_bytes"):
        estimate_overlap_budget(0.01, 1e9, 0)


# ---------------------------------------------------------------------------------------------
# Sparse materialization (Algorithm 1)

def _extras(pl: torch.Tensor, own: Ownership) -> torch.Tensor:
    return (pl & ~_owner_only(own, pl.shape[1])).sum(dim=0)


def _materialization_cases():
    gen = torch.Generator().manual_seed(3)
    for i in range(40):
        W = [2, 4, 8][i % 3]
        E = int(torch.randint(1, 20, (1,), generator=gen))
        own = Ownership.uniform(E, W) if i % 2 else _random_ownership(E, W, gen)
        load = torch.rand(E, generator=gen) * 100
        t, m = (int(x) for x in torch.randint(0, 6, (2,), generator=gen))
        yield load, own, W, [1, 2, 4][i % 3], t, m


def test_materialization_owner_always_and_budgets_respected():
    for load, own, W, rpn, t, m in _materialization_cases():
        pl = sparse_materialization(load, own, W, rpn, t, m)
        assert pl.dtype == torch.bool and pl.shape == (own.num_experts, W)
        assert pl[torch.arange(own.num_experts), own.owner].all()
        assert int(_extras(pl, own).max()) <= min(t, m)
        assert torch.equal(pl, sparse_materialization(load.clone(), own, W, rpn, t, m))  # deterministic


def test_materialization_top_t_everywhere_when_t_le_m():
    own = Ownership.uniform(8, 4)
    load = torch.tensor([5.0, 80, 3, 60, 60, 1, 0, 2])
    pl = sparse_materialization(load, own, 4, 2, overlap_budget=3, memory_budget=3)
    everywhere = torch.nonzero(pl.all(dim=1)).flatten().tolist()
    assert everywhere == [1, 3, 4]  # top-3 by load (3 and 4 tie: both in)
    assert torch.equal(pl[[0, 2, 5, 6, 7]], _owner_only(own, 4)[[0, 2, 5, 6, 7]])
    pl = sparse_materialization(load, own, 4, 2, overlap_budget=0, memory_budget=0)
    assert torch.equal(pl, _owner_only(own, 4))


def test_materialization_proportional_when_t_gt_m():
    gen = torch.Generator().manual_seed(5)
    for trial in range(60):
        # (W, E, m, hotter >= colder always): in the last three, hot experts crowded on one owner
        # can be blocked (every rank lacking them full), which must then be the reason.
        W, E, m, monotone = [(4, 8, 2, True), (8, 16, 3, True), (8, 8, 4, True), (8, 9, 7, True),
                             (2, 5, 2, False), (4, 7, 3, False), (4, 12, 1, False)][trial % 7]
        own = Ownership.uniform(E, W)
        load = torch.rand(E, generator=gen) ** 3 * 1000 + 1
        pl = sparse_materialization(load, own, W, ranks_per_node=[1, 2, 4][trial % 3],
                                    overlap_budget=m + 1 + trial % 3, memory_budget=m)
        copies, extras = pl.sum(dim=1), _extras(pl, own)
        assert int(extras.sum()) == min(W * m, E * (W - 1)) and int(extras.max()) <= m  # budget used, respected
        for h in range(E):
            for c in range(E):
                if load[h] > load[c] and copies[h] < copies[c]:
                    assert not monotone, (load, copies)
                    assert (extras[~pl[h]] == m).all()  # blocked: every rank lacking h is full
        assert int(copies[torch.argmax(load)]) > 1  # the hottest expert is always replicated
    # The hottest expert's first extra copy goes to the other node.
    own = Ownership.uniform(4, 4)  # nodes {0, 1}, {2, 3}
    pl = sparse_materialization(torch.tensor([100.0, 60, 60, 60]), own, 4, ranks_per_node=2,
                                overlap_budget=2, memory_budget=1)
    assert pl.sum(dim=1).tolist() == [2, 2, 2, 2]
    for e in range(4):  # every expert's extra copy is on the other node than its owner
        assert (torch.nonzero(pl[e]).flatten() // 2).tolist() == [0, 1]
    assert pl[0].tolist() == [True, False, True, False]
    zero = sparse_materialization(torch.tensor([5.0, 0, 0, 0]), own, 4, 2, 2, 1)
    assert torch.equal(zero[1:], _owner_only(own, 4)[1:])  # idle experts are not replicated


# ---------------------------------------------------------------------------------------------
# Topology-aware token routing

def test_route_tokens_prefers_local_then_node_and_splits_evenly():
    # W=4, two nodes {0,1}, {2,3}.
    pl = torch.zeros(4, 4, dtype=torch.bool)
    pl[0, [0, 1, 2, 3]] = True  # everywhere: stays on the source
    pl[1, [1, 2, 3]] = True  # from rank 0: rank 1 (same node) only
    pl[2, [2, 3]] = True  # from rank 0: across nodes, split over 2 and 3
    pl[3, [1]] = True
    experts = torch.tensor([0] * 5 + [1] * 7 + [2] * 9 + [3] * 2)
    dest = route_tokens(experts, 0, pl, ranks_per_node=2)
    assert dest.dtype == torch.int64 and dest.shape == experts.shape
    assert (dest[experts == 0] == 0).all() and (dest[experts == 1] == 1).all() and (dest[experts == 3] == 1).all()
    c2 = torch.bincount(dest[experts == 2], minlength=4)
    assert c2[[0, 1]].sum() == 0 and abs(int(c2[2]) - int(c2[3])) <= 1
    # From rank 3: expert 1 is local; expert 3 only on node 0.
    dest = route_tokens(experts, 3, pl, ranks_per_node=2)
    assert (dest[experts == 1] == 3).all() and (dest[experts == 3] == 1).all()
    with pytest.raises(ValueError, match="expert 1"):
        route_tokens(torch.tensor([1]), 0, torch.zeros(4, 4, dtype=torch.bool), 2)


def test_route_tokens_random_placements_only_to_replicas_and_even():
    gen = torch.Generator().manual_seed(11)
    for _ in range(30):
        W, E, rpn = 8, 12, 4
        own = _random_ownership(E, W, gen)
        pl = _random_placement(own, W, gen, p=0.3)
        src = int(torch.randint(W, (1,), generator=gen))
        experts = torch.sort(torch.randint(E, (200,), generator=gen)).values
        dest = route_tokens(experts, src, pl, rpn)
        assert pl[experts, dest].all()  # every destination holds a replica
        for e in experts.unique().tolist():
            d = dest[experts == e]
            holders = torch.nonzero(pl[e]).flatten()
            same_node = holders[holders // rpn == src // rpn]
            if pl[e, src]:
                assert (d == src).all()
            elif same_node.numel():
                assert torch.isin(d, same_node).all()
            counts = torch.bincount(d, minlength=W)[torch.unique(d)]
            eligible = 1 if pl[e, src] else (same_node.numel() or holders.numel())
            assert torch.unique(d).numel() == min(eligible, d.numel())
            assert int(counts.max() - counts.min()) <= 1
    # Unsorted input: same destinations as for the sorted copies, in the original order.
    pl = torch.ones(3, 4, dtype=torch.bool)
    pl[1, 0] = pl[1, 1] = False
    x = torch.tensor([1, 0, 1, 2, 1])
    assert route_tokens(x, 0, pl, 2).tolist() == [2, 0, 3, 0, 2]


# ---------------------------------------------------------------------------------------------
# Heterogeneous sharding (Algorithm 2)

def _owner_loads(own: Ownership, load: torch.Tensor, W: int) -> torch.Tensor:
    return torch.zeros(W, dtype=torch.float64).index_add_(0, own.owner, load.double())


def _moved(a: Ownership, b: Ownership) -> int:
    return int((a.owner != b.owner).sum())


@pytest.mark.parametrize("E,W", [(16, 4), (7, 4), (5, 2), (64, 8), (3, 4)])
def test_heterogeneous_sharding_balances_zipf(E, W):
    gen = torch.Generator().manual_seed(E * W)
    load = 1000.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
    load = load[torch.randperm(E, generator=gen)] if E > 8 else load  # hot experts together for small E
    uni = Ownership.uniform(E, W)
    cap = -(-E // W)
    for prev in (None, uni):
        new = heterogeneous_sharding(load, W, previous=prev)
        new.validate(W)
        assert max(new.num_owned(r) for r in range(W)) <= cap
        assert _owner_loads(new, load, W).max() <= _owner_loads(uni, load, W).max()
        again = heterogeneous_sharding(load.clone(), W, previous=prev)
        assert torch.equal(again.owner, new.owner) and torch.equal(again.slot, new.slot)
    greedy = heterogeneous_sharding(load, W)
    if E >= 2 * W:
        assert _owner_loads(greedy, load, W).max() < _owner_loads(uni, load, W).max()
    stable = heterogeneous_sharding(load, W, previous=greedy)  # already balanced: nothing moves
    assert torch.equal(stable.owner, greedy.owner) and torch.equal(stable.slot, greedy.slot)


def test_heterogeneous_sharding_with_previous_moves_less():
    E, W = 32, 4
    gen = torch.Generator().manual_seed(0)
    load = 1000.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
    uni = Ownership.uniform(E, W)
    fresh = heterogeneous_sharding(load, W)
    kept = heterogeneous_sharding(load, W, previous=uni)
    assert _moved(uni, kept) < _moved(uni, fresh)
    # A slightly changed load keeps most owners of the previous assignment.
    noisy = load * (1 + 0.05 * torch.rand(E, generator=gen, dtype=torch.float64))
    again = heterogeneous_sharding(noisy, W, previous=fresh)
    assert _moved(fresh, again) <= E // 4
    with pytest.raises(ValueError, match="previous ownership has 4 experts"):
        heterogeneous_sharding(load, W, previous=Ownership.uniform(4, W))


def test_rematerialize_recompute_replays_autocast() -> None:
    """Re-materialization recomputes experts in backward, outside the caller's autocast block: the
    settings captured in forward must be re-entered, else a bf16 forward gets an fp32 recompute."""
    from system.parallel.fssdp.layer import _autocast_as, _autocast_state

    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = _autocast_state()
        a = torch.randn(4, 8) @ torch.randn(8, 4)
    assert not torch.is_autocast_enabled("cpu")
    with _autocast_as(state):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        b = torch.randn(4, 8) @ torch.randn(8, 4)
    assert a.dtype == b.dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    with _autocast_as(_autocast_state()):
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.float32
