"""MoFME (feature-modulated experts + uncertainty-aware router) vs a conventional FFN-expert MoE.

The paper (Zhang et al., AAAI'24, arXiv 2312.16610) reports that MoFME has over 72% fewer parameters
and 39% less inference time than a conventional MoE of the same shape, at similar quality. This
script measures those three figures on our decoder, per E in ``--experts`` (default 8):

- ``moe``: :class:`~system.models.model.MoETransformer` with ``moe.expert_type = "ffn"`` (E SwiGLU
  experts of hidden ``--expert-dim``) and the plain top-k router;
- ``mofme``: the same model with ``moe.expert_type = "fme"`` (one shared SwiGLU block of hidden
  ``--expert-dim`` per MoE layer, E feature modulations; ``--fme-modulation``) and
  ``moe.router = "uncertainty"`` (``--fme-router topk`` for the plain router).

Same E, top-k, width, hidden size, layers, initialisation seed, optimiser, LR schedule, steps and
thread count (``--threads``, set explicitly). Per seed (``--seeds``, default 3) the two models are
trained interleaved: each step fetches one batch and runs :func:`system.train.step.train_step` (the
trainer's step: forward, backward, gradient sync, global-norm clipping, AdamW, scheduler) on both
models, the order of the two rotated every step, so both see the same data in the same order and
the same machine conditions. Measured per (corpus, E):

- MoE-layer parameters (router, experts, FME shared block): an exact count;
- inference: whole-model forward time (``eval()``, ``inference_mode``) on a fixed batch of validation
  text, and the MoE layers alone on their captured inputs, ``--infer-repeats`` repeats per seed with
  the order rotated per repeat;
- training tokens/s (the first ``--timing-warmup`` steps of each seed excluded);
- validation cross-entropy (nats/token, ``--eval-batches`` fixed batches) at ``--eval-points`` points of
  training, and the training-loss curve (its last-10% mean shows where it stands).

Goals, command-line thresholds: MoE-layer parameters at least ``--goal-param-reduction`` (0.72) fewer;
whole-model inference time at least ``--goal-infer-reduction`` (0.39) less, judged on the paired
per-repeat ratio MoFME/MoE <= 1 - goal with a bootstrap 95% interval; final validation loss within
``--goal-val-loss-rel`` (0.03) of the conventional MoE on either side, judged on the per-seed paired
ratio: "met" only when its whole interval lies in [1 - tol, 1 + tol] (:func:`benchmarks.common.band_goal`).

Usage (from the repository root)::

    python benchmarks/mofme.py                 # CPU default: E=8, tinyshakespeare, 3 seeds x 400 steps (~7 min)
    python benchmarks/mofme.py --smoke --out /tmp/x   # tiny model: end-to-end check (~15 s)
    python benchmarks/mofme.py --experts 8,16,32 --corpora stdlib,tinyshakespeare   # the full grid (long)

Writes ``<out>/mofme_<device><tag>.json`` and ``.md`` (``--smoke`` adds the tag ``_smoke``). The
CUDA path (bf16 autocast, synchronised timing) has not been run on a GPU.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    MET, NOT_MET, Stopwatch, band_goal, fill_defaults, markdown_table, paired_ratio_summary, provenance,
    provenance_markdown, ratio_goal, rotated, setup_logging, summarize, write_json, write_text,
)

logger = logging.getLogger("benchmarks.mofme")

SYSTEMS = ("moe", "mofme")
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

CPU_DEFAULTS = dict(dim=128, layers=2, heads=4, expert_dim=512, seq_len=128, batch_size=4, steps=400,
                    warmup_steps=30, eval_batches=16, eval_points=4, infer_repeats=5, seeds=3, timing_warmup=5)
SMOKE_DEFAULTS = dict(dim=32, layers=2, heads=2, expert_dim=32, seq_len=32, batch_size=2, steps=8,
                      warmup_steps=2, eval_batches=2, eval_points=2, infer_repeats=2, seeds=2, timing_warmup=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; smoke-dependent defaults are filled in afterwards."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps (end-to-end check)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--experts", default=None, help="comma list of E (default 8; smoke 4)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--corpora", default=None,
                   help="comma list from stdlib (the default corpus of system.data) and tinyshakespeare "
                        "(default: tinyshakespeare when ../shared/data/tinyshakespeare.txt exists, else stdlib)")
    for name, help_ in (("dim", "model width (128)"), ("layers", "layers, all MoE (2)"),
                        ("heads", "attention heads (4)"),
                        ("expert-dim", "expert hidden size f (512 = 4d)"), ("seq-len", "tokens per sequence (128)"),
                        ("batch-size", "sequences per step (4)"), ("steps", "training steps per system and seed (400)"),
                        ("warmup-steps", "LR warm-up steps (30)"), ("eval-batches", "validation batches (16)"),
                        ("eval-points", "validation loss measured at this many evenly spaced steps (4)"),
                        ("infer-repeats", "inference repeats per seed (5)"), ("seeds", "seeds, paired (3)"),
                        ("timing-warmup", "first steps of each seed excluded from train tokens/s (5)")):
        p.add_argument(f"--{name}", type=int, default=None, help=help_)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--fme-modulation", default="vector", choices=["vector", "lowrank"])
    p.add_argument("--fme-rank", type=int, default=8)
    p.add_argument("--fme-router", default="uncertainty", choices=["uncertainty", "topk"])
    p.add_argument("--router-dropout", type=float, default=0.1)
    p.add_argument("--router-passes", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads, the same for both systems (1)")
    p.add_argument("--goal-param-reduction", type=float, default=0.72, help="MoE-layer parameters: at least this fewer")
    p.add_argument("--goal-infer-reduction", type=float, default=0.39,
                   help="whole-model inference time: at least this less")
    p.add_argument("--goal-val-loss-rel", type=float, default=0.03,
                   help="final validation loss of MoFME within this relative distance of the MoE's, either side")
    p.add_argument("--seed", type=int, default=1234, help="first seed; seed i is --seed + i")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default=None, help="suffix of the result files (default '' or '_smoke')")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    fill_defaults(args, SMOKE_DEFAULTS if args.smoke else CPU_DEFAULTS)
    if args.tag is None:
        args.tag = "_smoke" if args.smoke else ""
    if args.experts is None:
        args.experts = "4" if args.smoke else "8"
    if args.corpora is None:
        args.corpora = "tinyshakespeare" if SHAKESPEARE.is_file() else "stdlib"
    args.expert_list = [int(e) for e in args.experts.split(",") if e.strip()]
    args.corpus_list = [c.strip() for c in args.corpora.split(",") if c.strip()]
    errors = [f"unknown corpus {c!r} (stdlib, tinyshakespeare)" for c in args.corpus_list
              if c not in ("stdlib", "tinyshakespeare")]
    if any(not 1 <= args.top_k <= e for e in args.expert_list):
        errors.append(f"--top-k {args.top_k} must be in [1, E] for every E in {args.expert_list}")
    if args.dim % args.heads:
        errors.append(f"--dim {args.dim} must divide by --heads {args.heads}")
    if args.seeds < 1 or args.steps < 2 or args.threads < 1 or args.eval_points < 1:
        errors.append("--seeds >= 1, --steps >= 2, --threads >= 1 and --eval-points >= 1 are required")
    if args.timing_warmup >= args.steps:
        errors.append(f"--timing-warmup {args.timing_warmup} must be below --steps {args.steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        errors.append("--device cuda but torch.cuda.is_available() is False")
    if errors:
        raise SystemExit("mofme benchmark: " + "; ".join(errors))
    return args


# --------------------------------------------------------------------------------------------
# models and data


def build_model(args: argparse.Namespace, num_experts: int, system: str, vocab: int, device: torch.device,
                seed: int, mesh):
    """The ``system`` model for E = ``num_experts``, initialised with ``seed``, parallelised as the trainer does."""
    from system.config import ModelConfig, MoEConfig
    from system.config.parallel import ParallelConfig
    from system.models.model import MoETransformer
    from system.models.parallelize import parallelize_model

    model_cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, ffn_dim=args.expert_dim,
                            vocab_size=vocab, max_seq_len=args.seq_len, tie_embeddings=True)
    fme = system == "mofme"
    moe_cfg = MoEConfig(num_experts=num_experts, top_k=args.top_k, expert_dim=args.expert_dim,
                        expert_type="fme" if fme else "ffn", fme_modulation=args.fme_modulation,
                        fme_rank=args.fme_rank, router=args.fme_router if fme else "topk",
                        router_dropout=args.router_dropout, router_passes=args.router_passes)
    model_cfg.validate()
    moe_cfg.validate()
    with torch.device(device):
        model = MoETransformer(model_cfg, moe_cfg)
    model.init_weights(seed=seed)
    parallelize_model(model, mesh, ParallelConfig())  # one rank: EP of degree 1, as the trainer on one process
    return model


def load_tokens(corpus: str) -> tuple[np.ndarray, np.ndarray, int, str]:
    """``(train tokens, val tokens, vocab size, description)`` of ``corpus`` with the byte tokenizer."""
    from system.data import build_tokenizer, load_corpus, tokenize_docs

    data = load_corpus("" if corpus == "stdlib" else str(SHAKESPEARE))
    tok = build_tokenizer("byte")
    vocab = -(-tok.vocab_size // 64) * 64
    return tokenize_docs(data.train_docs, tok), tokenize_docs(data.val_docs, tok), vocab, repr(data)


def moe_layer_params(model) -> int:
    """Parameters of all MoE layers (router, experts, FME shared block, shared experts)."""
    return sum(p.numel() for layer in model.moe_layers() for p in layer.parameters())


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else None


# --------------------------------------------------------------------------------------------
# measurements


@torch.inference_mode()
def evaluate(model, val_tokens: np.ndarray, args: argparse.Namespace, device: torch.device) -> float:
    """Mean validation cross-entropy (nats/token) over ``--eval-batches`` fixed batches."""
    from system.data import PackedLoader

    model.eval()
    loader = PackedLoader(val_tokens, seq_len=args.seq_len, batch_size=args.batch_size, shuffle=False)
    total = 0.0
    for _ in range(args.eval_batches):
        x, y = (t.to(device) for t in loader.next_batch())
        with _autocast(device):
            logits = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item()
    return total / args.eval_batches


def train_pair(models: dict[str, Any], train_tokens: np.ndarray, val_tokens: np.ndarray, args: argparse.Namespace,
               device: torch.device, seed: int, mesh) -> dict[str, dict[str, Any]]:
    """Train both models ``--steps`` steps, interleaved: per step one batch, both models, order rotated per step.

    Returns per system: training losses, per-step seconds, and validation loss at the ``--eval-points``.
    """
    from system.config import TrainingConfig
    from system.data import PackedLoader
    from system.train.optim import build_lr_scheduler, build_optimizer
    from system.train.step import train_step

    tcfg = TrainingConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                          warmup_steps=args.warmup_steps)
    opts = {n: build_optimizer(m, tcfg) for n, m in models.items()}
    scheds = {n: build_lr_scheduler(opts[n], tcfg) for n in models}
    loader = PackedLoader(train_tokens, seq_len=args.seq_len, batch_size=args.batch_size, seed=seed)
    amp = torch.bfloat16 if device.type == "cuda" else None
    eval_at = sorted({round(args.steps * (i + 1) / args.eval_points) for i in range(args.eval_points)})
    out = {n: {"losses": [], "step_s": [], "val_at_step": {}} for n in models}
    torch.manual_seed(seed)  # the uncertainty router's dropout draws from the global generator
    for step in range(args.steps):
        batch = [tuple(t.to(device) for t in loader.next_batch())]  # the same batch for both systems
        for name in rotated(SYSTEMS, step):
            with Stopwatch(_sync(device)) as sw:
                st = train_step(models[name], opts[name], scheds[name], batch, mesh=mesh,
                                max_grad_norm=tcfg.max_grad_norm, autocast_dtype=amp)
            out[name]["losses"].append(st.loss)
            out[name]["step_s"].append(sw.seconds)
        if step + 1 in eval_at:
            for name in rotated(SYSTEMS, step):
                out[name]["val_at_step"][step + 1] = evaluate(models[name], val_tokens, args, device)
            logger.info("seed %d step %d: val loss %s", seed, step + 1,
                        ", ".join(f"{n} {out[n]['val_at_step'][step + 1]:.4f}" for n in SYSTEMS))
    return out


@torch.inference_mode()
def time_inference(models: dict[str, Any], batch: torch.Tensor, args: argparse.Namespace,
                   device: torch.device) -> dict[str, dict[str, list[float]]]:
    """Repeats (order rotated per repeat) of the whole-model forward and of the MoE layers alone on their inputs."""
    sync = _sync(device)
    inputs: dict[str, list[torch.Tensor]] = {}
    for name, model in models.items():
        model.eval()
        captured: list[torch.Tensor] = []
        hooks = [layer.register_forward_pre_hook(lambda m, a, c=captured: c.append(a[0].clone()))
                 for layer in model.moe_layers()]
        with _autocast(device):
            model(batch)  # warm-up, and the MoE layers' inputs
        for h in hooks:
            h.remove()
        inputs[name] = captured
    out = {n: {"forward_s": [], "moe_layers_s": []} for n in models}
    for r in range(args.infer_repeats):
        for name in rotated(SYSTEMS, r):
            model = models[name]
            with Stopwatch(sync) as sw, _autocast(device):
                model(batch)
            out[name]["forward_s"].append(sw.seconds)
            with Stopwatch(sync) as sw, _autocast(device):
                for layer, x in zip(model.moe_layers(), inputs[name]):
                    layer(x)
            out[name]["moe_layers_s"].append(sw.seconds)
    return out


def tail(losses: list[float]) -> dict[str, float]:
    """Mean training loss over the last 10% of steps and over the 10% before, and their relative change."""
    n = max(len(losses) // 10, 1)
    last, prev = float(np.mean(losses[-n:])), float(np.mean(losses[-2 * n:-n] or losses[-n:]))
    return {"last_10pct_mean": last, "previous_10pct_mean": prev, "relative_change": last / prev - 1}


def run_one(args: argparse.Namespace, corpus: tuple, e: int, device: torch.device, mesh) -> dict[str, Any]:
    """All seeds of one (corpus, E): interleaved training, validation, inference; then the comparison."""
    train_tokens, val_tokens, vocab, _ = corpus
    batch = torch.from_numpy(val_tokens[: args.batch_size * args.seq_len].astype(np.int64))
    batch = batch.view(args.batch_size, args.seq_len).to(device)
    seeds = []
    for i in range(args.seeds):
        seed = args.seed + i
        t0 = time.perf_counter()
        models = {s: build_model(args, e, s, vocab, device, seed, mesh) for s in SYSTEMS}
        trained = train_pair(models, train_tokens, val_tokens, args, device, seed, mesh)
        inference = time_inference(models, batch, args, device)
        entry: dict[str, Any] = {"seed": seed}
        for s in SYSTEMS:
            tr = trained[s]
            total, active = models[s].num_params()
            timed = tr["step_s"][args.timing_warmup:]
            entry[s] = {"moe_layer_params": moe_layer_params(models[s]), "model_params": total, "active_params": active,
                        "val_loss": tr["val_at_step"][args.steps], "val_loss_at_step": tr["val_at_step"],
                        "train_tokens_per_s": args.batch_size * args.seq_len * len(timed) / sum(timed),
                        "train_loss_tail": tail(tr["losses"]), "train_losses": tr["losses"],
                        "train_step_s": tr["step_s"],
                        "inference": inference[s]}
        seeds.append(entry)
        logger.info("E=%d seed %d: val loss moe %.4f, mofme %.4f (%.0f s)", e, seed, entry["moe"]["val_loss"],
                    entry["mofme"]["val_loss"], time.perf_counter() - t0)
        del models
    return {"seeds": seeds, "comparison": compare(args, seeds)}


def compare(args: argparse.Namespace, seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """The goals of record and the informational ratios for one (corpus, E), paired over seeds and repeats."""
    def pooled(system: str, key: str) -> list[float]:
        return [v for s in seeds for v in s[system]["inference"][key]]

    def steps(system: str) -> list[float]:
        return [v for s in seeds for v in s[system]["train_step_s"][args.timing_warmup:]]

    moe_params, fme_params = seeds[0]["moe"]["moe_layer_params"], seeds[0]["mofme"]["moe_layer_params"]
    reduction = 1 - fme_params / moe_params
    params_goal = {"name": "MoE-layer parameters: 1 - MoFME/MoE", "goal": args.goal_param_reduction,
                   "direction": ">=", "value": reduction,
                   "verdict": MET if reduction >= args.goal_param_reduction else NOT_MET,
                   "note": "an exact count: no interval"}
    infer = ratio_goal("whole-model inference time MoFME/MoE", pooled("mofme", "forward_s"), pooled("moe", "forward_s"),
                       1 - args.goal_infer_reduction, higher_is_better=False)
    val = band_goal("final validation loss MoFME/MoE", [s["mofme"]["val_loss"] for s in seeds],
                    [s["moe"]["val_loss"] for s in seeds], args.goal_val_loss_rel)
    return {
        "goals": [params_goal, infer, val],
        "moe_layers_time_ratio": paired_ratio_summary(pooled("mofme", "moe_layers_s"), pooled("moe", "moe_layers_s")),
        "train_step_time_ratio": paired_ratio_summary(steps("mofme"), steps("moe")),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All corpora x E; returns the result dict (also the JSON)."""
    from system.distributed import ParallelDims
    from system.distributed.init import init_distributed, shutdown_distributed

    device = torch.device(args.device)
    init_distributed(device)  # a one-rank group, as the trainer makes under plain python
    mesh = ParallelDims.from_config(1, 1, 1).build_mesh(device.type)
    result: dict[str, Any] = {"corpora": {}, "skipped": []}
    for corpus in args.corpus_list:
        if corpus == "tinyshakespeare" and not SHAKESPEARE.is_file():
            msg = f"tinyshakespeare skipped: {SHAKESPEARE} is absent"
            logger.warning(msg)
            result["skipped"].append(msg)
            continue
        data = load_tokens(corpus)
        result["corpora"][corpus] = {"description": data[3], "experts": {
            str(e): run_one(args, data, e, device, mesh) for e in args.expert_list}}
    shutdown_distributed()
    return result


