"""The on-disk description of a checkpoint: ``metadata.json`` (ByteCheckpoint section 3.2).

Metadata is data, never code: JSON only, no pickle. A checkpoint directory holds one data file per
writing rank (raw row-major bytes of each saved box, back to back, each box starting at a multiple
of :data:`ALIGN` bytes) and ``metadata.json``, written last; the directory is *committed* iff that
file exists and parses. Layout of ``metadata.json``::

    {"format": "moesys-ckpt", "version": 1, "world_size": 4, "layout": {...}, "extra": {...},
     "rank_extras": {"0": {...}, ...}, "crc_chunk_bytes": 4194304, "created_unix_s": 1.7e9,
     "files": {"data-00000.bin": {"rank": 0, "nbytes": 123}, ...},
     "tensors": {"layers.0.moe.experts.w1": {"dtype": "bfloat16", "shape": [8, 256, 512],
                 "boxes": [{"offsets": [0, 0, 0], "lengths": [2, 256, 512], "file": "data-00000.bin",
                            "byte_offset": 0, "nbytes": 524288, "crc32": 123,
                            "chunk_crc32": [...]}]}}}

``crc32`` is ``zlib.crc32`` of the box's bytes. When a box is longer than ``crc_chunk_bytes``,
``chunk_crc32[k]`` is the crc32 of its bytes ``[k * chunk, (k + 1) * chunk)``, so a partial read can
be verified exactly by reading whole chunks (see :mod:`system.checkpoint.reader`); for a box of one
chunk the list is omitted (it would equal ``[crc32]``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from system.checkpoint.errors import FormatVersionError, UncommittedCheckpointError

FORMAT_NAME = "moesys-ckpt"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
ALIGN = 64
"""Every saved box starts at a multiple of this many bytes in its data file."""
DEFAULT_CRC_CHUNK_BYTES = 4 << 20

_DTYPE_NAMES = (
    "float64", "float32", "float16", "bfloat16", "complex64", "complex128",
    "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
)
_DTYPES = {name: getattr(torch, name) for name in _DTYPE_NAMES if hasattr(torch, name)}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``.

    Raises:
        ValueError: a dtype the format does not store (e.g. quantized types).
    """
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype} cannot be checkpointed (supported: {sorted(_DTYPES)})")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; raises ``ValueError`` for an unknown name."""
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r} in checkpoint metadata")
    return _DTYPES[name]


def itemsize(name: str) -> int:
    """Bytes per element of the dtype called ``name``."""
    return dtype_from_name(name).itemsize


@dataclass
class SavedBox:
    """One saved region of a tensor and where its bytes are.

    Attributes:
        offsets, lengths: the box in the global tensor, in elements.
        file: data file name, relative to the checkpoint directory.
        byte_offset, nbytes: the box's bytes in ``file`` (row-major, contiguous).
        crc32: ``zlib.crc32`` of those bytes.
        chunk_crc32: crc32 of each ``crc_chunk_bytes`` slice, when the box spans several chunks.
    """

    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    file: str
    byte_offset: int
    nbytes: int
    crc32: int
    chunk_crc32: list[int] | None = None

    def chunk_crcs(self, chunk_bytes: int) -> list[int]:
        """The crc32 of every chunk of the box (``[crc32]`` when it fits in one chunk)."""
        if self.chunk_crc32 is not None:
            return self.chunk_crc32
        if self.nbytes > chunk_bytes:
            raise ValueError(f"box in {self.file} at byte {self.byte_offset} lacks its chunk crcs")
        return [self.crc32]

    def to_json(self) -> dict:
        out = {
            "offsets": list(self.offsets), "lengths": list(self.lengths), "file": self.file,
            "byte_offset": self.byte_offset, "nbytes": self.nbytes, "crc32": self.crc32,
        }
        if self.chunk_crc32 is not None and len(self.chunk_crc32) > 1:
            out["chunk_crc32"] = list(self.chunk_crc32)
        return out

    @classmethod
    def from_json(cls, d: dict) -> SavedBox:
        return cls(
            tuple(d["offsets"]), tuple(d["lengths"]), d["file"], int(d["byte_offset"]),
            int(d["nbytes"]), int(d["crc32"]), d.get("chunk_crc32"),
        )


