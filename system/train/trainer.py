"""The training loop: data, model, parallelisms, optimizer, metrics, final save and summary.

One :class:`Trainer` per rank, launched by torchrun (``python -m system.train.main``). A step:
``grad_accum`` micro-batches of forward + backward (cross-entropy + MoE auxiliary losses), gradient
reduction (dense: averaged over all ranks, or FSDP2 reduce-scatter; experts: over their ``dp``
replicas), clipping to the global norm, AdamW, LR schedule, and with ``moe.load_balance = "bias"`` the
routers' selection-bias update from the step's expert loads (:func:`~system.moe.balance.update_expert_bias`).
With ``metrics.routing_trace`` rank 0 also appends each step's per-layer expert loads to
``<run_dir>/routing_trace.jsonl`` (:class:`~system.train.metrics.RoutingTrace`).

With ``parallel.pp > 1`` the model is split into pipeline stages (:func:`~system.parallel.pp.build_pipeline`,
each stage parallelised like a whole model); ``self.model`` is then this rank's stages under their
single-device names (:class:`~system.parallel.pp.PipelineParts`), which the optimizer, checkpoints and the
export take, and steps, evaluation and the sample run through the pipeline.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from system.checkpoint.manager import CheckpointManager
from system.checkpoint.model_io import load_model, save_model
from system.checkpoint.storage import read_latest, step_dir_name
from system.config.job import JobConfig
from system.config.loader import ConfigError, config_to_dict
from system.data import PackedLoader, build_tokenizer, byte_unigram_entropy, load_corpus, tokenize_docs
from system.distributed import ParallelDims, init_distributed, pick_device
from system.inference.generate import greedy_generate
from system.models.model import MoETransformer
from system.models.parallelize import parallelize_model
from system.parallel.pp import Pipeline, build_pipeline, check_microbatches, token_cross_entropy
from system.errors import DataError, RunFolderError
from system.train.lifecycle import Preempted, preempt_requested, stop_signal_name
from system.train.determinism import enable_deterministic_algorithms, set_moe_deterministic
from system.train.flops import flops_per_token, peak_flops
from system.train.metrics import MetricsLogger, RoutingTrace
from system.train.step import pipeline_train_step, train_step
from system.train.optim import build_lr_scheduler, build_optimizer
from system.train.preflight import check_resume_model, checkpoint_root, default_run_dir
from system.train.run_folder import RunLock, clear_earlier_run, earlier_run, earlier_run_error

logger = logging.getLogger(__name__)
LN2 = math.log(2.0)


@dataclass
class StepResult:
    """What one optimizer step measured (values averaged over ranks where noted)."""

    loss: float  # cross-entropy, nats/token, mean over ranks and micro-batches
    aux_loss: float  # load-balancing loss, mean over MoE layers
    z_loss: float  # router z-loss, mean over MoE layers
    grad_norm: float
    tokens_per_expert: list[torch.Tensor]  # per MoE layer, [E] global assignments
    drop_rate: float  # dropped / made assignments over all ranks
    seconds: float = 0.0  # this rank's wall time for the step
    expert_tokens: int = 0  # token copies this rank's experts computed, all MoE layers
    router_std: float | None = None  # uncertainty router: mean std of the chosen scores over its passes


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def resolve_vocab(cfg: JobConfig, tokenizer_vocab: int) -> None:
    """Set ``model.vocab_size`` from the tokenizer when it is 0 (rounded up to a multiple of 64).

    Raises:
        ConfigError: a configured vocabulary smaller than the tokenizer's.
    """
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = -(-tokenizer_vocab // 64) * 64
    elif cfg.model.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer_vocab}")


class Trainer:
    """Builds everything for one rank from a :class:`JobConfig` and runs the loop.

    Args:
        cfg: the job.
        device: this rank's compute device; ``None`` picks it from ``parallel.device`` and
            ``LOCAL_RANK`` (:func:`~system.distributed.pick_device`). A launcher that assigns devices
            itself (Ray Train: ``ray.train.torch.get_device()``) passes it here.
        job_id: this job's id, recorded in the run folder's lock (a lock with the same id is this
            job's own, left by an earlier attempt); ``None``: torchrun's ``TORCHELASTIC_RUN_ID``.
        continue_run: the launcher continues runs by name (``moesys launch``): the run folder may hold
            this run's earlier attempts without ``checkpoint.resume``.

    The run folder (``metrics.run_dir``) is locked by rank 0 for the job's lifetime
    (:class:`~system.train.run_folder.RunLock`). A fresh start (no ``checkpoint.resume``, first attempt)
    in a folder holding an earlier run is refused unless ``checkpoint.overwrite`` is set, which deletes
    that run first. After a failure, a torchrun restart (``TORCHELASTIC_RESTART_COUNT > 0``) resumes from
    ``latest`` under the run's own checkpoint root when there is one.

    Raises:
        ValueError: for degrees that do not match the world size, experts that do not divide by
            the EP degree, or data too short for one global batch.
        RunFolderError: the run folder is held by another job, not writable, or holds an earlier run.
        ConfigError: the checkpoint to resume from was saved from a different model (fields listed).
        CheckpointError: the checkpoint to resume from is missing, uncommitted or corrupted.
    """

    def __init__(self, cfg: JobConfig, device: torch.device | None = None, job_id: str | None = None,
                 continue_run: bool = False):
        self.cfg = cfg
        self.device = device if device is not None else pick_device(cfg.parallel.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # NCCL object collectives use the current device
        self.rank, self.world = init_distributed(self.device, cfg.parallel.backend,
                                                 timeout_s=cfg.comm.init_timeout_seconds)
        self.lock: RunLock | None = None
        try:
            self._build(job_id, continue_run)
        except BaseException:
            self._release_lock()
            raise

    def _build(self, job_id: str | None, continue_run: bool) -> None:
        cfg = self.cfg
        if cfg.training.deterministic:  # before the first CUDA matmul: cuBLAS reads its workspace setting once
            enable_deterministic_algorithms()
        if self.device.type == "cpu":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(cfg.training.threads_per_rank or max(1, (os.cpu_count() or 1) // local))
        self.dims = ParallelDims.from_parallel_config(cfg.parallel, self.world)
        self.dims.check_experts(cfg.moe.num_experts)
        self.mesh = self.dims.build_mesh(self.device.type)
        self.amp_dtype = self._amp_dtype()
        self.preempt = False

        # The run folder and the checkpoint to resume come first: a held folder or a mismatched
        # checkpoint fails in seconds, before the corpus is read and the model built.
        self.run_dir = Path(self._broadcast_str(default_run_dir(cfg)))
        ccfg = cfg.checkpoint
        root = checkpoint_root(cfg, str(self.run_dir))
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        resume = ccfg.resume
        if restart > 0 and read_latest(root) is not None:
            resume = "latest"  # a restart after a failure continues from this run's own newest checkpoint
        self._prepare_run_folder(root, job_id or os.environ.get("TORCHELASTIC_RUN_ID") or f"pid{os.getpid()}",
                                 fresh=not (resume or restart or continue_run))
        tcfg = cfg.training
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        resolve_vocab(cfg, self.tokenizer.vocab_size)
        resume_path = None
        if resume:
            resume_path = CheckpointManager.resolve_in(root, resume)
            if resume_path is not None:
                check_resume_model(cfg, resume_path)  # on every rank: each reports the same one-line error

        corpus = load_corpus(cfg.data.path, cfg.data.val_fraction)
        train_tokens = tokenize_docs(corpus.train_docs, self.tokenizer)
        val_tokens = tokenize_docs(corpus.val_docs, self.tokenizer)
        self.corpus_name = corpus.name
        self.val_tokens_per_byte = len(val_tokens) / max(corpus.val_bytes, 1)
        self.unigram_bits = byte_unigram_entropy(corpus.train_docs)
        self.loader = PackedLoader(
            train_tokens, seq_len=tcfg.seq_len, batch_size=tcfg.batch_size,
            rank=self.dims.dp_rank(self.rank), world_size=self.dims.dp_degree, seed=tcfg.seed,
        )
        self.val_tokens = val_tokens
        global_windows = (len(val_tokens) - 1) // tcfg.seq_len // (tcfg.batch_size * self.dims.dp_degree)
        if global_windows < 1:
            raise DataError(
                f"validation split of {len(val_tokens)} tokens is shorter than one global batch "
                f"({tcfg.batch_size} x {self.dims.dp_degree} sequences of {tcfg.seq_len}); raise data.val_fraction"
            )
        self.eval_batches = min(tcfg.eval_batches, global_windows)

        torch.manual_seed(tcfg.seed)
        with torch.device(self.device):
            self.model = MoETransformer(cfg.model, cfg.moe)
        if not ccfg.initial_load_path:  # else every weight is read below (or from the resumed checkpoint)
            self.model.init_weights(seed=tcfg.seed)
        self.num_params, self.active_params = self.model.num_params()
        self.n_moe_layers = len(self.model.moe_layers())
        set_moe_deterministic(self.model, cfg.training.deterministic)

        def parallelize(part: nn.Module):
            return parallelize_model(part, self.dims, cfg.parallel, param_dtype=self.amp_dtype, fssdp=cfg.fssdp,
                                     activation_checkpoint=tcfg.activation_checkpoint, compile=tcfg.compile)

        self.pipeline: Pipeline | None = None
        if self.dims.pp > 1:
            # The stages share the initialised model's modules; replacing self.model frees the other stages' blocks.
            self.pipeline = build_pipeline(self.model, self.dims, cfg.parallel, self.device, parallelize=parallelize)
            check_microbatches(tcfg.batch_size, self.pipeline.n_microbatches)
            self.model = self.pipeline.model
            self.fssdp = self.pipeline.controllers[0] if self.pipeline.controllers else None  # metrics only
        else:
            self.fssdp = parallelize(self.model)
        self.optimizer = build_optimizer(self.model, tcfg)
        self.scheduler = build_lr_scheduler(self.optimizer, tcfg)

        # The checkpoint manager always exists: a SIGTERM commits a checkpoint even without checkpoint.interval.
        self.last_loss = float("nan")
        self.ckpt = CheckpointManager(
            root, self.model, self.optimizer, self.scheduler, self.loader,
            layout=self.layout(), async_save=ccfg.async_save, keep_last=ccfg.keep_last,
            extra_fn=lambda: {"config": config_to_dict(self.cfg), "last_loss": _finite_or_none(self.last_loss)},
        )
        self.flops_per_token = flops_per_token(self.active_params, cfg.model.n_layers, cfg.model.dim, tcfg.seq_len)
        # MFU against the peak of the math this run does (bf16 under autocast, else fp32/TF32), None on CPU.
        peak = peak_flops(self.device, self.amp_dtype)
        self.peak = peak[0] if peak is not None else None
        if peak is not None:
            logger.info("MFU peak: %.0f TFLOP/s per device (%s)", peak[0] / 1e12, peak[1])
        self.step = 0
        self.resumed_from = ""
        if resume_path is not None:
            resumed = self.ckpt.load(resume_path)
            self.step = resumed.step
            self.resumed_from = resumed.path
            if resumed.extra.get("last_loss") is not None:
                self.last_loss = float(resumed.extra["last_loss"])
        elif resume:
            logger.info("checkpoint: nothing under %s yet, starting from step 0", root)
        if resume_path is None and ccfg.initial_load_path:
            t0 = time.perf_counter()
            nbytes = load_model(self.model, ccfg.initial_load_path)
            logger.info("initial weights: %s (rank 0 read %.1f MB in %.1f s)", ccfg.initial_load_path, nbytes / 1e6,
                        time.perf_counter() - t0)
        self.start_step = self.step
        continuing = bool(resume) or restart > 0 or continue_run
        self.metrics = MetricsLogger(self.run_dir, self.rank, tensorboard=cfg.metrics.tensorboard,
                                     resume_step=self.step if continuing else None, resume_from=self.resumed_from)
        self.routing_trace = RoutingTrace(self.run_dir, self.rank) if cfg.metrics.routing_trace else None
        logger.info(
            "model: %.2fM params (%.2fM active), %d MoE layers x %d experts top-%d; world %d = dp %d x ep %d%s; "
            "dense %s; device %s; corpus %s (%.1f MB train)",
            self.num_params / 1e6, self.active_params / 1e6, self.n_moe_layers, cfg.moe.num_experts,
            cfg.moe.top_k, self.world, self.dims.dp, self.dims.ep, self._pp_tp_text(), cfg.parallel.dense,
            self.device, corpus.name, corpus.train_bytes / 1e6,
        )

    # ------------------------------------------------------------------ run folder
    def _prepare_run_folder(self, root: str, job_id: str, fresh: bool) -> None:
        """Rank 0 locks the run folder and checks (or, with ``checkpoint.overwrite``, clears) what an
        earlier run left; its verdict is broadcast so that every rank fails with the same one line."""
        error = None
        if self.rank == 0:
            try:
                self.lock = RunLock(self.run_dir, job_id)
                self.lock.acquire()
                found = earlier_run(self.run_dir, root) if fresh else []
                if found and self.cfg.checkpoint.overwrite:
                    deleted = clear_earlier_run(self.run_dir, root)
                    logger.warning("checkpoint.overwrite: deleted the earlier run in %s: %s", self.run_dir,
                                   ", ".join(deleted))
                elif found:
                    raise earlier_run_error(self.run_dir, found)
            except RunFolderError as e:
                error = str(e)
        if self.world > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise RunFolderError(error)

    def _release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ------------------------------------------------------------------ helpers
    def layout(self) -> dict:
        """The parallel layout, as recorded in checkpoints."""
        p = self.cfg.parallel
        d = self.dims
        return {"world_size": self.world, "dp": d.dp, "ep": d.ep, "expert_mode": p.expert_mode,
                "dense": p.dense, "device": self.device.type, "pp": d.pp, "dp_replicate": d.dp_replicate,
                "dp_shard": d.dp_shard, "tp": d.tp, "expert_tp": d.expert_tp}

    def _pp_tp_text(self) -> str:
        """`` x pp 2 (1F1B, 4 micro-batches) x tp 2`` for the degrees above 1 (empty otherwise)."""
        out = ""
        if self.dims.pp > 1:
            out += (f" x pp {self.dims.pp} ({self.cfg.parallel.pp_schedule}, "
                    f"{self.pipeline.n_microbatches if self.pipeline else '?'} micro-batches)")
        if self.dims.tp > 1:
            out += f" x tp {self.dims.tp}"
        return out

    def _amp_dtype(self) -> torch.dtype | None:
        mode = self.cfg.training.mixed_precision
        if mode == "bf16" or (mode == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _broadcast_str(self, value: str) -> str:
        obj = [value]
        dist.broadcast_object_list(obj, src=0)
        return obj[0]

    def _mean_over_ranks(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return (t / self.world).tolist()

    def _to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return [t.to(self.device, non_blocking=True) for t in tensors]

    # ------------------------------------------------------------------ steps
    def train_step(self) -> StepResult:
        """One optimizer step over ``grad_accum`` micro-batches (:func:`system.train.step.train_step`)."""
        tcfg = self.cfg.training
        t0 = time.perf_counter()
        batches = [tuple(self._to_device(*self.loader.next_batch())) for _ in range(tcfg.grad_accum)]
        if self.pipeline is not None:  # each batch one run of the pipeline schedule
            st = pipeline_train_step(self.pipeline, self.optimizer, self.scheduler, batches,
                                     max_grad_norm=tcfg.max_grad_norm, autocast_dtype=self.amp_dtype,
                                     load_balance=self.cfg.moe.load_balance)
        else:
            st = train_step(self.model, self.optimizer, self.scheduler, batches, mesh=self.mesh,
                            max_grad_norm=tcfg.max_grad_norm, autocast_dtype=self.amp_dtype, fssdp=self.fssdp,
                            load_balance=self.cfg.moe.load_balance)
        self.step += 1
        # The step's one all-reduce also carries this rank's SIGTERM flag, so all ranks stop after the same step.
        loss, aux_mean, z_mean, dropped, made, router_std, preempt = self._mean_over_ranks(
            [st.loss, st.aux_loss, st.z_loss, float(st.dropped), float(st.assignments),
             st.router_std if st.router_std is not None else 0.0, float(preempt_requested())]
        )
        self.preempt = preempt > 0
        self.last_loss = loss
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return StepResult(loss, aux_mean, z_mean, float(st.grad_norm), st.tokens_per_expert, dropped / max(made, 1.0),
                          time.perf_counter() - t0, st.expert_tokens, router_std if st.router_std is not None else None)

    @torch.no_grad()
    def evaluate(self, progress: str = "") -> float:
        """Mean validation cross-entropy (nats/token) over ``eval_batches`` fixed batches, all ranks.

        Under pipeline parallelism the batches go forward through the stages and the last stage's
        cross-entropy is shared over the pp group; vocabulary-sharded logits (tensor parallelism) use the
        loss-parallel cross-entropy.

        Args:
            progress: a label for a rank-0 progress bar over the batches (empty: no bar).
        """
        tcfg = self.cfg.training
        self.model.eval()
        loader = PackedLoader(
            self.val_tokens, seq_len=tcfg.seq_len, batch_size=tcfg.batch_size,
            rank=self.dims.dp_rank(self.rank), world_size=self.dims.dp_degree, seed=0, shuffle=False,
        )
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # summed on the device: one host sync
        batches = range(self.eval_batches)
        if progress and self.rank == 0 and self.cfg.metrics.progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc=progress, unit="batch", dynamic_ncols=True, leave=False)
        for _ in batches:
            inputs, targets = self._to_device(*loader.next_batch())
            if self.pipeline is not None:
                logits = self.pipeline.forward(inputs, autocast_dtype=self.amp_dtype)  # None off the last stage
            else:
                with self._autocast():
                    logits = self.model(inputs)
            if logits is not None:
                with loss_parallel() if isinstance(logits, DTensor) else contextlib.nullcontext():
                    total += token_cross_entropy(logits, targets).double()
        if self.pipeline is not None:
            total = self.pipeline.from_last(total)
        self.model.train()
        return self._mean_over_ranks([total.item() / self.eval_batches])[0]

    def bits_per_byte(self, nats_per_token: float) -> float:
        """Convert a cross-entropy in nats/token to bits per byte of the validation text."""
        return nats_per_token / LN2 * self.val_tokens_per_byte

    # ------------------------------------------------------------------ loop
    def run(self, on_step: Callable[[int, dict | None], None] | None = None) -> dict:
        """Train up to ``training.steps`` steps, evaluate, save, print the summary; return the summary dict.

        After the first step the collective timeout drops to ``comm.train_timeout_seconds`` (a hung
        peer fails the job instead of stalling it); it is back at ``comm.init_timeout_seconds`` for the
        final evaluation and export. On SIGTERM (:mod:`system.train.lifecycle`) every rank stops after
        the same step, commits a checkpoint of it and raises :class:`~system.train.lifecycle.Preempted`.
        The run folder's lock is released at the end, also on an exception.

        Args:
            on_step: called on every rank after each optimizer step (after its checkpoint save and
                metric record) with the step number and the record logged at that step (the same
                keys on every rank, the same values but for timings; ``None`` at steps that log
                nothing). Launchers use it to report progress (Ray Train's ``ray.train.report``);
                it may call collectives, since all ranks call it at the same steps.

        Raises:
            Preempted: after SIGTERM, once the checkpoint is committed.
        """
        try:
            return self._run(on_step)
        finally:
            self._release_lock()

    def _run(self, on_step: Callable[[int, dict | None], None] | None) -> dict:
        tcfg = self.cfg.training
        tokens_per_step = tcfg.batch_size * tcfg.seq_len * tcfg.grad_accum * self.dims.dp_degree
        bar = None
        if self.rank == 0 and self.cfg.metrics.progress and self.step < tcfg.steps:
            from tqdm import tqdm

            bar = tqdm(total=tcfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                       mininterval=1.0)
        t_start = time.perf_counter()
        t_window, steps_window = time.perf_counter(), 0
        last, tps = None, 0.0
        interval = self.cfg.checkpoint.interval
        while self.step < tcfg.steps:
            last = self.train_step()
            if self.routing_trace is not None:
                self.routing_trace.record(self.step, tokens_per_step, last.tokens_per_expert)
            if self.step == self.start_step + 1:
                self._set_collective_timeout(self.cfg.comm.train_timeout_seconds)
            steps_window += 1
            saved = bool(interval) and self.step % interval == 0
            if saved:
                self.ckpt.save(self.step)
            if bar is not None:
                bar.update(1)
            val_now = tcfg.eval_interval and self.step % tcfg.eval_interval == 0 and self.step < tcfg.steps
            if self.step % tcfg.log_interval == 0 or self.step == tcfg.steps or val_now:
                elapsed = time.perf_counter() - t_window
                tps = tokens_per_step * steps_window / max(elapsed, 1e-9)
                record = self._record(last, tps)
                if val_now:
                    val_loss = self.evaluate()
                    record["val_loss"] = val_loss
                    record["val_bpb"] = self.bits_per_byte(val_loss)
                    self._say(f"step {self.step}: val loss {record['val_bpb']:.3f} bits/byte "
                              f"(train {self.bits_per_byte(last.loss):.3f})", bar)
                self.metrics.log(self.step, record, self._load_histograms(last))
                if bar is not None:
                    bar.set_postfix(loss_bpb=f"{self.bits_per_byte(last.loss):.3f}", tok_s=f"{tps:,.0f}")
                t_window, steps_window = time.perf_counter(), 0
            else:
                record = None
            if self.preempt:
                self._stop_preempted(saved, bar)
            if on_step is not None:
                on_step(self.step, record)
        train_time = time.perf_counter() - t_start
        if bar is not None:
            bar.close()
        if self.step > self.start_step:
            self._set_collective_timeout(self.cfg.comm.init_timeout_seconds)
        return self._finish(last, tokens_per_step, train_time)

    def _finish(self, last: StepResult | None, tokens_per_step: int, train_time: float) -> dict:
        """Final evaluation, checkpoint, model export and sample, each announced (they take a while)."""
        t0 = time.perf_counter()
        val_loss = self.evaluate(progress="final evaluation")
        self.metrics.log(self.step, {"val_loss": val_loss, "val_bpb": self.bits_per_byte(val_loss)})
        self._say(f"step {self.step}: val loss {self.bits_per_byte(val_loss):.3f} bits/byte "
                  f"({time.perf_counter() - t0:.1f} s)")
        steps_run = self.step - self.start_step
        summary = self._summary(last, val_loss, tokens_per_step * steps_run / train_time if steps_run else None,
                                train_time, steps_run)
        interval = self.cfg.checkpoint.interval
        if self.cfg.checkpoint.save_final and interval and self.step % interval and steps_run:
            self._say(f"saving the final checkpoint (step {self.step})")
            self.ckpt.save(self.step)
        self.ckpt.close()
        if self.cfg.checkpoint.save_final:
            t0 = time.perf_counter()
            target = self.run_dir / self.cfg.checkpoint.folder
            self._say(f"exporting the model to {target}")
            save_model(self.model, self.mesh, target, config_to_dict(self.cfg), overwrite=True,
                       pp_group=self.pipeline.group if self.pipeline is not None else None)
            self._say(f"exported the model ({time.perf_counter() - t0:.1f} s)")
        sample = self.sample()
        if self.rank == 0:
            summary["sample"] = sample
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self._print_summary(summary)
        self.metrics.close()
        if self.routing_trace is not None:
            self.routing_trace.close()
        return summary

    def _stop_preempted(self, saved: bool, bar) -> None:
        """SIGTERM reached some rank: commit a checkpoint of this step (unless one was just saved), stop."""
        if bar is not None:
            bar.close()
        if not saved:
            self.ckpt.save(self.step)
        self.ckpt.close()
        self.metrics.close()
        if self.routing_trace is not None:
            self.routing_trace.close()
        where = f"{self.ckpt.root.rstrip('/')}/{step_dir_name(self.step)}"
        raise Preempted(f"preempted ({stop_signal_name()}) after step {self.step}: checkpoint {where} committed; "
                        f"continue with --checkpoint.resume latest")

    def _set_collective_timeout(self, seconds: int) -> None:
        """Set the timeout of the training groups (the default group and the mesh's); every rank calls it
        at the same point, after a collective, so none waits under the other timeout (TorchTitan does the same)."""
        groups = [None] + [self.mesh.get_group(name) for name in self.mesh.mesh_dim_names]
        for group in groups:
            try:
                dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=seconds), group)
            except (ValueError, RuntimeError, AttributeError) as e:  # a backend without timeouts: keep going
                logger.debug("collective timeout not set on %s: %s", group, e)

    def _say(self, line: str, bar=None) -> None:
        """A progress line on rank 0 that does not break the progress bar."""
        if self.rank != 0:
            return
        if bar is not None:
            bar.write(line)
        else:
            logger.info(line)

    def _record(self, r: StepResult, tps: float) -> dict[str, float]:
        imbalance = [float(l.max() / l.mean().clamp_min(1e-9)) for l in r.tokens_per_expert]
        rec = {
            "loss": r.loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": r.grad_norm,
            "tokens_per_s": tps,
            "aux_loss": r.aux_loss,
            "z_loss": r.z_loss,
            "expert_imbalance": sum(imbalance) / max(len(imbalance), 1),
            "drop_rate": r.drop_rate,
        }
        if r.router_std is not None:
            rec["router_std"] = r.router_std
        for i, value in enumerate(imbalance):
            rec[f"moe/imbalance/layer{i}"] = value
        per_rank = torch.tensor([r.seconds, float(r.expert_tokens)], dtype=torch.float64, device=self.device)
        gathered = [torch.empty_like(per_rank) for _ in range(self.world)]
        dist.all_gather(gathered, per_rank)
        rec["time/step_s_slowest_rank"] = max(float(g[0]) for g in gathered)
        for rank, g in enumerate(gathered):
            rec[f"moe/expert_tokens/rank{rank}"] = float(g[1])
        if self.fssdp is not None:
            rec.update(self.fssdp.metrics())
        if self.peak:
            rec["mfu_pct"] = 100.0 * self.flops_per_token * tps / (self.peak * self.world)
        return rec

    def _load_histograms(self, r: StepResult) -> dict[str, torch.Tensor]:
        return {f"moe/load/layer{i}": l for i, l in enumerate(r.tokens_per_expert)}

    def sample(self) -> str:
        """A greedy continuation of ``training.sample_prompt`` (all ranks run it; EP, TP and PP are collective)."""
        tcfg = self.cfg.training
        if tcfg.sample_tokens <= 0:
            return ""
        ids = self.tokenizer.encode(tcfg.sample_prompt) or [self.tokenizer.eos_id]
        prompt = torch.tensor([ids], dtype=torch.long, device=self.device)
        t0 = time.perf_counter()
        self._say(f"sampling {tcfg.sample_tokens} tokens greedily from {tcfg.sample_prompt!r}")
        if self.pipeline is not None:
            out = self.pipeline.greedy_generate(prompt, tcfg.sample_tokens, tcfg.seq_len, autocast_dtype=self.amp_dtype,
                                                seq_multiple=self.dims.tp)
        else:
            with self._autocast():
                out = greedy_generate(_FullLogits(self.model, self.dims.tp) if self.dims.tp > 1 else self.model, prompt,
                                      tcfg.sample_tokens, tcfg.seq_len)
        self._say(f"sampled ({time.perf_counter() - t0:.1f} s)")
        return self.tokenizer.decode(out[0].tolist())

    def _summary(self, last: StepResult | None, val_loss: float, tps: float | None, seconds: float,
                 steps_run: int) -> dict:
        # With no step run here (resumed at training.steps) the train loss is the checkpoint's last one.
        train_loss = last.loss if last else self.last_loss
        imbalance = (
            sum(float(l.max() / l.mean().clamp_min(1e-9)) for l in last.tokens_per_expert) / len(last.tokens_per_expert)
            if last and last.tokens_per_expert else float("nan")
        )
        return {
            "run_dir": str(self.run_dir),
            "corpus": self.corpus_name,
            "steps": self.step,
            "steps_run": steps_run,
            "start_step": self.start_step,
            "resumed_from": self.resumed_from or None,
            "world_size": self.world,
            "dp": self.dims.dp,
            "ep": self.dims.ep,
            "pp": self.dims.pp,
            "tp": self.dims.tp,
            "params": self.num_params,
            "active_params": self.active_params,
            "train_loss": train_loss,
            "train_bpb": self.bits_per_byte(train_loss),
            "val_loss": val_loss,
            "val_bpb": self.bits_per_byte(val_loss),
            "unigram_entropy_bpb": self.unigram_bits,
            "tokens_per_s": tps,
            "train_seconds": seconds,
            "expert_imbalance": imbalance,
        }

    def _print_summary(self, s: dict) -> None:
        lines = [
            f"run            {s['run_dir']}",
            f"steps          {s['steps']}  (world {s['world_size']} = dp {s['dp']} x ep {s['ep']}{self._pp_tp_text()})"
            + (f", resumed from {s['resumed_from']}" if s["resumed_from"] else ""),
            f"params         {s['params'] / 1e6:.2f}M total, {s['active_params'] / 1e6:.2f}M active",
            f"train loss     {s['train_bpb']:.3f} bits/byte" + ("" if s["steps_run"] else
                                                                f"  (step {s['steps']}, before the resume)"),
            f"val loss       {s['val_bpb']:.3f} bits/byte  (byte-unigram entropy of {s['corpus']}: "
            f"{s['unigram_entropy_bpb']:.3f} bits/byte)",
            (f"throughput     {s['tokens_per_s']:,.0f} tokens/s over {s['steps_run']} steps in "
             f"{s['train_seconds']:.0f} s" + (f" (resumed at step {s['start_step']})" if s["start_step"] else "")
             if s["tokens_per_s"] else
             f"throughput     - (no step left to run: resumed at step {s['start_step']} = training.steps)"),
            f"expert imbal.  {s['expert_imbalance']:.2f} (max/mean tokens per expert, last step)" if s["steps_run"]
            else "expert imbal.  - (no step run)",
            f"sample         {s['sample']!r}",
        ]
        print("\n".join(["== summary =="] + lines), flush=True)


class _FullLogits(nn.Module):
    """A tensor-parallel ``model`` for greedy sampling: the token window trimmed at the front to a multiple of
    ``tp`` (sequence parallelism splits every sequence over the ``tp`` ranks; the first ``len % tp`` tokens of the
    context go unseen), and vocabulary-sharded DTensor logits returned whole (``full_tensor()``) as a plain
    ``[B, S', V]`` tensor whose last position is the next-token distribution."""

    def __init__(self, model: nn.Module, tp: int):
        super().__init__()
        self.model, self.tp = model, tp

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = self.model(tokens[:, tokens.shape[1] % self.tp:])
        return out.full_tensor() if isinstance(out, DTensor) else out