# --------------------------------------------------------------------------------------------
# output


def _f(x: float, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render_markdown(args: argparse.Namespace, result: dict[str, Any]) -> str:
    """The results as markdown: provenance, configuration, per (corpus, E) the systems, goals and loss curves."""
    cfg = result["config"]
    lines = [f"# MoFME vs conventional MoE ({cfg['device']}{args.tag})", "", provenance_markdown(result["provenance"]),
             f"d={cfg['dim']}, {cfg['layers']} layers (all MoE), {cfg['heads']} heads, hidden f={cfg['expert_dim']}, "
             f"top-{cfg['top_k']}, seq {cfg['seq_len']}, batch {cfg['batch_size']}, {cfg['steps']} steps per system and "
             f"seed (lr {cfg['lr']}, {cfg['warmup_steps']} warm-up, cosine), {cfg['seeds']} seeds, byte tokenizer, "
             f"{cfg['threads']} thread(s). MoFME: FME '{cfg['fme_modulation']}' modulation, router '{cfg['fme_router']}' "
             f"(dropout {cfg['router_dropout']}, M={cfg['router_passes']}); conventional: SwiGLU experts, top-k router. "
             "Both trained interleaved (one batch per step for both, order rotated per step) with the trainer's "
             "train_step.", ""]
    lines += [f"*{msg}*\n" for msg in result["skipped"]]
    for corpus, c in result["corpora"].items():
        lines += [f"## {corpus}", "", c["description"], ""]
        for e, entry in c["experts"].items():
            seeds = entry["seeds"]
            rows = []
            for s in SYSTEMS:
                first = seeds[0][s]
                val = [x[s]["val_loss"] for x in seeds]
                tl = [x[s]["train_loss_tail"] for x in seeds]
                rows.append([s, f"{first['moe_layer_params']:,}", f"{first['model_params']:,}",
                             _f(summarize([x[s]["train_tokens_per_s"] for x in seeds])["median"], ".0f"),
                             ", ".join(f"{v:.4f}" for v in val),
                             ", ".join(f"{t['last_10pct_mean']:.3f} ({100 * t['relative_change']:+.1f}%)" for t in tl)])
            lines += [f"### E = {e}", "", markdown_table(
                ["system", "MoE-layer params", "model params", "train tok/s (median over seeds)",
                 "final val loss per seed", "train loss, last 10% of steps (change vs the 10% before) per seed"], rows)]
            curve = []
            for step in seeds[0]["moe"]["val_loss_at_step"]:
                curve.append([str(step)] + [", ".join(f"{x[s]['val_loss_at_step'][step]:.4f}" for x in seeds)
                                            for s in SYSTEMS])
            lines += ["Validation loss during training (per seed):", "",
                      markdown_table(["step", "moe", "mofme"], curve)]
            cmp = entry["comparison"]
            goal_rows = []
            for g in cmp["goals"]:
                if "value" in g:
                    goal_rows.append([g["name"], f">= {g['goal']:g}", f"{g['value']:.3f}", "(exact)", g["verdict"]])
                else:
                    goal = f"in [{g['goal'][0]:g}, {g['goal'][1]:g}]" if g["direction"] == "within" else \
                        f"{g['direction']} {g['goal']:g}"
                    goal_rows.append([g["name"], goal, _f(g["median"]), f"[{_f(g['ci_low'])}, {_f(g['ci_high'])}]",
                                      g["verdict"]])
            lines += ["Goals (paired ratios: median and bootstrap 95% interval; 'met' only when the whole interval "
                      "clears the goal):", "", markdown_table(["quantity", "goal", "median", "95% interval", "verdict"],
                                                              goal_rows)]
            lines += [f"- {g['name']}: {g['note']}" for g in cmp["goals"] if g.get("note") and "value" not in g]
            ml, ts = cmp["moe_layers_time_ratio"], cmp["train_step_time_ratio"]
            lines += [f"- MoE layers alone, forward time MoFME/MoE: {_f(ml['median'])} "
                      f"[{_f(ml['ci_low'])}, {_f(ml['ci_high'])}] ({ml['n']} paired repeats); training step time "
                      f"MoFME/MoE: {_f(ts['median'])} [{_f(ts['ci_low'])}, {_f(ts['ci_high'])}] ({ts['n']} paired steps).",
                      ""]
    lines += ["Inference: whole-model forward (eval, inference mode) on one batch of validation text, "
              f"{cfg['infer_repeats']} repeats per seed, order rotated per repeat; the ratio pairs the two systems "
              "within a repeat. Parameter reduction counts every parameter of the MoE layers (router, experts, FME "
              "shared block). Validation loss: the final value of each seed, paired by seed (same initialisation "
              "seed and data order for both systems); tolerance two-sided."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(level=getattr(logging, args.log_level.upper(), logging.INFO))
    torch.set_num_threads(args.threads)  # explicit and recorded: the same for both systems
    t0 = time.perf_counter()
    result = run(args)
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("expert_list", "corpus_list")}
    result["config"]["torch_threads"] = torch.get_num_threads()
    result["provenance"] = provenance()
    result["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    stem = f"mofme_{args.device}{args.tag}"
    write_json(out / f"{stem}.json", result)
    md = render_markdown(args, result)
    write_text(out / f"{stem}.md", md)
    print(md)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
