"""The GPU check (``make gpu-check``): the CUDA test tier and three GPU measurements, in one command.

Parts, each in its own subprocess with its own time limit; a part that fails or runs out of time is
recorded and the next one runs:

1. ``tests``: ``pytest -m cuda tests/test_cuda.py`` (the MoE layer and expert parallelism at world 1
   against CPU references, ``_grouped_mm`` on unaligned shapes, FSSDP on one rank, the host syncs per
   MoE layer, ring and expert offload through pinned memory and the copy stream ``torch.equal`` to the
   resident engine, the asynchronous checkpoint's pinned staging round trip, deterministic mode, 50
   bf16 training steps with a falling loss); outcome per test from its JUnit XML.
2. ``moe_layer``: ``benchmarks/moe_layer.py --device cuda`` at the Mixtral proxy (d 4096, F 14336,
   E 8, top-2, bf16, 16k tokens) against DeepSpeed-MoE and Megatron-Core, through its command line;
   its JSON gives tokens/s, MFU and the agreement check (retried without Megatron-Core when that
   peer alone fails, time allowing).
3. ``offload``: the pinned host-to-device bandwidth (a 1 GiB pinned buffer copied with CUDA events),
   then the ring (:class:`system.inference.OffloadEngine`, K = 2, the CUDA transport) on a bf16 MoE
   model of about 1.6 GB under a device budget of half that; ``eta`` = bytes streamed per second of
   decoding / that bandwidth (1.0: decoding runs at the link's speed). Also the transport's own copy
   bandwidth and the resident engine's decode step (the compute bound).
4. ``checkpoint``: the training stall of an asynchronous save of 768 MiB of CUDA tensors (the time
   until the tensors may change again): :class:`system.checkpoint.AsyncCheckpointer` (pinned
   staging) against ``torch.distributed.checkpoint.async_save`` as most code calls it and with a
   persistent pinned ``DefaultStager``; median of 2 saves after one warm-up, and the time to commit.

At most 7.5 minutes (``--budget``: the parts' limits, 150 + 150 + 60 + 70 s, bound the total).
Writes ``<out>/gpu_check_<device><tag>.json`` (commit, command, package versions, device, every
part's outcome and numbers) and ``.md``; the moe_layer part also leaves
``moe_layer_cuda_gpucheck.json``/``.md`` there.

On the GPU machine (offline; Python 3.12 and a CUDA build of torch preinstalled), from the repository
root, with the wheels ``make gpu-wheels`` wrote into ``.whl/`` on a networked machine (torch is never
touched: every wheel goes in with ``--no-deps`` into ``/tmp/site``)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD   # the project from the checkout; or, to install it (offline, needs the
                                       # preinstalled setuptools and wheel): export PYTHONPATH=/tmp/site &&
                                       # python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
    python3 benchmarks/gpu_check.py --commit <sha>   # or: make gpu-check ARGS="--commit <sha>"

Results go to ``$OUT`` when it is set (the device machine's result folder), else ``benchmarks/results``.

Options: ``--parts tests,moe_layer,offload,checkpoint``, ``--commit SHA`` (when the copy has no
``.git``), ``--smoke`` (tiny sizes; with ``--device cpu`` a dry run of the orchestration without a GPU).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("benchmarks.gpu_check")

PARTS = ("tests", "moe_layer", "offload", "checkpoint")
LIMIT_S = {"tests": 150, "moe_layer": 150, "offload": 60, "checkpoint": 70}
"""Seconds per part (7.2 min together); ``--budget`` caps the sum."""
PACKAGES = ("torch", "numpy", "deepspeed", "megatron-core", "transformers", "accelerate", "safetensors", "tokenizers",
            "pydantic", "isal", "pytest", "moe-system")
MIXTRAL = ["--dim", "4096", "--ffn", "14336", "--experts", "8", "--top-k", "2", "--dtype", "bf16", "--tokens", "16384"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run of the orchestration")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list from {','.join(PARTS)}")
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results",
                   help="result directory ($OUT if set)")
    p.add_argument("--tag", default=None, help="suffix of the result files (default '', '_smoke' with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (the orchestration, not the numbers)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all parts together (7.5 min)")
    p.add_argument("--commit", default=os.environ.get("MOESYS_COMMIT"), help="commit to record when there is no .git")
    p.add_argument("--moe-peers", default="ours,deepspeed,megatron", help="--peers of the moe_layer part")
    p.add_argument("--moe-args", default="--repeats 3 --iters 5 --warmup 2",
                   help="extra arguments of the moe_layer part (timing)")
    p.add_argument("--worker", choices=("offload", "checkpoint"), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.part_list = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = [s for s in args.part_list if s not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    if args.tag is None:
        args.tag = "_smoke" if args.smoke else ""
    return args


# ---------------------------------------------------------------------------------------------
# Running a part


def _env() -> dict[str, str]:
    """The children's environment: the repository importable (after whatever PYTHONPATH holds)."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([str(ROOT)] if str(ROOT) not in paths else []))
    return env


