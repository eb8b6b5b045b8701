"""``moesys launch``: the training job on a Ray cluster, restarted from our checkpoints when workers die.

How it runs. :func:`launch` connects to a Ray cluster (``--ray-address ADDR|auto``; without it, a
local Ray instance on 127.0.0.1) and runs :func:`~system.cluster.ray_worker.train_loop_per_worker`
on ``num_nodes x workers_per_node`` workers with Ray Train's ``TorchTrainer`` (Train V2, the default
in Ray 2.60): ``ScalingConfig(num_workers=N or (MIN, MAX), resources_per_worker={"CPU": C, "GPU": G})``,
``RunConfig(name, storage_path, FailureConfig(max_failures))``. Ray makes the process group
(``gloo`` without GPUs, ``nccl`` with them) and the unchanged :class:`~system.train.trainer.Trainer`
runs inside it.

Why ``TorchTrainer`` rather than Ray actors each running a torchrun agent: the trainer only needs a
default process group and a rank, which TorchTrainer provides; its controller already does what we
would otherwise rebuild around torchrun: health checks, tearing down the whole worker group when one
worker or node dies, restarting it up to ``max_failures`` times (torchrun's ``--max-restarts`` only
restarts processes on nodes that are still there), placement groups, shared storage checks, and
elastic worker counts. Actors plus torchrun would add a second rendezvous (c10d) and a second restart
loop that must agree with Ray's.

Checkpoints. Our own checkpoints (:mod:`system.checkpoint`) are the source of truth, written to
shared storage under ``<storage_path>/<name>/checkpoints`` (local path, NFS or fsspec URL; Ray's
``RunConfig.storage_path`` is the same place). Every attempt resumes from the newest committed one
(:func:`~system.cluster.ray_worker.newest_checkpoint`), and the load reshards to whatever layout the
attempt has. Ray is told about them with ``ray.train.report`` at checkpoint steps and at the end: the
latest metrics, and each directory that ``latest`` comes to name, reported in place
(``CheckpointUploadMode.NO_UPLOAD``, nothing copied), so ``Result.checkpoint`` names the final
committed checkpoint. Per-step metrics stay in ``metrics.jsonl`` and TensorBoard (reporting every step
would throttle training: Ray takes one report per controller poll, every 2 s). We do not resume from
``ray.train.get_checkpoint()``: it lags our own commits (asynchronous saves commit in the background)
and knows nothing of checkpoints given with ``--checkpoint.resume``. Ray's ``CheckpointConfig`` keeps
every reported checkpoint; pruning is ours (``checkpoint.keep_last``), so ``Result.best_checkpoints``
may name pruned directories. A failure loses at most the steps since the last committed checkpoint:
one ``checkpoint.interval``, plus the background write of the save in flight if a rank dies during it.
Running ``moesys launch`` again with the same ``--name`` continues the run from its newest checkpoint.

Placement. Workers = nodes x ``--workers-per-node``; Ray packs them onto nodes by the resources each
reserves (``--cpus-per-worker``, ``--gpus-per-worker``), so P workers land on each node when a node
has P x G GPUs (or P x C CPUs). The code must be installed (same Python environment) on every node.

Elastic runs. ``--num-nodes MIN:MAX`` gives Ray a worker range; after losing a node Ray restarts
with the workers it can place, and each attempt keeps the global batch and shrinks the EP degree
(:func:`~system.cluster.ray_worker.adapt_to_world`): EP=2 over 2 workers resumes as EP=1 on one.
Ray's resource view refreshes about every 20 s, so right after a node loss it may first try the old
size and wait ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (default 60 s) before shrinking.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec

from system.cluster.ray_worker import FAULT_ENV, FaultInjection, read_attempts, train_loop_per_worker
from system.cluster.torchrun import parse_nnodes
from system.config.job import JobConfig
from system.config.loader import config_to_dict, load_config
from system.train.preflight import preflight

logger = logging.getLogger(__name__)

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Set to ``0`` before ``import ray`` so a local instance stays on 127.0.0.1 (Ray otherwise rewrites
127.0.0.1 to the NIC's address: ray-project/ray#1556)."""


