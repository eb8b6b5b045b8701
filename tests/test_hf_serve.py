"""Serving a Hugging Face MoE checkpoint in place (``moesys generate --checkpoint HF_DIR``), resident,
ring-offloaded and expert-offloaded, against ``transformers`` itself.

For every family (tiny random models built and saved by ``transformers``, :mod:`hf_tiny`): the
last-position prefill logits equal ``transformers``' within 1e-4 (fp32) and greedy generation gives
its ids, in every mode, from a single ``model.safetensors``, from an index and several shards, and
from fused expert tensors; bf16 weights run bf16 arithmetic, identical in the three modes. The
folder is never written to. CPU, fp32 unless said, no downloads.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import hf_tiny
from system.hf.config import HFCheckpointError
from system.inference import OffloadEngine, Sampler, SamplingConfig
from system.inference.engine import generate, load_job_config
from system.inference.sections import build_skeleton, split_model

PROMPTS = [[5, 9, 2, 7, 1, 3], [8, 6, 4]]
NEW = 8
MODES = ("none", "ring", "experts")
ENGINE = dict(slots=1, expert_cache=3)  # K = 1: every block visit streams; C = 3 < experts: evictions


def folder_digest(path: Path) -> str:
    """SHA-256 over the names, sizes, modification times and bytes of every file under ``path``."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*")):
        st = file.stat()
        h.update(f"{file.relative_to(path)} {st.st_size} {st.st_mtime_ns}\n".encode())
        if file.is_file():
            h.update(file.read_bytes())
    return h.hexdigest()


@dataclass
class Folder:
    """A saved tiny model and the digest of its folder when saved."""

    path: Path
    digest: str

    def check_untouched(self) -> None:
        assert folder_digest(self.path) == self.digest, f"{self.path} was modified"


def _fuse_experts(src: Path, dst: Path, num_experts: int, layers: int) -> None:
    """Rewrite ``src`` (single-file, per-expert ``mlp.experts.{e}.*_proj``) into ``dst`` with fused expert
    tensors ``mlp.experts.gate_up_proj`` ``[E, 2f, d]`` (gate rows first) and ``mlp.experts.down_proj``
    ``[E, d, f]``, as ``transformers`` holds them in memory."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    for i in range(layers):
        pre = f"model.layers.{i}.mlp.experts"
        gate = [tensors.pop(f"{pre}.{e}.gate_proj.weight") for e in range(num_experts)]
        up = [tensors.pop(f"{pre}.{e}.up_proj.weight") for e in range(num_experts)]
        down = [tensors.pop(f"{pre}.{e}.down_proj.weight") for e in range(num_experts)]
        tensors[f"{pre}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
        tensors[f"{pre}.down_proj"] = torch.stack(down)
    dst.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(src / name, dst / name)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``folder(family, variant)``: the tiny model saved once per module. Variants: ``fp32`` (one
    ``model.safetensors``), ``sharded`` (fp32, index + shards of 20 KB), ``bf16`` (sharded), ``fused``
    (fp32, fused expert tensors)."""
    cache: dict[tuple[str, str], Folder] = {}

    def get(family: str, variant: str) -> Folder:
        if (family, variant) not in cache:
            path = tmp_path_factory.mktemp(f"{family}_{variant}") / "model"
            if variant == "fp32":
                hf_tiny.save_model(family, path)
            elif variant == "sharded":
                hf_tiny.save_model(family, path, max_shard_size="20KB")
            elif variant == "bf16":
                hf_tiny.save_model(family, path, dtype=torch.bfloat16, max_shard_size="20KB")
            else:
                cfg = hf_tiny.make_config(family)
                _fuse_experts(get(family, "fp32").path, path, cfg.num_experts, cfg.num_hidden_layers)
            cache[family, variant] = Folder(path, folder_digest(path))
        return cache[family, variant]

    return get


