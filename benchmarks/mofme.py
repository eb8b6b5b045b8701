"""MoFME (feature-modulated experts + uncertainty-aware router) vs a conventional FFN-expert MoE.

The paper (Zhang et al., AAAI'24, arXiv 2312.16610) reports that MoFME has over 72% fewer parameters
and 39% less inference time than a conventional MoE of the same shape, at similar quality. This
script measures those figures on our decoder, for E in {8, 16, 32} experts (``--experts``):

- ``moe``: :class:`~system.models.model.MoETransformer` with ``moe.expert_type = "ffn"`` (E SwiGLU
  experts of hidden ``--expert-dim``) and the plain top-k router;
- ``mofme``: the same model with ``moe.expert_type = "fme"`` (one shared SwiGLU block of hidden
  ``--expert-dim`` per MoE layer, E feature modulations; ``--fme-modulation``) and
  ``moe.router = "uncertainty"`` (``--fme-router topk`` for the plain router).

Same E, top-k, width, hidden size, layers, data, seed, optimiser and number of steps. Measured per E:

- MoE-layer parameters: every parameter of the MoE layers (router, experts, FME shared block);
- inference: forward tokens/s of the whole model (``eval()``, ``inference_mode``) on a fixed batch of
  real validation text, and the forward time of the MoE layers alone on their real inputs (captured
  from that batch), medians of ``--infer-repeats`` interleaved repeats;
- training tokens/s (forward, backward, clipping, AdamW; the first step excluded as warm-up);
- validation loss (cross-entropy, nats/token, ``--eval-batches`` fixed batches) after ``--steps``
  steps, on the default corpus of :mod:`system.data` (the standard library's sources) and on
  ``../shared/data/tinyshakespeare.txt`` (skipped, with a message, when absent).

Goals (met / not met in the results): MoE-layer parameters >= 72% fewer, whole-model inference time
>= 39% less, validation loss within 3% of the conventional MoE.

Usage (from the repository root)::

    python benchmarks/mofme.py                 # CPU default (d=256, 4 layers, f=4d=1024, 300 steps; long)
    python benchmarks/mofme.py --smoke         # tiny model, 4 steps: end-to-end check (< 1 min)
    python benchmarks/mofme.py --experts 8 --corpora stdlib --steps 100

Writes ``<out>/mofme_<device><tag>.json`` and ``.md`` (``--smoke`` adds the tag ``_smoke``). The
CUDA path (bf16 autocast, synchronised timing) is written but was not run on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
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
    Stopwatch, fill_defaults, host_info, markdown_table, package_versions, setup_logging, summarize, write_json, write_text,
)

logger = logging.getLogger("benchmarks.mofme")

SYSTEMS = ("moe", "mofme")
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
GOAL_PARAMS = 0.72  # MoE-layer parameters: at least 72% fewer
GOAL_INFER = 0.39  # whole-model inference time: at least 39% less
GOAL_LOSS = 0.03  # validation loss: within 3%

CPU_DEFAULTS = dict(dim=256, layers=4, heads=4, expert_dim=1024, seq_len=256, batch_size=8, steps=300,
                    warmup_steps=30, eval_batches=8, infer_repeats=5)
SMOKE_DEFAULTS = dict(dim=32, layers=2, heads=2, expert_dim=32, seq_len=32, batch_size=2, steps=4,
                      warmup_steps=1, eval_batches=2, infer_repeats=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; smoke-dependent defaults are filled in afterwards."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps (end-to-end check)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--experts", default="8,16,32", help="comma list of E (default 8,16,32)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--corpora", default="stdlib,tinyshakespeare",
                   help="comma list from stdlib (the default corpus) and tinyshakespeare")
    for name, typ in (("dim", int), ("layers", int), ("heads", int), ("expert-dim", int), ("seq-len", int),
                      ("batch-size", int), ("steps", int), ("warmup-steps", int), ("eval-batches", int),
                      ("infer-repeats", int)):
        p.add_argument(f"--{name}", type=typ, default=None)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--fme-modulation", default="vector", choices=["vector", "lowrank"])
    p.add_argument("--fme-rank", type=int, default=8)
    p.add_argument("--fme-router", default="uncertainty", choices=["uncertainty", "topk"])
    p.add_argument("--router-dropout", type=float, default=0.1)
    p.add_argument("--router-passes", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default=None, help="suffix of the result files (default '' or '_smoke')")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    fill_defaults(args, SMOKE_DEFAULTS if args.smoke else CPU_DEFAULTS)
    if args.tag is None:
        args.tag = "_smoke" if args.smoke else ""
    args.expert_list = [int(e) for e in args.experts.split(",") if e.strip()]
    args.corpus_list = [c.strip() for c in args.corpora.split(",") if c.strip()]
    errors = [f"unknown corpus {c!r} (stdlib, tinyshakespeare)" for c in args.corpus_list
              if c not in ("stdlib", "tinyshakespeare")]
    if any(not 1 <= args.top_k <= e for e in args.expert_list):
        errors.append(f"--top-k {args.top_k} must be in [1, E] for every E in {args.expert_list}")
    if args.dim % args.heads:
        errors.append(f"--dim {args.dim} must divide by --heads {args.heads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        errors.append("--device cuda but torch.cuda.is_available() is False")
    if errors:
        raise SystemExit("mofme benchmark: " + "; ".join(errors))
    return args


# --------------------------------------------------------------------------------------------
# models and data


def build_model(args: argparse.Namespace, num_experts: int, system: str, vocab: int, device: torch.device):
    """The ``system`` model for E = ``num_experts``, initialised with ``--seed`` (same for both systems)."""
    from system.config import ModelConfig, MoEConfig
    from system.models.model import MoETransformer

    model_cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, ffn_dim=args.expert_dim,
                            vocab_size=vocab, max_seq_len=args.seq_len, tie_embeddings=True)
    fme = system == "mofme"
    moe_cfg = MoEConfig(num_experts=num_experts, top_k=args.top_k, expert_dim=args.expert_dim,
                        expert_type="fme" if fme else "ffn", fme_modulation=args.fme_modulation,
                        fme_rank=args.fme_rank, router=args.fme_router if fme else "topk",
                        router_dropout=args.router_dropout, router_passes=args.router_passes)
    model_cfg.validate()
    moe_cfg.validate()
    model = MoETransformer(model_cfg, moe_cfg)
    model.init_weights(seed=args.seed)
    return model.to(device)


def load_tokens(corpus: str) -> tuple[np.ndarray, np.ndarray, int, str]:
    """``(train tokens, val tokens, vocab size, description)`` of ``corpus`` with the byte tokenizer."""
    from system.data import build_tokenizer, load_corpus, tokenize_docs

    path = "" if corpus == "stdlib" else str(SHAKESPEARE)
    data = load_corpus(path)
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


def train(model, train_tokens: np.ndarray, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """``--steps`` training steps; returns losses, tokens/s (first step excluded) and seconds."""
    from system.config import TrainingConfig
    from system.data import PackedLoader
    from system.train.optim import build_lr_scheduler, build_optimizer

    tcfg = TrainingConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                          warmup_steps=args.warmup_steps)
    opt, loader = build_optimizer(model, tcfg), PackedLoader(train_tokens, seq_len=args.seq_len,
                                                               batch_size=args.batch_size, seed=args.seed)
    sched = build_lr_scheduler(opt, tcfg)
    model.train()
    losses, seconds = [], []
    for _ in range(args.steps):
        x, y = (t.to(device) for t in loader.next_batch())
        with Stopwatch(_sync(device)) as sw:
            with _autocast(device):
                logits = model(x)
            ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            (ce + model.aux_loss()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        losses.append(ce.item())
        seconds.append(sw.seconds)
    timed = seconds[1:] or seconds
    tokens = args.batch_size * args.seq_len
    return {"losses": losses, "tokens_per_s": tokens * len(timed) / sum(timed), "seconds": sum(seconds),
            "step_s": summarize(timed)}


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


@torch.inference_mode()
def time_inference(models: dict[str, Any], batch: torch.Tensor, args: argparse.Namespace,
                   device: torch.device) -> dict[str, dict[str, Any]]:
    """Interleaved repeats of the whole-model forward and of the MoE layers alone on their real inputs."""
    sync = _sync(device)
    inputs: dict[str, list[torch.Tensor]] = {}
    for name, model in models.items():
        model.eval()
        captured = []
        hooks = [layer.register_forward_pre_hook(lambda m, a, c=captured: c.append(a[0].clone()))
                 for layer in model.moe_layers()]
        with _autocast(device):
            model(batch)  # warm-up, and the MoE layers' inputs
        for h in hooks:
            h.remove()
        inputs[name] = captured
    model_s: dict[str, list[float]] = {n: [] for n in models}
    layer_s: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(args.infer_repeats):
        for name, model in models.items():
            with Stopwatch(sync) as sw, _autocast(device):
                model(batch)
            model_s[name].append(sw.seconds)
            with Stopwatch(sync) as sw, _autocast(device):
                for layer, x in zip(model.moe_layers(), inputs[name]):
                    layer(x)
            layer_s[name].append(sw.seconds)
    tokens = batch.numel()
    return {n: {"forward_s": summarize(model_s[n]), "tokens_per_s": tokens / summarize(model_s[n])["median"],
                "moe_layers_forward_s": summarize(layer_s[n]), "samples_forward_s": model_s[n],
                "samples_moe_layers_s": layer_s[n]} for n in models}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All corpora x E x systems; returns the result dict (also the JSON)."""
    device = torch.device(args.device)
    result: dict[str, Any] = {"corpora": {}, "skipped": []}
    for corpus in args.corpus_list:
        if corpus == "tinyshakespeare" and not SHAKESPEARE.is_file():
            msg = f"tinyshakespeare skipped: {SHAKESPEARE} is absent"
            logger.warning(msg)
            result["skipped"].append(msg)
            continue
        train_tokens, val_tokens, vocab, desc = load_tokens(corpus)
        batch = torch.from_numpy(val_tokens[: args.batch_size * args.seq_len].astype(np.int64))
        batch = batch.view(args.batch_size, args.seq_len).to(device)
        per_e: dict[str, Any] = {}
        for e in args.expert_list:
            models, entry = {}, {}
            for system in SYSTEMS:
                model = build_model(args, e, system, vocab, device)
                total, active = model.num_params()
                t0 = time.perf_counter()
                tr = train(model, train_tokens, args, device)
                val = evaluate(model, val_tokens, args, device)
                entry[system] = {"moe_layer_params": moe_layer_params(model), "model_params": total,
                                 "active_params": active, "train": tr, "val_loss": val}
                logger.info("%s E=%d %s: %d MoE-layer params, train %.0f tok/s, val loss %.4f (%.0f s)",
                            corpus, e, system, entry[system]["moe_layer_params"], tr["tokens_per_s"], val,
                            time.perf_counter() - t0)
                models[system] = model
            for system, inf in time_inference(models, batch, args, device).items():
                entry[system]["inference"] = inf
            entry["comparison"] = compare(entry)
            per_e[str(e)] = entry
            del models
            gc.collect()
        result["corpora"][corpus] = {"description": desc, "experts": per_e}
    result["goals"] = goals(result)
    return result


