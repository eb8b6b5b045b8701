"""Import a PyTorch Distributed Checkpoint (DCP) directory into our format.

TorchTitan and Megatron-Core (``torch_dist``) write DCP directories: ``.metadata`` plus
``__<rank>_<n>.distcp`` data files. **Security note:** DCP's ``.metadata`` is a Python pickle, and
reading it (as this importer must) unpickles it, which can run arbitrary code: import only
checkpoints you trust. Our own format never unpickles anything (JSON metadata, raw tensor bytes).
"""

from __future__ import annotations

import logging
import os

import torch

from system.checkpoint.errors import CheckpointError

logger = logging.getLogger(__name__)


def import_dcp(dcp_dir: str | os.PathLike, out_path: str | os.PathLike, *, extra: dict | None = None,
               storage_options: dict | None = None, overwrite: bool = False) -> str:
    """Convert the DCP checkpoint at ``dcp_dir`` into a committed checkpoint at ``out_path``.

    Runs in one process (no process group needed; ``no_dist`` on both sides). Every tensor is
    materialised with its full global shape in CPU memory, so this needs as much RAM as the
    checkpoint. Keys are DCP's flattened fqns (nested dicts joined with ``.``). Non-tensor (bytes)
    items are skipped with a warning: put what you need of them in ``extra``.

    Returns:
        The URL of the new checkpoint.

    Raises:
        CheckpointError: ``dcp_dir`` is not a DCP checkpoint.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from system.checkpoint.api import save

    reader = dcp.FileSystemReader(os.fspath(dcp_dir))
    try:
        meta = reader.read_metadata()  # unpickles DCP's .metadata: trusted input only
    except FileNotFoundError as e:
        raise CheckpointError(f"{dcp_dir} is not a DCP checkpoint (no .metadata)") from e
    state, skipped = {}, []
    for fqn, item in meta.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            state[fqn] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
        else:
            skipped.append(fqn)
    if skipped:
        logger.warning("import_dcp: skipping %d non-tensor items: %s", len(skipped), ", ".join(sorted(skipped)))
    dcp.load(state, storage_reader=reader, no_dist=True)
    info = {"source": "torch.distributed.checkpoint", "source_path": os.fspath(dcp_dir), "skipped": sorted(skipped)}
    return save(state, out_path, extra={**(extra or {}), "imported_from": info}, layout={"world_size": 1},
                storage_options=storage_options, overwrite=overwrite, no_dist=True)
