"""MoE layer forward+backward throughput: ``system.moe.MoELayer`` against DeepSpeed-MoE (and Megatron-Core).

Every peer gets the same problem: E SwiGLU experts ``d -> F -> d`` (w1, w3 ``[d, F]``, w2 ``[F, d]``),
top-2 softmax gating with the two weights renormalised to sum to 1, no token dropping, the same
tokens per rank, expert parallelism over all ranks (EP = number of processes), the same dtype.
One step is forward + backward of ``sum(out * g) + aux_coef * aux_loss`` with a fixed upstream
gradient ``g`` and an input that requires grad (as inside a network); gradients are dropped
(``set_to_none``) between steps. No optimizer.

Peers:

- ``ours``: :class:`system.moe.layer.MoELayer`, expert parallel through
  :func:`system.parallel.expert_parallel.apply_ep` (uneven all-to-all, dropless, grouped matmul).
- ``deepspeed``: ``deepspeed.moe.layer.MoE`` with ``drop_tokens=False`` and ``use_rts=False`` and
  no Gumbel sampling of the second expert (``top2_2nd_expert_sampling=False`` where the installed
  DeepSpeed has it), so both systems route every token to its two highest-scoring experts. It
  starts from *our* weights (router and experts copied), so both systems make the same routing
  decisions; the run checks that outputs and input gradients agree before timing. DeepSpeed's
  dropless gating sets the capacity to the largest expert load over the EP group and pads every
  expert's buffer to it (GShard-style dense ``[E, C, d]`` all-to-all); that is its algorithm and
  it is kept: the extra rows are reported as ``padding_factor = E * C / (T * k)``.
- ``megatron`` (CUDA only, optional): ``megatron.core.transformer.moe.moe_layer.MoELayer`` with
  grouped GEMM and the ``alltoall`` token dispatcher, its own initialisation (so routing is
  similar in distribution, not identical).

Method: all peers are built in the same N-process run (one process per CPU core with one intra-op
thread on CPU; one GPU per process on CUDA), warmed up, then timed in interleaved repeats
(ours, deepspeed, ours, deepspeed, ...). A repeat times ``--iters`` steps between two barriers;
its time is the slowest rank's. tokens/s = global tokens * iters / time. Reported: medians over
repeats, the ratio of our tokens/s to DeepSpeed's, peak resident memory per rank while each peer
ran (``VmHWM`` reset before each repeat; it includes the process baseline: Python, libraries and
both peers' weights), peak GPU memory on CUDA, achieved FLOP/s and (CUDA) MFU.

Usage (from the repository root)::

    python benchmarks/moe_layer.py                      # default CPU run: 2 processes, Gloo, fp32
    python benchmarks/moe_layer.py --device cuda        # 1 GPU, NCCL, bf16, Mixtral-like shape
    python benchmarks/moe_layer.py --device cuda --nproc 8 --peers ours,deepspeed,megatron
    torchrun --standalone --nproc-per-node 2 benchmarks/moe_layer.py   # same, launched by torchrun

Writes ``<out>/moe_layer_<device>.json`` (config, all samples, summaries, versions, host) and
``<out>/moe_layer_<device>.md`` (the table). ``--profile`` adds ``moe_layer_<device>_profile_<peer>.txt``
(torch.profiler operator table of a few steps on rank 0).

The CUDA path (NCCL, bf16, CUDA synchronisation around timing, MFU, the Megatron peer) is
UNTESTED ON GPU: it was written without access to one and may need small fixes on first use.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import inspect
import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    Stopwatch,
    current_rss_bytes,
    fill_defaults,
    format_bytes,
    free_port,
    host_info,
    markdown_table,
    package_versions,
    peak_rss_bytes,
    reset_peak_rss,
    setup_logging,
    summarize,
    write_json,
    write_text,
)

logger = logging.getLogger("benchmarks.moe_layer")

PEERS = ("ours", "deepspeed", "megatron")

# Dense bf16 tensor-core peak (FLOP/s, no sparsity) by device-name substring, most specific first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
)

# glibc tunables for ``--malloc tuned``: keep large blocks on the heap and never trim it, so a tensor
# freed in one step is reused in the next instead of being unmapped and page-faulted in again.
MALLOC_TUNED_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}

CPU_DEFAULTS = dict(nproc=2, dtype="fp32", dim=512, ffn=1024, experts=8, tokens=4096, iters=5, warmup=2)
CUDA_DEFAULTS = dict(nproc=1, dtype="bf16", dim=4096, ffn=14336, experts=8, tokens=16384, iters=10, warmup=5)


# --------------------------------------------------------------------------------------------
# arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; device-dependent defaults are filled in afterwards."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dim", type=int, help="model width d (cpu 512, cuda 4096)")
    p.add_argument("--ffn", type=int, help="expert hidden size F (cpu 1024, cuda 14336)")
    p.add_argument("--experts", type=int, help="experts E (8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (DeepSpeed supports 1 or 2)")
    p.add_argument("--tokens", type=int, help="tokens per rank (cpu 4096, cuda 16384)")
    p.add_argument("--seq-len", type=int, default=1024, help="input is [tokens/seq_len, seq_len, d]")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per peer (interleaved)")
    p.add_argument("--iters", type=int, help="fwd+bwd steps per repeat (cpu 5, cuda 10)")
    p.add_argument("--warmup", type=int, help="untimed steps per peer before timing (cpu 2, cuda 5)")
    p.add_argument("--nproc", type=int, help="processes = EP degree (cpu 2, cuda 1)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process on CPU")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="cpu fp32, cuda bf16")
    p.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss coefficient")
    p.add_argument("--peers", default="ours,deepspeed", help=f"comma list from {','.join(PEERS)}")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown results")
    p.add_argument("--tag", default="", help="suffix for the result file names (moe_layer_<device><tag>.*)")
    p.add_argument("--profile", action="store_true", help="also write a torch.profiler table per peer (rank 0)")
    p.add_argument("--no-pin", action="store_true", help="do not pin CPU ranks to one core each")
    p.add_argument(
        "--malloc",
        choices=("default", "tuned"),
        default="default",
        help="glibc malloc of the spawned CPU ranks: 'tuned' sets MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ "
        "high so large freed tensors are reused instead of unmapped and page-faulted again (same for all peers)",
    )
    p.add_argument("--peak-tflops", type=float, help="override the bf16 peak used for MFU (TFLOP/s per device)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    fill_defaults(args, CUDA_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS)
    args.peer_list = [s.strip() for s in args.peers.split(",") if s.strip()]
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Raise ``SystemExit`` with a clear message for impossible settings or missing peers."""
    errors = []
    unknown = [s for s in args.peer_list if s not in PEERS]
    if unknown:
        errors.append(f"unknown peer(s) {unknown}; choose from {list(PEERS)}")
    if len(set(args.peer_list)) != len(args.peer_list):
        errors.append(f"duplicate peers in --peers {args.peers!r}")
    if args.experts % args.nproc:
        errors.append(f"--experts {args.experts} must divide by --nproc {args.nproc} (the EP degree)")
    if "deepspeed" in args.peer_list and args.top_k not in (1, 2):
        errors.append("DeepSpeed-MoE supports top-1 and top-2 gating only (--top-k 1|2)")
    if args.device == "cuda" and not torch.cuda.is_available():
        errors.append("--device cuda but torch.cuda.is_available() is False")
    if args.device == "cuda" and torch.cuda.is_available() and args.nproc > torch.cuda.device_count():
        errors.append(f"--nproc {args.nproc} > {torch.cuda.device_count()} visible GPUs")
    if "deepspeed" in args.peer_list and not _importable("deepspeed"):
        errors.append("peer 'deepspeed' needs DeepSpeed: pip install 'moe-system[peers]' (or drop it from --peers)")
    if "megatron" in args.peer_list:
        if args.device != "cuda":
            errors.append("peer 'megatron' runs on CUDA only (Megatron-Core has no CPU path); use --device cuda")
        elif not _importable("megatron.core"):
            errors.append(
                "peer 'megatron' needs Megatron-Core, which is not installed: "
                "pip install 'moe-system[cuda]' (megatron-core; Transformer Engine recommended for grouped GEMM)"
            )
    if args.repeats < 1 or args.iters < 1 or args.warmup < 0 or args.tokens < 1:
        errors.append("--repeats and --iters must be >= 1, --warmup >= 0, --tokens >= 1")
    if errors:
        raise SystemExit("moe_layer benchmark: " + "; ".join(errors))


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# peers