def compare(entry: dict[str, Any]) -> dict[str, float]:
    """MoFME relative to the conventional MoE for one (corpus, E)."""
    moe, fme = entry["moe"], entry["mofme"]
    return {
        "moe_layer_param_reduction": 1 - fme["moe_layer_params"] / moe["moe_layer_params"],
        "inference_time_reduction": 1 - (fme["inference"]["forward_s"]["median"]
                                         / moe["inference"]["forward_s"]["median"]),
        "moe_layer_time_reduction": 1 - (fme["inference"]["moe_layers_forward_s"]["median"]
                                         / moe["inference"]["moe_layers_forward_s"]["median"]),
        "train_speedup": fme["train"]["tokens_per_s"] / moe["train"]["tokens_per_s"],
        "val_loss_rel_diff": fme["val_loss"] / moe["val_loss"] - 1,
    }


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (corpus, E, goal) with the measured value and met / not met."""
    rows = []
    for corpus, c in result["corpora"].items():
        for e, entry in c["experts"].items():
            cmp = entry["comparison"]
            for goal, value, target, met in (
                ("MoE-layer params >= 72% fewer", cmp["moe_layer_param_reduction"], GOAL_PARAMS,
                 cmp["moe_layer_param_reduction"] >= GOAL_PARAMS),
                ("inference time >= 39% less", cmp["inference_time_reduction"], GOAL_INFER,
                 cmp["inference_time_reduction"] >= GOAL_INFER),
                ("val loss within 3%", cmp["val_loss_rel_diff"], GOAL_LOSS, cmp["val_loss_rel_diff"] <= GOAL_LOSS),
            ):
                rows.append({"corpus": corpus, "experts": int(e), "goal": goal, "value": value, "target": target,
                             "met": bool(met)})
    return rows


# --------------------------------------------------------------------------------------------
# output


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _measured(goal: dict[str, Any]) -> str:
    if goal["goal"].startswith("val loss"):
        return f"{_pct(goal['value'])} (MoFME vs MoE)"
    return f"{100 * goal['value']:.1f}% {'fewer' if 'params' in goal['goal'] else 'less'}"


def render_markdown(args: argparse.Namespace, result: dict[str, Any]) -> str:
    """The results as markdown: configuration, one table per corpus, the goals."""
    cfg = result["config"]
    lines = [f"# MoFME vs conventional MoE ({cfg['device']}{args.tag})", "",
             f"{result['date']}. d={cfg['dim']}, {cfg['layers']} layers (all MoE), {cfg['heads']} heads, hidden "
             f"f={cfg['expert_dim']}, top-{cfg['top_k']}, seq {cfg['seq_len']}, batch {cfg['batch_size']}, "
             f"{cfg['steps']} steps (lr {cfg['lr']}, warmup {cfg['warmup_steps']}), byte tokenizer. MoFME: FME "
             f"'{cfg['fme_modulation']}' modulation, router '{cfg['fme_router']}' (dropout {cfg['router_dropout']}, "
             f"M={cfg['router_passes']}); conventional: SwiGLU experts, top-k router. Threads: {cfg['threads']}.", ""]
    for msg in result["skipped"]:
        lines += [f"*{msg}*", ""]
    for corpus, c in result["corpora"].items():
        lines += [f"## {corpus}", "", c["description"], ""]
        rows = []
        for e, entry in c["experts"].items():
            for system in SYSTEMS:
                s = entry[system]
                rows.append([e, system, f"{s['moe_layer_params']:,}", f"{s['model_params']:,}",
                             f"{s['inference']['tokens_per_s']:.0f}",
                             f"{1e3 * s['inference']['moe_layers_forward_s']['median']:.2f}",
                             f"{s['train']['tokens_per_s']:.0f}", f"{s['val_loss']:.4f}"])
            cmp = entry["comparison"]
            rows.append([e, "MoFME vs MoE", _pct(-cmp["moe_layer_param_reduction"]), "",
                         f"time {_pct(-cmp['inference_time_reduction'])}", f"{_pct(-cmp['moe_layer_time_reduction'])}",
                         f"x{cmp['train_speedup']:.2f}", _pct(cmp["val_loss_rel_diff"])])
        lines.append(markdown_table(["E", "system", "MoE-layer params", "model params", "inference tok/s",
                                     "MoE layers fwd ms", "train tok/s", "val loss (nats/tok)"], rows))
    lines += ["## Goals", ""]
    lines.append(markdown_table(["corpus", "E", "goal", "measured", "met"],
                                [[g["corpus"], g["experts"], g["goal"], _measured(g),
                                  "met" if g["met"] else "not met"] for g in result["goals"]]))
    lines += ["", "Inference: whole-model forward (eval, inference mode) on one batch of validation text, median of "
              f"{cfg['infer_repeats']} interleaved repeats; 'MoE layers fwd' times the MoE layers alone on their "
              "captured inputs. Train tok/s excludes the first step. Parameter reduction counts every parameter "
              "of the MoE layers (router, experts, FME shared block)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(level=getattr(logging, args.log_level.upper(), logging.INFO))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    result = run(args)
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("expert_list", "corpus_list")}
    result["config"]["threads"] = torch.get_num_threads()
    result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result["seconds"] = time.perf_counter() - t0
    result["host"] = host_info()
    result["packages"] = package_versions(["torch", "numpy"])
    out = Path(args.out)
    stem = f"mofme_{args.device}{args.tag}"
    write_json(out / f"{stem}.json", result)
    md = render_markdown(args, result)
    write_text(out / f"{stem}.md", md)
    print(md)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
