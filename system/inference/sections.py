"""Split a MoE decoder into resident parameters and streamed sections (SE-MoE, arXiv 2205.10034, sec. 3.3.2).

Resident (kept on the device for the whole run): token embeddings, every block's attention and
norms, the routers, the final norm and the output head. Section ``i`` (one per block, ``N =
n_layers``) is the feed-forward weight of block ``i``: for a MoE block its routed experts
(``moe.experts.w1/w2/w3``, ``[E, d, f]``/``[E, f, d]``; for FME experts their modulations
``moe.experts.scale/shift/...`` and the shared block ``moe.fme_shared``) and its shared experts, for a
dense block its SwiGLU FFN (``mlp.w1/w2/w3``). A model that mixes dense and MoE blocks, or different expert counts,
has sections of unequal size; ring slots are sized to the largest one.

Within a slot a section is packed: its tensors in name order, each at an offset aligned to
:data:`ALIGN` bytes (so that every weight view has the alignment of a fresh allocation, and
kernels see the same memory layout as in the resident model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from system.config.model import ModelConfig
from system.config.moe import MoEConfig
from system.inference.mmap_file import MmapCheckpoint
from system.models.model import MoETransformer

ALIGN = 256
"""Byte alignment of every tensor inside a slot (a multiple of the CPU allocator's 64 and CUDA's 256)."""

_SECTION_RE = re.compile(r"^layers\.(\d+)\.(moe\.experts|moe\.shared_experts|moe\.fme_shared|mlp)\.")


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
    """One weight of a section: its parameter ``name``, ``dtype``, ``shape``, ``nbytes`` and ``offset``
    (bytes) inside the slot."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int


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


def split_model(skeleton: MoETransformer, ckpt: MmapCheckpoint) -> ModelLayout:
    """Split the tensors of ``skeleton`` into resident ones and one section per block.

    Byte sizes and dtypes come from the checkpoint (so a bf16 file gives bf16 sections); run
    :func:`system.inference.plan.check_checkpoint` first so every name is present with its shape.
    """
    resident: dict[str, int] = {}
    members: dict[int, list[str]] = {i: [] for i in range(len(skeleton.layers))}
    for name in skeleton.state_dict():
        idx = section_index(name)
        if idx is None:
            resident[name] = ckpt.info(name).nbytes
        else:
            members[idx].append(name)
    sections = []
    for idx, names in members.items():
        offset, tensors = 0, []
        for name in sorted(names):
            info = ckpt.info(name)
            tensors.append(SectionTensor(name, info.dtype, info.shape, info.nbytes, offset))
            offset = align_up(offset + info.nbytes)
        nbytes = tensors[-1].offset + tensors[-1].nbytes if tensors else 0
        kind = "moe" if skeleton.layers[idx].moe is not None else "dense"
        sections.append(Section(idx, kind, tuple(tensors), nbytes))
    return ModelLayout(resident, tuple(sections))


def section_views(buffer: torch.Tensor, section: Section) -> dict[str, torch.Tensor]:
    """Typed views ``{name: tensor}`` of ``section``'s weights inside a flat ``uint8`` slot ``buffer``."""
    out = {}
    for t in section.tensors:
        out[t.name] = buffer[t.offset : t.offset + t.nbytes].view(t.dtype).view(t.shape)
    return out


def pack_section(section: Section, ckpt: MmapCheckpoint, dst: torch.Tensor) -> None:
    """Copy ``section``'s weights from the checkpoint into the flat ``uint8`` buffer ``dst`` (packed layout)."""
    for t in section.tensors:
        dst[t.offset : t.offset + t.nbytes].copy_(ckpt.raw(t.name))


def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """The parameter ``name`` (dotted path) of ``model``."""
    module_name, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module_name), leaf)
