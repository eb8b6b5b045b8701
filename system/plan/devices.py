"""Device profiles for ``moesys plan``: memory, dense bf16 peak, NVLink and network bandwidth per GPU, with sources.

One profile per GPU as it sits in NVIDIA's own 8-GPU servers (DGX/HGX), the layout the figures describe:

- memory: the HBM capacity of the datasheet, read as GiB (an "80GB" H100 shows 79.6 GiB to CUDA);
- peak: the dense BF16 tensor-core peak, looked up in :data:`system.train.flops.PEAKS` (the one peak table,
  whose rows name their datasheets) by the name CUDA reports for the device;
- intra-node: NVLink bandwidth per GPU in one direction (half the datasheet's bidirectional figure);
- inter-node: the GPU's own network adapter (DGX H100/H200/B200: one 400 Gb/s ConnectX-7 per GPU; DGX
  A100: one 200 Gb/s ConnectX-6 HDR per GPU), in one direction.

Explicit figures (``--memory-gib --peak-tflops --intra-node-gbps --inter-node-gbps``) override any field.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from system.train.flops import peak_flops

GIB = 2**30
GBIT = 1e9 / 8  # bytes per second in one Gb/s


@dataclass(frozen=True)
class DeviceProfile:
    """One accelerator of a cluster, as the planner sees it.

    Attributes:
        name: the profile's key (``h100-80gb``).
        memory_bytes: device memory, bytes.
        peak_flops: dense BF16 peak, FLOP/s.
        tf32_flops: dense TF32 peak, FLOP/s (the peak of an fp32 job, ``training.mixed_precision = "fp32"``).
        intra_node_bps: NVLink bandwidth per GPU, one direction, bytes/s.
        inter_node_bps: network bandwidth per GPU, one direction, bytes/s.
        grouped_mm: the experts' ``torch._grouped_mm`` has a fused kernel here (bf16 on sm90/sm100; elsewhere
            :mod:`system.moe.swiglu`'s kernel runs).
        sources: where each figure comes from (datasheet and system-guide URLs).
    """

    name: str
    memory_bytes: float
    peak_flops: float
    intra_node_bps: float
    inter_node_bps: float
    tf32_flops: float = 0.0
    grouped_mm: bool = True
    sources: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line: the figures in the units datasheets use."""
        return (f"{self.name}: {self.memory_bytes / GIB:.0f} GiB, {self.peak_flops / 1e12:.0f} TFLOP/s dense bf16, "
                f"NVLink {self.intra_node_bps / 1e9:.0f} GB/s, network {self.inter_node_bps / GBIT:.0f} Gb/s per GPU "
                f"and direction")


def _profile(name: str, cuda_name: str, memory_gib: float, nvlink_bidir_gbs: float, network_gbit: float,
             grouped_mm: bool, sources: tuple[str, ...]) -> DeviceProfile:
    peak = peak_flops(cuda_name, dtype=torch.bfloat16)
    tf32 = peak_flops(cuda_name, dtype=torch.float32, allow_tf32=True)
    if peak is None or tf32 is None:  # a row missing from PEAKS is a bug in this table, not a user error
        raise KeyError(f"system.train.flops.PEAKS has no row for {cuda_name!r}")
    flops, peak_source = peak
    return DeviceProfile(name, memory_gib * GIB, flops, nvlink_bidir_gbs / 2 * 1e9, network_gbit * GBIT, tf32[0],
                         grouped_mm, (f"peak ({cuda_name!r} in system.train.flops.PEAKS): {peak_source}", *sources))