def run_command(cmd: list[str], limit_s: float, log_path: Path) -> dict[str, Any]:
    """Run ``cmd`` from the repository root in its own process group, output to ``log_path``; kill the
    group at ``limit_s``. Returns ``{"rc", "seconds", "timed_out", "tail"}`` (the last 40 lines)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=max(limit_s, 1.0)), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
    tail = log_path.read_text(errors="replace").splitlines()[-40:]
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "timed_out": timed_out, "tail": tail}


def _status(run: dict[str, Any]) -> str:
    return "timeout" if run["timed_out"] else "passed" if run["rc"] == 0 else "failed"


def part_tests(args: argparse.Namespace, limit_s: float, tmp: Path) -> dict[str, Any]:
    """``pytest -m cuda`` over tests/test_cuda.py; outcome per test from its JUnit XML."""
    junit = tmp / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-q", "tests/test_cuda.py",
           f"--junitxml={junit}", "--timeout=150"]
    run = run_command(cmd, limit_s, tmp / "tests.log")
    tests = _junit(junit) if junit.exists() else []
    counts = {k: sum(1 for t in tests if t["outcome"] == k) for k in ("passed", "failed", "error", "skipped")}
    if run["timed_out"]:
        status = "timeout"
    elif not tests or counts["failed"] or counts["error"] or run["rc"] != 0:
        status = "failed"
    else:
        status = "passed" if counts["passed"] else "skipped"  # every test skipped: no GPU
    return {"status": status, **run, "counts": counts, "tests": tests}


def _junit(path: Path) -> list[dict[str, Any]]:
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "failed" if child.tag == "failure" else child.tag
                message = (child.get("message") or child.text or "").strip().splitlines()[:1]
                message = message[0][:300] if message else ""
                break
        out.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0),
                    "message": message})
    return out


def part_moe_layer(args: argparse.Namespace, limit_s: float, tmp: Path, out_dir: Path) -> dict[str, Any]:
    """benchmarks/moe_layer.py through its command line; its JSON read back (retried without Megatron-Core
    when only that peer failed and time is left)."""
    tag = "_gpucheck" + ("_smoke" if args.smoke else "")
    peers = [p for p in args.moe_peers.split(",") if p and (args.device == "cuda" or p != "megatron")]
    shape = ["--smoke"] if args.smoke else (MIXTRAL if args.device == "cuda" else [])
    deadline = time.perf_counter() + limit_s
    attempts = []
    while True:
        cmd = [sys.executable, "benchmarks/moe_layer.py", "--device", args.device, *shape, "--peers", ",".join(peers),
               "--ds-capacity-factors", "", "--ours-capacity-factors", "", *args.moe_args.split(),
               "--out", str(out_dir), "--tag", tag]
        run = run_command(cmd, deadline - time.perf_counter(), tmp / f"moe_layer_{len(attempts)}.log")
        attempts.append({"peers": list(peers), **run})
        megatron_failed = "megatron" in peers and run["rc"] != 0 and any("egatron" in line for line in run["tail"])
        if run["rc"] == 0 or not megatron_failed or deadline - time.perf_counter() < 60:
            break
        peers = [p for p in peers if p != "megatron"]
    result_path = out_dir / f"moe_layer_{args.device}{tag}.json"
    out: dict[str, Any] = {"status": _status(attempts[-1]), "attempts": attempts, "result_file": str(result_path)}
    if attempts[-1]["rc"] == 0 and result_path.exists():
        res = json.loads(result_path.read_text())
        out["systems"] = {name: {k: s.get(k) for k in ("tokens_per_s", "step_ms", "achieved_tflops_total", "mfu",
                                                        "peak_gpu_bytes_per_rank", "paired_ratio_vs_deepspeed")}
                          for name, s in res.get("summary", {}).items()}
        out["goals"] = res.get("goals")
        out["agreement"] = res.get("agreement")
        out["config"] = {k: res.get("config", {}).get(k) for k in
                         ("dim", "ffn", "experts", "top_k", "tokens", "dtype", "world_size", "peak_flops_per_device")}
        if len(attempts) > 1:
            out["status"] = "partial"  # ran without Megatron-Core
    elif attempts[-1]["rc"] == 0:
        out["status"] = "failed"
        out["error"] = f"exit 0 but no {result_path.name}"
    return out


def part_worker(args: argparse.Namespace, name: str, limit_s: float, tmp: Path) -> dict[str, Any]:
    """Run :func:`worker_offload` / :func:`worker_checkpoint` in a child process; read its JSON."""
    result = tmp / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-out", str(result),
           "--device", args.device] + (["--smoke"] if args.smoke else [])
    run = run_command(cmd, limit_s, tmp / f"{name}.log")
    out: dict[str, Any] = {"status": _status(run), **run}
    if result.exists():
        data = json.loads(result.read_text())
        out.update(data)
        if "error" in data:
            out["status"] = "failed"
    elif out["status"] == "passed":
        out["status"] = "failed"
        out["error"] = "the worker wrote no result"
    return out


# ---------------------------------------------------------------------------------------------
# Workers (run in a child process)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_h2d(device: torch.device, nbytes: int, repeats: int = 5) -> dict[str, Any]:
    """Host-to-device bytes/s of one ``nbytes`` copy from pinned memory (CUDA events), median of
    ``repeats`` after a warm-up; on CPU the host memcpy rate (perf_counter) stands in for the link."""
    cuda = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    secs = []
    for i in range(repeats + 1):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            dt = time.perf_counter() - t0
        if i:
            secs.append(dt)
    del src, dst
    return {"bytes": nbytes, "seconds": secs, "bytes_per_s": nbytes / statistics.median(secs),
            "method": "pinned -> device copy_(non_blocking) between CUDA events" if cuda else "host memcpy"}


def _offload_job(smoke: bool):
    from system.config import JobConfig

    job = JobConfig()
    model = dict(dim=64, n_layers=4, n_heads=4, ffn_dim=128, vocab_size=320, max_seq_len=64) if smoke else \
        dict(dim=1024, n_layers=8, n_heads=8, ffn_dim=2048, vocab_size=512, max_seq_len=64)
    moe = dict(num_experts=4, top_k=2, expert_dim=128) if smoke else dict(num_experts=8, top_k=2, expert_dim=4096)
    for k, v in {**model, "tie_embeddings": False}.items():
        setattr(job.model, k, v)
    for k, v in moe.items():
        setattr(job.moe, k, v)
    job.training.seq_len = job.model.max_seq_len
    job.validate()
    return job


def write_random_model(path: Path, smoke: bool, device: torch.device, dtype: torch.dtype) -> int:
    """A seeded random MoE checkpoint in :func:`system.checkpoint.model_io.save_model`'s layout
    (``model.safetensors`` + ``config.json``), weights N(0, 0.02) and unit norms in ``dtype``,
    drawn on ``device``. Returns its bytes."""
    from safetensors.torch import save_file

    from system.checkpoint.model_io import CONFIG_FILE, MODEL_FILE
    from system.config import config_to_dict
    from system.inference.sections import build_skeleton

    job = _offload_job(smoke)
    skeleton = build_skeleton(job.model, job.moe)
    gen = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for name, t in skeleton.state_dict().items():
        if not t.dtype.is_floating_point:
            tensors[name] = torch.zeros(t.shape, dtype=t.dtype)
        elif "norm" in name:
            tensors[name] = torch.ones(t.shape, dtype=dtype)
        else:
            tensors[name] = (torch.randn(t.shape, generator=gen, device=device) * 0.02).to(dtype).cpu()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / MODEL_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(config_to_dict(job)))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _generate(ckpt: Path, device: str, new_tokens: int, prompt: list[int], **kw) -> tuple[Any, Any]:
    from system.inference import OffloadEngine, Sampler, SamplingConfig

    with OffloadEngine(ckpt, device=device, max_batch_size=1, max_seq_len=len(prompt) + new_tokens, **kw) as eng:
        sampler = Sampler(SamplingConfig(), device=eng.device)
        eng.generate_ids([prompt], 2, sampler, batch_size=1)  # warm-up: kernels, allocator, first loads
        _, stats = eng.generate_ids([prompt], new_tokens, sampler, batch_size=1)
        facts = {"plan": eng.plan.describe(), "measured_copy_bandwidth": eng.measured_bandwidth,
                 "section_bytes": [s.nbytes for s in eng.layout.sections]}
    return stats, facts


def worker_offload(args: argparse.Namespace) -> dict[str, Any]:
    """Ring-offload efficiency against the measured pinned host-to-device bandwidth (see the module docstring)."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    h2d = measure_h2d(device, (64 << 20) if args.smoke else (1 << 30))
    new_tokens, prompt = (6, list(range(5, 13))) if args.smoke else (16, list(range(5, 21)))
    with tempfile.TemporaryDirectory(prefix="gpu_check_offload_") as tmp:
        ckpt = Path(tmp) / "model"
        model_bytes = write_random_model(ckpt, args.smoke, device, dtype)
        budget = None if args.smoke else model_bytes // 2  # smoke: the plan's fixed workspaces exceed half
        resident, _ = _generate(ckpt, args.device, new_tokens, prompt, offload="none")
        ring, facts = _generate(ckpt, args.device, new_tokens, prompt, offload="ring", slots=2, device_memory=budget)
    per_pass = sum(facts["section_bytes"])  # K = 2 < N: every pass streams every section
    decode_steps = ring.forward_passes - 1
    streamed_per_s = per_pass * decode_steps / ring.decode_s if ring.decode_s > 0 else 0.0
    resident_step = resident.decode_s / max(resident.forward_passes - 1, 1)
    ring_step = ring.decode_s / max(decode_steps, 1)
    bound_step = max(per_pass / h2d["bytes_per_s"], resident_step)
    return {
        "h2d": h2d,
        "model_bytes": model_bytes, "device_budget_bytes": budget, "dtype": str(dtype),
        "ring": {"slots": 2, **facts, "stats": ring.as_dict(), "bytes_per_pass": per_pass,
                 "decode_step_s": ring_step, "streamed_bytes_per_s": streamed_per_s},
        "resident": {"stats": resident.as_dict(), "decode_step_s": resident_step},
        "eta": streamed_per_s / h2d["bytes_per_s"],
        "eta_copy": facts["measured_copy_bandwidth"] / h2d["bytes_per_s"],
        "eta_tokens": bound_step / ring_step if ring_step > 0 else 0.0,
        "definitions": {
            "eta": "bytes streamed per second of decoding (ring, K=2) / pinned H2D bytes/s",
            "eta_copy": "the CUDA transport's copy bandwidth (events on its copy stream) / pinned H2D bytes/s",
            "eta_tokens": "max(bytes per pass / H2D bytes/s, resident decode step) / ring decode step",
        },
    }


