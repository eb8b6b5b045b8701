"""``torch.compile`` per transformer block (``training.compile``), TorchTitan style.

Each block is compiled in place with ``nn.Module.compile`` (which sets the module's compiled call and
keeps its parameter names, unlike ``torch.compile(module)``'s ``_orig_mod.`` wrapper). Blocks of the
same structure share compiled graphs (parameters are graph inputs: three blocks, two of them MoE, make
four graphs), so compile time does not grow with depth. Backend: inductor (CPU: C++ kernels, needs a
C++ compiler; CUDA: Triton).

MoE blocks are not compiled whole. Their MoE layer has data-dependent shapes (``bincount`` of the expert
choices, a variable number of token copies per expert), reads split sizes to the host (``.tolist()``,
``int(...)``: ``aten._local_scalar_dense``), runs hand-written autograd functions with Python-list
arguments (the chunked SwiGLU kernel, the all-to-all) and collectives. Compiled whole (no
``torch._dynamo.config`` changes), a model of one dense and one MoE block broke its graphs 8 times (3 at
``bincount``, 5 at host reads), made 8 graphs and took 283 s to compile and train 3 steps on two busy
CPU cores (empty inductor cache), against 68 s for the regions below; under activation checkpointing a
graph break inside the checkpointed block also makes Dynamo run the whole ``checkpoint`` eagerly
(TorchTitan's "Compile(AC(graph break))"). ``capture_scalar_outputs`` and
``capture_dynamic_output_shape_ops`` would trade those breaks for unbacked symbolic sizes in every later
op; not set. Instead, as TorchTitan did for its MoE blocks, the static parts of an MoE block are
compiled on their own, each as one graph: the attention, the router and the shared experts. The norms,
token permutation, dispatch, expert computation and combine stay eager. Blocks without MoE layers (dense
FFN) are compiled whole, checkpoint included: Dynamo traces ``torch.utils.checkpoint`` with its SAC
policy into a ``tag_activation_checkpoint`` region that the partitioner honours. An MoE block's
checkpoint stays eager and calls the compiled parts both in the forward and in the recomputation (SAC's
dispatch modes declare ``ignore_compile_internals``, so Dynamo runs compiled code under them).

``fullgraph=False``: hooks that other components register (e.g. FSSDP's shape-recording pre-hook on
the first attention) may not be traceable; they then break the graph instead of failing. On the
reference model no region breaks (the tests check Dynamo's graph-break counter).

Inductor option ``fallback_random=True``: random ops (the uncertainty router's Monte Carlo dropout)
draw from PyTorch's generator as in eager mode, so a compiled model makes the same routing decisions
as an eager one (inductor's own Philox streams would not), and activation checkpointing's RNG
restore covers them.

Order of use: after :func:`system.parallel.ac.apply_ac` (the compiled dense block then contains the
checkpoint) and before FSDP2 (TorchTitan: TP, EP, AC, compile, FSDP), whose hooks on a compiled dense
block Dynamo then traces (tested with EP=2 and FSDP2 on two Gloo ranks).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from system.moe.layer import MoELayer

logger = logging.getLogger(__name__)

COMPILE_OPTIONS = {"fallback_random": True}
"""Inductor options of every compiled region (see the module docstring)."""


def compile_unavailable_reason(device: torch.device | str) -> str | None:
    """Why inductor cannot compile for ``device`` here, or None when it can.

    CPU needs a C++ compiler (inductor's search: ``torch._inductor.config.cpp.cxx``, ``$CXX``, ``g++``);
    CUDA needs Triton.
    """
    device = torch.device(device)
    if device.type == "cpu":
        from torch._inductor import cpp_builder, exc

        try:
            cpp_builder.get_cpp_compiler()
        except exc.InvalidCxxCompiler:
            return "inductor found no C++ compiler for CPU kernels (install g++ or set $CXX)"
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "inductor needs Triton for CUDA kernels and it is not installed"
    return None


def compile_regions(block: nn.Module) -> list[nn.Module]:
    """The modules :func:`apply_compile` compiles for ``block``: the block itself when it has no MoE
    layer, else its attention and each MoE layer's router and shared experts (those present)."""
    moe_layers = [m for m in block.modules() if isinstance(m, MoELayer)]
    if not moe_layers:
        return [block]
    regions = [getattr(block, "attention", None)]
    for moe in moe_layers:
        regions += [moe.router, moe.shared_experts]
    return [r for r in regions if r is not None]


def apply_compile(model: nn.Module) -> None:
    """``torch.compile`` the blocks of ``model.layers`` in place (see the module docstring for which parts).

    Compilation is lazy: the first forward pass compiles (and each new input shape recompiles; Dynamo
    marks a dimension dynamic after it changes once).

    Args:
        model: a model with a ``layers`` container of blocks, on its training device.

    Raises:
        ValueError: a model without ``layers``.
        RuntimeError: inductor cannot compile for the model's device (the reason names
            ``training.compile``).
    """
    layers = getattr(model, "layers", None)
    if not isinstance(layers, (nn.ModuleList, nn.ModuleDict)):
        raise ValueError("training.compile needs a model with a `layers` ModuleList/ModuleDict, "
                         f"got {type(model).__name__}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    reason = compile_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"training.compile=true cannot run on {device}: {reason}")
    blocks = layers.values() if isinstance(layers, nn.ModuleDict) else layers
    count = 0
    for block in blocks:
        for region in compile_regions(block):
            region.compile(fullgraph=False, options=COMPILE_OPTIONS)
            count += 1
    logger.info("torch.compile: %d regions in %d blocks (inductor, %s)", count, len(layers), device.type)