class SwiGLU(nn.Module):
    """One dense SwiGLU expert ``w2(silu(w1 x) * w3 x)``, bias-free (the DeepSpeed expert)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@dataclass
class Peer:
    """One system under test.

    Attributes:
        name: peer name (``ours``, ``deepspeed``, ``megatron``).
        module: the layer.
        forward: ``x -> (out, aux)`` where ``aux`` is the load-balancing loss to add (or ``None``
            when the peer adds it inside autograd itself, as Megatron does).
        info: peer facts recorded in the results (implementation details, routing statistics).
    """

    name: str
    module: nn.Module
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Setup:
    """Per-rank run context."""

    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype


def build_ours(s: Setup, global_weights: dict[str, torch.Tensor]) -> Peer:
    """Our :class:`MoELayer` with EP over all ranks; fills ``global_weights`` for the other peers."""
    from system.config.moe import MoEConfig
    from system.distributed import ParallelDims
    from system.moe.layer import MoELayer
    from system.moe.experts import expert_kernel
    from system.parallel.expert_parallel import apply_ep

    a = s.args
    cfg = MoEConfig(
        num_experts=a.experts, top_k=a.top_k, expert_dim=a.ffn, aux_loss_coef=a.aux_coef, capacity_factor=0.0
    )
    cfg.validate()
    torch.manual_seed(a.seed)  # identical global weights on every rank before apply_ep slices them
    layer = MoELayer(a.dim, cfg)
    layer.init_weights(std=0.02, out_std=0.02 / math.sqrt(2))
    global_weights.update(
        router=layer.router.gate.weight.detach().clone(),
        w1=layer.experts.w1.detach().clone(),
        w2=layer.experts.w2.detach().clone(),
        w3=layer.experts.w3.detach().clone(),
    )
    mesh = ParallelDims.from_config(dp=1, ep=s.world, world_size=s.world).build_mesh(s.device.type)
    apply_ep(layer, mesh)
    layer.to(device=s.device, dtype=s.dtype)
    ep_rank = mesh["ep"].get_local_rank()

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = layer(x)
        return out, layer.last_stats.aux_loss

    info = {
        "impl": "system.moe.layer.MoELayer + system.parallel.expert_parallel.apply_ep",
        "dispatcher": type(layer.dispatcher).__name__,
        "expert_kernel": expert_kernel(torch.device(s.device), s.dtype, layer.experts.grouped_mm),
        "local_experts": layer.experts.num_local_experts,
        "expert_offset": layer.experts.expert_offset,
        "ep_rank": ep_rank,
    }
    return Peer("ours", layer, forward, info)


def build_deepspeed(s: Setup, global_weights: dict[str, torch.Tensor]) -> Peer:
    """``deepspeed.moe.layer.MoE`` with EP over all ranks, dropless, initialised from our weights."""
    import deepspeed
    from deepspeed.moe.layer import MoE

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    a = s.args
    deepspeed.init_distributed(dist_backend="nccl" if s.device.type == "cuda" else "gloo")
    kwargs: dict[str, Any] = dict(
        hidden_size=a.dim,
        expert=SwiGLU(a.dim, a.ffn),
        num_experts=a.experts,
        ep_size=s.world,
        k=a.top_k,
        capacity_factor=1.0,  # unused when drop_tokens=False (capacity = max expert load)
        eval_capacity_factor=1.0,
        min_capacity=0,
        drop_tokens=False,
        use_rts=False,
    )
    supported = inspect.signature(MoE.__init__).parameters
    if "top2_2nd_expert_sampling" in supported:
        kwargs["top2_2nd_expert_sampling"] = False  # deterministic top-2, as ours
    with contextlib.ExitStack() as stack:  # DeepSpeed prints group creation to stdout: rank 0 -> stderr, others muted
        sink = sys.stderr if s.rank == 0 else stack.enter_context(open(os.devnull, "w"))
        stack.enter_context(contextlib.redirect_stdout(sink))
        moe = MoE(**kwargs)
        # deepspeed.initialize() normally does this; we use the layer without an engine.
        moe.set_deepspeed_parallelism()
    ds = moe.deepspeed_moe
    ep_rank = dist.get_rank(group=ds.ep_group)
    num_local = ds.num_local_experts
    with torch.no_grad():
        ds.gate.wg.weight.copy_(global_weights["router"])
        for i, expert in enumerate(ds.experts.deepspeed_experts):
            e = ep_rank * num_local + i  # DeepSpeed's all-to-all sends experts [j*nl, (j+1)*nl) to EP rank j
            expert.w1.weight.copy_(global_weights["w1"][e].t())
            expert.w3.weight.copy_(global_weights["w3"][e].t())
            expert.w2.weight.copy_(global_weights["w2"][e].t())
    moe.to(device=s.device, dtype=s.dtype)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, l_aux, _ = moe(x)
        return out, l_aux

    info = {
        "impl": "deepspeed.moe.layer.MoE (drop_tokens=False, use_rts=False)",
        "kwargs": {k: v for k, v in kwargs.items() if k != "expert"},
        "local_experts": num_local,
        "ep_rank": ep_rank,
        "aux_loss": "DeepSpeed top2gating l_aux = E^2 * mean(me * ce), ce from first choices only (its definition)",
    }
    return Peer("deepspeed", moe, forward, info)


def build_megatron(s: Setup, global_weights: dict[str, torch.Tensor]) -> Peer:  # noqa: ARG001 - own init
    """Megatron-Core ``MoELayer`` (grouped GEMM, alltoall dispatcher, EP over all ranks).

    UNTESTED ON GPU (written without access to one). Follows Megatron-LM's own unit tests
    (``tests/unit_tests/transformer/moe/test_moe_layer.py``): initialise model parallel state with
    ``expert_model_parallel_size``, seed the CUDA RNG tracker, build ``MoELayer`` from the MLP
    submodules of the GPT layer spec (Transformer Engine spec when TE is installed, else local).
    Megatron adds the load-balancing loss inside autograd, so ``forward`` returns ``aux=None``.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe.moe_layer import MoELayer as MegatronMoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    a = s.args
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=s.world
        )
    model_parallel_cuda_manual_seed(a.seed)
    heads = max(1, a.dim // 128)
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=a.dim,
        num_attention_heads=heads,
        ffn_hidden_size=a.ffn,
        moe_ffn_hidden_size=a.ffn,
        num_moe_experts=a.experts,
        moe_router_topk=a.top_k,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=a.aux_coef,
        moe_grouped_gemm=True,
        moe_token_dispatcher_type="alltoall",
        expert_model_parallel_size=s.world,
        gated_linear_unit=True,  # SwiGLU
        activation_func=F.silu,
        add_bias_linear=False,
        bf16=s.dtype == torch.bfloat16,
        params_dtype=s.dtype,
    )
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=a.experts, moe_grouped_gemm=True)
        spec_name = "transformer_engine"
    except ImportError:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        spec = get_gpt_layer_local_spec(num_experts=a.experts, moe_grouped_gemm=True)
        spec_name = "local"
    layer = MegatronMoELayer(cfg, spec.submodules.mlp.submodules).to(device=s.device, dtype=s.dtype)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Megatron's layout is [S, B, d] and it flattens with .view(); an MoE layer is token-wise, so
        # reinterpreting the contiguous [B, S, d] input as [S, B, d] (no copy) gives it the same tokens.
        batch, seq, dim = x.shape
        out, _bias = layer(x.view(seq, batch, dim))
        return out.view(batch, seq, dim), None

    info = {
        "impl": f"megatron.core MoELayer (grouped GEMM, alltoall dispatcher, {spec_name} spec)",
        "init": "Megatron's own (routing similar in distribution, not identical to ours)",
    }
    return Peer("megatron", layer, forward, info)


