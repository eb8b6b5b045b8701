"""Zero-copy, read-only views of the tensors of a safetensors checkpoint through ``mmap``.

The safetensors format is an 8-byte little-endian header length ``n``, a JSON header of ``n`` bytes
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, offsets relative to the end of the
header) and the raw little-endian tensor bytes. We parse the header ourselves and map the file
read-only (``MAP_SHARED``, ``PROT_READ``): a view of a tensor is a ``torch.frombuffer`` over the
mapping, so reading it touches page-cache pages only. Such pages are file-backed: they are not
anonymous memory and do not count against ``RLIMIT_DATA``. This is the host tier of the ring-offload
engine on a CPU-only machine (SE-MoE, arXiv 2205.10034, sec. 3.3.2).
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: ``file``, absolute byte ``offset`` in it, ``nbytes``, ``dtype``, ``shape``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse the header of one safetensors file.

    Raises:
        ValueError: the file is truncated, the header is not JSON, a dtype is unknown, or a
            tensor's byte range does not match its shape (the name and the numbers are given).
    """
    size = file.stat().st_size
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError(f"{file}: not a safetensors file ({size} bytes)")
        (hlen,) = struct.unpack("<Q", raw)
        if 8 + hlen > size:
            raise ValueError(f"{file}: header of {hlen} bytes exceeds the file size {size}")
        try:
            header = json.loads(fh.read(hlen))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: bad safetensors header: {e}") from None
    base = 8 + hlen
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        shape = tuple(int(s) for s in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or base + end > size:
            raise ValueError(
                f"{file}: tensor {name!r} {list(shape)} {dtype} needs {nbytes} bytes, header gives "
                f"[{begin}, {end}) in a data section of {size - base} bytes"
            )
        out[name] = TensorInfo(name, dtype, shape, file, base + begin, nbytes)
    return out


class MmapCheckpoint:
    """Read-only mmap of a checkpoint folder's safetensors file(s).

    Accepts ``<dir>/model.safetensors`` (what :func:`system.checkpoint.model_io.save_model` writes),
    or a Hugging Face style ``<dir>/*.safetensors.index.json`` whose ``weight_map`` names the file
    of each tensor. Views returned by :meth:`tensor` and :meth:`raw` share memory with the mapping:
    never write to them, and keep this object alive while they are used.

    Raises:
        FileNotFoundError: no safetensors file in ``path``.
    """

    def __init__(self, path: str | Path, file_name: str = "model.safetensors"):
        path = Path(path)
        single = path / file_name
        if single.is_file():
            files = [single]
        else:
            indexes = sorted(path.glob("*" + INDEX_SUFFIX))
            if not indexes:
                raise FileNotFoundError(f"no {file_name} or *{INDEX_SUFFIX} in {path}")
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            files = sorted({path / f for f in weight_map.values()})
        self.path = path
        self.infos: dict[str, TensorInfo] = {}
        for f in files:
            self.infos.update(read_header(f))
        self._maps: dict[Path, mmap.mmap] = {}
        for f in files:
            with open(f, "rb") as fh:
                self._maps[f] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def info(self, name: str) -> TensorInfo:
        """The :class:`TensorInfo` of ``name`` (``KeyError`` naming the folder when absent)."""
        try:
            return self.infos[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} missing from {self.path}") from None

    def raw(self, name: str) -> torch.Tensor:
        """Flat ``uint8`` view ``[nbytes]`` of a tensor's bytes in the mapping (zero copy)."""
        info = self.info(name)
        if info.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        with warnings.catch_warnings():  # the mapping is read-only; we never write through the view
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(self._maps[info.file], dtype=torch.uint8, count=info.nbytes, offset=info.offset)

    def tensor(self, name: str) -> torch.Tensor:
        """Typed, shaped view of a tensor in the mapping (zero copy, read-only by contract)."""
        info = self.info(name)
        return self.raw(name).view(info.dtype).view(info.shape)

    def close(self) -> None:
        """Drop this object's references to the mappings.

        A mapping is unmapped when its last view is freed (each view holds a reference to it):
        ``mmap.close()`` is never called, since ``torch.frombuffer`` views do not pin the buffer and
        would be left pointing at unmapped memory.
        """
        self._maps.clear()
