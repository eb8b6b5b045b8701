"""Where each of our parameters lies in a Hugging Face checkpoint, and reading it from there in place.

Our names (``layers.3.moe.experts.w1``) map to Hugging Face tensors (``model.layers.3.mlp.experts.5
.gate_proj.weight``) once, in :func:`hf_tensor_map`. Every tensor but the routed experts is stored
the same way in both (``nn.Linear`` weights ``[out, in]``, norms, biases): a plain rename. Routed experts
are ours as ``w1``/``w3`` ``[E, d, f]`` and ``w2`` ``[E, f, d]``; Hugging Face stores them either per
expert (``experts.{e}.gate_proj.weight`` ``[f, d]``, ``up_proj`` ``[f, d]``, ``down_proj`` ``[d, f]``;
Mixtral ``w1``/``w3``/``w2``) or fused (``experts.gate_up_proj`` ``[E, 2f, d]``, gate rows first, and
``experts.down_proj`` ``[E, d, f]``). Either way expert ``e`` of one of our tensors is one contiguous
byte range of a shard holding its transpose: a :class:`Piece`. A :class:`Source` lists, per tensor,
its pieces in expert order, so a reader can fetch exactly the experts it holds (the rows of a shard
of any other tensor are contiguous too), and an offload engine can stream them from the mapped shard
files.

:class:`HFCheckpoint` opens a folder (``model.safetensors`` or ``model.safetensors.index.json`` and the
shards it names), checks every tensor the model needs is there with the right shape and a float
dtype, and reads with ``os.preadv`` into the destination: bytes read are counted, and a rank's peak
memory is its shard plus one tensor (the transpose of one expert).
"""

from __future__ import annotations

import math
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from system.config.model import ModelConfig
from system.config.moe import MoEConfig
from system.hf.config import FAMILIES, HFCheckpointError, read_hf_config
from system.inference.mmap_file import (  # Piece, Source: defined beside our own reader, used by both
    INDEX_SUFFIX, ModelFilesNotFoundError, Piece, SafetensorsFileError, Source, TensorInfo, byte_view, map_file,
    read_header,
)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
READ_THREADS = max(1, min(4, os.cpu_count() or 1))
"""Threads that read and transpose experts in :meth:`HFCheckpoint.read_into` (each holds one expert)."""
EXPERT_WEIGHTS = ("w1", "w2", "w3")


def _hf_layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def hf_tensor_map(model_cfg: ModelConfig, moe_cfg: MoEConfig, family: str, our_names: list[str]) -> dict[str, str]:
    """``{our name: HF name}`` for every non-expert tensor in ``our_names`` (routed experts are in
    :func:`expert_names`).

    Raises:
        HFCheckpointError: ``family`` unknown, or a name of ours has no Hugging Face counterpart.
    """
    if family not in FAMILIES:
        raise HFCheckpointError(f"unknown Hugging Face family {family!r}; supported: {', '.join(FAMILIES)}")
    moe_block = "block_sparse_moe" if family == "mixtral" else "mlp"
    shared = "shared_expert" if family == "qwen2_moe" else "shared_experts"
    top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    attn = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "q_norm": "q_norm", "k_norm": "k_norm"}
    if model_cfg.attention_type == "mla":
        attn = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
                "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
    ffn = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    out = {}
    for name in our_names:
        if name in top:
            out[name] = top[name]
            continue
        parts = name.split(".")
        if parts[0] != "layers" or len(parts) < 4:
            raise HFCheckpointError(f"tensor {name!r} has no Hugging Face {family} counterpart")
        pre, rest, leaf = _hf_layer_prefix(int(parts[1])), parts[2:-1], parts[-1]
        hf = None
        if rest == ["attention_norm"]:
            hf = pre + "input_layernorm"
        elif rest == ["ffn_norm"]:
            hf = pre + "post_attention_layernorm"
        elif rest[0] == "attention" and len(rest) == 2 and rest[1] in attn:
            hf = pre + "self_attn." + attn[rest[1]]
        elif rest[0] == "mlp" and len(rest) == 2 and rest[1] in ffn:
            hf = pre + "mlp." + ffn[rest[1]]
        elif rest == ["moe", "router", "gate"]:
            hf = pre + moe_block + ".gate"
        elif rest == ["moe", "router"] and leaf == "expert_bias":
            out[name] = pre + moe_block + ".gate.e_score_correction_bias"
            continue
        elif rest[:2] == ["moe", "shared_experts"] and len(rest) == 3 and rest[2] in ffn:
            hf = pre + f"mlp.{shared}." + ffn[rest[2]]
        elif rest == ["moe", "shared_expert_gate"]:
            hf = pre + "mlp.shared_expert_gate"
        if hf is None:
            raise HFCheckpointError(f"tensor {name!r} has no Hugging Face {family} counterpart")
        out[name] = f"{hf}.{leaf}"
    return out