def _checkpoint_state(smoke: bool, device: torch.device) -> dict[str, torch.Tensor]:
    """768 MiB (smoke: 24 MiB) of training state on ``device``: fp32 and bf16 matrices."""
    gen = torch.Generator(device=device).manual_seed(0)
    n, rows = (2, 512) if smoke else (4, 8192)
    state = {}
    for i in range(n):  # n fp32 [rows, 4096] (128 MiB each) and n bf16 of the same shape (64 MiB)
        state[f"layer{i}.fp32"] = torch.randn(rows, 4096, generator=gen, device=device)
        state[f"layer{i}.bf16"] = torch.randn(rows, 4096, generator=gen, device=device).to(torch.bfloat16)
    return state


def _dcp_stager(pinned: bool):
    """A persistent ``DefaultStager`` staging into pinned memory with blocking copies (so that the call
    returns with the snapshot complete, as ours does), or ``None`` where this torch has none."""
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError:
        return None
    try:
        return DefaultStager(StagingOptions(use_pinned_memory=pinned, use_shared_memory=False,
                                            use_async_staging=False, use_non_blocking_copy=False))
    except TypeError:
        return None


def _dcp_async_save(state: dict[str, torch.Tensor], path: Path, stager) -> float:
    """``dcp.async_save`` on one process; returns the call's wall time after waiting for the commit."""
    import torch.distributed.checkpoint as dcp

    kw = {"async_stager": stager} if stager is not None else {}
    t0 = time.perf_counter()
    try:
        fut = dcp.async_save(state, checkpoint_id=str(path), no_dist=True, **kw)
    except TypeError:  # an older signature without no_dist: no process group means one process anyway
        t0 = time.perf_counter()
        fut = dcp.async_save(state, checkpoint_id=str(path), **kw)
    stall = time.perf_counter() - t0
    (fut.upload_completion if hasattr(fut, "upload_completion") else fut).result()
    return stall