@dataclass
class TensorMeta:
    """A global tensor: dtype name, global shape (``[]`` for 0-d) and its saved boxes."""

    dtype: str
    shape: tuple[int, ...]
    boxes: list[SavedBox] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor (each element once)."""
        return math.prod(self.shape) * itemsize(self.dtype)

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "boxes": [b.to_json() for b in self.boxes]}

    @classmethod
    def from_json(cls, d: dict) -> TensorMeta:
        return cls(d["dtype"], tuple(d["shape"]), [SavedBox.from_json(b) for b in d["boxes"]])


@dataclass
class CheckpointMetadata:
    """Everything in ``metadata.json`` (see the module docstring for the JSON layout).

    Attributes:
        tensors: fqn -> :class:`TensorMeta`.
        files: data file name -> ``{"rank": writer rank, "nbytes": file size in bytes}``.
        world_size: number of ranks that saved.
        layout: free-form description of the saving job's parallel layout.
        extra: JSON state from rank 0 (config, step, scheduler, dataloader position, ...).
        rank_extras: saved rank -> that rank's JSON state (e.g. RNG).
        crc_chunk_bytes: chunk size of ``SavedBox.chunk_crc32``, in bytes.
        created_unix_s: commit time, seconds since the epoch.
        version: format version.
    """

    tensors: dict[str, TensorMeta]
    files: dict[str, dict]
    world_size: int
    layout: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    rank_extras: dict[int, dict | None] = field(default_factory=dict)
    crc_chunk_bytes: int = DEFAULT_CRC_CHUNK_BYTES
    created_unix_s: float = 0.0
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        """The ``metadata.json`` text."""
        return json.dumps({
            "format": FORMAT_NAME, "version": self.version, "world_size": self.world_size,
            "layout": self.layout, "extra": self.extra,
            "rank_extras": {str(r): e for r, e in sorted(self.rank_extras.items())},
            "crc_chunk_bytes": self.crc_chunk_bytes, "created_unix_s": self.created_unix_s,
            "files": self.files,
            "tensors": {k: t.to_json() for k, t in self.tensors.items()},
        }, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "metadata.json") -> CheckpointMetadata:
        """Parse ``metadata.json``.

        Raises:
            UncommittedCheckpointError: the text is not valid JSON of this format (e.g. truncated), or
                a field is missing or of the wrong type.
            FormatVersionError: the version is not :data:`FORMAT_VERSION` (a newer one says the
                checkpoint was written by a newer moe-system).
        """
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UncommittedCheckpointError(f"{where} does not parse as JSON ({e}); the checkpoint is not committed") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise UncommittedCheckpointError(f"{where} is not a {FORMAT_NAME} metadata file")
        version = d.get("version")
        if version != FORMAT_VERSION:
            if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
                raise FormatVersionError(
                    f"{where} was written by a newer moe-system (format version {version}, this version reads "
                    f"version {FORMAT_VERSION}): upgrade moe-system to read it"
                )
            raise FormatVersionError(
                f"{where} has format version {version!r}; this version of moe-system reads version {FORMAT_VERSION}"
            )
        try:
            return cls(
                tensors={k: TensorMeta.from_json(t) for k, t in d["tensors"].items()},
                files=d["files"], world_size=int(d["world_size"]), layout=d.get("layout", {}),
                extra=d.get("extra", {}), rank_extras={int(r): e for r, e in d.get("rank_extras", {}).items()},
                crc_chunk_bytes=int(d["crc_chunk_bytes"]), created_unix_s=float(d.get("created_unix_s", 0.0)),
                version=d["version"],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UncommittedCheckpointError(
                f"{where} is malformed ({type(e).__name__}: {e}); the checkpoint cannot be read"
            ) from None
