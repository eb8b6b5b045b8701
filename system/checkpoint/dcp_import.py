"""Import a PyTorch Distributed Checkpoint (DCP) directory into our format.

TorchTitan and Megatron-Core (``torch_dist``) write DCP directories: ``.metadata`` plus
``__<rank>_<n>.distcp`` data files. **Security note:** DCP's ``.metadata`` is a Python pickle, and
reading it (as this importer must) unpickles it, which can run arbitrary code: import only
checkpoints you trust. Our own format never unpickles anything (JSON metadata, raw tensor bytes).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from system.checkpoint.errors import CheckpointError
from system.checkpoint.metadata import METADATA_FILE
from system.checkpoint.storage import Storage, apply_umask, read_metadata, swap_in_dir

logger = logging.getLogger(__name__)


def import_dcp(dcp_dir: str | os.PathLike, out_path: str | os.PathLike, *, extra: dict | None = None,
               storage_options: dict | None = None, overwrite: bool = False) -> str:
    """Convert the DCP checkpoint at ``dcp_dir`` into a committed checkpoint at ``out_path``.

    Runs in one process (no process group needed; ``no_dist`` on both sides). Every tensor is
    materialised with its full global shape in CPU memory, so this needs as much RAM as the
    checkpoint. Keys are DCP's flattened fqns (nested dicts joined with ``.``). Non-tensor (bytes)
    items are skipped with a warning: put what you need of them in ``extra``.

    ``out_path`` must not exist, be an empty folder, or (with ``overwrite``) be a committed checkpoint
    holding nothing but its ``metadata.json`` and the data files it lists; it is checked before the
    DCP checkpoint is read. On a local file system the new checkpoint is built in a hidden sibling and
    renamed (or swapped) into place, so a failed import leaves ``out_path`` as it was.

    Returns:
        The URL of the new checkpoint.

    Raises:
        CheckpointError: ``dcp_dir`` is not a readable DCP checkpoint; ``out_path`` is a file, a
            non-empty folder that is not a checkpoint, a checkpoint and ``overwrite`` is False, or a
            checkpoint holding other files (each named).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from system.checkpoint.api import save

    out = Storage(out_path, storage_options)
    replace = _check_out(out, overwrite)
    if not os.path.isdir(dcp_dir):
        what = "does not exist" if not os.path.exists(dcp_dir) else "is not a folder"
        raise CheckpointError(f"DCP checkpoint {dcp_dir} {what}")
    reader = dcp.FileSystemReader(os.fspath(dcp_dir))
    try:
        meta = reader.read_metadata()  # unpickles DCP's .metadata: trusted input only
    except FileNotFoundError as e:
        raise CheckpointError(f"{dcp_dir} is not a DCP checkpoint (no .metadata)") from e
    except Exception as e:  # noqa: BLE001 - a pickle can fail in any way; the input is named
        raise CheckpointError(f"{dcp_dir}/.metadata cannot be read as DCP metadata ({type(e).__name__}: {e})") from e
    state, skipped = {}, []
    for fqn, item in meta.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            state[fqn] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
        else:
            skipped.append(fqn)
    if skipped:
        logger.warning("import_dcp: skipping %d non-tensor items: %s", len(skipped), ", ".join(sorted(skipped)))
    try:
        dcp.load(state, storage_reader=reader, no_dist=True)
    except Exception as e:  # noqa: BLE001 - DCP wraps read errors in its own exceptions
        raise CheckpointError(f"cannot read the DCP data files of {dcp_dir} ({type(e).__name__}: {e})") from e
    info = {"source": "torch.distributed.checkpoint", "source_path": os.fspath(dcp_dir), "skipped": sorted(skipped)}
    kwargs = dict(extra={**(extra or {}), "imported_from": info}, layout={"world_size": 1},
                  storage_options=storage_options, no_dist=True)
    if not out.is_local:  # no rename on object stores: the writer un-commits, then rewrites in place
        return save(state, out_path, overwrite=overwrite, **kwargs)
    return build_local_checkpoint(out, replace, lambda tmp: save(state, tmp, **kwargs))


def build_local_checkpoint(out: Storage, replace: bool, write: Callable[[Path], object]) -> str:
    """Write a checkpoint into a hidden sibling of the local ``out`` with ``write(tmp)``, then rename it into
    place (``replace``: swap it with the committed checkpoint there); on any failure only the sibling is
    removed. Returns ``out.url``.

    Raises:
        CheckpointError: the folder cannot be created or written (the OS error and the folder named).
    """
    path = Path(out.root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    except OSError as e:
        raise CheckpointError(f"cannot create the checkpoint folder {path}: {e}") from None
    try:
        write(tmp)
        apply_umask(tmp)
        if replace:
            swap_in_dir(tmp, path)
        else:
            os.rename(tmp, path)  # onto nothing or an empty folder; never clobbers a folder with files
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write the checkpoint {path}: {e}") from e
        raise
    return out.url


def _check_out(out: Storage, overwrite: bool) -> bool:
    """Whether ``out`` may receive the import: True when a committed checkpoint is to be replaced,
    False when nothing is there (or an empty folder).

    Raises:
        CheckpointError: see :func:`import_dcp` (nothing is touched).
    """
    fs, root = out.fs, out.root
    if not fs.exists(root):
        return False
    if not fs.isdir(root) or (out.is_local and os.path.islink(root)):
        raise CheckpointError(f"--out {out.url} exists and is not a folder; not replacing it")
    entries = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(root, detail=False))
    if not entries:
        return False
    if METADATA_FILE not in entries:
        raise CheckpointError(
            f"--out {out.url} is a non-empty folder that is not a checkpoint (no {METADATA_FILE}); not writing "
            f"into it, even with --overwrite: choose another --out"
        )
    meta = read_metadata(out)  # a metadata.json that does not parse: UncommittedCheckpointError
    if not overwrite:
        raise CheckpointError(f"--out {out.url} already holds a committed checkpoint; pass --overwrite to replace it")
    extra = sorted(set(entries) - set(meta.files) - {METADATA_FILE})
    if extra:
        raise CheckpointError(
            f"--out {out.url} holds a checkpoint plus files it does not list ({', '.join(extra)}); they would "
            f"be lost: move them away or choose another --out"
        )
    return True
