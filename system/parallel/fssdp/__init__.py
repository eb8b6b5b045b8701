"""Fully Sharded Sparse Data Parallelism (FSSDP) primitives, after Hecate (arXiv 2502.02581).

An MoE layer is sharded by whole experts: each expert has one owner that keeps its parameters and
optimizer state (:class:`Ownership`). Each iteration, per layer:

1. :class:`LoadTracker` gives the expert loads (moving average of routed tokens);
2. :func:`sparse_materialization` (Algorithm 1) picks a placement ``[E, W]``: which experts are
   materialized on which ranks, within an overlap budget (:func:`estimate_overlap_budget`) and a
   memory budget;
3. :func:`sparse_all_gather` copies the owners' parameters to the placement;
4. :func:`route_tokens` sends each token copy to the nearest materialized copy of its expert
   (:func:`route_counts` and :func:`routed_to`: the same rule as send and receive counts);
5. :func:`sparse_reduce_scatter` sums the gradients of all copies back on the owners, which run the
   optimizer.

Every R iterations :func:`heterogeneous_sharding` (Algorithm 2) re-assigns owners by load and
:func:`reshard` moves parameters and optimizer state to the new owners. All functions are plain
(no global state); the collectives take an explicit process group.
"""

from system.parallel.fssdp.collectives import (
    SparseAllGatherHandle,
    materialized_ids,
    sparse_all_gather,
    sparse_reduce_scatter,
)
from system.parallel.fssdp.ownership import Ownership
from system.parallel.fssdp.placement import (
    LoadTracker,
    estimate_overlap_budget,
    route_counts,
    route_tokens,
    routed_to,
    sparse_materialization,
)
from system.parallel.fssdp.resharding import heterogeneous_sharding, reshard

__all__ = [
    "LoadTracker",
    "Ownership",
    "SparseAllGatherHandle",
    "estimate_overlap_budget",
    "heterogeneous_sharding",
    "materialized_ids",
    "reshard",
    "route_counts",
    "route_tokens",
    "routed_to",
    "sparse_all_gather",
    "sparse_materialization",
    "sparse_reduce_scatter",
]