def _build() -> dict[str, DeviceProfile]:
    h100 = "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
    dgx_h100 = "https://docs.nvidia.com/dgx/dgxh100-user-guide/introduction-to-dgxh100.html"
    return {p.name: p for p in (
        _profile("h100-80gb", "NVIDIA H100 80GB HBM3", 80, 900, 400, True, (
            f"memory 80 GB HBM3, NVLink 900 GB/s bidirectional (H100 SXM): {h100}",
            f"network: 8 x 400 Gb/s ConnectX-7 (NDR InfiniBand), one per GPU (DGX H100): {dgx_h100}")),
        _profile("h200", "NVIDIA H200", 141, 900, 400, True, (
            "memory 141 GB HBM3e, NVLink 900 GB/s bidirectional (H200 SXM): "
            "https://www.nvidia.com/en-us/data-center/h200/",
            "network: 8 x 400 Gb/s ConnectX-7, one per GPU (DGX H200): "
            "https://www.nvidia.com/en-us/data-center/dgx-h200/")),
        _profile("a100-80gb", "NVIDIA A100-SXM4-80GB", 80, 600, 200, False, (
            "memory 80 GB HBM2e, NVLink 600 GB/s bidirectional (A100 SXM): https://www.nvidia.com/content/dam/"
            "en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
            "network: 8 x 200 Gb/s ConnectX-6 (HDR InfiniBand), one per GPU (DGX A100): "
            "https://docs.nvidia.com/dgx/dgxa100-user-guide/introduction-to-dgxa100.html")),
        _profile("b200", "NVIDIA B200", 180, 1800, 400, True, (
            "memory 180 GB HBM3e per GPU (1,440 GB per 8-GPU system), NVLink 1.8 TB/s bidirectional (5th "
            "generation): https://www.nvidia.com/en-us/data-center/dgx-b200/",
            "network: 8 x 400 Gb/s ConnectX-7, one per GPU (DGX B200): "
            "https://docs.nvidia.com/dgx/dgxb200-user-guide/introduction-to-dgxb200.html")),
    )}


DEVICES: dict[str, DeviceProfile] = _build()
"""The shipped profiles by name: ``h100-80gb`` (SXM), ``h200`` (SXM), ``a100-80gb`` (SXM), ``b200``."""


def resolve_device(name: str | None, *, memory_gib: float | None = None, peak_tflops: float | None = None,
                   intra_node_gbps: float | None = None, inter_node_gbps: float | None = None) -> DeviceProfile:
    """The profile ``name`` with any explicit figure overriding its field, or one built from the figures alone.

    Args:
        name: a key of :data:`DEVICES`, or ``None`` (then all four figures are needed).
        memory_gib: device memory, GiB.
        peak_tflops: dense peak of the compute dtype, TFLOP/s.
        intra_node_gbps, inter_node_gbps: per-GPU, one-direction bandwidth within a node (NVLink) and between
            nodes (the GPU's network adapter), Gb/s (gigabits: 400 for NDR InfiniBand, 3600 for 450 GB/s NVLink).

    Raises:
        ValueError: an unknown ``name``, a figure that is not positive, or (without ``name``) a missing figure;
            the message names the option.
    """
    figures = {"--memory-gib": memory_gib, "--peak-tflops": peak_tflops, "--intra-node-gbps": intra_node_gbps,
               "--inter-node-gbps": inter_node_gbps}
    for option, value in figures.items():
        if value is not None and not value > 0:
            raise ValueError(f"{option} must be positive, got {value}")
    if name is None:
        missing = [o for o, v in figures.items() if v is None]
        if missing:
            raise ValueError(f"give --device ({', '.join(DEVICES)}) or all of {', '.join(figures)}; missing "
                             f"{', '.join(missing)}")
        base = DeviceProfile("custom", 0, 0, 0, 0, sources=("figures given on the command line",))
    elif name not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    else:
        base = DEVICES[name]
    changes = {}
    if memory_gib is not None:
        changes["memory_bytes"] = memory_gib * GIB
    if peak_tflops is not None:  # the figure of the job's math: it stands for both columns
        changes["peak_flops"] = changes["tf32_flops"] = peak_tflops * 1e12
    if intra_node_gbps is not None:
        changes["intra_node_bps"] = intra_node_gbps * GBIT
    if inter_node_gbps is not None:
        changes["inter_node_bps"] = inter_node_gbps * GBIT
    if changes and name is not None:
        changes["name"] = f"{name} (overridden: {', '.join(k for k, v in figures.items() if v is not None)})"
    return replace(base, **changes)
