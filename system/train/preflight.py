"""Checks of a training job that the config and the command line already decide, run before anything starts.

``moesys train`` runs :func:`preflight` in the launcher, before torchrun starts a worker, and exits with
code 2 and one line on the first problem; ``moesys launch`` runs it before Ray starts. The workers run
the same checks that touch shared state again (:func:`check_resume_model`, the run-folder lock and
state in :class:`~system.train.trainer.Trainer`), since a job can also be started by plain torchrun,
and a folder can change between the launch and the start.

What is checked (each failure a :class:`~system.errors.MoesysError` naming the key or path):

- world size: ``--nproc-per-node x --nnodes`` (every size of an elastic range) against
  ``parallel.dp x parallel.ep``, and the experts against the EP degree;
- devices: ``parallel.device = cuda`` with CUDA present and at least ``--nproc-per-node`` GPUs;
  ``parallel.backend = nccl`` only with CUDA;
- data: ``data.path`` exists and is a readable file or folder; ``data.tokenizer`` loads;
- initial weights: ``checkpoint.initial_load_path`` is a Hugging Face model folder or one of our
  exported model folders (:func:`check_initial_load`; :func:`~system.config.loader.load_config` has
  already merged its shape; ``--dry-run`` tolerates a missing folder with a warning, the real run
  refuses it);
- resume: ``checkpoint.resume`` names a committed checkpoint (or ``latest``), saved from the same
  model (:func:`check_resume_model`); not combined with ``checkpoint.overwrite``;
- run folder: not held by another live job (:mod:`system.train.run_folder`), writable, and without an
  earlier run's checkpoints or records unless resuming or ``checkpoint.overwrite`` is set.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from system.config.compat import describe_mismatch, model_config_diff
from system.config.job import JobConfig
from system.config.loader import ConfigError
from system.errors import DataError, RunFolderError
from system.train.run_folder import check_unlocked, earlier_run, earlier_run_error


def default_run_dir(cfg: JobConfig) -> str:
    """``metrics.run_dir``, or ``runs/<name>-<YYYYmmdd-HHMMSS>`` when it is empty."""
    return cfg.metrics.run_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def checkpoint_root(cfg: JobConfig, run_dir: str) -> str:
    """``checkpoint.dir``, or ``<run_dir>/checkpoints`` when it is empty."""
    return cfg.checkpoint.dir or str(Path(run_dir) / "checkpoints")


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def check_world(cfg: JobConfig, world_sizes: Sequence[int], how: str) -> None:
    """Every world size the launch can have must fit the parallel degrees (``pp x dp_replicate x dp_shard x tp``,
    expert parallelism folded onto them; :class:`~system.distributed.ParallelDims` decides).

    Args:
        world_sizes: the possible world sizes (one, or every size of an elastic range).
        how: how the world size was given, for the message (``"--nproc-per-node 3 x --nnodes 1"``).

    Raises:
        ConfigError: naming the degrees, the world size and how it was given.
    """
    from system.distributed.parallel_dims import ParallelDims

    p = cfg.parallel
    for world in world_sizes:
        if p.dp == -1 and p.pp == p.tp == 1 and p.dp_shard == -1 and p.dp_replicate == 1 and world % p.ep:
            raise ConfigError(f"{how} = {world} ranks does not divide by parallel.ep={p.ep}")
        if p.dp != -1 and p.pp == p.tp == 1 and not p.expert_tp and p.dp * p.ep != world:
            raise ConfigError(
                f"parallel.dp={p.dp} x parallel.ep={p.ep} = {p.dp * p.ep} ranks, but {how} = {world} ranks; "
                f"set --parallel.dp -1 (derived) or change the process count"
            )
        try:
            ParallelDims.from_parallel_config(p, world)
        except ConfigError as e:
            raise ConfigError(f"{how} = {world} ranks: {e}") from None


def check_devices(cfg: JobConfig, nproc_per_node: int) -> None:
    """CUDA present when asked for, with a GPU per local rank; NCCL only with CUDA.

    Raises:
        ConfigError: naming the key and the device count.
    """
    import torch

    p = cfg.parallel
    has_cuda = torch.cuda.is_available()
    uses_cuda = p.device == "cuda" or (p.device == "auto" and has_cuda)
    if p.device == "cuda" and not has_cuda:
        raise ConfigError("parallel.device='cuda' but this torch build or machine has no CUDA device")
    if p.backend == "nccl" and not uses_cuda:
        raise ConfigError("parallel.backend='nccl' needs CUDA devices; use 'gloo' (or 'auto') on CPU")
    if uses_cuda and nproc_per_node > torch.cuda.device_count():
        raise ConfigError(
            f"--nproc-per-node {nproc_per_node} ranks on this node, but it has {torch.cuda.device_count()} "
            f"CUDA device(s); one rank per GPU"
        )


def check_data(cfg: JobConfig):
    """``data.path`` exists and can be read; ``data.tokenizer`` loads. Returns the tokenizer.

    Only the paths are checked here (reading a large corpus is the workers' job); a file that cannot be
    decoded fails in the workers with the same kind of one-line error.

    Raises:
        DataError: naming the key and the path.
    """
    from system.data import build_tokenizer

    path = cfg.data.path
    if path:
        p = Path(path).expanduser()
        if not p.exists():
            raise DataError(f"data.path {path!r} does not exist")
        if p.is_dir():
            if not os.access(p, os.R_OK | os.X_OK):
                raise DataError(f"data.path {path!r} is a folder that cannot be read")
        elif not p.is_file():
            raise DataError(f"data.path {path!r} is neither a file nor a folder")
        else:
            try:
                with open(p, "rb") as f:
                    f.read(1)
            except OSError as e:
                raise DataError(f"data.path {path!r} cannot be read: {e.strerror or e}") from None
    try:
        return build_tokenizer(cfg.data.tokenizer)
    except DataError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"data.tokenizer {cfg.data.tokenizer!r}: {e}") from None


def missing_initial_load(cfg: JobConfig) -> str | None:
    """The one line for a ``checkpoint.initial_load_path`` that does not exist here, else None."""
    path = cfg.checkpoint.initial_load_path
    if not path or Path(path).expanduser().exists():
        return None
    return (f"checkpoint.initial_load_path {path} does not exist: the model shape is the config's own "
            f"[model]/[moe] (the real run refuses a missing folder)")


def check_initial_load(cfg: JobConfig, *, missing_ok: bool = False) -> str | None:
    """``checkpoint.initial_load_path`` (when set) is a model folder we can start from.

    Args:
        missing_ok: a folder that does not exist is returned as a warning line instead (``--dry-run``).

    Returns:
        The warning line for a missing folder under ``missing_ok``, else None.

    Raises:
        ConfigError: the folder is missing (without ``missing_ok``), not a folder, neither a Hugging Face
            model folder nor one of our exported model folders, or of an unsupported architecture
            (:func:`~system.config.initial_load.read_initial_model`).
    """
    from system.config.initial_load import read_initial_model

    if not cfg.checkpoint.initial_load_path:
        return None
    missing = missing_initial_load(cfg)
    if missing is not None and missing_ok:
        return missing
    read_initial_model(cfg.checkpoint.initial_load_path)  # raises for a missing or unusable folder
    return None


def check_resume_model(cfg: JobConfig, path: str) -> None:
    """The checkpoint at ``path`` (committed) was saved from the model ``cfg`` describes.

    ``cfg.model.vocab_size`` should be resolved (the tokenizer's, rounded) for it to be compared.

    Raises:
        CheckpointError: ``path`` is missing or not committed.
        ConfigError: a ``[model]``/``[moe]`` field differs (all differing fields listed).
    """
    from system.checkpoint.storage import Storage, read_metadata

    extra = read_metadata(Storage(path)).extra
    saved = extra.get("config") or {}
    diff = model_config_diff(saved, cfg)
    if diff:
        raise ConfigError(describe_mismatch(path, diff))


def resolve_resume(cfg: JobConfig, root: str) -> str | None:
    """The committed checkpoint ``checkpoint.resume`` names, or None (empty, or ``latest`` with none yet).

    Raises:
        CheckpointError: an explicit path that does not exist or is not committed; a ``latest`` that
            names a missing or uncommitted folder.
    """
    from system.checkpoint.storage import read_latest, resolve_checkpoint

    resume = cfg.checkpoint.resume
    if not resume:
        return None
    if resume == "latest":
        name = read_latest(root)
        return None if name is None else resolve_checkpoint(f"{root.rstrip('/')}/{name}")
    return resolve_checkpoint(resume)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str, what: str) -> None:
    """``path`` (a local folder, created later if missing) can be created and written.

    Raises:
        RunFolderError: ``path`` is a file, or it (or the existing folder it would be created in) is
            not writable, e.g. on a read-only file system.
    """
    p = Path(path.removeprefix("file://"))
    if p.exists() and not p.is_dir():
        raise RunFolderError(f"{what} {p} exists and is not a folder")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise RunFolderError(f"{what} {p} cannot be created: {base} is not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        ro = False
        try:
            ro = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
        except OSError:
            pass
        reason = "is on a read-only file system" if ro else "is not writable"
        raise RunFolderError(f"{what} {p} cannot be written: {base} {reason}")


def check_run_folder(cfg: JobConfig, run_dir: str, *, job_id: str | None, restart: bool = False,
                     continue_run: bool = False) -> None:
    """The run folder and checkpoint root can be used as the config asks.

    Args:
        run_dir: the resolved run folder.
        job_id: this job's id; a lock held under the same id is not an obstacle (another node or an
            earlier attempt of this job). None: any live holder is.
        restart: a restart of a job that already ran here (torchrun's restart count > 0): its
            own checkpoints and records are expected.
        continue_run: the launcher continues runs by name (``moesys launch``): same as ``restart``.

    Raises:
        RunFolderError: the folder is held by a live job, not writable, or holds an earlier run while
            neither ``checkpoint.resume`` nor ``checkpoint.overwrite`` is set (the message lists the ways out).
        ConfigError: ``checkpoint.overwrite`` together with ``checkpoint.resume``.
    """
    ccfg = cfg.checkpoint
    root = checkpoint_root(cfg, run_dir)
    if ccfg.overwrite and ccfg.resume:
        raise ConfigError(
            f"checkpoint.overwrite deletes the earlier run's checkpoints, checkpoint.resume={ccfg.resume!r} loads "
            f"one: pass only one of them"
        )
    check_writable(run_dir, "run folder")
    if os.path.isdir(run_dir):
        check_unlocked(run_dir, job_id)
    if _is_local(root):
        check_writable(root, "checkpoint.dir")
        local_root = root.removeprefix("file://")
        if os.path.isdir(local_root) and os.path.abspath(local_root) != os.path.abspath(run_dir):
            check_unlocked(local_root, job_id)
    if ccfg.resume or ccfg.overwrite or restart or continue_run:
        return
    found = earlier_run(run_dir, root)
    if found:
        raise earlier_run_error(run_dir, found)


def preflight(cfg: JobConfig, run_dir: str, *, world_sizes: Sequence[int] | None = None, how: str = "",
              nproc_per_node: int | None = None, job_id: str | None = None, continue_run: bool = False,
              initial_load_missing_ok: bool = False):
    """Every check of the module docstring that applies, in that order; the first failure raises.

    Args:
        cfg: the validated job config.
        run_dir: the resolved run folder (:func:`default_run_dir`).
        world_sizes: the possible world sizes (None: not known here, e.g. Ray plans its own).
        how: how ``world_sizes`` were given, for messages.
        nproc_per_node: ranks on this node (devices are checked only when given).
        job_id: this job's id for the lock check (None: any live holder is an obstacle).
        continue_run: runs continue by name (``moesys launch``): an earlier run is not an obstacle.
        initial_load_missing_ok: a ``checkpoint.initial_load_path`` that does not exist is not an error
            (``--dry-run``; the caller warns, :func:`missing_initial_load`).

    Returns:
        The job's tokenizer (``data.tokenizer``, loaded by :func:`check_data`).

    Raises:
        MoesysError: a :class:`ConfigError`, :class:`DataError`, :class:`CheckpointError` or
            :class:`RunFolderError` naming the problem.
    """
    from system.train.trainer import resolve_vocab

    if world_sizes is not None:
        check_world(cfg, world_sizes, how)
    if nproc_per_node is not None:
        check_devices(cfg, nproc_per_node)
    tokenizer = check_data(cfg)
    check_initial_load(cfg, missing_ok=initial_load_missing_ok)
    check_run_folder(cfg, run_dir, job_id=job_id, continue_run=continue_run)
    path = resolve_resume(cfg, checkpoint_root(cfg, run_dir))
    if path is not None:
        resolved = _with_vocab(cfg, tokenizer.vocab_size, resolve_vocab)
        check_resume_model(resolved, path)
    return tokenizer


def _with_vocab(cfg: JobConfig, vocab: int, resolve) -> JobConfig:
    import copy

    out = copy.deepcopy(cfg)
    try:
        resolve(out, vocab)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return out
