"""``moesys plan``: which parallel layouts of a job fit a cluster, and how fast each would train.

Small modules with one job each:

- :mod:`system.plan.devices`: device profiles (memory, dense bf16 peak, NVLink and network per GPU, with sources);
- :mod:`system.plan.layouts`: the candidate layouts and the checks that rule some out;
- :mod:`system.plan.activations`: what one block keeps for backward under each activation-checkpointing mode;
- :mod:`system.plan.memory`: one rank's peak memory over a step, by category (model state from
  :mod:`system.train.memory`);
- :mod:`system.plan.comm`: bytes per collective per step on intra- and inter-node links;
- :mod:`system.plan.estimate`: step time, MFU, and the ranked plan;
- :mod:`system.plan.measure`: the measured peak of live tensor bytes over a step (:class:`~system.plan.measure.LivePeak`), which the estimate is checked against;
- :mod:`system.plan.report` and :mod:`system.plan.cli`: what the command prints.
"""
