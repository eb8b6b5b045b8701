"""What every Ray Train worker of ``moesys launch`` runs (see :mod:`system.cluster.ray_launch`).

:func:`train_loop_per_worker` is the function ``ray.train.torch.TorchTrainer`` calls on each worker,
once per attempt (the first start and every restart after a failure). Ray has already made the
default process group (``MASTER_ADDR``/``RANK``/``WORLD_SIZE`` set, ``gloo`` for CPU workers,
``nccl`` for GPU ones); the :class:`~system.train.trainer.Trainer` uses it as it is. Each attempt:

1. adapts the job to the world size Ray gave it (:func:`adapt_to_world`: an elastic run restarted on
   fewer workers keeps its global batch and shrinks the EP degree);
2. resumes from the newest committed checkpoint under ``checkpoint.dir`` (:func:`newest_checkpoint`,
   rank 0 decides and broadcasts), which reshards on load to the new layout;
3. records the attempt (``<experiment>/attempts/attempt_NNNN.json``) and trains, calling
   ``ray.train.report`` at every checkpoint step and at the end with the latest metrics and, once
   ``latest`` moved, the committed checkpoint directory (reported in place:
   ``CheckpointUploadMode.NO_UPLOAD``). Not at every logged step: a report waits while the previous
   one is still queued, and Ray's controller takes one per poll (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``,
   2 s), which would cap a fast job at one step per 2 s. Per-step metrics are in ``metrics.jsonl``
   and TensorBoard under ``metrics.run_dir``.

A test-only fault injection (:class:`FaultInjection`, ``MOESYS_FAULT_INJECT``) kills or pauses a
worker at a chosen step of the first attempt.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import fsspec
import torch.distributed as dist

from system.checkpoint.storage import list_checkpoints, read_latest
from system.config.job import JobConfig
from system.config.loader import config_from_dict

logger = logging.getLogger(__name__)

FAULT_ENV = "MOESYS_FAULT_INJECT"
"""Environment variable of ``moesys launch`` (the driver) holding a :class:`FaultInjection` (tests only)."""

PAUSE_LIMIT_S = 600.0
"""A paused worker raises after this many seconds if nobody removed its node."""


def adapt_to_world(cfg: JobConfig, world: int, full_world: int) -> JobConfig:
    """A copy of ``cfg`` for ``world`` ranks, keeping the global batch of ``full_world`` ranks.

    ``cfg`` describes the job at ``full_world`` ranks (the launch size). At ``world`` ranks the EP
    degree becomes ``gcd(parallel.ep, world)`` (it still divides ``moe.num_experts``), ``parallel.dp``
    becomes ``world // ep`` and ``training.batch_size`` (sequences per rank) becomes
    ``batch_size * full_world // world``, so every optimizer step sees the same global batch, and
    resumed losses continue those of the full-size run (the checkpoint reshards on load). At
    ``world == full_world`` the layout is unchanged (``dp = -1`` is resolved to its value).

    Raises:
        ValueError: ``world`` or ``full_world`` < 1, or a global batch that ``world`` does not divide.
    """
    if world < 1 or full_world < 1:
        raise ValueError(f"world sizes must be >= 1, got world={world}, full_world={full_world}")
    global_batch = cfg.training.batch_size * full_world
    if global_batch % world:
        raise ValueError(
            f"global batch training.batch_size={cfg.training.batch_size} x {full_world} ranks = {global_batch} "
            f"sequences does not divide over {world} ranks"
        )
    out = copy.deepcopy(cfg)
    out.parallel.ep = math.gcd(cfg.parallel.ep, world)
    out.parallel.dp = world // out.parallel.ep
    out.training.batch_size = global_batch // world
    out.validate()
    return out


def newest_checkpoint(root: str) -> str | None:
    """URL of the newest committed ``step_*`` directory under ``root`` (path or fsspec URL), or ``None``.

    A directory is committed once its ``metadata.json`` exists (written last, atomically), so this is
    never older than what ``root/latest`` names; it is newer when a rank died between writing a
    checkpoint's ``metadata.json`` and moving ``latest`` (both happen at commit, in the background).
    """
    found = list_checkpoints(root)
    return found[-1] if found else None


@dataclass(frozen=True)
class FaultInjection:
    """Test-only fault: at ``step`` of a run's first attempt, ``kill`` or ``pause`` workers.

    Parsed from ``MOESYS_FAULT_INJECT="ACTION:STEP:RANK:MARKER"`` in the environment of the driver
    (``moesys launch``), which hands it to the workers. The first attempt is the one that starts while
    the file ``MARKER`` does not exist (rank 0 looks, all ranks follow). At ``STEP``:

    - ``kill``: rank ``RANK`` creates ``MARKER`` and sends itself SIGKILL (a crashed worker);
    - ``pause``: rank ``RANK`` creates ``MARKER``, and every rank sleeps until killed (a test then
      removes a node), raising ``RuntimeError`` after :data:`PAUSE_LIMIT_S`.

    ``MARKER`` must be a local path that every worker can see (tests run all nodes on one machine).
    """

    action: str
    step: int
    rank: int
    marker: str

    @classmethod
    def parse(cls, text: str) -> FaultInjection:
        """Parse ``"ACTION:STEP:RANK:MARKER"``.

        Raises:
            ValueError: not of that form, an unknown action, or a step < 1 or rank < 0.
        """
        parts = text.split(":", 3)
        if len(parts) != 4 or parts[0] not in ("kill", "pause") or not parts[1].isdigit() or not parts[2].isdigit() \
                or not parts[3]:
            raise ValueError(f"{FAULT_ENV} must be 'kill|pause:STEP:RANK:MARKER_PATH', got {text!r}")
        step, rank = int(parts[1]), int(parts[2])
        if step < 1:
            raise ValueError(f"{FAULT_ENV}: STEP must be >= 1, got {step}")
        return cls(parts[0], step, rank, parts[3])

    def fire(self, step: int, rank: int) -> None:
        """Act at ``step`` on ``rank`` (call only in an armed attempt)."""
        if step != self.step:
            return
        if rank == self.rank:
            with open(self.marker, "w") as f:
                f.write(f"{self.action} at step {step} on rank {rank}\n")
                f.flush()
                os.fsync(f.fileno())
        if self.action == "kill" and rank == self.rank:
            logger.warning("fault injection: rank %d kills itself at step %d", rank, step)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.action == "pause":
            logger.warning("fault injection: rank %d pauses at step %d", rank, step)
            deadline = time.monotonic() + PAUSE_LIMIT_S
            while time.monotonic() < deadline:
                time.sleep(0.5)
            raise RuntimeError(f"fault injection: paused at step {step} for {PAUSE_LIMIT_S:.0f} s and nobody came")


def record_attempt(experiment: str, record: dict[str, Any]) -> int:
    """Write ``record`` as the next ``<experiment>/attempts/attempt_NNNN.json``; returns its number (from 1).

    One file per attempt (no appends), so it works on object stores too. Called by rank 0 only.
    """
    fs, root = fsspec.core.url_to_fs(f"{experiment.rstrip('/')}/attempts")
    fs.makedirs(root, exist_ok=True)
    number = len([p for p in fs.ls(root, detail=False) if p.rstrip("/").rsplit("/", 1)[-1].startswith("attempt_")]) + 1
    with fs.open(f"{root}/attempt_{number:04d}.json", "w") as f:
        f.write(json.dumps({"attempt": number, **record}))
    return number


def read_attempts(experiment: str) -> list[dict[str, Any]]:
    """The attempt records of a run (``<experiment>/attempts/attempt_*.json``), oldest first."""
    fs, root = fsspec.core.url_to_fs(f"{experiment.rstrip('/')}/attempts")
    if not fs.exists(root):
        return []
    names = sorted(p for p in fs.ls(root, detail=False) if p.rstrip("/").rsplit("/", 1)[-1].startswith("attempt_"))
    out = []
    for name in names:
        with fs.open(name, "r") as f:
            out.append(json.loads(f.read()))
    return out


class _RayReporter:
    """``ray.train.report`` at checkpoint steps (the same steps on every rank) and at the end.

    Metrics: the latest logged record (rank 0's is the one Ray keeps). Checkpoint: on rank 0, when ``latest``
    under the checkpoint root names a directory not reported yet, that committed directory, reported
    in place (``NO_UPLOAD``: it already lies in the run's experiment directory on shared storage).
    """

    def __init__(self, rank: int, interval: int, ckpt_root: str | None, report_checkpoints: bool):
        import ray.train

        self.rank, self.interval, self.ckpt_root = rank, interval, ckpt_root
        self.report_checkpoints = report_checkpoints and ckpt_root is not None
        self.storage = ray.train.get_context().get_storage() if self.report_checkpoints else None
        self.reported: str | None = None
        self.last: dict[str, Any] = {}

    def _new_checkpoint(self):
        if self.rank != 0 or not self.report_checkpoints:
            return None
        import ray.train

        name = read_latest(self.ckpt_root)
        if name is None or name == self.reported:
            return None
        self.reported = name
        path = f"{self.storage.experiment_fs_path.rstrip('/')}/checkpoints/{name}"
        return ray.train.Checkpoint(path=path, filesystem=self.storage.storage_filesystem)

    def report(self, metrics: dict[str, Any], with_checkpoint: bool) -> None:
        """Report ``metrics`` (floats); attach the new committed checkpoint when ``with_checkpoint``."""
        import ray.train

        mode = getattr(ray.train, "CheckpointUploadMode", None)  # absent from older Rays: metrics only
        checkpoint = self._new_checkpoint() if with_checkpoint and mode is not None else None
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}
        if checkpoint is not None:
            ray.train.report(clean, checkpoint=checkpoint, checkpoint_upload_mode=mode.NO_UPLOAD)
        else:
            ray.train.report(clean)

    def on_step(self, step: int, record: dict | None) -> None:
        """The trainer's ``on_step`` hook: remember the record; report at checkpoint steps."""
        if record is not None:
            self.last = {"logged_step": step, **record}
        if self.interval and step % self.interval == 0:
            self.report({"step": step, **self.last}, with_checkpoint=True)


def train_loop_per_worker(config: dict[str, Any]) -> dict | None:
    """Train on this Ray worker; the ``train_loop_per_worker`` of ``TorchTrainer``.

    Args:
        config: built by :func:`system.cluster.ray_launch.plan_launch`: ``job`` (the config as a
            dict, with ``metrics.run_dir`` and ``checkpoint.dir`` resolved), ``full_world`` (workers
            at launch size), ``experiment`` (``<storage_path>/<name>``), ``use_gpu``,
            ``report_checkpoints`` and ``fault`` (a :class:`FaultInjection` string or ``None``).

    Returns:
        On rank 0 the trainer's summary (Ray's ``Result.return_value``); ``None`` elsewhere.

    Raises:
        ValueError: the job does not fit the world size Ray gave (see :func:`adapt_to_world`).
    """
    import ray.train

    from system.train.log import init_logging
    from system.train.trainer import Trainer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    init_logging(rank)
    cfg = adapt_to_world(config_from_dict(config["job"]), world, config["full_world"])
    fault = FaultInjection.parse(config["fault"]) if config.get("fault") else None
    root = cfg.checkpoint.dir or None
    decision = [None, False]
    if rank == 0:
        decision = [newest_checkpoint(root) if root else None, fault is not None and not os.path.exists(fault.marker)]
    if world > 1:
        dist.broadcast_object_list(decision, src=0)
    resume, armed = decision
    if resume:
        cfg.checkpoint.resume = resume
    device = None
    if config.get("use_gpu"):
        import ray.train.torch

        device = ray.train.torch.get_device()
    # The run's name is the job id of the run folder's lock: an attempt takes over its predecessor's lock.
    trainer = Trainer(cfg, device=device, job_id=os.path.basename(config["experiment"].rstrip("/")),
                      continue_run=True)
    if rank == 0:
        number = record_attempt(config["experiment"], {
            "world_size": world, "dp": trainer.dims.dp, "ep": trainer.dims.ep, "batch_size": cfg.training.batch_size,
            "resumed_from": cfg.checkpoint.resume or None, "start_step": trainer.step, "unix_s": time.time(),
        })
        logger.info("attempt %d: world %d = dp %d x ep %d, batch %d per rank, starting at step %d%s",
                    number, world, trainer.dims.dp, trainer.dims.ep, cfg.training.batch_size, trainer.step,
                    f" (from {cfg.checkpoint.resume})" if cfg.checkpoint.resume else "")
    reporter = _RayReporter(rank, cfg.checkpoint.interval, root, bool(config.get("report_checkpoints")))

    def on_step(step: int, record: dict | None) -> None:
        reporter.on_step(step, record)
        if armed:
            fault.fire(step, rank)

    summary = trainer.run(on_step=on_step)
    final = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
    reporter.report({"step": trainer.step, **final}, with_checkpoint=True)
    return summary if rank == 0 else None
