"""Helpers of ``benchmarks/expert_parallel_sim.py``: the discrete-event step model (:mod:`.step_model`)."""
