"""Serve a saved MoE model, resident or offloaded through a ring of slots (SE-MoE, arXiv 2205.10034, sec. 3.3.2).

:class:`OffloadEngine` opens a checkpoint folder (``model.safetensors`` + ``config.json``, as
:func:`system.checkpoint.model_io.save_model` writes it, or a Hugging Face model folder of a supported
family, read in place: :func:`open_checkpoint`), checks the plan (:mod:`system.inference.plan`), loads
the resident weights onto the device and, per mode:

- ``offload="none"``: every weight resident; the reference path.
- ``offload="ring"``: block FFNs stream from the host tier through ``K`` slots
  (:mod:`system.inference.ring`, :mod:`system.inference.transport`).
- ``offload="experts"``: only the experts the router picked stream, through an LRU pool of ``C``
  expert slots (:mod:`system.inference.expert_cache`).

All modes run the same decode code (:func:`system.inference.loop.generate_batch`), so ring and
experts outputs are bitwise those of the resident engine on CPU. Inference is dropless: a
``moe.capacity_factor`` from training is ignored.

Weights are read through one interface (:class:`~system.inference.mmap_file.WeightFiles`): per tensor
its stored pieces, copied byte for byte from the mapped files into device memory, a ring slot or an
expert slot. A Hugging Face checkpoint's routed experts keep its orientation (the transpose of ours) in
every mode, bound as transposed views, so resident, ring and experts run identical arithmetic; no
converted copy is written anywhere.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from system.config.job import JobConfig
from system.config.loader import ConfigError, apply_dict
from system.inference.decoder import default_ffn
from system.inference.expert_cache import ExpertCache, ExpertHost, expert_slot_layout
from system.inference.loop import GenerationStats, generate_batch
from system.hf.config import HFModelConfig, is_hf_folder, read_hf_config
from system.inference.mmap_file import MmapCheckpoint, ModelFilesNotFoundError, WeightFiles
from system.inference.plan import PlanError, check_checkpoint, make_plan, parse_bytes
from system.inference.prompts import Prompt, encode_prompts, model_vocab_size, resolve_tokenizer
from system.inference.ring import EventLog, RingScheduler, SlotRing
from system.inference.sampling import METHODS, Sampler, SamplingConfig
from system.inference.sections import (
    ModelLayout, build_skeleton, expected_tensors, expert_views, load_tensor, pack_section, section_copies,
    section_index, split_model,
)
from system.inference.transport import CudaTransport, HostTier, Link, ThreadTransport
from system.models.model import MoETransformer, precompute_rope

logger = logging.getLogger(__name__)


CONFIG_FILE = "config.json"
"""The job config beside the model (as :func:`system.checkpoint.model_io.save_model` writes it; read
here directly so that serving does not import the checkpoint package and its DTensor machinery)."""


def load_job_config(checkpoint_dir: str | Path) -> JobConfig:
    """The ``[model]``, ``[moe]`` and ``[data]`` sections saved beside a model (others are ignored).

    A Hugging Face model folder (:func:`system.hf.config.is_hf_folder`) gives ``[model]`` and ``[moe]``
    from its ``config.json`` (:func:`system.hf.config.read_hf_config`) and ``data.tokenizer = "none"``
    (its ``tokenizer.json``, if any, is found by :func:`system.inference.prompts.resolve_tokenizer`).

    Raises:
        ModelFilesNotFoundError: the folder or its ``config.json`` does not exist (a
            ``FileNotFoundError``; a training checkpoint folder is recognised and the export
            command suggested).
        ConfigError: ``config.json`` is not a JSON object, or a value is wrong or out of range (the
            file and the key are named).
        HFCheckpointError: a Hugging Face ``config.json`` of an unsupported architecture or with a field
            we cannot honour (named; see :func:`~system.hf.config.read_hf_config`).
    """
    folder = Path(checkpoint_dir)
    file = folder / CONFIG_FILE
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise ModelFilesNotFoundError(f"model folder {folder} {what} (give a folder with model.safetensors and "
                                      f"{CONFIG_FILE})")
    if is_hf_folder(folder):
        return hf_job_config(read_hf_config(folder))
    if not file.is_file():
        hint = ""
        if (folder / "metadata.json").is_file() or (folder / "latest").is_file():
            hint = (f"; {folder} is a training checkpoint: export it first with "
                    f"`moesys ckpt export {folder} --out DIR` and pass --checkpoint DIR")
        raise ModelFilesNotFoundError(f"no {CONFIG_FILE} at {file}{hint}")
    try:
        saved = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    except OSError as e:
        raise ConfigError(f"{file} cannot be read: {e.strerror or e}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{file} holds a JSON {type(saved).__name__}, not an object of config sections")
    cfg = JobConfig()
    apply_dict(cfg, {k: saved[k] for k in ("model", "moe", "data") if k in saved}, source=str(file))
    try:
        cfg.model.validate()
        cfg.moe.validate()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{file}: {e}") from None
    cfg.moe.capacity_factor = 0.0
    return cfg


def hf_job_config(hf: HFModelConfig) -> JobConfig:
    """A job config serving the Hugging Face model ``hf``: its ``[model]`` and ``[moe]``, dropless
    (``moe.capacity_factor = 0``), ``data.tokenizer = "none"``."""
    cfg = JobConfig()
    cfg.model, cfg.moe = hf.model, hf.moe
    cfg.moe.capacity_factor = 0.0
    cfg.data.tokenizer = "none"
    return cfg


def open_checkpoint(checkpoint_dir: str | Path, job: JobConfig, expected: dict[str, tuple[int, ...]]) -> WeightFiles:
    """The weights of a model folder, mapped read-only: a Hugging Face folder
    (:class:`system.hf.weights.HFCheckpoint`, its shards in place, routed experts as per-expert pieces
    holding the transpose of our slices) or ours (:class:`~system.inference.mmap_file.MmapCheckpoint`).
    Nothing is written to the folder.

    Args:
        checkpoint_dir: the folder.
        job: its job config (:func:`load_job_config`): the model the weights are mapped onto.
        expected: ``{our name: shape}`` of every tensor the model holds
            (:func:`~system.inference.sections.expected_tensors`).

    Raises:
        ModelFilesNotFoundError: our folder holds no ``model.safetensors`` nor index.
        SafetensorsFileError: a malformed safetensors file or index.
        HFCheckpointError: a Hugging Face folder without weights, a shard its index names missing, a tensor
            missing or of the wrong shape or dtype (named with its file).
    """
    if is_hf_folder(checkpoint_dir):
        # Imported here: system.hf.weights imports this package's mmap_file (a top-level import would cycle).
        from system.hf.weights import HFCheckpoint

        return HFCheckpoint(checkpoint_dir, job.model, job.moe, expected=expected)
    return MmapCheckpoint(checkpoint_dir)


def resolve_device(spec: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a device, checked against this machine.

    Raises:
        PlanError: not a device string; a device type other than cpu or cuda; CUDA asked for on a
            torch build or machine without it; ``N`` not below the number of visible GPUs.
    """
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise PlanError(f"device {spec!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise PlanError(f"device {spec!r} is not supported: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise PlanError(f"device {spec!r}: CUDA is not available (torch {torch.__version__}, built with CUDA "
                        f"{torch.version.cuda or 'none'}, {torch.cuda.device_count()} GPUs visible); use cpu")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise PlanError(f"device {spec!r} does not exist: {count} GPU(s) visible (cuda:0 to cuda:{count - 1})")
    return dev


def check_request(*, max_new_tokens: int, batch_size: int, offload: str, slots: int, expert_cache: int | None,
                  sampling: str, top_p: float, temperature: float, device: str,
                  device_memory: str | int | None = None, link_bandwidth: str | float | None = None) -> torch.device:
    """Check the arguments of a generation request before anything is loaded; returns the device.

    Raises:
        PlanError: naming the argument (and its ``moesys generate`` flag) and the value received:
            ``max_new_tokens < 1``, ``batch_size < 1``, an unknown ``offload`` or ``sampling``,
            ``slots < 1``, ``expert_cache < 1``, ``top_p`` outside (0, 1], ``temperature <= 0``,
            a ``device_memory`` or ``link_bandwidth`` that is not a size, or a device that is not
            usable (see :func:`resolve_device`).
    """
    def at_least_one(name: str, flag: str, value: int) -> None:
        if value < 1:
            raise PlanError(f"{name} ({flag}) must be >= 1, got {value}")

    at_least_one("max_new_tokens", "--max-new-tokens", max_new_tokens)
    at_least_one("batch_size", "--batch-size", batch_size)
    if offload not in ("none", "ring", "experts"):
        raise PlanError(f"offload (--offload) must be one of none, ring, experts, got {offload!r}")
    if slots < 1:
        raise PlanError(f"slots (--slots) must be >= 1: the ring needs at least one slot, got slots (K) = {slots}")
    if expert_cache is not None and expert_cache < 1:
        raise PlanError(f"expert_cache (--expert-cache) must be >= 1, got expert_cache (C) = {expert_cache}")
    if sampling not in METHODS:
        raise PlanError(f"sampling (--sampling) must be one of {', '.join(METHODS)}, got {sampling!r}")
    if not 0.0 < top_p <= 1.0:
        raise PlanError(f"top_p (--top-p) must be in (0, 1], got {top_p}")
    if not temperature > 0.0:
        raise PlanError(f"temperature (--temperature) must be > 0, got {temperature}")
    for flag, value in (("--device-memory", device_memory), ("--link-bandwidth", link_bandwidth)):
        try:
            parse_bytes(value)
        except PlanError as e:
            raise PlanError(f"{flag}: {e}") from None
    return resolve_device(device)


def materialize(skeleton: MoETransformer, ckpt: WeightFiles, load: set[str], device: torch.device,
                shape_only: frozenset[str] = frozenset()) -> MoETransformer:
    """Turn the meta ``skeleton`` into a device model in place: tensors in ``load`` are copied from the
    checkpoint (each read once, in its stored dtype and orientation:
    :func:`~system.inference.sections.load_tensor`), those in ``shape_only`` stay on ``meta`` (their
    shapes are read, their values never), the others hold empty placeholders (to be bound to ring slot
    views)."""
    placeholders: dict[torch.dtype, torch.Tensor] = {}
    for name in expected_tensors(skeleton):
        if name in shape_only:
            continue
        if name in load:
            value = load_tensor(ckpt, name, device)
        else:
            dtype = ckpt.source(name).dtype
            value = placeholders.setdefault(dtype, torch.empty(0, dtype=dtype, device=device))
        module_name, _, leaf = name.rpartition(".")
        module = skeleton.get_submodule(module_name)
        if leaf in module._parameters:
            setattr(module, leaf, nn.Parameter(value, requires_grad=False))
        else:
            module._buffers[leaf] = value
    cfg = skeleton.cfg
    skeleton.rope = precompute_rope(cfg).to(device)
    return skeleton.eval()


def ring_host_tier(layout: ModelLayout, ckpt: WeightFiles, device: torch.device) -> HostTier:
    """Host tier of the ring: per section, zero-copy mmap views of its stored pieces (CPU; one per tensor,
    or per expert and weight from a Hugging Face folder) or one packed pinned buffer (CUDA)."""
    host = []
    for sec in layout.sections:
        if device.type == "cuda":
            buf = torch.empty(sec.nbytes, dtype=torch.uint8, pin_memory=True)
            pack_section(sec, ckpt, buf)
            host.append([(buf, 0, sec.nbytes)])
        else:
            host.append(section_copies(sec, ckpt))
    return host


def expert_host_tier(layout: ModelLayout, ckpt: WeightFiles, device: torch.device) -> ExpertHost:
    """Host tier of the experts mode: per ``(block, expert)``, that expert's stored bytes of ``w1``/``w2``/``w3``
    (zero-copy mmap views on CPU; on CUDA copied once into one pinned buffer per block and weight)."""
    host: ExpertHost = {}
    for sec in layout.sections:
        if sec.kind != "moe":
            continue
        for wname, _, _, _, offset, nbytes in expert_slot_layout(sec)[0]:
            views = expert_views(ckpt, f"layers.{sec.index}.moe.experts.{wname}")
            if device.type == "cuda":
                pinned = torch.empty(len(views) * nbytes, dtype=torch.uint8, pin_memory=True)
                for e, view in enumerate(views):
                    pinned[e * nbytes : (e + 1) * nbytes].copy_(view)
                views = [pinned[e * nbytes : (e + 1) * nbytes] for e in range(len(views))]
            for e, view in enumerate(views):
                host.setdefault((sec.index, e), []).append((view, offset, nbytes))
    return host


class OffloadEngine:
    """A loaded model ready to generate, resident or offloaded.

    Args:
        checkpoint_dir: folder with ``model.safetensors`` and ``config.json``, or a Hugging Face model
            folder (``config.json`` with a ``model_type``, safetensors shards), read in place.
        offload: ``"none"``, ``"ring"`` or ``"experts"``.
        slots: K ring slots (ring mode; ``K >= N`` keeps every section in a slot after the first pass).
        device: ``"cpu"`` or ``"cuda[:i]"`` (the device tier).
        device_memory: budget of the device tier (``"4GiB"``, bytes, or ``None``: unchecked).
        max_batch_size, max_seq_len: the largest batch and prompt + new tokens to plan for
            (default ``model.max_seq_len``).
        link_bandwidth: CPU link throttle in bytes/s (``"2GB"`` or a number; ``None``: unthrottled);
            ignored by the CUDA ring, which measures the real pinned host-to-device link.
        expert_cache: C expert slots (experts mode).
        event_log: keep an :class:`EventLog` of loads and computes (:attr:`log`).
        check_stamps: check ring slot generation stamps around each compute.
        transport: a custom transport (tests); default: CUDA or thread transport by device.

    Attributes:
        hf_config: the Hugging Face config (:class:`~system.hf.config.HFModelConfig`: its
            ``eos_token_ids``, ``bos_token_id``) when ``checkpoint_dir`` is a Hugging Face folder, else ``None``.

    Raises:
        PlanError: the plan cannot run (checkpoint mismatch, K < 1, a section larger than a slot,
            the budget too small, a device that is not usable); nothing has been allocated then.
        ModelFilesNotFoundError: no folder, model file or config (a ``FileNotFoundError``).
        SafetensorsFileError: the model file is malformed (see :mod:`system.inference.mmap_file`).
        ConfigError: ``config.json`` is malformed or holds a bad value.
        HFCheckpointError: a Hugging Face folder that cannot be served (see :func:`load_job_config` and
            :func:`open_checkpoint`).
        DataError: the saved tokenizer cannot be loaded.
    """

    def __init__(self, checkpoint_dir: str | Path, *, offload: str = "ring", slots: int = 2, device: str = "cpu",
                 device_memory: str | int | None = None, max_batch_size: int = 8, max_seq_len: int | None = None,
                 link_bandwidth: str | float | None = None, expert_cache: int | None = None,
                 event_log: bool = False, check_stamps: bool = True, transport=None):
        self.hf_config = read_hf_config(checkpoint_dir) if is_hf_folder(checkpoint_dir) else None
        self.job = load_job_config(checkpoint_dir) if self.hf_config is None else hf_job_config(self.hf_config)
        cfg, moe = self.job.model, self.job.moe
        self.checkpoint_dir = Path(checkpoint_dir)
        self._tokenizer, self._tokenizer_built = None, False
        if cfg.vocab_size == 0:
            cfg.vocab_size = model_vocab_size(0, self.tokenizer)
        self.device = resolve_device(device)
        self.mode = offload
        skeleton = build_skeleton(cfg, moe)
        expected = expected_tensors(skeleton)
        self.ckpt = open_checkpoint(checkpoint_dir, self.job, expected)
        check_checkpoint(expected, self.ckpt)
        self.layout = split_model(skeleton, self.ckpt)
        elem = self.ckpt.source("tok_embeddings.weight").dtype.itemsize
        seq = max_seq_len or cfg.max_seq_len
        if seq > cfg.max_seq_len:
            raise PlanError(f"max_seq_len {seq} exceeds the model's max_seq_len {cfg.max_seq_len}")
        self.plan = make_plan(self.layout, cfg, moe, mode=offload, slots=slots, batch=max_batch_size, seq=seq,
                              elem=elem, budget_bytes=parse_bytes(device_memory), expert_cache=expert_cache)
        logger.info("offload plan: %s", self.plan.describe())
        names = set(expected_tensors(skeleton))
        if offload == "ring":
            load = {n for n in names if section_index(n) is None}
        elif offload == "experts":
            load = {n for n in names if ".moe.experts." not in n}
        else:
            load = names
        shape_only = frozenset(names - load) if offload == "experts" else frozenset()
        self.model = materialize(skeleton, self.ckpt, load, self.device, shape_only)
        self.log = EventLog() if event_log else None
        self.link = Link(parse_bytes(link_bandwidth))
        self.transport = self.scheduler = self.expert_cache = None
        self.run_ffn = default_ffn
        if offload == "ring":
            self._start_ring(transport, check_stamps)
        elif offload == "experts":
            host = expert_host_tier(self.layout, self.ckpt, self.device)
            self.expert_cache = ExpertCache(list(self.layout.sections), host, self.plan.slots, self.plan.slot_bytes,
                                            self.device, self.link)
            self.run_ffn = self.expert_cache.run_ffn

    def _start_ring(self, transport, check_stamps: bool) -> None:
        """Allocate the K slots, start the transport on the host tier, prime the ring."""
        ring = SlotRing(self.model, self.layout.sections, self.plan.slots, self.plan.slot_bytes, self.device)
        if transport is None:
            cuda = self.device.type == "cuda"
            transport = CudaTransport(self.device, self.log) if cuda else ThreadTransport(self.link, self.log)
        elif getattr(transport, "log", None) is None:
            transport.log = self.log
        self.transport = transport
        transport.start(ring, ring_host_tier(self.layout, self.ckpt, self.device))
        self.scheduler = RingScheduler(ring, transport, log=self.log, check_stamps=check_stamps)
        self.run_ffn = self.scheduler.ffn_runner(default_ffn)

    @property
    def tokenizer(self):
        """The model's tokenizer, built on first use: the folder's ``tokenizer.json`` (with BOS/EOS from
        its Hugging Face config files), else the saved ``data.tokenizer``; ``None`` when the model has
        none (see :func:`system.inference.prompts.resolve_tokenizer`)."""
        if not self._tokenizer_built:
            self._tokenizer = resolve_tokenizer(self.checkpoint_dir, self.job.data.tokenizer)
            self._tokenizer_built = True
        return self._tokenizer

    @property
    def bytes_streamed(self) -> int:
        """Bytes moved (ring: issued) from the host tier into device slots since the engine started."""
        if self.scheduler is not None:
            return self.scheduler.bytes_issued
        return self.expert_cache.bytes_moved if self.expert_cache is not None else 0

    @property
    def measured_bandwidth(self) -> float:
        """Host-to-device bytes/s measured over this engine's copies (0 when nothing streamed)."""
        if self.transport is not None:
            return self.transport.measured_bandwidth
        return self.link.measured_bandwidth

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int, sampler: Sampler, *, batch_size: int | None = None,
                     eos_id: int | Collection[int] | None = None) -> tuple[list[list[int]], GenerationStats]:
        """Generate for token-id prompts in batches of ``batch_size`` (default: the planned batch); a
        row stops at ``eos_id`` (one id or any of several; ``None``: never).

        Returns:
            ``(new ids per prompt, stats summed over batches)``.

        Raises:
            PlanError: a batch or a prompt + ``max_new_tokens`` larger than planned.
            StaleSlotError: the ring computed with a slot that did not hold the expected section.
        """
        batch_size = batch_size or self.plan.batch
        if batch_size > self.plan.batch:
            raise PlanError(f"batch size {batch_size} exceeds the planned {self.plan.batch}")
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > self.plan.seq:
            raise PlanError(f"prompt + new tokens = {longest} exceeds the planned sequence length {self.plan.seq}")
        sync = torch.cuda.synchronize if self.device.type == "cuda" else None
        outputs: list[list[int]] = []
        total = GenerationStats()
        for lo in range(0, len(prompts), batch_size):
            before = self.bytes_streamed
            out, stats = generate_batch(self.model, prompts[lo : lo + batch_size], max_new_tokens, sampler,
                                        run_ffn=self.run_ffn, eos_id=eos_id, sync=sync)
            stats.bytes_streamed = self.bytes_streamed - before
            if isinstance(self.transport, CudaTransport):
                self.transport.verify()  # the device-side stamp checks of this batch (after its sync)
            outputs.extend(out)
            total.add(stats)
        return outputs, total

    def close(self) -> None:
        """Stop the transport and unmap the checkpoint."""
        if self.transport is not None:
            self.transport.close()
        self.ckpt.close()

    def __enter__(self) -> "OffloadEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class GenerationOutput:
    """Per prompt: the decoded new text (``None`` without a tokenizer), the new ids (the EOS id that
    stopped a row included) and the prompt's ids as run (BOS included); with the run's statistics."""

    texts: list[str | None]
    tokens: list[list[int]]
    stats: GenerationStats
    plan: str = ""
    extra: dict = field(default_factory=dict)
    prompt_ids: list[list[int]] = field(default_factory=list)


