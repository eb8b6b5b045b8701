"""Split a MoE decoder into resident parameters and streamed sections (SE-MoE, arXiv 2205.10034, sec. 3.3.2).

Resident (kept on the device for the whole run): token embeddings, every block's attention and
norms, the routers (their gate and DeepSeek-V3's ``router.expert_bias``), the shared experts' gate
(Qwen2-MoE's ``moe.shared_expert_gate``, ``[1, d]``), the final norm and the output head. Section
``i`` (one per block, ``N = n_layers``) is the feed-forward weight of block ``i``: for a MoE block its routed experts
(``moe.experts.w1/w2/w3``, ``[E, d, f]``/``[E, f, d]``; for FME experts their modulations
``moe.experts.scale/shift/...`` and the shared block ``moe.fme_shared``) and its shared experts, for a
dense block its SwiGLU FFN (``mlp.w1/w2/w3``). A model that mixes dense and MoE blocks, or different expert counts,
has sections of unequal size; ring slots are sized to the largest one.

Within a slot a section is packed: its tensors in name order, each at an offset aligned to
:data:`ALIGN` bytes (so that every weight view has the alignment of a fresh allocation, and
kernels see the same memory layout as in the resident model). A tensor is packed as it is stored
(:class:`~system.inference.mmap_file.Source`): its pieces laid end to end, byte for byte. Routed experts
read from a Hugging Face checkpoint are stored as the transpose of our ``[E, d, f]``/``[E, f, d]``
slices (``[E, f, d]``/``[E, d, f]``); they keep that orientation in the slot and the parameter is bound
to its transposed view (:func:`typed_view`), which matmul reads as it is (column-major per expert).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from system.config.model import ModelConfig
from system.config.moe import MoEConfig
from system.inference.mmap_file import WeightFiles
from system.models.model import MoETransformer

ALIGN = 256
"""Byte alignment of every tensor inside a slot (a multiple of the CPU allocator's 64 and CUDA's 256)."""

_SECTION_RE = re.compile(r"^layers\.(\d+)\.(moe\.experts|moe\.shared_experts|moe\.fme_shared|mlp)\.")
"""Section tensors: routed and shared experts, FME's shared block, a dense block's FFN. Everything else is
resident, ``moe.router.*`` and ``moe.shared_expert_gate.weight`` included (tiny, and read outside the FFN
weights' lifetime: the router before any expert is chosen)."""


def align_up(n: int, align: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``align``."""
    return -(-n // align) * align


def section_index(name: str) -> int | None:
    """The section (block index) a parameter name belongs to, or ``None`` for a resident one."""
    m = _SECTION_RE.match(name)
    return int(m.group(1)) if m else None


def build_skeleton(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> MoETransformer:
    """A :class:`MoETransformer` on the ``meta`` device: names and shapes, no memory."""
    with torch.device("meta"):
        return MoETransformer(model_cfg, moe_cfg)


def expected_tensors(skeleton: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every tensor the checkpoint must hold (parameters and persistent buffers)."""
    return {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}


@dataclass(frozen=True)
class SectionTensor:
    """One weight of a section: its parameter ``name``, ``dtype``, (our) ``shape``, ``nbytes`` and ``offset``
    (bytes) inside the slot; ``transposed``: stored with its last two axes swapped (see :func:`typed_view`)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int
    transposed: bool = False


def typed_view(raw: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], transposed: bool = False) -> torch.Tensor:
    """The tensor of our ``shape`` held by the flat ``uint8`` bytes ``raw`` (no copy).

    Args:
        raw: ``[nbytes]`` uint8, its start aligned to ``dtype``'s size.
        dtype, shape: the tensor's (``shape`` ours, e.g. ``w1`` ``[E, d, f]``).
        transposed: ``raw`` holds ``shape`` with its last two axes swapped (``[E, f, d]``, Hugging Face's
            orientation); the result is then that tensor's ``transpose(-1, -2)``: ``shape``, strides
            ``(f d, 1, d)`` for ``w1`` (column-major per expert).

    Raises:
        RuntimeError: ``raw`` has not ``prod(shape) * dtype.itemsize`` bytes (from ``view``).
    """
    if not transposed:
        return raw.view(dtype).view(shape)
    stored = tuple(shape[:-2]) + (shape[-1], shape[-2])
    return raw.view(dtype).view(stored).transpose(-1, -2)


def piece_views(ckpt: WeightFiles, name: str) -> list[tuple[torch.Tensor, int]]:
    """The stored bytes of tensor ``name``: ``[(zero-copy uint8 view of one piece, its byte offset in the
    packed tensor)]``, in order (laid end to end they are :func:`typed_view`'s ``raw``).

    Raises:
        KeyError: ``name`` is not in the checkpoint.
    """
    out, offset = [], 0
    for piece in ckpt.source(name).pieces:
        out.append((ckpt.piece_view(piece), offset))
        offset += piece.nbytes
    return out


def expert_views(ckpt: WeightFiles, name: str) -> list[torch.Tensor]:
    """Zero-copy uint8 views of each expert's bytes of the expert tensor ``name`` ``[E, ...]`` (``E`` of them).

    Raises:
        KeyError: ``name`` is not in the checkpoint.
        ValueError: its pieces are neither one nor one per expert.
    """
    src = ckpt.source(name)
    num = src.shape[0]
    if len(src.pieces) == num:
        return [ckpt.piece_view(p) for p in src.pieces]
    if len(src.pieces) != 1:
        raise ValueError(f"{name} {list(src.shape)} is stored in {len(src.pieces)} pieces: neither one nor one "
                         f"per expert ({num})")
    raw = ckpt.piece_view(src.pieces[0])
    n = raw.numel() // num
    return [raw[e * n : (e + 1) * n] for e in range(num)]


def load_tensor(ckpt: WeightFiles, name: str, device: torch.device | str) -> torch.Tensor:
    """Tensor ``name`` in our shape, read once into a new buffer on ``device`` (its stored dtype; a
    transposed source keeps its stored orientation, returned as the transposed view, see :func:`typed_view`).

    Raises:
        KeyError: ``name`` is not in the checkpoint.
    """
    src = ckpt.source(name)
    buf = torch.empty(src.nbytes, dtype=torch.uint8, device=device)
    for view, offset in piece_views(ckpt, name):
        buf[offset : offset + view.numel()].copy_(view)
    return typed_view(buf, src.dtype, src.shape, src.transposed)


@dataclass(frozen=True)
class Section:
    """Section ``index`` (= block index): the FFN weights of one block, packed.

    Attributes:
        index: block index ``i`` (sections are visited in this order, wrapping mod N).
        kind: ``"moe"`` or ``"dense"``.
        tensors: the packed weights.
        nbytes: bytes of the packed section (the end of its last tensor, unaligned).
    """

    index: int
    kind: str
    tensors: tuple[SectionTensor, ...]
    nbytes: int


@dataclass(frozen=True)
class ModelLayout:
    """Resident tensor names with their byte sizes, and the N sections."""

    resident: dict[str, int]
    sections: tuple[Section, ...]

    @property
    def resident_bytes(self) -> int:
        """Bytes of the resident parameters."""
        return sum(self.resident.values())

    @property
    def max_section_bytes(self) -> int:
        """Bytes of the largest section (the slot size)."""
        return max((s.nbytes for s in self.sections), default=0)

    @property
    def total_section_bytes(self) -> int:
        """Bytes of all sections: what one forward pass streams when no section stays in a slot."""
        return sum(s.nbytes for s in self.sections)


def split_model(skeleton: MoETransformer, ckpt: WeightFiles) -> ModelLayout:
    """Split the tensors of ``skeleton`` into resident ones and one section per block.

    Byte sizes, dtypes and orientations come from the checkpoint (so a bf16 file gives bf16 sections);
    run :func:`system.inference.plan.check_checkpoint` first so every name is present with its shape.
    """
    resident: dict[str, int] = {}
    members: dict[int, list[str]] = {i: [] for i in range(len(skeleton.layers))}
    for name in skeleton.state_dict():
        idx = section_index(name)
        if idx is None:
            resident[name] = ckpt.source(name).nbytes
        else:
            members[idx].append(name)
    sections = []
    for idx, names in members.items():
        offset, tensors = 0, []
        for name in sorted(names):
            src = ckpt.source(name)
            tensors.append(SectionTensor(name, src.dtype, src.shape, src.nbytes, offset, src.transposed))
            offset = align_up(offset + src.nbytes)
        nbytes = tensors[-1].offset + tensors[-1].nbytes if tensors else 0
        kind = "moe" if skeleton.layers[idx].moe is not None else "dense"
        sections.append(Section(idx, kind, tuple(tensors), nbytes))
    return ModelLayout(resident, tuple(sections))


def section_views(buffer: torch.Tensor, section: Section) -> dict[str, torch.Tensor]:
    """Typed views ``{name: tensor}`` (our shapes) of ``section``'s weights inside a flat ``uint8`` slot ``buffer``."""
    out = {}
    for t in section.tensors:
        out[t.name] = typed_view(buffer[t.offset : t.offset + t.nbytes], t.dtype, t.shape, t.transposed)
    return out


def section_copies(section: Section, ckpt: WeightFiles) -> list[tuple[torch.Tensor, int, int]]:
    """What loading ``section`` into a slot copies: ``[(zero-copy uint8 view of a stored piece, byte offset
    in the slot, nbytes)]`` (one per tensor from our checkpoint, one per expert and weight from a
    Hugging Face one), pieces byte for byte."""
    return [(view, t.offset + offset, view.numel()) for t in section.tensors
            for view, offset in piece_views(ckpt, t.name)]


def pack_section(section: Section, ckpt: WeightFiles, dst: torch.Tensor) -> None:
    """Copy ``section``'s weights from the checkpoint into the flat ``uint8`` buffer ``dst`` (packed layout)."""
    for view, offset, nbytes in section_copies(section, ckpt):
        dst[offset : offset + nbytes].copy_(view)


def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """The parameter ``name`` (dotted path) of ``model``."""
    module_name, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module_name), leaf)
