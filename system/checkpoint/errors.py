"""Exceptions raised by the checkpoint library (ByteCheckpoint-style format, arXiv 2407.20143).

Every error subclasses :class:`CheckpointError` (itself a ``RuntimeError``), and its message names
the tensor (fqn) and the file concerned, so a failed resume says *what* is wrong and *where*.
"""

from __future__ import annotations

from system.errors import MoesysError


class CheckpointError(MoesysError, RuntimeError):
    """Base class of every checkpoint failure."""


class UncommittedCheckpointError(CheckpointError):
    """The directory has no readable ``metadata.json``: the save never committed (or it is not a checkpoint)."""


class CheckpointNotFoundError(UncommittedCheckpointError):
    """The path given as a checkpoint does not exist at all (a typo, or the wrong folder).

    A subclass of :class:`UncommittedCheckpointError` so that existing ``except`` clauses still catch it.
    """


class FormatVersionError(CheckpointError):
    """``metadata.json`` carries a format version this code does not know."""


class SavePlanError(CheckpointError):
    """The ranks' shards do not describe a valid checkpoint (dtype/shape disagree, boxes overlap or leave holes)."""


class MissingTensorError(CheckpointError):
    """A tensor the caller wants to load is not in the checkpoint."""


class TensorMismatchError(CheckpointError):
    """Global shape or dtype in the checkpoint differs from the target's."""


class CoverageError(CheckpointError):
    """The saved boxes of a tensor do not cover a region a rank needs."""


class ChecksumError(CheckpointError):
    """Bytes read from a data file do not match the crc32 recorded in the metadata."""


class DataFileError(CheckpointError):
    """A data file is missing, truncated or unreadable."""


class ModelFileError(DataFileError, ValueError):
    """A consolidated model (``model.safetensors`` + ``config.json``) is missing, malformed or lies
    about its contents (header length or tensor offsets beyond the file, bad JSON); names the file."""


class ModelNotFoundError(ModelFileError, FileNotFoundError):
    """The model folder, or its ``model.safetensors`` / ``config.json``, does not exist."""


class ExportTargetError(CheckpointError):
    """``moesys ckpt export --out`` names something that must not be replaced (a file, a folder that is
    not an earlier export, an export holding other files, or an earlier export without ``--overwrite``)."""