@dataclass
class RayLaunchSpec:
    """What ``moesys launch`` was asked for.

    Attributes:
        config: TOML job file (``None``: defaults only).
        overrides: ``--section.key value`` strings.
        ray_address: ``HOST:PORT``, ``auto`` (the cluster this machine belongs to) or ``ray://...``;
            ``None`` starts a local Ray instance for this job.
        num_nodes: ``"N"``, or ``"MIN:MAX"`` for an elastic run.
        workers_per_node: P; workers = nodes x P.
        gpus_per_worker: GPUs reserved per worker (0: CPU workers with Gloo).
        cpus_per_worker: CPUs reserved per worker.
        storage_path: shared storage for checkpoints and Ray's run directory (path or fsspec URL);
            empty: ``runs/ray`` under the current directory (only for one node).
        name: run name; the run lives in ``<storage_path>/<name>``. Reusing a name continues that run
            from its newest checkpoint. Empty: ``<config name>-<YYYYmmdd-HHMMSS>``.
        max_failures: restarts after worker or node failures (``-1``: unlimited).
    """

    config: str | None
    overrides: list[str] = field(default_factory=list)
    ray_address: str | None = None
    num_nodes: str = "1"
    workers_per_node: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    storage_path: str = ""
    name: str = ""
    max_failures: int = 3


@dataclass
class RayLaunchPlan:
    """A validated launch: the job and the Ray settings. Built by :func:`plan_launch`."""

    cfg: JobConfig
    name: str
    storage_path: str
    experiment: str  # <storage_path>/<name>
    min_workers: int
    max_workers: int
    resources_per_worker: dict[str, float]
    max_failures: int
    ray_address: str | None
    report_checkpoints: bool
    fault: str | None = None

    @property
    def num_workers(self) -> int | tuple[int, int]:
        """``ScalingConfig(num_workers=...)``: an int, or ``(min, max)`` for an elastic run."""
        return self.max_workers if self.min_workers == self.max_workers else (self.min_workers, self.max_workers)

    def worker_config(self) -> dict[str, Any]:
        """The ``train_loop_config`` handed to every worker (plain JSON-able data)."""
        return {
            "job": config_to_dict(self.cfg), "full_world": self.max_workers, "experiment": self.experiment,
            "use_gpu": self.resources_per_worker.get("GPU", 0) > 0, "report_checkpoints": self.report_checkpoints,
            "fault": self.fault,
        }

    def describe(self) -> str:
        """Human-readable summary (``moesys launch --dry-run``)."""
        p = self.cfg.parallel
        return "\n".join([
            f"ray address    {self.ray_address or '(local instance on 127.0.0.1)'}",
            f"workers        {self.num_workers} x {self.resources_per_worker} (TorchTrainer, Ray Train V2)",
            f"layout         ep={p.ep} dp={self.max_workers // p.ep} at {self.max_workers} workers; "
            f"batch {self.cfg.training.batch_size} per worker",
            f"run            {self.experiment}",
            f"checkpoints    {self.cfg.checkpoint.dir} every {self.cfg.checkpoint.interval} steps",
            f"metrics        {self.cfg.metrics.run_dir}",
            f"max failures   {self.max_failures}",
        ])


@dataclass
class RayRunResult:
    """What :func:`launch` returns.

    Attributes:
        experiment: ``<storage_path>/<name>``.
        checkpoint_root: where the checkpoints are.
        run_dir: rank 0's run directory (``metrics.jsonl``, ``summary.json``, ``model/``).
        attempts: one record per (re)start, oldest first: ``world_size``, ``dp``, ``ep``,
            ``batch_size``, ``resumed_from``, ``start_step``.
        summary: the trainer's summary from rank 0 (``steps``, ``val_loss``, ...), ``None`` on failure.
        checkpoint: the last checkpoint reported to Ray (``Result.checkpoint.path``), if any.
        error: why the run failed, ``None`` on success.
    """

    experiment: str
    checkpoint_root: str
    run_dir: str
    attempts: list[dict[str, Any]]
    summary: dict[str, Any] | None
    checkpoint: str | None
    error: str | None

    @property
    def restarts(self) -> int:
        """Attempts after the first."""
        return max(len(self.attempts) - 1, 0)


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def check_storage_writable(url: str) -> None:
    """Create ``url`` (path or fsspec URL) if needed and write and delete a probe file in it.

    Raises:
        ValueError: naming the path and the error when it cannot be written.
    """
    try:
        fs, root = fsspec.core.url_to_fs(url)
        fs.makedirs(root, exist_ok=True)
        probe = f"{root.rstrip('/')}/.moesys-probe-{uuid.uuid4().hex}"
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        raise ValueError(f"storage path {url!r} cannot be written: {type(e).__name__}: {e}") from e


