"""Zero-copy, read-only views of the tensors of a safetensors checkpoint through ``mmap``.

The safetensors format is an 8-byte little-endian header length ``n``, a JSON header of ``n`` bytes
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, offsets relative to the end of the
header) and the raw little-endian tensor bytes. We parse the header ourselves and map the file
read-only (``MAP_SHARED``, ``PROT_READ``): a view of a tensor is a ``torch.frombuffer`` over the
mapping, so reading it touches page-cache pages only. Such pages are file-backed: they are not
anonymous memory and do not count against ``RLIMIT_DATA``. This is the host tier of the ring-offload
engine on a CPU-only machine (SE-MoE, arXiv 2205.10034, sec. 3.3.2).

The serving engine reads weights through one interface, :class:`WeightFiles`, which both our folder
(:class:`MmapCheckpoint`) and a Hugging Face folder (:class:`system.hf.weights.HFCheckpoint`) provide:
``source(name)`` says how a tensor is stored (a :class:`Source`: dtype, our logical shape, the
contiguous byte ranges of files holding it, and whether each holds the transpose of its slice), and
``piece_view(piece)`` is a zero-copy ``uint8`` view of one range in the mapping.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from system.errors import MoesysError

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


@dataclass(frozen=True)
class Piece:
    """One contiguous byte range ``[offset, offset + nbytes)`` of ``file``, holding (part of) the stored
    tensor ``hf_name`` (its name in the file: the Hugging Face name in a Hugging Face folder, ours in ours)."""

    hf_name: str
    file: Path
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Source:
    """How one of our tensors is stored.

    Attributes:
        name: our parameter name.
        dtype: stored dtype.
        shape: our (logical) shape.
        pieces: contiguous byte ranges in order. For expert tensors one per expert (``len == E``), else one.
        transposed: each piece holds the transpose of one expert's slice (the last two axes swapped);
            a transposed source always has one piece per expert (also when ``E = 1``).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    transposed: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor."""
        return sum(p.nbytes for p in self.pieces)

    @property
    def piece_shape(self) -> tuple[int, ...]:
        """Shape of one piece's bytes as stored (``[f, d]`` for an HF expert ``gate_proj``)."""
        inner = self.shape[1:] if len(self.pieces) > 1 or self.transposed else self.shape
        return inner[:-2] + (inner[-1], inner[-2]) if self.transposed else inner

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """Shape of the pieces' bytes laid end to end: ``shape``, with its last two axes swapped when
        :attr:`transposed` (``[E, f, d]`` for our ``w1`` ``[E, d, f]`` read from Hugging Face)."""
        return self.shape[:-2] + (self.shape[-1], self.shape[-2]) if self.transposed else self.shape


class WeightFiles(Protocol):
    """What the serving engine reads weights through (:class:`MmapCheckpoint`, and
    :class:`system.hf.weights.HFCheckpoint`). Views share memory with read-only mappings: never write to
    them, and keep the object alive while they are used."""

    path: Path

    def __contains__(self, name: str) -> bool: ...

    def source(self, name: str) -> Source:
        """How our tensor ``name`` is stored (``KeyError`` naming the folder when absent)."""
        ...

    def piece_view(self, piece: Piece) -> torch.Tensor:
        """Flat ``uint8`` view ``[piece.nbytes]`` of ``piece`` in the mapping of its file (zero copy)."""
        ...

    def close(self) -> None:
        """Drop the mappings (views already made keep theirs alive)."""
        ...


def map_file(file: Path) -> mmap.mmap:
    """A read-only ``MAP_SHARED`` mapping of the whole ``file`` (an empty file cannot be mapped: raises
    ``ValueError``; ``OSError`` when it cannot be opened)."""
    with open(file, "rb") as fh:
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)


def byte_view(mapping: mmap.mmap, offset: int, nbytes: int) -> torch.Tensor:
    """Flat ``uint8`` view ``[nbytes]`` of ``mapping`` at byte ``offset`` (zero copy; read-only by contract).

    Raises:
        ValueError: the range lies outside the mapping.
    """
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():  # the mapping is read-only; we never write through the view
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset)


class SafetensorsFileError(MoesysError, ValueError):
    """A safetensors file or index cannot be used: truncated, a header or tensor offsets beyond the
    file, bad JSON, an unknown dtype (names the file and the numbers)."""