BUILDERS = {"ours": build_ours, "deepspeed": build_deepspeed, "megatron": build_megatron}


# --------------------------------------------------------------------------------------------
# measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _zero_grads(peer: Peer, x: torch.Tensor) -> None:
    peer.module.zero_grad(set_to_none=True)
    x.grad = None


def train_step(peer: Peer, x: torch.Tensor, g: torch.Tensor, aux_coef: float) -> torch.Tensor:
    """One forward+backward of ``sum(out * g) + aux_coef * aux``; returns the (detached) loss."""
    _zero_grads(peer, x)
    out, aux = peer.forward(x)
    loss = (out * g).sum()
    if aux is not None:
        loss = loss + aux_coef * aux
    loss.backward()
    return loss.detach()


def check_agreement(s: Setup, peers: dict[str, Peer], x: torch.Tensor, g: torch.Tensor) -> dict[str, Any]:
    """Compare ``deepspeed`` against ``ours`` on the same input: outputs, input gradients, routing.

    The loss here is ``sum(out * g)`` only (the two aux-loss definitions differ by design). Both
    start from the same weights, so outputs and gradients should agree to rounding.
    """
    if "ours" not in peers or "deepspeed" not in peers:
        return {}
    results: dict[str, torch.Tensor] = {}
    for name in ("ours", "deepspeed"):
        peer = peers[name]
        _zero_grads(peer, x)
        out, _ = peer.forward(x)
        (out * g).sum().backward()
        results[name + "_out"] = out.detach().float()
        results[name + "_dx"] = x.grad.detach().float().clone()
        _zero_grads(peer, x)
    ours_mod, ds = peers["ours"].module, peers["deepspeed"].module
    ours_counts = ours_mod.last_stats.tokens_per_expert.float()
    ds_counts = ds.deepspeed_moe.exp_counts.detach().float().clone()
    dist.all_reduce(ds_counts)  # DeepSpeed's counts are per rank; ours are global
    ep_group = ds.deepspeed_moe.ep_group
    capacity = ds.deepspeed_moe.exp_counts.detach().max().clone()
    dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=ep_group)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    local = torch.tensor(
        [rel(results["ours_out"], results["deepspeed_out"]), rel(results["ours_dx"], results["deepspeed_dx"])],
        device=s.device,
    )
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    tokens, k, num_experts = s.args.tokens, s.args.top_k, s.args.experts
    c = int(capacity)
    report = {
        "max_rel_diff_out": float(local[0]),
        "max_rel_diff_input_grad": float(local[1]),
        "routing_identical": bool(torch.equal(ours_counts.cpu(), ds_counts.cpu())),
        "tokens_per_expert_global": [int(v) for v in ours_counts.tolist()],
        "load_max_over_mean": float(ours_counts.max() / ours_counts.mean()),
        "deepspeed_capacity": c,
        # Rows each rank's experts compute: DeepSpeed E*C (padded, the same on every rank) vs T*k on average (ours).
        "deepspeed_padding_factor": num_experts * c / (tokens * k),
        # Ours is dropless without padding, so the busiest EP rank (its experts' summed load) sets the pace.
        "ours_busiest_rank_rows_factor": float(ours_counts.view(s.world, -1).sum(dim=1).max()) / (tokens * k),
    }
    tol = 1e-3 if s.dtype == torch.float32 else 5e-2
    if max(report["max_rel_diff_out"], report["max_rel_diff_input_grad"]) > tol:
        logger.warning("ours and deepspeed disagree beyond %.0e: %s", tol, report)
    else:
        logger.info(
            "agreement ours vs deepspeed: out %.1e, dx %.1e (relative max); routing identical: %s",
            report["max_rel_diff_out"], report["max_rel_diff_input_grad"], report["routing_identical"],
        )
    return report


