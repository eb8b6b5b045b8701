"""The CUDA tier (``pytest -m cuda``, run by ``make gpu-check``): every CUDA path against a CPU reference.

Each test builds the same thing twice from one seed, on the GPU and on the CPU, and compares: within
a tolerance suited to the dtype (fp32: cuBLAS and the CPU sum in different orders; bf16: rounding of
the inputs), or with ``torch.equal`` where the arithmetic is the same on both sides (ring and expert
offload against the resident engine on the same GPU; checkpoint round trips). Covered: the MoE layer
(fused bf16 ``torch._grouped_mm``, fp32 through the chunked kernel), expert parallelism at world 1
(the all-to-all dispatcher over a one-rank NCCL group), ``grouped_matmul`` on shapes and pointers the
fused kernel rejects, FSSDP on one rank, the host synchronisations per MoE layer and step, the
deterministic combine and ``training.deterministic``, ring and expert offload through pinned memory
and the copy stream, the asynchronous checkpoint with pinned staging, and 50 bf16 training steps.

Skipped without a GPU; the tests at the top (host-side bookkeeping the CUDA paths rely on) run
everywhere. ``CUBLAS_WORKSPACE_CONFIG`` is set at import, before any cuBLAS call of the process, so
that the deterministic-mode test can turn ``torch.use_deterministic_algorithms`` on.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any cuBLAS call (see the docstring)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

from system.config import MoEConfig  # noqa: E402
from system.config.fssdp import FSSDPConfig  # noqa: E402
from system.config.model import ModelConfig  # noqa: E402
from system.config.parallel import ParallelConfig  # noqa: E402
from system.config.training import TrainingConfig  # noqa: E402
from system.moe import MoELayer, grouped_matmul  # noqa: E402
from system.moe.dispatch import AllToAllDispatcher  # noqa: E402
from system.moe.experts import expert_kernel, grouped_mm_fused  # noqa: E402
from system.moe.swiglu import swiglu_experts  # noqa: E402
from system.parallel.fssdp import route_counts, route_tokens, routed_to  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
DEV = torch.device("cuda", 0) if CUDA else None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius), in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# Host-side parts of the CUDA paths (run everywhere)


def test_route_counts_and_routed_to_equal_route_tokens() -> None:
    """FSSDP's dispatcher derives every send and receive count from the gathered per-expert counts:
    both functions must equal the histogram of the per-token routing, for any placement."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        W, E = int(torch.randint(1, 9, (1,), generator=gen)), int(torch.randint(1, 13, (1,), generator=gen))
        rpn = int(torch.randint(1, W + 1, (1,), generator=gen))
        placement = torch.rand(E, W, generator=gen) < float(torch.rand(1, generator=gen))
        placement[torch.arange(E), torch.randint(W, (E,), generator=gen)] = True
        counts = torch.randint(0, 9, (W, E), generator=gen) * (torch.rand(W, E, generator=gen) > 0.3)
        sent = []
        for s in range(W):
            experts = torch.repeat_interleave(torch.arange(E), counts[s])
            dest = route_tokens(experts, s, placement, rpn)
            hist = torch.zeros(W * E, dtype=torch.int64).index_add_(0, dest * E + experts, torch.ones_like(dest))
            assert torch.equal(route_counts(counts[s], s, placement, rpn), hist.view(W, E))
            sent.append(hist.view(W, E))
        for r in range(W):
            assert torch.equal(routed_to(counts, r, placement, rpn), torch.stack(sent)[:, r])
    unplaced = torch.zeros(3, 2, dtype=torch.bool)
    unplaced[0, 0] = unplaced[2, 1] = True
    with pytest.raises(ValueError, match="expert 1 is routed tokens but materialized on no rank"):
        route_counts(torch.tensor([1, 2, 0]), 0, unplaced, 1)
    with pytest.raises(ValueError, match="expert 1 is routed tokens"):
        routed_to(torch.tensor([[1, 0, 0], [0, 2, 0]]), 1, unplaced, 2)
    with pytest.raises(ValueError, match=r"counts \[W=2, E=3\]"):
        routed_to(torch.zeros(3, 3, dtype=torch.int64), 0, unplaced, 1)


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 0, 0], [1, 4, 0, 2]])
def test_one_chunk_per_expert_kernel_is_exact(counts: list[int]) -> None:
    """``chunk_bytes=None`` (the chunked kernel's GPU setting: one GEMM per expert) is exact (gradcheck)."""
    torch.manual_seed(0)
    x = torch.randn(sum(counts), 6, dtype=torch.float64, requires_grad=True)
    w1, w3 = (torch.randn(4, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w2 = torch.randn(4, 8, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: swiglu_experts(*a, counts, chunk_bytes=None), (x, w1, w2, w3))


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers of the CUDA tier


@pytest.fixture(scope="module")
def pg():
    """A one-rank process group for the module: NCCL for CUDA tensors, Gloo for CPU ones."""
    if not CUDA:
        pytest.skip("no CUDA device")
    torch.cuda.set_device(DEV)
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("cpu:gloo,cuda:nccl", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    if own:
        dist.destroy_process_group()


@contextlib.contextmanager
def count_syncs():
    """Count the host synchronisations CUDA reports inside the block (``torch.cuda.set_sync_debug_mode``):
    yields a list that holds the count once the block has ended."""
    box: list[int] = []
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield box
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    box.append(sum("synchroniz" in str(w.message) for w in caught))


def _layer(seed: int = 0, dim: int = 64, **kw) -> MoELayer:
    cfg = MoEConfig(**{"num_experts": 8, "top_k": 2, "expert_dim": 96, **kw})
    torch.manual_seed(seed)
    layer = MoELayer(dim, cfg)
    layer.init_weights(0.2, 0.1)
    return layer


@torch.no_grad()
def _cpu_routing(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The CPU layer's expert choices ``[T, k]`` for ``x``, on the GPU. Under bf16 autocast the router's
    linear runs in bf16, so scores that are nearly tied in fp32 may order differently and route a token
    elsewhere (a discrete change, not a rounding error): bf16 comparisons route as the CPU did."""
    return layer.router(x.reshape(-1, x.shape[-1])).indices.to(DEV)


def _fwd_bwd(layer: nn.Module, x0: torch.Tensor, g: torch.Tensor, dtype: torch.dtype | None = None):
    """Output, input gradient and parameter gradients (by name) of ``sum(layer(x) * g)``."""
    x = x0.clone().requires_grad_()
    ctx = torch.autocast(x.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with ctx:
        y = layer(x)
    (y.float() * g).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return y.detach(), x.grad.detach(), grads


# ---------------------------------------------------------------------------------------------
# The MoE layer, expert parallelism at world 1, grouped_matmul


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kw", [{}, {"num_shared_experts": 1, "top_k": 3}, {"capacity_factor": 1.0}],
                         ids=["dropless", "shared-k3", "capacity"])
def test_moe_layer_cuda_matches_cpu(dtype: str, kw: dict) -> None:
    """Same weights and tokens: forward, input and weight gradients on CUDA equal the CPU layer's
    (fp32: rel. 1e-5; bf16 autocast, fused ``_grouped_mm`` on Hopper: rel. 2e-2)."""
    layer = _layer(**kw)
    torch.manual_seed(1)
    x, g = torch.randn(4, 48, 64), torch.randn(4, 48, 64)
    routing = _cpu_routing(layer, x)
    ref = _fwd_bwd(layer, x, g)
    amp = torch.bfloat16 if dtype == "bf16" else None
    layer = layer.to(DEV)
    if amp:
        layer.router.forced_indices = routing
    got = _fwd_bwd(layer, x.to(DEV), g.to(DEV), amp)
    tol = 2e-2 if amp else 1e-5
    assert _rel(got[0], ref[0]) < tol and _rel(got[1], ref[1]) < tol
    for name, grad in ref[2].items():
        assert _rel(got[2][name], grad) < tol, name
    if amp and grouped_mm_fused(DEV, torch.bfloat16):
        assert expert_kernel(DEV, torch.bfloat16) == "grouped_mm"
    assert expert_kernel(DEV, torch.float32) == "chunked"  # fp32: per-expert GEMMs, see system.moe.experts


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_expert_parallel_world1_cuda_matches_cpu(pg, dtype: str) -> None:
    """The all-to-all dispatcher over a one-rank NCCL group, on CUDA, against the plain CPU layer;
    its split sizes and permutation come from one device-to-host copy per layer and step."""
    layer = _layer(seed=3)
    torch.manual_seed(4)
    x, g = torch.randn(2, 64, 64), torch.randn(2, 64, 64)
    routing = _cpu_routing(layer, x)
    ref = _fwd_bwd(layer, x, g)
    layer = layer.to(DEV)
    layer.dispatcher = AllToAllDispatcher(pg, layer.num_experts)
    amp = torch.bfloat16 if dtype == "bf16" else None
    if amp:
        layer.router.forced_indices = routing
    got = _fwd_bwd(layer, x.to(DEV), g.to(DEV), amp)
    tol = 2e-2 if amp else 1e-5
    assert _rel(got[0], ref[0]) < tol and _rel(got[1], ref[1]) < tol
    for name, grad in ref[2].items():
        assert _rel(got[2][name], grad) < tol, name
    xd, gd = x.to(DEV), g.to(DEV)
    with count_syncs() as syncs:
        _fwd_bwd(layer, xd, gd, amp)
    assert syncs[0] <= 1, syncs  # the dispatcher's one read of its sizes; the experts get host counts


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_local_layer_has_no_host_sync_with_fused_grouped_mm() -> None:
    """Dropless, one device, bf16 on a GPU with the fused ``_grouped_mm``: no host sync at all
    (expert counts by scatter_add, offsets on the device); otherwise one (the chunked kernel's counts)."""
    layer = _layer(seed=5).to(DEV)
    x, g = torch.randn(2, 32, 64, device=DEV), torch.randn(2, 32, 64, device=DEV)
    _fwd_bwd(layer, x, g, torch.bfloat16)  # warm-up (lazy inits may sync)
    with count_syncs() as syncs:
        _fwd_bwd(layer, x, g, torch.bfloat16)
    assert syncs[0] <= (0 if grouped_mm_fused(DEV, torch.bfloat16) else 1), syncs


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("case", ["aligned", "odd-width", "transposed-weights", "misaligned-pointer", "empty-groups"])
def test_grouped_matmul_unaligned_shapes_match_cpu(case: str) -> None:
    """``grouped_matmul(use_grouped_mm=True)`` on bf16 CUDA, uneven group sizes (not multiples of 8):
    the fused kernel where strides and pointers allow it, column-major weights (Hugging Face experts),
    and the exact per-group loop where the kernel would reject them (an output width of 39, a data
    pointer 2 bytes off); forward and both gradients against the fp32 per-group loop on the CPU."""
    torch.manual_seed(7)
    counts = torch.tensor([0, 5, 17, 0, 1, 40, 3, 0]) if case == "empty-groups" else torch.tensor([9, 1, 30, 7])
    a, b = 24, (39 if case == "odd-width" else 40)
    m = int(counts.sum())
    x0, w0, gy = torch.randn(m, a) * 0.5, torch.randn(len(counts), a, b) * 0.2, torch.randn(m, b)

    def run(device: torch.device, dtype: torch.dtype):
        xs = x0.to(device, dtype, copy=True).requires_grad_()
        w = w0.to(device, dtype, copy=True).requires_grad_()
        x = xs
        if case == "misaligned-pointer":  # same values, data pointer one element past an aligned one
            x = torch.cat([xs.new_zeros(1), xs.flatten()])[1:].view(m, a)
        wt = w.transpose(1, 2).contiguous().transpose(1, 2) if case == "transposed-weights" else w
        y = grouped_matmul(x, wt, counts, device.type == "cuda")
        (y.float() * gy.to(device)).sum().backward()
        return y.detach(), xs.grad.detach(), w.grad.detach()

    ref = run(torch.device("cpu"), torch.float32)
    got = run(DEV, torch.bfloat16)
    for r, c in zip(ref, got):
        assert _rel(c, r) < 2e-2
    for i in torch.nonzero(counts == 0).flatten().tolist():  # empty groups: exactly zero weight gradient
        assert got[2][i].abs().max() == 0


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_deterministic_combine_is_bitwise_stable_and_close() -> None:
    """``MoELayer.deterministic`` on CUDA: with top-3 (where atomic sums may differ from run to run) the
    layer's output and the expert weights' gradients (both downstream of the combine) are bitwise the
    same on every call, and agree with the index_add combine to fp32 rounding. (The input gradient also
    goes through the token gather's backward, outside the combine: ``training.deterministic`` covers it,
    see the training test below.)"""
    layer = _layer(seed=8, top_k=3).to(DEV)
    x, g = torch.randn(4, 64, 64, device=DEV), torch.randn(4, 64, 64, device=DEV)
    layer.deterministic = True
    _fwd_bwd(layer, x, g)  # warm-up (lazy initialisations)
    first = _fwd_bwd(layer, x, g)
    experts = ("experts.w1", "experts.w2", "experts.w3")
    for _ in range(3):
        again = _fwd_bwd(layer, x, g)
        assert torch.equal(again[0], first[0])
        assert all(torch.equal(again[2][n], first[2][n]) for n in experts)
    layer.deterministic = False
    atomic = _fwd_bwd(layer, x, g)
    assert _rel(atomic[0], first[0]) < 1e-6 and _rel(atomic[1], first[1]) < 1e-6


# ---------------------------------------------------------------------------------------------
# FSSDP on one rank; host syncs per MoE layer and step


def _fssdp_layer_model(layer: MoELayer, **cfg) -> tuple[nn.Module, object]:
    from system.parallel.fssdp.apply import apply_fssdp

    model = nn.ModuleList([layer])
    ctrl = apply_fssdp(model, FSSDPConfig(**{"overlap_budget": 0, "memory_budget": 0, "reshard_interval": 0,
                                             "ranks_per_node": 1, **cfg}))
    return model, ctrl


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("rematerialize", [False, True], ids=["keep", "rematerialize"])
def test_fssdp_one_rank_layer_matches_cpu_with_one_host_sync(pg, dtype: str, rematerialize: bool) -> None:
    """FSSDP over a one-rank NCCL group: the layer's outputs and gradients (the owned flat rows) equal
    the plain CPU layer's, and forward + backward synchronise with the host at most once."""
    ref_layer = _layer(seed=9)
    torch.manual_seed(10)
    x, g = torch.randn(2, 64, 64), torch.randn(2, 64, 64)
    routing = _cpu_routing(ref_layer, x)
    ref = _fwd_bwd(ref_layer, x, g)
    layer = _layer(seed=9).to(DEV)
    model, ctrl = _fssdp_layer_model(layer, rematerialize=rematerialize)
    amp = torch.bfloat16 if dtype == "bf16" else None
    if amp:
        layer.router.forced_indices = routing
    tol = 2e-2 if amp else 1e-5
    xd, gd = x.to(DEV), g.to(DEV)
    ctrl.begin_step()
    got = _fwd_bwd(layer, xd, gd, amp)
    ctrl.end_step()
    assert _rel(got[0], ref[0]) < tol and _rel(got[1], ref[1]) < tol
    kind = layer.experts.kind
    full = kind.unflatten(got[2]["experts.owned"])  # one rank owns every expert, in id order
    for name in ("w1", "w2", "w3"):
        assert _rel(full[name], ref[2][f"experts.{name}"]) < tol, name
    ctrl.begin_step()
    with count_syncs() as syncs:
        _fwd_bwd(layer, xd, gd, amp)
    ctrl.end_step()
    assert syncs[0] <= 1, syncs  # the all-gathered counts, read once per layer and step


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_fssdp_one_rank_training_matches_cpu(pg) -> None:
    """Three optimizer steps of the FSSDP scenario of the CPU equivalence tests, on one GPU rank:
    losses and updated parameters equal the single-process CPU run (fp32, rel. 1e-4)."""
    from ep_scenarios import build, configs, forced_routing, fssdp_config, global_batches, reference_run, set_routing

    from system.distributed import ParallelDims
    from system.models.parallelize import parallelize_model
    from system.train.optim import build_optimizer
    from system.train.step import train_step

    s = dict(world=1, ep=1, mode="fssdp", routing="skew")
    ref = reference_run(s)
    _, _, par, train_cfg = configs(s)
    mesh = ParallelDims.from_config(par.dp, par.ep, 1).build_mesh("cuda")
    model = build(s).to(DEV)
    fssdp = parallelize_model(model, mesh, par, fssdp=fssdp_config(s))
    opt = build_optimizer(model, train_cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    losses = []
    for step, (x, y) in enumerate(global_batches(s)):
        set_routing(model, forced_routing(s, step, x.numel()))
        st = train_step(model, opt, sched, [(x.to(DEV), y.to(DEV))], mesh=mesh, max_grad_norm=train_cfg.max_grad_norm,
                        fssdp=fssdp)
        losses.append(st.loss)
    for a, b in zip(losses, ref["loss"]):
        assert math.isclose(a, b, rel_tol=1e-4), (losses, ref["loss"])
    from system.checkpoint.model_io import full_state_dict

    got = full_state_dict(model, mesh)
    for name, want in ref["params"].items():
        assert _rel(got[name], want) < 1e-4, name


# ---------------------------------------------------------------------------------------------
# Deterministic mode and 50 bf16 training steps


def _tiny_model_cfg(top_k: int = 2) -> tuple[ModelConfig, MoEConfig]:
    model = ModelConfig(dim=128, n_layers=2, n_heads=4, ffn_dim=256, vocab_size=256, max_seq_len=64)
    moe = MoEConfig(num_experts=8, top_k=top_k, expert_dim=128, aux_loss_coef=0.01, z_loss_coef=0.001)
    return model, moe


def _byte_batches(steps: int, batch: int = 8, seq: int = 64, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Windows of this repository's MoE layer source as bytes (a small corpus with structure to learn)."""
    data = torch.frombuffer(bytearray((ROOT / "system" / "moe" / "layer.py").read_bytes()), dtype=torch.uint8).long()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        rows = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
        out.append((rows[:, :-1], rows[:, 1:]))
    return out


def _train(steps: int, *, top_k: int = 2, amp: torch.dtype | None = torch.bfloat16, deterministic: bool = False,
           lr: float = 3e-3) -> tuple[list[float], dict[str, torch.Tensor]]:
    from system.distributed import ParallelDims
    from system.models import MoETransformer
    from system.models.parallelize import parallelize_model
    from system.train.determinism import set_moe_deterministic
    from system.train.optim import build_lr_scheduler, build_optimizer
    from system.train.step import train_step

    model_cfg, moe_cfg = _tiny_model_cfg(top_k)
    train_cfg = TrainingConfig(steps=steps, lr=lr, warmup_steps=5, max_grad_norm=1.0)
    model = MoETransformer(model_cfg, moe_cfg)
    model.init_weights(seed=11)
    model = model.to(DEV)
    set_moe_deterministic(model, deterministic)
    mesh = ParallelDims.from_config(-1, 1, 1).build_mesh("cuda")
    parallelize_model(model, mesh, ParallelConfig(ep=1))
    opt = build_optimizer(model, train_cfg)
    sched = build_lr_scheduler(opt, train_cfg)
    losses = []
    for x, y in _byte_batches(steps):
        st = train_step(model, opt, sched, [(x.to(DEV), y.to(DEV))], mesh=mesh, max_grad_norm=1.0, autocast_dtype=amp)
        losses.append(st.loss)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_50_bf16_training_steps_loss_falls(pg) -> None:
    """The trainer's step function, 50 steps under bf16 autocast on one GPU: finite, falling loss."""
    losses, _ = _train(50)
    assert all(math.isfinite(v) for v in losses), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last, losses)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_training_deterministic_mode_reproduces_bitwise(pg) -> None:
    """``training.deterministic``: under ``torch.use_deterministic_algorithms`` (no operation of the
    training step may lack a deterministic kernel: it would raise) and the fixed-order MoE combine,
    two runs of top-3 training give bitwise the same losses and weights."""
    from system.train.determinism import enable_deterministic_algorithms

    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    enable_deterministic_algorithms()
    try:
        _train(2, top_k=3, deterministic=True)  # warm-up (lazy initialisations), and nothing may raise
        a_loss, a_params = _train(6, top_k=3, deterministic=True)
        b_loss, b_params = _train(6, top_k=3, deterministic=True)
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1], saved[2]
    assert a_loss == b_loss
    assert all(torch.equal(a_params[k], b_params[k]) for k in a_params)


# ---------------------------------------------------------------------------------------------
# Ring and expert offload: pinned host tier, copy stream, equal to the resident engine


@pytest.fixture(scope="module")
def offload_ckpt(pg, tmp_path_factory) -> Path:
    from test_offload import make_job, save_checkpoint

    path = tmp_path_factory.mktemp("cuda_offload") / "mixed5"
    job = make_job({"n_layers": 5, "ffn_dim": 40}, {"num_experts": 6, "first_dense_layers": 1, "interleave": 2})
    save_checkpoint(job, path)
    return path


def _generate(ckpt: Path, **kw):
    from test_offload import PROMPTS, Recorder

    from system.inference import OffloadEngine

    rec = Recorder()
    with OffloadEngine(ckpt, device="cuda", max_batch_size=2, max_seq_len=16, **kw) as eng:
        out, stats = eng.generate_ids(PROMPTS, 6, rec, batch_size=2)
    return out, rec.logits, stats, eng


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("mode", ["ring1", "ring2", "ring3", "experts1", "experts3"])
def test_offload_cuda_equals_resident(offload_ckpt: Path, mode: str) -> None:
    """Ring (CudaTransport: pinned packed sections, copy stream, ready/free events) and expert offload
    (pinned per-expert host tier, LRU of expert slots) give the resident engine's logits bitwise, on the
    GPU; the copy timings are device times (a plausible PCIe/NVLink figure, not an enqueue rate)."""
    from system.inference import CudaTransport

    ref = _generate(offload_ckpt, offload="none")
    k = int(mode[-1])
    kw = {"offload": "ring", "slots": k} if mode.startswith("ring") else {"offload": "experts", "expert_cache": k}
    got = _generate(offload_ckpt, **kw)
    assert got[0] == ref[0]
    assert len(got[1]) == len(ref[1]) and all(torch.equal(a, b) for a, b in zip(got[1], ref[1]))
    eng = got[3]
    if mode.startswith("ring"):
        assert isinstance(eng.transport, CudaTransport)
        assert all(src.is_pinned() for pieces in eng.transport.host for src, _, _ in pieces)
        eng.transport.verify()  # the device-side stamp checks saw nothing stale
    else:
        assert all(src.is_pinned() for pieces in eng.expert_cache.host.values() for src, _, _ in pieces)
    if got[2].bytes_streamed:
        assert 1e8 < eng.measured_bandwidth < 2e12, eng.measured_bandwidth


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_stale_slot_is_a_host_error_and_the_context_survives(offload_ckpt: Path) -> None:
    """A transport that skips ``wait_ready``: the host-side stamp check raises StaleSlotError at once
    (no device-side assert), and the CUDA context still works afterwards."""
    from test_offload import PROMPTS, Recorder

    from system.inference import CudaTransport, OffloadEngine, StaleSlotError

    class NoReadyWait(CudaTransport):
        def wait_ready(self, slot: int) -> None:  # the bug: compute does not wait for the copy
            pass

    eng = OffloadEngine(offload_ckpt, device="cuda", offload="ring", slots=2, max_batch_size=2, max_seq_len=16,
                        transport=NoReadyWait("cuda"))
    try:
        with pytest.raises(StaleSlotError, match="expected load 1"):
            eng.generate_ids(PROMPTS[:2], 2, Recorder())
    finally:
        eng.close()
    torch.cuda.synchronize()
    assert float((torch.ones(4, device=DEV) * 2).sum()) == 8.0


# ---------------------------------------------------------------------------------------------
# Asynchronous checkpoint: pinned staging, snapshot semantics, round trip


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_async_checkpoint_pinned_staging_round_trip(tmp_path: Path) -> None:
    """CUDA tensors (fp32, bf16, int64, a non-contiguous view, 0-d) saved by AsyncCheckpointer: staged in
    pinned host memory, safe to modify once ``save`` returns, loaded back into CUDA tensors bit-exactly."""
    from system.checkpoint import AsyncCheckpointer, load

    gen = torch.Generator().manual_seed(0)
    state = {
        "dense": torch.randn(256, 1024, generator=gen).to(DEV),
        "experts": torch.randn(8, 64, 96, generator=gen).to(DEV, torch.bfloat16),
        "count": torch.tensor(123456789012, dtype=torch.int64, device=DEV),
        "cols": torch.randn(96, 40, generator=gen).to(DEV).t(),
        "scalar": torch.tensor(0.5, device=DEV),
    }
    want = {k: v.clone() for k, v in state.items()}
    with AsyncCheckpointer(no_dist=True) as ckpt:
        handle = ckpt.save(state, tmp_path / "step_1")
        assert ckpt._staging is not None and ckpt._staging.is_pinned()
        for v in state.values():  # training goes on: the snapshot must not see this
            v.add_(1)
        handle.wait()
        assert ckpt.last_blocking_s > 0
    targets = {k: torch.zeros_like(v) for k, v in want.items()}
    load(targets, tmp_path / "step_1", no_dist=True)
    for k, v in want.items():
        assert targets[k].device.type == "cuda" and torch.equal(targets[k], v), k
