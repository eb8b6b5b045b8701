"""Shared helpers for the side-by-side benchmarks in ``benchmarks/``.

Everything here is plain measurement plumbing, with no knowledge of any particular benchmark:

- statistics over timing samples (:func:`median`, :func:`summarize`, :func:`paired_ratio_summary`) and
  the verdicts of record (:func:`verdict`, :func:`ratio_goal`, :func:`efficiency_goal`);
- fairness between systems: the order rotated per repeat (:func:`rotated`) and an abort on a numerical
  disagreement (:func:`check_agreement`, :class:`NumericalDisagreement`);
- a wall-clock timer that synchronises an accelerator first (:class:`Stopwatch`);
- process memory on Linux: current and peak resident set size, with a resettable peak
  (:func:`reset_peak_rss`, :func:`peak_rss_bytes`, :func:`current_rss_bytes`);
- provenance: host description and package versions (:func:`host_info`, :func:`package_versions`), and the
  stamp every result file carries (:func:`provenance`: commit, command, versions, CRC implementation);
- writers for the ``benchmarks/results/`` files: JSON and markdown tables (:func:`write_json`,
  :func:`markdown_table`, :func:`write_text`);
- small launch helpers (:func:`free_port`, :func:`setup_logging`).

Benchmarks import this module as ``benchmarks.common`` (run them from the repository root, as
``python benchmarks/<name>.py`` or ``python -m benchmarks.<name>``).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
import random
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# statistics


def median(xs: Iterable[float]) -> float:
    """Median of ``xs`` (``nan`` when empty)."""
    values = list(xs)
    return statistics.median(values) if values else math.nan


def summarize(xs: Sequence[float]) -> dict[str, float]:
    """Summary of samples: ``n``, ``median``, ``mean``, ``min``, ``max``, ``stdev``, ``p25``, ``p75``.

    ``stdev`` is the sample standard deviation (0 for a single sample); ``p25``/``p75`` are the
    quartiles by linear interpolation.
    """
    values = sorted(float(x) for x in xs)
    if not values:
        return {"n": 0, "median": math.nan, "mean": math.nan, "min": math.nan, "max": math.nan,
                "stdev": math.nan, "p25": math.nan, "p75": math.nan}
    return {
        "n": len(values),
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "min": values[0],
        "max": values[-1],
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "p25": _quantile(values, 0.25),
        "p75": _quantile(values, 0.75),
    }


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted values."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def paired_ratio_summary(num: Sequence[float], den: Sequence[float], *, confidence: float = 0.95,
                         resamples: int = 10000, seed: int = 0) -> dict[str, Any]:
    """Median of the paired ratios ``num[i] / den[i]`` with a percentile-bootstrap interval.

    The pairs are resampled with replacement ``resamples`` times; the interval is the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled medians. With few
    pairs the interval can only take values among the ratios themselves (3 pairs: about their min and
    max), so read it as a spread, not a precise interval.

    Returns:
        ``{"ratios": [...], "median": m, "ci_low": lo, "ci_high": hi, "confidence": c, "n": n}``
        (``nan`` entries when there are no valid pairs; pairs with a zero or missing denominator are skipped).

    Raises:
        ValueError: ``num`` and ``den`` differ in length.
    """
    if len(num) != len(den):
        raise ValueError(f"paired samples differ in length: {len(num)} vs {len(den)}")
    ratios = [float(a) / float(b) for a, b in zip(num, den)
              if a is not None and b is not None and float(b) != 0.0 and not math.isnan(float(a) / float(b))]
    out: dict[str, Any] = {"ratios": ratios, "median": median(ratios), "ci_low": math.nan, "ci_high": math.nan,
                           "confidence": confidence, "n": len(ratios)}
    if ratios:
        rng = random.Random(seed)
        boots = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
        out["ci_low"] = _quantile(boots, (1 - confidence) / 2)
        out["ci_high"] = _quantile(boots, (1 + confidence) / 2)
    return out


MET = "met"
NOT_MET = "not met"
NOT_DISTINGUISHABLE = "not distinguishable"
MEASUREMENT_ERROR = "measurement error"


def verdict(ci_low: float, ci_high: float, goal: float, *, higher_is_better: bool = True) -> str:
    """The verdict of a goal on a quantity known through a confidence interval ``[ci_low, ci_high]``.

    ``"met"`` only when the whole interval clears ``goal``; ``"not met"`` when the whole interval misses it;
    ``"not distinguishable"`` when the interval straddles it (or is unknown: ``nan``).
    """
    if any(math.isnan(float(v)) for v in (ci_low, ci_high, goal)):
        return NOT_DISTINGUISHABLE
    lo, hi = min(ci_low, ci_high), max(ci_low, ci_high)
    if higher_is_better:
        return MET if lo >= goal else NOT_MET if hi < goal else NOT_DISTINGUISHABLE
    return MET if hi <= goal else NOT_MET if lo > goal else NOT_DISTINGUISHABLE


def ratio_goal(name: str, num: Sequence[float], den: Sequence[float], goal: float, *, higher_is_better: bool = True,
               seed: int = 0) -> dict[str, Any]:
    """A goal on the paired ratio ``num[i] / den[i]`` (e.g. ours/peer tokens/s), judged by :func:`verdict`.

    Returns:
        The :func:`paired_ratio_summary` fields plus ``name``, ``goal``, ``direction`` (``">="`` or ``"<="``),
        ``verdict``, and ``note``: for a straddling interval, its width against the distance from the
        goal (the repeats did not separate the effect from the noise).
    """
    r = paired_ratio_summary(num, den, seed=seed)
    r.update(name=name, goal=goal, direction=">=" if higher_is_better else "<=",
             verdict=verdict(r["ci_low"], r["ci_high"], goal, higher_is_better=higher_is_better), note="")
    if r["verdict"] == NOT_DISTINGUISHABLE and r["n"]:
        r["note"] = (f"95% interval [{r['ci_low']:.3f}, {r['ci_high']:.3f}] (width {r['ci_high'] - r['ci_low']:.3f}) "
                     f"straddles {goal:g}: too few repeats for this machine's noise to decide")
    return r


def efficiency_goal(name: str, achieved: Sequence[float], bound: Sequence[float], goal: float, *,
                    tolerance: float = 1.02, seed: int = 0) -> dict[str, Any]:
    """A goal on an efficiency ``achieved[i] / bound[i]`` (at most 1 by construction), e.g. eta of a ring.

    As :func:`ratio_goal` with ``>= goal``, except that an interval reaching above ``tolerance`` (1.02) is
    reported as ``"measurement error"``, never as met: the bound was measured too low (or the
    achieved value too high), so neither number can be trusted.
    """
    r = ratio_goal(name, achieved, bound, goal, seed=seed)
    if r["n"] and r["ci_high"] > tolerance:
        r["verdict"] = MEASUREMENT_ERROR
        r["note"] = (f"efficiency interval reaches {r['ci_high']:.3f} > {tolerance}: an efficiency cannot exceed 1, "
                     "so the bound or the measurement is wrong")
    return r


def rotated(names: Sequence[str], repeat: int) -> list[str]:
    """``names`` rotated by ``repeat`` places: the order systems run in repeat ``repeat``.

    Every system runs first (and last) equally often over ``len(names)`` repeats, so drift of the machine
    within a repeat (thermal, page cache, a neighbour's load) is not charged to one system.
    """
    k = repeat % max(len(names), 1)
    return list(names[k:]) + list(names[:k])


class NumericalDisagreement(RuntimeError):
    """Two systems computed different results on the same problem: their timings are not comparable."""


def check_agreement(what: str, values: dict[str, Any], *, rtol: float, atol: float = 0.0) -> dict[str, float]:
    """Abort when the systems' results differ: compare every system's value with the first one's.

    Args:
        what: what is compared (``"loss at step 1"``, ``"output"``), for the message.
        values: system name -> a float or tensor (all the same shape).
        rtol, atol: ``|a - b| <= atol + rtol * |b|`` elementwise.

    Returns:
        system name -> the maximum absolute difference from the first system (0 for the first).

    Raises:
        NumericalDisagreement: some system is outside the tolerance (the message names both systems,
            the worst difference and the tolerance).
    """
    import torch

    names = list(values)
    ref = torch.as_tensor(values[names[0]], dtype=torch.float64)
    out: dict[str, float] = {names[0]: 0.0}
    for name in names[1:]:
        v = torch.as_tensor(values[name], dtype=torch.float64)
        if v.shape != ref.shape:
            raise NumericalDisagreement(f"{what}: {name} has shape {tuple(v.shape)}, {names[0]} {tuple(ref.shape)}")
        diff = (v - ref).abs()
        out[name] = float(diff.max()) if diff.numel() else 0.0
        bad = ~(diff <= atol + rtol * ref.abs())
        if bool(bad.any()):
            raise NumericalDisagreement(
                f"{what}: {name} differs from {names[0]} by up to {out[name]:.3g} "
                f"(tolerance atol {atol:g} + rtol {rtol:g}); the systems do not compute the same thing, "
                "so their timings are not compared")
    return out


# --------------------------------------------------------------------------------------------
# timing


class Stopwatch:
    """Wall-clock timer around a block, synchronising an accelerator at both ends.

    Args:
        sync: called before reading the clock (e.g. ``torch.cuda.synchronize``), so queued device
            work is inside the measured interval; ``None`` on CPU.

    Example::

        with Stopwatch(sync) as sw:
            run()
        print(sw.seconds)
    """

    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync = sync
        self.seconds = math.nan
        self._t0 = 0.0

    def __enter__(self) -> "Stopwatch":
        if self.sync is not None:
            self.sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sync is not None:
            self.sync()
        self.seconds = time.perf_counter() - self._t0


# --------------------------------------------------------------------------------------------
# memory (Linux /proc; falls back to getrusage where /proc is missing)


def _proc_status_kib(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or ``None``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int | None:
    """Resident set size of this process now, in bytes (``None`` where unknown)."""
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS.

    Uses ``echo 5 > /proc/self/clear_refs`` (Linux >= 4.0). Returns ``False`` where that is not
    possible; :func:`peak_rss_bytes` then reports the peak since process start.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes, since start or the last :func:`reset_peak_rss`."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss if sys.platform == "darwin" else rss * 1024


def format_bytes(n: float | None) -> str:
    """Human-readable binary size (``"1.23 GiB"``); ``"n/a"`` for ``None``."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# provenance


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Installed distribution version for each name (``None`` when not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git(*args: str) -> str:
    import subprocess

    try:
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                              text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


PEER_PACKAGES = ("torch", "numpy", "deepspeed", "megatron-core", "accelerate", "transformers", "safetensors",
                 "isal", "ray", "moe-system")


def provenance(extra_packages: Iterable[str] = ()) -> dict[str, Any]:
    """The stamp of a result file: commit, command, package versions, CRC implementation, host.

    ``dirty`` is true when tracked files outside ``benchmarks/results/`` differ from the commit (the numbers
    then belong to no commit).
    ``command`` is this process's command line as run from the repository root.
    """
    from system.checkpoint.checksum import IMPLEMENTATION

    return {
        "commit": _git("rev-parse", "HEAD") or None,
        # result files written earlier in the same regeneration are not code: they do not make the tree dirty
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")),
        "command": " ".join(["python"] + [a if " " not in a else repr(a) for a in sys.argv]),
        "versions": package_versions(list(PEER_PACKAGES) + list(extra_packages)),
        "crc32_implementation": IMPLEMENTATION,
        "host": host_info(),
    }


def provenance_markdown(p: dict[str, Any]) -> str:
    """Markdown lines stating a :func:`provenance` stamp (for the head of a result's ``.md``)."""
    v = ", ".join(f"{k} {ver}" for k, ver in p["versions"].items() if ver)
    h = p["host"]
    return (f"- Commit: `{p['commit']}`" + (" (with uncommitted changes)" if p["dirty"] else "") + "\n"
            f"- Command: `{p['command']}`\n- Packages: {v}; CRC-32: {p['crc32_implementation']}\n"
            f"- Host: {h.get('cpu_model')}, {h.get('logical_cpus')} logical CPUs, torch {h.get('torch')}, "
            f"{h.get('timestamp_utc')}\n")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def host_info() -> dict[str, Any]:
    """Description of the machine and software: OS, CPU, cores, memory, Python, torch, GPUs.

    ``logical_cpus`` is the machine's CPU count; ``cpus_in_affinity`` those the calling process may
    use (smaller when a benchmark pinned its ranks).
    """
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        # CPUs the calling process may run on now (after any pinning of benchmark ranks).
        "cpus_in_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_bytes": _mem_total_bytes(),
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_num_threads"] = torch.get_num_threads()
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["cuda"] = torch.version.cuda
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:  # pragma: no cover - every benchmark needs torch
        pass
    return info


# --------------------------------------------------------------------------------------------
# writers


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (parent directories created; NaN written as ``null``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_nan_to_none(obj), indent=2, sort_keys=False) + "\n")
    return path


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table.

    Args:
        headers: column titles.
        rows: cells (converted with ``str``; ``None`` becomes ``"n/a"``).
        align: per column ``"l"``, ``"r"`` or ``"c"`` (default: left for the first column, right
            for the others).
    """
    if align is None:
        align = ["l"] + ["r"] * (len(headers) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    for row in rows:
        cells = ["n/a" if c is None else str(c).replace("|", "\\|") for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` (parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# launch


def fill_defaults(args: Any, defaults: dict[str, Any]) -> None:
    """Set each ``args.<key>`` still ``None`` (not given on the command line) to ``defaults[key]``.

    Benchmarks whose defaults depend on another option (``--smoke``, ``--device``) parse with
    ``default=None`` and call this with the table that option selects.
    """
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a single-host rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_logging(rank: int | None = None, level: int = logging.INFO) -> None:
    """Log to stderr with a timestamp and, in multi-process runs, the rank."""
    prefix = f"[rank{rank}] " if rank is not None else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


# --------------------------------------------------------------------------------------------
# two-sided goals


def band_goal(name: str, num: Sequence[float], den: Sequence[float], tolerance: float, *, seed: int = 0) -> dict[str, Any]:
    """A two-sided goal: the paired ratio ``num[i] / den[i]`` lies within ``[1 - tolerance, 1 + tolerance]``.

    For quality parity (e.g. validation loss of a variant over the baseline's, paired by seed). ``"met"``
    only when the whole bootstrap interval of the median ratio lies inside the band; ``"not met"`` when
    the whole interval lies outside it (on either side); ``"not distinguishable"`` otherwise, and always
    with fewer than two pairs (one pair has no spread, so its "interval" says nothing).

    Returns:
        The :func:`paired_ratio_summary` fields plus ``name``, ``goal`` (``[low, high]``), ``direction``
        (``"within"``), ``verdict`` and ``note``.
    """
    r = paired_ratio_summary(num, den, seed=seed)
    low, high = 1.0 - tolerance, 1.0 + tolerance
    lo, hi = r["ci_low"], r["ci_high"]
    if r["n"] < 2 or math.isnan(lo) or math.isnan(hi):
        v = NOT_DISTINGUISHABLE
    elif low <= lo and hi <= high:
        v = MET
    elif hi < low or lo > high:
        v = NOT_MET
    else:
        v = NOT_DISTINGUISHABLE
    r.update(name=name, goal=[low, high], direction="within", verdict=v, note="")
    if v == NOT_DISTINGUISHABLE and r["n"] == 1:
        r["note"] = "one pair: no interval, no verdict (use several seeds)"
    elif v == NOT_DISTINGUISHABLE and r["n"]:
        r["note"] = (f"95% interval [{lo:.3f}, {hi:.3f}] overlaps an edge of [{low:g}, {high:g}]: "
                     "too few seeds (or too much spread) to decide")
    return r