def moe_flops(tokens: int, dim: int, ffn: int, experts: int, top_k: int) -> float:
    """Useful FLOPs of one forward+backward for ``tokens`` tokens (backward = 2x forward).

    Forward: ``2 * tokens * top_k * 3 * dim * ffn`` (three SwiGLU matmuls per routed copy) plus the
    router ``2 * tokens * dim * experts``. Padding rows (DeepSpeed) are not useful work and not counted.
    """
    forward = 2.0 * tokens * top_k * 3 * dim * ffn + 2.0 * tokens * dim * experts
    return 3.0 * forward


def peak_flops_per_device(device: torch.device, dtype: torch.dtype, override_tflops: float | None) -> tuple[float | None, str]:
    """Dense peak FLOP/s of one device for MFU, and the device name (``None`` where unknown)."""
    if device.type != "cuda":
        return None, host_info().get("cpu_model", "cpu")
    name = torch.cuda.get_device_name(device)
    if override_tflops:
        return override_tflops * 1e12, name
    if dtype != torch.bfloat16:
        return None, name  # MFU is quoted against the bf16 tensor-core peak only
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return peak, name
    logger.warning("unknown GPU %r: no bf16 peak known, MFU not reported (use --peak-tflops)", name)
    return None, name


def profile_peer(s: Setup, peer: Peer, x: torch.Tensor, g: torch.Tensor, out_dir: Path) -> list[dict[str, Any]]:
    """Profile a few steps with torch.profiler; rank 0 writes the operator table (by self time).

    Returns (rank 0; other ranks an empty list) the top operators by self time as
    ``{"op", "self_ms_per_step", "calls_per_step", "share"}`` (CPU time on CPU, device time on CUDA).
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = s.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    steps = 3
    dist.barrier()
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            train_step(peer, x, g, s.args.aux_coef)
        _sync(s.device)
    _zero_grads(peer, x)
    dist.barrier()
    if s.rank != 0:
        return []
    averages = prof.key_averages()
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = averages.table(sort_by=sort_by, row_limit=30, max_name_column_width=60)
    path = out_dir / f"moe_layer_{s.args.device}{s.args.tag}_profile_{peer.name}.txt"
    header = f"# {peer.name}: torch.profiler over {steps} fwd+bwd steps on rank 0 (times are totals over the steps)\n"
    write_text(path, header + table)
    logger.info("wrote %s", path)

    def self_us(evt: Any) -> float:
        if cuda:
            return float(getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0.0)))
        return float(evt.self_cpu_time_total)

    total = sum(self_us(e) for e in averages) or 1.0
    top = sorted(averages, key=self_us, reverse=True)[:12]
    return [
        {"op": e.key, "self_ms_per_step": self_us(e) / 1e3 / steps, "calls_per_step": e.count / steps,
         "share": self_us(e) / total}
        for e in top
    ]


def run_rank(args: argparse.Namespace) -> None:
    """The body of one rank: init, build peers, check, warm up, time, gather, write (rank 0)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    level = logging.getLevelName(args.log_level.upper()) if rank == 0 else logging.WARNING
    setup_logging(rank if world > 1 else None, level)
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=10), device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(args.threads)
        pinned = _pin_cpu(local_rank, args) if not args.no_pin else None
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
        if pinned is not None:
            logger.info("rank %d pinned to CPU %d", rank, pinned)
        args.pinned_cpu = pinned
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    s = Setup(args, rank, world, device, dtype)
    from system.distributed.init import shutdown_distributed

    _run(s)
    shutdown_distributed()  # success only: after an exception torchrun stops the peers