def _check_layout(cfg: JobConfig, lo: int, hi: int, spec: RayLaunchSpec) -> None:
    size = f"--num-nodes {spec.num_nodes} x --workers-per-node {spec.workers_per_node}"
    p = cfg.parallel
    if p.pp > 1 or p.tp > 1 or p.dp_replicate > 1 or p.dp_shard != -1 or p.expert_tp:
        from system.train.preflight import check_world

        check_world(cfg, range(lo, hi + 1), size)
    elif p.dp != -1 and p.dp * p.ep != hi:
        raise ValueError(
            f"parallel.dp={p.dp} x parallel.ep={p.ep} = {p.dp * p.ep} ranks, but {size} = {hi} workers; "
            f"set --parallel.dp={hi // p.ep if hi % p.ep == 0 else -1} (or -1: derived) or change the worker count"
        )
    if hi % p.ep:
        raise ValueError(f"{size} = {hi} workers does not divide by parallel.ep={p.ep}")
    global_batch = cfg.training.batch_size * hi
    bad = [w for w in range(lo, hi + 1) if global_batch % w]
    if bad:
        need = math.lcm(*range(lo, hi + 1))
        raise ValueError(
            f"elastic range {lo}..{hi} workers: the global batch training.batch_size={cfg.training.batch_size} x {hi} "
            f"= {global_batch} sequences does not divide over {bad} workers; make it a multiple of {need} "
            f"(training.batch_size a multiple of {need // math.gcd(need, hi)})"
        )
    if spec.gpus_per_worker > 0 and p.device == "cpu":
        raise ValueError(f"--gpus-per-worker {spec.gpus_per_worker:g} with parallel.device='cpu'; drop one of them")
    if spec.gpus_per_worker == 0 and p.device == "cuda":
        raise ValueError("parallel.device='cuda' needs --gpus-per-worker >= 1 "
                         "(Ray hides GPUs from workers without them)")


def plan_launch(spec: RayLaunchSpec, *, check_storage: bool = True) -> RayLaunchPlan:
    """Validate ``spec`` and resolve the run's name, storage, checkpoint and metrics locations.

    ``checkpoint.dir`` defaults to ``<storage_path>/<name>/checkpoints`` (then reported to Ray);
    ``metrics.run_dir`` to ``<storage_path>/<name>`` for local (shared) storage, else to
    ``runs/<name>`` on rank 0's node. The progress bar is turned off (Ray forwards worker output).

    Args:
        spec: the request.
        check_storage: also create the storage path and write a probe file there
            (:func:`check_storage_writable`); ``--dry-run`` skips it.

    Raises:
        ConfigError: a bad config key or value (a ``ValueError``).
        FileNotFoundError: the config file does not exist.
        ValueError: bad counts (workers, GPUs, failures), workers that do not match the config's
            parallel layout or global batch, a missing ``--storage-path`` for several nodes, storage
            that cannot be written, or a malformed ``MOESYS_FAULT_INJECT``.
        MoesysError: a :func:`~system.train.preflight.preflight` check failed (data, tokenizer,
            checkpoint to resume, run folder held by another job).
    """
    cfg = load_config(spec.config, spec.overrides)
    lo_nodes, hi_nodes = parse_nnodes(spec.num_nodes)
    if not isinstance(spec.workers_per_node, int) or spec.workers_per_node < 1:
        raise ValueError(f"--workers-per-node must be an integer >= 1, got {spec.workers_per_node!r}")
    if spec.gpus_per_worker < 0 or spec.cpus_per_worker <= 0:
        raise ValueError(f"need --gpus-per-worker >= 0 and --cpus-per-worker > 0, got {spec.gpus_per_worker:g} "
                         f"and {spec.cpus_per_worker:g}")
    if spec.max_failures < -1:
        raise ValueError(f"--max-failures must be >= -1 (-1: unlimited), got {spec.max_failures}")
    lo, hi = lo_nodes * spec.workers_per_node, hi_nodes * spec.workers_per_node
    _check_layout(cfg, lo, hi, spec)

    storage = spec.storage_path
    if not storage:
        if hi_nodes > 1:
            raise ValueError("--storage-path is required for several nodes: a shared path (NFS) or a URL (s3://...) "
                             "that every node can reach")
        storage = "runs/ray"
    if _is_local(storage):
        storage = os.path.abspath(storage.removeprefix("file://"))
    storage = storage.rstrip("/")
    name = spec.name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not name or "/" in name:
        raise ValueError(f"--name must be a non-empty name without '/', got {name!r}")
    experiment = f"{storage}/{name}"
    if check_storage:
        check_storage_writable(storage)

    report_checkpoints = not cfg.checkpoint.dir
    if report_checkpoints:
        cfg.checkpoint.dir = f"{experiment}/checkpoints"
    if not cfg.metrics.run_dir:
        cfg.metrics.run_dir = experiment if _is_local(storage) else os.path.abspath(f"runs/{name}")
    cfg.metrics.progress = False
    if not cfg.checkpoint.interval:
        logger.warning("checkpoint.interval=0: a restart after a failure begins again at step 0")
    if _is_local(cfg.metrics.run_dir):
        # What the config and the command line decide, before Ray starts: data, tokenizer, the
        # checkpoint to resume, and the run folder (not held by a live job; reusing --name continues).
        preflight(cfg, cfg.metrics.run_dir, job_id=name, continue_run=True)
    fault = os.environ.get(FAULT_ENV) or None
    if fault:
        FaultInjection.parse(fault)
    resources = {"CPU": float(spec.cpus_per_worker)}
    if spec.gpus_per_worker > 0:
        resources["GPU"] = float(spec.gpus_per_worker)
    return RayLaunchPlan(cfg, name, storage, experiment, lo, hi, resources, spec.max_failures, spec.ray_address,
                         report_checkpoints, fault)


