"""moe-system: training and serving Mixture-of-Experts models on GPU clusters.

Subpackages, by concern (nothing imports upward):

- ``config``: nested dataclass job configuration, TOML loading and ``--section.key`` overrides.
- ``distributed``: :class:`~system.distributed.ParallelDims`, process-group and DeviceMesh set-up.
- ``moe``: router, experts, token dispatch and the MoE layer.
- ``parallel``: functions that apply expert parallelism / FSDP2 to a model.
- ``models``: the reference MoE decoder and ``parallelize_model``.
- ``data``: corpora, tokenizers and the packed, rank-sharded loader.
- ``train``: the training loop, optimizer and schedule, metrics.
- ``checkpoint``: saving and loading model state.
- ``inference``: generation.
- ``cluster``: launching (torchrun commands).
"""

__version__ = "0.1.0"