def worker_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """Stall of an asynchronous save (see the module docstring): ours against DCP's ``async_save``."""
    from system.checkpoint import AsyncCheckpointer

    device = torch.device(args.device)
    state = _checkpoint_state(args.smoke, device)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    repeats = 2
    samples: dict[str, list[dict[str, float]]] = {"ours": [], "dcp": [], "dcp_pinned_stager": []}
    stager = _dcp_stager(pinned=device.type == "cuda")
    if stager is None:
        samples.pop("dcp_pinned_stager")
    with tempfile.TemporaryDirectory(prefix="gpu_check_ckpt_", dir=os.environ.get("GPU_CHECK_CKPT_DIR")) as tmp, \
            AsyncCheckpointer(no_dist=True) as ours:
        for r in range(repeats + 1):  # r = 0: warm-up (allocations, plans, first writes)
            for system in samples:
                path = Path(tmp) / f"{system}_{r}"
                _sync(device)
                t0 = time.perf_counter()
                if system == "ours":
                    handle = ours.save(state, path)
                    stall = time.perf_counter() - t0
                    handle.wait()
                else:
                    stall = _dcp_async_save(state, path, stager if system == "dcp_pinned_stager" else None)
                total = time.perf_counter() - t0
                shutil.rmtree(path, ignore_errors=True)
                if r:
                    samples[system].append({"stall_s": stall, "commit_s": total})
    if stager is not None:
        stager.close()
    summary = {name: {"stall_s": statistics.median(s["stall_s"] for s in ss),
                      "commit_s": statistics.median(s["commit_s"] for s in ss)} for name, ss in samples.items()}
    ratios = {f"{name}_stall_over_ours": summary[name]["stall_s"] / summary["ours"]["stall_s"]
              for name in summary if name != "ours" and summary["ours"]["stall_s"] > 0}
    return {"state_bytes": nbytes, "tensors": len(state), "repeats": repeats, "samples": samples, "summary": summary,
            "ratios": ratios, "staging_pinned": device.type == "cuda",
            "definitions": {"stall_s": "wall time of the save call: until the tensors may change again",
                            "commit_s": "from the call until the checkpoint is committed on disk"}}