@pytest.fixture(scope="module")
def reference(folder):
    """``reference(family, variant="fp32")``: ``transformers``' last-position logits ``[V]`` (float32
    compute) and greedy ids ``[NEW]`` of each prompt, computed alone."""
    cache: dict[tuple[str, str], tuple[list[torch.Tensor], list[list[int]]]] = {}

    def get(family: str, variant: str = "fp32"):
        if (family, variant) not in cache:
            path = folder(family, variant).path
            logits = [hf_tiny.hf_logits(path, torch.tensor([p]))[0, -1] for p in PROMPTS]
            ids = [hf_tiny.hf_greedy(path, torch.tensor([p]), NEW)[0].tolist() for p in PROMPTS]
            cache[family, variant] = (logits, ids)
        return cache[family, variant]

    return get


class Recorder:
    """A greedy sampler that keeps every logits tensor it sees (the first: the prefill's ``[B, V]``)."""

    def __init__(self):
        self.inner = Sampler(SamplingConfig())
        self.logits: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self.logits.append(logits.clone())
        return self.inner(logits)


def run_engine(path: Path, mode: str) -> tuple[list[list[int]], torch.Tensor, OffloadEngine]:
    """Greedy ``NEW`` tokens for :data:`PROMPTS` in one batch (no EOS stop); returns ``(ids, prefill
    logits [B, V], engine)`` (engine closed)."""
    rec = Recorder()
    with OffloadEngine(path, offload=mode, max_batch_size=len(PROMPTS), max_seq_len=16, **ENGINE) as eng:
        out, _ = eng.generate_ids(PROMPTS, NEW, rec)
    return out, rec.logits[0], eng


def assert_matches(logits: torch.Tensor, ids: list[list[int]], ref, tol: float = 1e-4) -> None:
    ref_logits, ref_ids = ref
    for row, want in enumerate(ref_logits):
        err = (logits[row] - want).abs().max().item()
        assert err <= tol, f"prompt {row}: logits differ from transformers by {err:.3e} (> {tol})"
    assert ids == ref_ids


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", hf_tiny.FAMILIES)
def test_matches_transformers(folder, reference, family: str, mode: str) -> None:
    """One ``model.safetensors``: prefill logits and greedy ids equal ``transformers``', through the
    engine and through :func:`~system.inference.engine.generate` (what ``moesys generate`` calls)."""
    f = folder(family, "fp32")
    ids, logits, eng = run_engine(f.path, mode)
    assert eng.hf_config is not None and eng.hf_config.family == family
    assert_matches(logits, ids, reference(family))
    out = generate(f.path, PROMPTS, NEW, batch_size=2, offload=mode, stop_at_eos=False, **ENGINE)
    assert out.tokens == reference(family)[1]
    if mode != "none":
        assert out.stats.bytes_streamed > 0
    f.check_untouched()


@pytest.mark.parametrize("family", hf_tiny.FAMILIES)
def test_sharded_checkpoint(folder, reference, family: str) -> None:
    """An index and several shards: every mode streams from the mapped shards and matches ``transformers``."""
    f = folder(family, "sharded")
    assert (f.path / "model.safetensors.index.json").is_file()
    for mode in MODES:
        ids, logits, eng = run_engine(f.path, mode)
        assert len({p.file for s in eng.ckpt.sources.values() for p in s.pieces}) > 2
        assert_matches(logits, ids, reference(family, "sharded"))
    f.check_untouched()


def test_fused_expert_tensors(folder, reference) -> None:
    """Fused ``gate_up_proj``/``down_proj`` (each expert's ``w1`` and ``w3`` are interleaved ranges of one
    tensor): every mode matches ``transformers`` on the same weights saved per expert."""
    f = folder("qwen3_moe", "fused")
    for mode in MODES:
        ids, logits, eng = run_engine(f.path, mode)
        assert eng.ckpt.source("layers.0.moe.experts.w1").pieces[0].hf_name.endswith("gate_up_proj")
        assert_matches(logits, ids, reference("qwen3_moe"))
    f.check_untouched()