def expert_names(family: str, layer: int, num_experts: int) -> dict[str, dict[str, list[str] | tuple[str, int]]]:
    """Candidate HF names of the routed experts of block ``layer``: ``{"per_expert": {w: [name_e]},
    "fused": {w: (name, half)}}`` where ``half`` is 0 (gate rows of ``gate_up_proj``), 1 (up rows) or -1
    (all of ``down_proj``)."""
    pre = _hf_layer_prefix(layer)
    if family == "mixtral":
        per = {w: [f"{pre}block_sparse_moe.experts.{e}.{w}.weight" for e in range(num_experts)] for w in EXPERT_WEIGHTS}
    else:
        names = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
        per = {w: [f"{pre}mlp.experts.{e}.{hf}.weight" for e in range(num_experts)] for w, hf in names.items()}
    fused = {"w1": (f"{pre}mlp.experts.gate_up_proj", 0), "w3": (f"{pre}mlp.experts.gate_up_proj", 1),
             "w2": (f"{pre}mlp.experts.down_proj", -1)}
    return {"per_expert": per, "fused": fused}


class HFCheckpoint:
    """A Hugging Face model folder, read in place.

    Args:
        path: folder with ``config.json`` and ``model.safetensors`` or ``*.safetensors.index.json``.
        model_cfg, moe_cfg: the model to read into (default: from the folder's ``config.json``).
        expected: ``{our name: shape}`` of every tensor the model holds (state-dict names and global
            shapes, experts ``[E, ...]``); default: built from the config on the ``meta`` device.

    Attributes:
        family, config (:class:`~system.hf.config.HFModelConfig`), sources (``{our name: Source}``),
        bytes_read (bytes fetched by :meth:`read_into` so far, all threads).

    Raises:
        HFCheckpointError: not an HF folder, unsupported architecture or field (see
            :func:`~system.hf.config.read_hf_config`), no weights file, a shard the index names is
            missing, a tensor missing, of the wrong shape or of a non-float dtype (each named with the file).
    """

    def __init__(self, path: str | Path, model_cfg: ModelConfig | None = None, moe_cfg: MoEConfig | None = None,
                 expected: dict[str, tuple[int, ...]] | None = None):
        self.path = Path(path)
        self.config = read_hf_config(self.path)
        self.family = self.config.family
        self.model_cfg = model_cfg or self.config.model
        self.moe_cfg = moe_cfg or self.config.moe
        if expected is None:
            expected = _expected_shapes(self.model_cfg, self.moe_cfg)
        self.infos = self._read_headers()
        self.sources: dict[str, Source] = {}
        plain = [n for n in expected if not _is_routed_expert(n)]
        for ours, hf in hf_tensor_map(self.model_cfg, self.moe_cfg, self.family, plain).items():
            if ours.endswith(".router.expert_bias") and hf not in self.infos:
                continue  # a family without the bias, fine-tuned with moe.load_balance = "bias": starts at 0
            info = self._info(hf, ours)
            self._check(ours, hf, info, expected[ours], info.shape)
            self.sources[ours] = Source(ours, info.dtype, info.shape, (Piece(hf, info.file, info.offset, info.nbytes),))
        for ours in expected:
            if _is_routed_expert(ours):
                self.sources[ours] = self._expert_source(ours, expected[ours])
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, mmap.mmap] = {}  # read-only mappings of the shards, made by piece_view

    def _read_headers(self) -> dict[str, TensorInfo]:
        single = self.path / "model.safetensors"
        index = self.path / ("model" + INDEX_SUFFIX)
        try:
            if single.is_file():
                return read_header(single)
            if not index.is_file():
                found = sorted(self.path.glob("*.safetensors"))
                if len(found) == 1:
                    return read_header(found[0])
                raise HFCheckpointError(f"{self.path}: no model.safetensors nor model{INDEX_SUFFIX} (Hugging Face "
                                        f"safetensors weights); .bin/.pt weights are not read")
            from system.hf.config import read_json
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise HFCheckpointError(f"{index}: no weight_map object")
            infos: dict[str, TensorInfo] = {}
            headers: dict[str, dict[str, TensorInfo]] = {}
            for tensor, shard in sorted(weight_map.items()):
                if not isinstance(shard, str) or Path(shard).is_absolute() or ".." in Path(shard).parts:
                    raise HFCheckpointError(f"{index}: weight_map names {shard!r} for {tensor}, not a file in "
                                            f"{self.path}")
                if shard not in headers:
                    file = self.path / shard
                    if not file.is_file():
                        raise HFCheckpointError(f"{index} names shard {shard} (holding {tensor}), which is missing "
                                                f"from {self.path}")
                    headers[shard] = read_header(file)
                if tensor not in headers[shard]:
                    raise HFCheckpointError(f"{index} says {tensor} is in {shard}, but that shard does not hold it")
                infos[tensor] = headers[shard][tensor]
            return infos
        except (SafetensorsFileError, ModelFilesNotFoundError) as e:
            raise HFCheckpointError(str(e)) from None

    def _info(self, hf: str, ours: str) -> TensorInfo:
        info = self.infos.get(hf)
        if info is None:
            raise HFCheckpointError(f"{self.path}: tensor {hf} (our {ours}) is missing from the checkpoint")
        if info.dtype not in FLOAT_DTYPES:
            raise HFCheckpointError(f"{info.file}: tensor {hf} has dtype {info.dtype}; only float32, bfloat16 and "
                                    f"float16 weights are read")
        return info

    def _check(self, ours: str, hf: str, info: TensorInfo, expected: tuple, got: tuple) -> None:
        if tuple(got) != tuple(expected):
            raise HFCheckpointError(f"{info.file}: tensor {hf} has shape {list(info.shape)}, the model (from "
                                    f"config.json) needs {list(expected)} for it")

    def _expert_source(self, ours: str, shape: tuple[int, ...]) -> Source:
        layer, weight = int(ours.split(".")[1]), ours.rsplit(".", 1)[1]
        num = shape[0]
        names = expert_names(self.family, layer, num)
        per = names["per_expert"][weight]
        piece_shape = (shape[2], shape[1])
        if per[0] in self.infos or names["fused"][weight][0] not in self.infos:
            pieces, dtypes = [], set()
            for hf in per:
                info = self._info(hf, ours)
                self._check(ours, hf, info, piece_shape, info.shape)
                pieces.append(Piece(hf, info.file, info.offset, info.nbytes))
                dtypes.add(info.dtype)
            if len(dtypes) > 1:
                raise HFCheckpointError(f"{self.path}: the experts of {ours} have mixed dtypes {sorted(map(str, dtypes))}")
            return Source(ours, dtypes.pop(), shape, tuple(pieces), transposed=True)
        hf, half = names["fused"][weight]
        info = self._info(hf, ours)
        fused_shape = (num, 2 * shape[2], shape[1]) if half >= 0 else (num, shape[2], shape[1])
        self._check(ours, hf, info, fused_shape, info.shape)
        per_bytes = math.prod(piece_shape) * info.dtype.itemsize
        stride = info.nbytes // num
        start = info.offset + max(half, 0) * per_bytes
        pieces = tuple(Piece(hf, info.file, start + e * stride, per_bytes) for e in range(num))
        return Source(ours, info.dtype, shape, pieces, transposed=True)

    def __contains__(self, name: str) -> bool:
        return name in self.sources

    # -- reading ---------------------------------------------------------------------------------
    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file)
                if fd is None:
                    fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def _pread(self, piece: Piece, start: int, dst: torch.Tensor) -> None:
        """Read ``dst.nbytes`` bytes at ``piece.offset + start`` into contiguous ``dst``."""
        buf = memoryview(dst.view(torch.uint8).reshape(-1).numpy())
        fd, pos, done = self._fd(piece.file), piece.offset + start, 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], pos + done)
            if n <= 0:
                raise HFCheckpointError(f"{piece.file}: unexpected end of file reading {piece.hf_name}")
            done += n
        with self._lock:
            self.bytes_read += done

    def read_into(self, name: str, dst: torch.Tensor, start: int = 0) -> None:
        """Fill ``dst`` with rows ``[start, start + dst.shape[0])`` (axis 0) of our tensor ``name``.

        Reads only those rows' bytes (for experts: those experts' pieces). ``dst`` may have any
        float dtype (converted on copy), be non-contiguous or on a GPU; peak extra host memory is
        :data:`READ_THREADS` experts (or ``dst``'s size when its dtype or layout differs from the stored
        one). Experts are read and transposed by :data:`READ_THREADS` threads (``preadv`` and the copy
        release the GIL); on a GPU the transpose runs there.

        Raises:
            KeyError: ``name`` is not one of our tensors here.
            ValueError: the rows exceed the tensor, or ``dst``'s trailing shape differs.
        """
        src = self.sources[name]
        rows = dst.shape[0] if dst.dim() else 1
        if dst.dim() and (start < 0 or start + rows > src.shape[0] or tuple(dst.shape[1:]) != src.shape[1:]):
            raise ValueError(f"rows [{start}, {start + rows}) of {name} {list(src.shape)} do not fit {list(dst.shape)}")
        if len(src.pieces) > 1 or src.transposed:  # one piece per expert
            self._read_experts(src, dst, start, rows)
            return
        piece = src.pieces[0]
        row_bytes = piece.nbytes // src.shape[0] if src.shape else piece.nbytes
        direct = dst.dtype == src.dtype and dst.is_contiguous() and dst.device.type == "cpu"
        target = dst if direct else torch.empty(dst.shape, dtype=src.dtype)
        self._pread(piece, start * row_bytes, target)
        if not direct:
            dst.copy_(target)

    def _read_experts(self, src: Source, dst: torch.Tensor, start: int, rows: int) -> None:
        """Rows ``[start, start + rows)`` of a per-expert source into ``dst``, over :data:`READ_THREADS` threads."""
        workers = max(1, min(READ_THREADS, rows))

        def run(first: int) -> None:
            scratch = torch.empty(src.piece_shape, dtype=src.dtype)
            for r in range(first, rows, workers):
                self._pread(src.pieces[start + r], 0, scratch)
                piece = scratch if dst.device.type == "cpu" else scratch.to(dst.device)
                dst[r].copy_(piece.transpose(-1, -2) if src.transposed else piece)

        if workers == 1:
            run(0)
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="hf-read") as pool:
            for future in [pool.submit(run, i) for i in range(workers)]:
                future.result()

    def read(self, name: str) -> torch.Tensor:
        """Our tensor ``name`` whole, in our layout and its stored dtype (a new CPU tensor)."""
        src = self.sources[name]
        out = torch.empty(src.shape, dtype=src.dtype)
        self.read_into(name, out)
        return out

    # -- mapping (the serving engine's host tier, system.inference.mmap_file.WeightFiles) ------------
    def source(self, name: str) -> Source:
        """How our tensor ``name`` is stored (:attr:`sources`).

        Raises:
            KeyError: ``name`` is not one of our tensors here (the folder is named).
        """
        try:
            return self.sources[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} missing from {self.path}") from None

    def piece_view(self, piece: Piece) -> torch.Tensor:
        """Flat ``uint8`` view ``[piece.nbytes]`` of ``piece`` in a read-only mapping of its shard (zero copy:
        page-cache pages, no anonymous memory). Never write to it; the mapping lives as long as a view does.

        Raises:
            OSError: the shard cannot be opened or mapped.
        """
        mapping = self._maps.get(piece.file)
        if mapping is None:
            with self._lock:
                mapping = self._maps.get(piece.file)
                if mapping is None:
                    mapping = self._maps[piece.file] = map_file(piece.file)
        return byte_view(mapping, piece.offset, piece.nbytes)

    def close(self) -> None:
        """Close the shard files and drop this object's mappings (views made by :meth:`piece_view` keep theirs)."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._maps.clear()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_routed_expert(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 5 and parts[2:4] == ["moe", "experts"] and parts[4] in EXPERT_WEIGHTS


def _expected_shapes(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> dict[str, tuple[int, ...]]:
    """``{name: global shape}`` of every tensor the model ``model_cfg``/``moe_cfg`` holds (built on ``meta``)."""
    from system.inference.sections import build_skeleton, expected_tensors

    return expected_tensors(build_skeleton(model_cfg, moe_cfg))