def run_worker(args: argparse.Namespace) -> int:
    """``--worker NAME``: run it, write its JSON (``{"error": ...}`` on an exception)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        result = (worker_offload if args.worker == "offload" else worker_checkpoint)(args)
        rc = 0
    except Exception as e:  # noqa: BLE001 - recorded for the report
        traceback.print_exc()
        result, rc = {"error": f"{type(e).__name__}: {e}"}, 1
    Path(args.worker_out).write_text(json.dumps(result, indent=2, default=str))
    return rc


# ---------------------------------------------------------------------------------------------
# The report


def _versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _commit(args: argparse.Namespace) -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if sha.returncode == 0 and sha.stdout.strip():
            return sha.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return args.commit


def _device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda,
                            "python": platform.python_version(), "cpu_count": os.cpu_count()}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_bytes=props.total_memory,
                    count=torch.cuda.device_count())
    else:
        info.update(name=platform.processor() or platform.machine(), capability=None)
    return info


def _fmt(x: Any, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def render_markdown(result: dict[str, Any]) -> str:
    """The report: the header, one line per part, then each part's numbers."""
    dev, parts = result["device"], result["parts"]
    lines = [f"# GPU check ({result['config']['device']}{result['config']['tag']})", "",
             f"- Commit: `{result['commit']}`", f"- Command: `{result['command']}`",
             f"- Device: {dev.get('name')} (capability {dev.get('capability')}), torch {dev['torch']}, "
             f"CUDA {dev['cuda_runtime']}, Python {dev['python']}",
             "- Packages: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v),
             f"- Total: {result['total_seconds']:.0f} s", "",
             "| part | status | seconds | result |", "|---|---|---|---|"]
    for name, p in parts.items():
        lines.append(f"| {name} | {p['status']} | {_fmt(p.get('seconds'), '.0f')} | {_headline(name, p)} |")
    t = parts.get("tests", {})
    if t.get("tests"):
        lines += ["", "## tests", "", "| test | outcome | seconds | message |", "|---|---|---|---|"]
        lines += [f"| {c['name']} | {c['outcome']} | {c['seconds']:.1f} | {c['message'].replace('|', '/')} |"
                  for c in t["tests"]]
    m = parts.get("moe_layer", {})
    if m.get("systems"):
        lines += ["", "## moe_layer", "", f"config: {json.dumps(m.get('config'))}", "",
                  "| system | tokens/s (median) | step ms (median) | TFLOP/s | MFU | vs DeepSpeed (paired) |",
                  "|---|---|---|---|---|---|"]
        for name, s in m["systems"].items():
            ratio = (s.get("paired_ratio_vs_deepspeed") or {}).get("median")
            mfu = s.get("mfu")
            lines.append(f"| {name} | {_fmt((s.get('tokens_per_s') or {}).get('median'), ',.0f')} | "
                         f"{_fmt((s.get('step_ms') or {}).get('median'), '.1f')} | "
                         f"{_fmt(s.get('achieved_tflops_total'), '.1f')} | "
                         f"{_fmt(100 * mfu, '.1f') + '%' if mfu is not None else 'n/a'} | {_fmt(ratio, '.3f')} |")
    o = parts.get("offload", {})
    if "eta" in o:
        lines += ["", "## offload (ring, K = 2)", "",
                  f"- pinned H2D: {o['h2d']['bytes_per_s'] / 1e9:.1f} GB/s ({o['h2d']['method']})",
                  f"- model {o['model_bytes'] / 1e9:.2f} GB ({o['dtype']}), device budget "
                  f"{_fmt(o['device_budget_bytes'] and o['device_budget_bytes'] / 1e9, '.2f')} GB; "
                  f"plan: {o['ring']['plan']}",
                  f"- streamed {o['ring']['streamed_bytes_per_s'] / 1e9:.1f} GB/s while decoding: "
                  f"**eta = {o['eta']:.3f}**; transport copy bandwidth "
                  f"{o['ring']['measured_copy_bandwidth'] / 1e9:.1f} GB/s (eta_copy {o['eta_copy']:.3f})",
                  f"- decode step: ring {1e3 * o['ring']['decode_step_s']:.1f} ms, resident "
                  f"{1e3 * o['resident']['decode_step_s']:.1f} ms; eta_tokens {o['eta_tokens']:.3f}"]
    c = parts.get("checkpoint", {})
    if "summary" in c:
        lines += ["", f"## checkpoint ({c['state_bytes'] / 2**30:.2f} GiB of {c['tensors']} tensors, median of "
                  f"{c['repeats']} saves)", "", "| system | stall s | commit s |", "|---|---|---|"]
        lines += [f"| {name} | {s['stall_s']:.3f} | {s['commit_s']:.2f} |" for name, s in c["summary"].items()]
    for name, p in parts.items():
        if p["status"] not in ("passed", "skipped") and p.get("tail"):
            lines += ["", f"## {name}: last output lines", "", "```", *p["tail"][-20:], "```"]
    return "\n".join(lines) + "\n"