@pytest.mark.parametrize("family", hf_tiny.FAMILIES)
def test_bf16_checkpoint(folder, reference, family: str) -> None:
    """bf16 weights run in bf16: the three modes give bitwise the same logits and ids, and the logits are
    within bf16 rounding of ``transformers``' float32 compute on the same weights (greedy ids of tiny
    random models, whose logits differ by less than that, are not compared)."""
    f = folder(family, "bf16")
    runs = {mode: run_engine(f.path, mode) for mode in MODES}
    ids, logits, eng = runs["none"]
    assert eng.model.tok_embeddings.weight.dtype == torch.bfloat16
    for mode in ("ring", "experts"):
        assert runs[mode][0] == ids and torch.equal(runs[mode][1], logits), mode
    ref_logits, _ = reference(family, "bf16")
    for row, want in enumerate(ref_logits):
        assert (logits[row] - want).abs().max().item() < 1e-2
        top2 = want.topk(2).values
        if top2[0] - top2[1] > 2e-2:  # a clear winner must win here too
            assert logits[row].argmax() == want.argmax()
    f.check_untouched()


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_sections_and_orientation(folder, family: str) -> None:
    """Routers (gate and DeepSeek's ``expert_bias``) and Qwen2-MoE's ``shared_expert_gate`` are resident;
    routed and shared experts and dense FFNs are sections; routed experts keep Hugging Face's
    orientation (column-major views of our ``[E, d, f]``) in device memory, ring slots and expert slots."""
    f = folder(family, "fp32")
    job = load_job_config(f.path)
    assert job.model.hf_model_type == family and job.data.tokenizer == "none" and job.moe.capacity_factor == 0
    with OffloadEngine(f.path, offload="ring", slots=1, max_batch_size=1, max_seq_len=8) as eng:
        layout = split_model(build_skeleton(job.model, job.moe), eng.ckpt)
        ring = eng.scheduler.ring
        views = ring.views[0][1]
    names = {t.name: t for s in layout.sections for t in s.tensors}
    assert "layers.1.moe.router.gate.weight" in layout.resident
    assert all(".moe.router." not in n and "shared_expert_gate" not in n for n in names)
    if family == "qwen2_moe":
        assert "layers.1.moe.shared_expert_gate.weight" in layout.resident
    else:
        assert "layers.1.moe.router.expert_bias" in layout.resident
        assert "layers.0.mlp.w1.weight" in names and layout.sections[0].kind == "dense"
    shared = names["layers.1.moe.shared_experts.w1.weight"]
    assert not shared.transposed
    for w in ("w1", "w2", "w3"):
        assert names[f"layers.1.moe.experts.{w}"].transposed
        view = views[f"layers.1.moe.experts.{w}"]
        assert view.stride(-2) == 1 and tuple(view.shape) == names[f"layers.1.moe.experts.{w}"].shape
    with OffloadEngine(f.path, offload="none", max_batch_size=1, max_seq_len=8) as eng:
        w1 = eng.model.layers[1].moe.experts.w1
        assert w1.stride(-2) == 1 and w1.stride(-1) == w1.shape[-2]
    with OffloadEngine(f.path, offload="experts", expert_cache=2, max_batch_size=1, max_seq_len=8) as eng:
        assert all(v.stride(-2) == 1 for v in eng.expert_cache.views[0].values())
    f.check_untouched()


def test_missing_shard(folder, tmp_path: Path) -> None:
    """A shard the index names is gone: the engine refuses before loading, naming the shard."""
    src = folder("mixtral", "sharded")
    broken = tmp_path / "broken"
    shutil.copytree(src.path, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(HFCheckpointError, match=shard.name):
        OffloadEngine(broken, offload="ring", max_batch_size=1, max_seq_len=8)