def _pin_cpu(local_rank: int, args: argparse.Namespace) -> int | None:
    """Pin this rank to one core when there are at least ``nproc * threads`` cores available."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < args.nproc * args.threads:
        return None
    mine = cpus[local_rank * args.threads : (local_rank + 1) * args.threads]
    os.sched_setaffinity(0, mine)
    return mine[0]


def _run(s: Setup) -> None:
    a = s.args
    out_dir = Path(a.out)
    global_weights: dict[str, torch.Tensor] = {}
    peers: dict[str, Peer] = {}
    # "ours" is built first even when not timed: it defines the weights the others copy.
    for name in ["ours"] + [p for p in a.peer_list if p != "ours"]:
        peers[name] = BUILDERS[name](s, global_weights)
        logger.info("built %s: %s", name, peers[name].info.get("impl"))

    seq = a.seq_len if a.tokens % a.seq_len == 0 else a.tokens
    gen = torch.Generator().manual_seed(a.seed + 1 + s.rank)  # different tokens on every rank
    x = torch.randn(a.tokens // seq, seq, a.dim, generator=gen).to(device=s.device, dtype=s.dtype).requires_grad_(True)
    g = (torch.randn(a.tokens // seq, seq, a.dim, generator=gen) / math.sqrt(a.tokens * a.dim)).to(s.device, s.dtype)

    load_at_start = list(os.getloadavg())
    agreement = check_agreement(s, peers, x, g)
    if "ours" not in a.peer_list:
        del peers["ours"]
    timed = [peers[name] for name in a.peer_list]

    for peer in timed:  # warm-up (allocator, kernel selection, lazy init)
        for _ in range(a.warmup):
            train_step(peer, x, g, a.aux_coef)
        _zero_grads(peer, x)
        _sync(s.device)
    logger.info("warm-up done (%d steps per peer); timing %d repeats x %d steps", a.warmup, a.repeats, a.iters)

    sync = (lambda: torch.cuda.synchronize(s.device)) if s.device.type == "cuda" else None
    samples: dict[str, list[float]] = {p.name: [] for p in timed}
    rss_peak: dict[str, int] = {p.name: 0 for p in timed}
    rss_before: dict[str, int] = {p.name: 0 for p in timed}
    gpu_peak: dict[str, int] = {p.name: 0 for p in timed}
    rss_reset_ok = True
    for r in range(a.repeats):
        for peer in timed:
            gc.collect()
            rss_reset_ok &= reset_peak_rss()
            rss_before[peer.name] = max(rss_before[peer.name], current_rss_bytes() or 0)
            if s.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(s.device)
            _sync(s.device)
            dist.barrier()
            with Stopwatch(sync) as watch:  # synchronises the device at both ends
                for _ in range(a.iters):
                    train_step(peer, x, g, a.aux_coef)
                _sync(s.device)
                dist.barrier()
            elapsed = torch.tensor([watch.seconds], dtype=torch.float64)
            if s.device.type == "cuda":
                elapsed = elapsed.to(s.device)
                gpu_peak[peer.name] = max(gpu_peak[peer.name], torch.cuda.max_memory_allocated(s.device))
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's time
            rss_peak[peer.name] = max(rss_peak[peer.name], peak_rss_bytes())
            _zero_grads(peer, x)
            samples[peer.name].append(float(elapsed.item()))
            logger.info(
                "repeat %d/%d %-9s %8.1f ms/step  %10.0f tokens/s",
                r + 1, a.repeats, peer.name, 1e3 * samples[peer.name][-1] / a.iters,
                a.tokens * s.world * a.iters / samples[peer.name][-1],
            )

    profiles: dict[str, list[dict[str, Any]]] = {}
    if a.profile:
        for peer in timed:
            profiles[peer.name] = profile_peer(s, peer, x, g, out_dir)

    per_rank = {
        "rank": s.rank,
        "pinned_cpu": getattr(a, "pinned_cpu", None),
        "rss_peak": rss_peak,
        "rss_before": rss_before,
        "gpu_peak": gpu_peak,
        "peer_info": {p.name: p.info for p in timed},
    }
    gathered: list[Any] = [None] * s.world
    dist.all_gather_object(gathered, per_rank)
    if s.rank == 0:
        write_results(s, samples, gathered, agreement, rss_reset_ok, profiles, load_at_start)


# --------------------------------------------------------------------------------------------
# results


def write_results(
    s: Setup,
    samples: dict[str, list[float]],
    ranks: list[dict[str, Any]],
    agreement: dict[str, Any],
    rss_reset_ok: bool,
    profiles: dict[str, list[dict[str, Any]]],
    load_at_start: list[float],
) -> None:
    """Summarise the samples and write ``moe_layer_<device><tag>.json`` and ``.md``."""
    a = s.args
    global_tokens = a.tokens * s.world
    flops_step = moe_flops(global_tokens, a.dim, a.ffn, a.experts, a.top_k)
    peak, device_name = peak_flops_per_device(s.device, s.dtype, a.peak_tflops)
    summaries: dict[str, dict[str, Any]] = {}
    for name, secs in samples.items():
        step_ms = [1e3 * t / a.iters for t in secs]
        tps = [global_tokens * a.iters / t for t in secs]
        med_step_s = summarize(step_ms)["median"] / 1e3
        achieved = flops_step / med_step_s
        summaries[name] = {
            "tokens_per_s": summarize(tps),
            "step_ms": summarize(step_ms),
            "achieved_tflops_total": achieved / 1e12,
            "mfu": (achieved / (peak * s.world)) if peak else None,
            "peak_rss_bytes_per_rank": [r["rss_peak"][name] for r in ranks],
            "rss_before_bytes_per_rank": [r["rss_before"][name] for r in ranks],
            "peak_gpu_bytes_per_rank": [r["gpu_peak"][name] for r in ranks] if s.device.type == "cuda" else None,
        }
    baseline = "deepspeed" if "deepspeed" in summaries else None
    for name, summ in summaries.items():
        if baseline is None:
            continue
        summ["ratio_tokens_per_s_vs_deepspeed"] = (
            summ["tokens_per_s"]["median"] / summaries[baseline]["tokens_per_s"]["median"]
        )
        # Ratio within each repeat (adjacent samples), robust to slowly varying background load.
        summ["paired_ratio_vs_deepspeed"] = summarize([b / t for t, b in zip(samples[name], samples[baseline])])

    config = {k: v for k, v in vars(a).items() if k not in ("peer_list", "pinned_cpu")}
    config.update(world_size=s.world, ep=s.world, global_tokens=global_tokens, flops_per_step=flops_step,
                  dtype_torch=str(s.dtype), peak_flops_per_device=peak, device_name=device_name,
                  malloc_env={k: os.environ.get(k) for k in MALLOC_TUNED_ENV})
    result = {
        "benchmark": "moe_layer",
        "description": "MoE layer forward+backward throughput, expert parallel over all ranks, dropless top-k",
        "config": config,
        "versions": package_versions(["torch", "deepspeed", "megatron-core", "transformer-engine", "moe-system", "numpy"]),
        "host": {
            **host_info(),
            "loadavg_1_5_15_at_start": load_at_start,
            "loadavg_1_5_15_at_end": list(os.getloadavg()),
        },
        "method": {
            "timing": "interleaved repeats; each repeat times --iters fwd+bwd steps between barriers; "
            "the repeat's time is the slowest rank's (all_reduce MAX)",
            "tokens_per_s": "global tokens * iters / repeat time",
            "loss": "sum(out * g) + aux_coef * aux_loss, fixed g, input requires grad; grads set to None each step",
            "peak_rss": "VmHWM reset (/proc/self/clear_refs) before each repeat of a peer; max over its repeats; "
            "includes the process baseline (interpreter, libraries, every peer's weights)"
            + ("" if rss_reset_ok else " [reset unavailable: peak since process start]"),
            "flops": "3 * (2*T*k*3*d*F + 2*T*d*E) per step (useful work; padding excluded)",
        },
        "agreement_ours_vs_deepspeed": agreement,
        "peers": {r["rank"]: r["peer_info"] for r in ranks}.get(0, {}),
        "ranks": [{"rank": r["rank"], "pinned_cpu": r["pinned_cpu"]} for r in ranks],
        "profile_top_ops_rank0": profiles,
        "samples_s_per_repeat": samples,
        "summary": summaries,
    }
    out_dir = Path(a.out)
    stem = f"moe_layer_{a.device}{a.tag}"
    json_path = write_json(out_dir / f"{stem}.json", result)
    md_path = write_text(out_dir / f"{stem}.md", render_markdown(s, result))
    logger.info("wrote %s and %s", json_path, md_path)
    print(render_markdown(s, result))


def _paired(summary: dict[str, float] | None) -> str:
    if not summary:
        return "n/a"
    return f"{summary['median']:.2f}x [{summary['min']:.2f}, {summary['max']:.2f}]"


def render_markdown(s: Setup, result: dict[str, Any]) -> str:
    """The markdown report: setup line, the table, agreement and padding notes."""
    a = s.args
    summ = result["summary"]
    cuda = s.device.type == "cuda"
    headers = ["system", "tokens/s (median)", "step ms (median)", "step ms [min, max]", "ratio vs DeepSpeed",
               "paired ratio [min, max]", "peak RSS / rank (max)"]
    if cuda:
        headers += ["peak GPU mem / rank", "TFLOP/s", "MFU"]
    else:
        headers += ["GFLOP/s (useful)"]
    rows = []
    for name, sm in summ.items():
        ratio = sm.get("ratio_tokens_per_s_vs_deepspeed")
        row = [
            name,
            f"{sm['tokens_per_s']['median']:,.0f}",
            f"{sm['step_ms']['median']:.1f}",
            f"[{sm['step_ms']['min']:.1f}, {sm['step_ms']['max']:.1f}]",
            f"{ratio:.2f}x" if ratio is not None else "n/a",
            "(baseline)" if name == "deepspeed" else _paired(sm.get("paired_ratio_vs_deepspeed")),
            format_bytes(max(sm["peak_rss_bytes_per_rank"])),
        ]
        if cuda:
            row += [format_bytes(max(sm["peak_gpu_bytes_per_rank"])), f"{sm['achieved_tflops_total'] / s.world:.1f} per GPU",
                    f"{100 * sm['mfu']:.1f}%" if sm["mfu"] is not None else "n/a"]
        else:
            row += [f"{1e3 * sm['achieved_tflops_total']:.1f}"]
        rows.append(row)
    cfg = result["config"]
    lines = [
        f"# MoE layer fwd+bwd: {', '.join(summ)} ({a.device})",
        "",
        f"E={a.experts}, top-{a.top_k}, d={a.dim}, F={a.ffn} (SwiGLU), {a.tokens} tokens/rank x {s.world} ranks, "
        f"EP={s.world}, {a.dtype}, dropless; {a.repeats} interleaved repeats x {a.iters} steps "
        f"(+{a.warmup} warm-up), median over repeats, time of the slowest rank. "
        f"{'NCCL' if cuda else 'Gloo'}, {'1 GPU' if cuda else f'{a.threads} thread(s)'} per rank"
        f"{'' if cuda else f', glibc malloc {a.malloc}'}; "
        f"device: {cfg['device_name']}. torch {result['versions']['torch']}, deepspeed {result['versions']['deepspeed']}.",
        "",
        markdown_table(headers, rows),
    ]
    ag = result["agreement_ours_vs_deepspeed"]
    if ag:
        lines += [
            f"- Same weights and routing in both (routing identical: {ag['routing_identical']}); "
            f"max relative difference ours vs DeepSpeed: output {ag['max_rel_diff_out']:.1e}, "
            f"input gradient {ag['max_rel_diff_input_grad']:.1e}.",
            f"- DeepSpeed dropless gating pads every expert to the largest expert load over the EP group "
            f"(capacity C={ag['deepspeed_capacity']} rows per expert and rank vs a mean of "
            f"{a.tokens * a.top_k / a.experts:.0f}): its experts compute E*C = {ag['deepspeed_padding_factor']:.3f}x "
            f"the T*k useful rows, and its all-to-alls move the padded [E, C, d] buffers. That is its algorithm and "
            f"is kept. Load max/mean over experts (global): {ag['load_max_over_mean']:.3f}; ours does no padding, "
            f"its busiest EP rank computes {ag['ours_busiest_rank_rows_factor']:.3f}x T*k rows (the others wait "
            f"for it in the all-to-all).",
        ]
    for name, ops in result.get("profile_top_ops_rank0", {}).items():
        if ops:
            top = ", ".join(f"{o['op']} {o['self_ms_per_step']:.0f} ms ({100 * o['share']:.0f}%)" for o in ops[:6])
            lines.append(f"- Profile of {name} (rank 0, self time per step): {top}.")
    lines += [
        "- ratio vs DeepSpeed = median tokens/s over median tokens/s; paired ratio = median over repeats of "
        "DeepSpeed's time / ours within the same repeat (robust to background load that drifts between repeats). "
        f"Load average (1, 5, 15 min) at the end of the run: {', '.join(f'{v:.1f}' for v in result['host']['loadavg_1_5_15_at_end'])} "
        f"on {result['host']['logical_cpus']} CPUs.",
        "- Peak RSS is VmHWM while that system ran (reset before each repeat), so it includes the process baseline "
        "(interpreter, libraries, both systems' weights).",
        "- Loss = sum(out * g) + aux_coef * aux (each system's own load-balancing loss); input requires grad.",
        "- Command: `" + " ".join(["python benchmarks/moe_layer.py", *sys.argv[1:]]) + "`",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# launch


def _spawned_rank(local_rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    """Entry of a process started by :func:`main` (``torch.multiprocessing`` spawn)."""
    os.environ.update(
        RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    run_rank(args)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark: under torchrun (env set) run this rank; else spawn ``--nproc`` ranks."""
    args = parse_args(argv)
    validate_args(args)
    under_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if under_launcher:
        world = int(os.environ["WORLD_SIZE"])
        if args.malloc == "tuned" and any(os.environ.get(k) != v for k, v in MALLOC_TUNED_ENV.items()):
            logging.getLogger(__name__).warning(
                "--malloc tuned under a launcher: export %s before starting it (glibc reads them at process start)",
                " ".join(f"{k}={v}" for k, v in MALLOC_TUNED_ENV.items()),
            )
        if world != args.nproc:
            args.nproc = world
            validate_args(args)
        run_rank(args)
        return
    setup_logging(None, logging.getLevelName(args.log_level.upper()))
    if args.malloc == "tuned":
        os.environ.update(MALLOC_TUNED_ENV)  # read by glibc at start-up of the spawned ranks
    logger.info("spawning %d processes (%s, %s)", args.nproc, args.device, args.dtype)
    import torch.multiprocessing as mp

    mp.start_processes(_spawned_rank, args=(args.nproc, free_port(), args), nprocs=args.nproc, start_method="spawn")


if __name__ == "__main__":
    main()