def _connect(plan: RayLaunchPlan) -> bool:
    """Connect to Ray (or start a local instance); return True when this call started or joined it."""
    if plan.ray_address is None and LOOPBACK_ENV not in os.environ:
        os.environ[LOOPBACK_ENV] = "0"
    import ray

    if ray.is_initialized():
        return False
    if plan.ray_address is not None:
        ray.init(address=plan.ray_address)
    else:
        ray.init(include_dashboard=False)
    need_cpu = plan.min_workers * plan.resources_per_worker["CPU"]
    need_gpu = plan.min_workers * plan.resources_per_worker.get("GPU", 0.0)
    have = ray.cluster_resources()
    if have.get("CPU", 0.0) < need_cpu or have.get("GPU", 0.0) < need_gpu:
        msg = (f"the Ray cluster has {have.get('CPU', 0.0):g} CPUs and {have.get('GPU', 0.0):g} GPUs; "
               f"{plan.min_workers} workers need {need_cpu:g} CPUs and {need_gpu:g} GPUs")
        if plan.ray_address is None:
            ray.shutdown()
            raise ValueError(msg + " (lower --workers-per-node or --cpus-per-worker)")
        logger.warning("%s: waiting for the autoscaler", msg)
    return True


def launch(spec: RayLaunchSpec | RayLaunchPlan) -> RayRunResult:
    """Run the job on Ray with ``TorchTrainer`` and wait for it; see the module docstring.

    Uses the Ray connection of this process if there is one (``ray.init`` already called), else
    connects to ``ray_address`` or starts a local instance (shut down again at the end).

    Returns:
        A :class:`RayRunResult`; ``error`` is set when the run failed for good (more failures than
        ``max_failures``, or an error that is not retried).

    Raises:
        ValueError, ConfigError, FileNotFoundError: see :func:`plan_launch`; also not enough
            resources on a local instance.
        RuntimeError: Ray Train V2 is disabled (``RAY_TRAIN_V2_ENABLED=0``).
    """
    plan = spec if isinstance(spec, RayLaunchPlan) else plan_launch(spec)
    started = _connect(plan)
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.constants import is_v2_enabled

    try:
        if not is_v2_enabled():
            raise RuntimeError("moesys launch needs Ray Train V2: set RAY_TRAIN_V2_ENABLED=1 where it runs")
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=plan.worker_config(),
            scaling_config=ray.train.ScalingConfig(
                num_workers=plan.num_workers, use_gpu="GPU" in plan.resources_per_worker,
                resources_per_worker=plan.resources_per_worker,
            ),
            run_config=ray.train.RunConfig(
                name=plan.name, storage_path=plan.storage_path,
                failure_config=ray.train.FailureConfig(max_failures=plan.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            ),
        )
        logger.info("launching %s on Ray: %s workers", plan.experiment, plan.num_workers)
        error, summary, checkpoint = None, None, None
        try:
            result = trainer.fit()
            summary = getattr(result, "return_value", None)
            checkpoint = result.checkpoint.path if result.checkpoint is not None else None
            summary_file = os.path.join(plan.cfg.metrics.run_dir, "summary.json")
            if summary is None and os.path.isfile(summary_file):  # a Ray without Result.return_value
                with open(summary_file) as f:
                    summary = json.load(f)
        except ray.train.TrainingFailedError as e:
            error = f"{type(e).__name__}: {e}"
            logger.error("run %s failed: %s", plan.experiment, error)
        return RayRunResult(plan.experiment, plan.cfg.checkpoint.dir, plan.cfg.metrics.run_dir,
                            read_attempts(plan.experiment), summary, checkpoint, error)
    finally:
        if started:
            ray.shutdown()