def _headline(name: str, p: dict[str, Any]) -> str:
    if p.get("error"):
        return p["error"][:200].replace("|", "/")
    if name == "tests" and "counts" in p:
        return ", ".join(f"{v} {k}" for k, v in p["counts"].items() if v)
    if name == "moe_layer" and p.get("systems"):
        parts = []
        for sys_name, s in p["systems"].items():
            tps, mfu = (s.get("tokens_per_s") or {}).get("median"), s.get("mfu")
            parts.append(f"{sys_name} {_fmt(tps, ',.0f')} tok/s" + (f" MFU {100 * mfu:.1f}%" if mfu else ""))
        return "; ".join(parts)
    if name == "offload" and "eta" in p:
        return f"eta {p['eta']:.3f} (H2D {p['h2d']['bytes_per_s'] / 1e9:.1f} GB/s)"
    if name == "checkpoint" and "summary" in p:
        return "; ".join(f"{k} stall {s['stall_s']:.3f} s" for k, s in p["summary"].items())
    return ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    parts: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp_name:
        tmp = Path(tmp_name)
        for name in args.part_list:
            left = args.budget - (time.perf_counter() - t_start)
            later = sum(min(LIMIT_S[n], 30) for n in args.part_list[args.part_list.index(name) + 1:])
            limit = min(LIMIT_S[name], left - later)
            if limit < 20:
                parts[name] = {"status": "no_time", "error": f"no time left ({left:.0f} s of the budget)"}
                continue
            logger.info("part %s: up to %.0f s", name, limit)
            t_part = time.perf_counter()
            try:
                if name == "tests":
                    parts[name] = part_tests(args, limit, tmp)
                elif name == "moe_layer":
                    parts[name] = part_moe_layer(args, limit, tmp, out_dir)
                else:
                    parts[name] = part_worker(args, name, limit, tmp)
            except Exception as e:  # noqa: BLE001 - one part's failure must not stop the others
                logger.exception("part %s", name)
                parts[name] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
            parts[name]["seconds"] = round(time.perf_counter() - t_part, 1)
            logger.info("part %s: %s (%.0f s)", name, parts[name]["status"], parts[name]["seconds"])
    result = {
        "benchmark": "gpu_check",
        "commit": _commit(args),
        "command": " ".join([Path(sys.executable).name] + [a if a and " " not in a else repr(a) for a in sys.argv]),
        "config": {"device": args.device, "tag": args.tag, "smoke": args.smoke, "parts": args.part_list,
                   "budget_s": args.budget, "limits_s": LIMIT_S, "moe_peers": args.moe_peers,
                   "moe_args": args.moe_args},
        "versions": _versions(),
        "device": _device_info(args.device),
        "total_seconds": time.perf_counter() - t_start,
        "parts": parts,
    }
    stem = f"gpu_check_{args.device}{args.tag}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out_dir / f"{stem}.md").write_text(render_markdown(result))
    print(render_markdown(result))
    logger.info("wrote %s/%s.json and .md", out_dir, stem)
    ok = ("passed", "partial") + (("skipped",) if args.device == "cpu" else ())
    return 0 if all(p["status"] in ok for p in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
