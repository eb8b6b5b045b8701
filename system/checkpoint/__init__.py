"""Saving and loading model state: consolidated safetensors (``model_io``) and resharding checkpoints.

The resharding checkpoint (ByteCheckpoint, arXiv 2407.20143) stores each global tensor as boxes in
per-rank data files with JSON metadata; any layout loads from any other.
"""

from system.checkpoint.api import inspect, load_full, save, verify
from system.checkpoint.dcp_import import import_dcp
from system.checkpoint.errors import (
    CheckpointError, ChecksumError, CoverageError, DataFileError, FormatVersionError, MissingTensorError,
    SavePlanError, TensorMismatchError, UncommittedCheckpointError,
)
from system.checkpoint.model_io import full_state_dict, load_model, read_config, save_model
from system.checkpoint.reader import LoadResult, load
from system.checkpoint.rng import capture_rng, decode_rng_state, encode_rng_state, restore_rng
from system.checkpoint.sharding import Shard, ShardedEntry
from system.checkpoint.storage import (
    commit_latest, list_checkpoints, prune, read_latest, resolve_checkpoint, step_dir_name,
)
from system.checkpoint.writer import AsyncCheckpointer, SaveHandle

__all__ = [
    "AsyncCheckpointer", "CheckpointError", "ChecksumError", "CoverageError", "DataFileError",
    "FormatVersionError", "LoadResult", "MissingTensorError", "SaveHandle", "SavePlanError", "Shard",
    "ShardedEntry", "TensorMismatchError", "UncommittedCheckpointError", "capture_rng", "commit_latest",
    "decode_rng_state", "encode_rng_state", "full_state_dict", "import_dcp", "inspect", "list_checkpoints",
    "load", "load_full", "load_model", "prune", "read_config", "read_latest", "resolve_checkpoint", "restore_rng", "save",
    "save_model", "step_dir_name", "verify",
]