def generate(checkpoint_dir: str | Path, prompts: list[Prompt], max_new_tokens: int = 32, batch_size: int = 8, *,
             offload: str = "none", slots: int = 2, device_memory: str | int | None = None, sampling: str = "greedy",
             top_p: float = 0.9, temperature: float = 1.0, seed: int = 0, device: str = "cpu",
             link_bandwidth: str | float | None = None, expert_cache: int | None = None,
             stop_at_eos: bool = True) -> GenerationOutput:
    """Generate for ``prompts`` from a saved model (see :class:`OffloadEngine` for the modes).

    A prompt is text or a list of token ids. Text is encoded with the model's tokenizer
    (:func:`system.inference.prompts.resolve_tokenizer`: the folder's ``tokenizer.json``, else the saved
    ``data.tokenizer``), BOS prepended as the model family does, an empty prompt becoming EOS; ids
    need no tokenizer. Every prompt is checked against the model's vocabulary before any weight is
    read. Prompts run in batches of ``batch_size``; each row stops at any of the tokenizer's EOS ids
    (``stop_at_eos``); the new ids are decoded when there is a tokenizer. The plan is sized for
    ``min(batch_size, len(prompts))`` sequences of the longest prompt + ``max_new_tokens``.

    Raises:
        PlanError: a bad argument (see :func:`check_request`, checked before anything is loaded), no
            prompts, an empty id prompt or an id outside ``[0, vocab_size)``, a sequence beyond the
            model's ``max_seq_len``, or see :class:`OffloadEngine`.
        DataError: a text prompt for a model without a tokenizer, or a tokenizer that cannot be loaded.
        ModelFilesNotFoundError, SafetensorsFileError, ConfigError: see :class:`OffloadEngine`.
    """
    check_request(max_new_tokens=max_new_tokens, batch_size=batch_size, offload=offload, slots=slots,
                  expert_cache=expert_cache, sampling=sampling, top_p=top_p, temperature=temperature, device=device,
                  device_memory=device_memory, link_bandwidth=link_bandwidth)
    if not prompts:
        raise PlanError("no prompts to generate for")
    probe = load_job_config(checkpoint_dir)
    tok = resolve_tokenizer(checkpoint_dir, probe.data.tokenizer, required=any(isinstance(p, str) for p in prompts))
    ids = encode_prompts(prompts, tok, model_vocab_size(probe.model.vocab_size, tok))
    batch = max(1, min(batch_size, len(ids)))
    seq = max(len(i) for i in ids) + max_new_tokens
    if seq > probe.model.max_seq_len:
        raise PlanError(f"longest prompt + max_new_tokens = {seq} exceeds model.max_seq_len {probe.model.max_seq_len}")
    with OffloadEngine(checkpoint_dir, offload=offload, slots=slots, device=device, device_memory=device_memory,
                       max_batch_size=batch, max_seq_len=seq, link_bandwidth=link_bandwidth,
                       expert_cache=expert_cache) as engine:
        sampler = Sampler(SamplingConfig(sampling, top_p, temperature, seed),
                          vocab_limit=tok.vocab_size if tok is not None else None, device=engine.device)
        eos = None
        if stop_at_eos:  # the tokenizer's EOS ids, else (an HF folder without tokenizer.json) its config's
            eos = tok.eos_ids if tok is not None else (engine.hf_config.eos_token_ids or None) \
                if engine.hf_config is not None else None
        out, stats = engine.generate_ids(ids, max_new_tokens, sampler, batch_size=batch, eos_id=eos)
        extra = {"measured_bandwidth": engine.measured_bandwidth}
        if engine.expert_cache is not None:
            extra.update(expert_hits=engine.expert_cache.hits, expert_misses=engine.expert_cache.misses)
        texts = [tok.decode(o) if tok is not None else None for o in out]
        return GenerationOutput(texts, out, stats, engine.plan.describe(), extra, prompt_ids=ids)