class ModelFilesNotFoundError(MoesysError, FileNotFoundError):
    """The model folder does not exist, or holds no ``model.safetensors`` (nor an index)."""


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse the header of one safetensors file.

    Raises:
        ModelFilesNotFoundError: the file does not exist.
        SafetensorsFileError: the file cannot be read or is truncated, the header is not JSON (or
            not an object of tensor entries), a dtype is unknown, or a tensor's byte range does not
            match its shape or lies outside the file (the name and the numbers are given).
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise SafetensorsFileError(f"{file}: not a safetensors file ({size} bytes)")
            (hlen,) = struct.unpack("<Q", raw)
            if 8 + hlen > size:
                raise SafetensorsFileError(f"{file}: header of {hlen} bytes exceeds the file size {size}")
            text = fh.read(hlen)
    except FileNotFoundError:
        raise ModelFilesNotFoundError(f"{file} does not exist") from None
    except OSError as e:
        raise SafetensorsFileError(f"{file} cannot be read: {e.strerror or e}") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsFileError(f"{file}: bad safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsFileError(f"{file}: bad safetensors header: a JSON {type(header).__name__}, not an object")
    base = 8 + hlen
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        out[name] = _tensor_info(file, name, entry, base, size)
    return out


def _tensor_info(file: Path, name: str, entry, base: int, size: int) -> TensorInfo:
    """One header entry checked against the file: dtype known, ``end - begin`` the shape's bytes, inside the file."""
    try:
        dtype_name = entry["dtype"]
        shape = tuple(int(s) for s in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
    except (TypeError, KeyError, ValueError) as e:
        raise SafetensorsFileError(
            f"{file}: header entry of tensor {name!r} is malformed ({type(e).__name__}: {e}); it needs dtype, "
            f"shape and data_offsets [begin, end]"
        ) from None
    if dtype_name not in SAFETENSORS_DTYPES:
        raise SafetensorsFileError(f"{file}: tensor {name!r} has unsupported dtype {dtype_name}")
    dtype = SAFETENSORS_DTYPES[dtype_name]
    nbytes = math.prod(shape) * dtype.itemsize
    if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes or base + end > size:
        raise SafetensorsFileError(
            f"{file}: tensor {name!r} {list(shape)} {dtype} needs {nbytes} bytes, header gives "
            f"[{begin}, {end}) in a data section of {size - base} bytes"
        )
    return TensorInfo(name, dtype, shape, file, base + begin, nbytes)


class MmapCheckpoint:
    """Read-only mmap of a checkpoint folder's safetensors file(s).

    Accepts ``<dir>/model.safetensors`` (what :func:`system.checkpoint.model_io.save_model` writes),
    or a Hugging Face style ``<dir>/*.safetensors.index.json`` whose ``weight_map`` names the file
    of each tensor. Views returned by :meth:`tensor` and :meth:`raw` share memory with the mapping:
    never write to them, and keep this object alive while they are used.

    Raises:
        ModelFilesNotFoundError: ``path`` does not exist, or holds no safetensors file (a
            ``FileNotFoundError``).
        SafetensorsFileError: a file or the index is malformed (see :func:`read_header`).
    """

    def __init__(self, path: str | Path, file_name: str = "model.safetensors"):
        path = Path(path)
        if not path.is_dir():
            what = "does not exist" if not path.exists() else "is not a folder"
            raise ModelFilesNotFoundError(f"model folder {path} {what}")
        single = path / file_name
        if single.is_file():
            files = [single]
        else:
            indexes = sorted(path.glob("*" + INDEX_SUFFIX))
            if not indexes:
                raise ModelFilesNotFoundError(f"no {file_name} or *{INDEX_SUFFIX} in {path}")
            files = _index_files(path, indexes[0])
        self.path = path
        self.infos: dict[str, TensorInfo] = {}
        for f in files:
            self.infos.update(read_header(f))
        self._maps: dict[Path, mmap.mmap] = {f: map_file(f) for f in files}

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
        return byte_view(self._maps[info.file], info.offset, info.nbytes)

    def source(self, name: str) -> Source:
        """How ``name`` is stored: one piece, in our layout (:class:`WeightFiles`; ``KeyError`` when absent)."""
        info = self.info(name)
        return Source(name, info.dtype, info.shape, (Piece(name, info.file, info.offset, info.nbytes),))

    def piece_view(self, piece: Piece) -> torch.Tensor:
        """Flat ``uint8`` view ``[piece.nbytes]`` of ``piece`` in the mapping (zero copy)."""
        return byte_view(self._maps[piece.file], piece.offset, piece.nbytes)

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


def _index_files(folder: Path, index: Path) -> list[Path]:
    """The safetensors files an index's ``weight_map`` names (each inside ``folder``).

    Raises:
        SafetensorsFileError: the index is not JSON with a ``weight_map`` of file names, or names a
            file outside ``folder``.
    """
    try:
        weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise SafetensorsFileError(f"{index}: not a safetensors index with a weight_map ({type(e).__name__}: {e})") from None
    files = []
    for name in names:
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise SafetensorsFileError(f"{index}: weight_map names {name!r}, not a file inside {folder}")
        files.append(folder / name)
    return files
