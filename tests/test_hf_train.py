"""Fine-tune a Hugging Face MoE checkpoint end to end: ``moesys train --checkpoint.initial_load_path HF_DIR``
at EP=2 (2 Gloo ranks, torchrun), export the result with ``moesys ckpt export --format hf``, and
``transformers`` loads the export with our logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_tiny import hf_logits, save_model

ROOT = Path(__file__).resolve().parents[1]
JOB = """
[parallel]
ep = 2
dp = 1

[data]
tokenizer = "byte"

[training]
steps = 4
batch_size = 2
seq_len = 32
lr = 1e-3
warmup_steps = 1
log_interval = 2
eval_interval = 4
eval_batches = 1
sample_tokens = 4

[metrics]
progress = false
tensorboard = false
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "system.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("family", ["qwen3_moe", pytest.param("deepseek_v3", marks=pytest.mark.slow)])
def test_finetune_hf_checkpoint_ep2_and_export(family: str, tmp_path: Path) -> None:
    from system.checkpoint.model_io import load_model
    from system.hf.config import read_hf_config
    from system.hf.weights import HFCheckpoint
    from system.models.model import MoETransformer

    hf_dir = save_model(family, tmp_path / "hf", vocab_size=320)  # covers the byte tokenizer's 257 ids
    job = tmp_path / "job.toml"
    job.write_text(JOB)
    run_dir = tmp_path / "run"
    _run("train", "--config", str(job), "--checkpoint.initial_load_path", str(hf_dir),
         "--metrics.run_dir", str(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ep"] == 2 and summary["steps"] == 4

    out = tmp_path / "export"
    _run("ckpt", "export", str(run_dir / "model"), "--format", "hf", "--out", str(out))
    assert json.loads((out / "config.json").read_text())["model_type"] == family

    hf = read_hf_config(out)
    ours = MoETransformer(hf.model, hf.moe)
    load_model(ours, run_dir / "model")  # the trained weights, our format
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours.eval()(tokens)
    assert (logits - hf_logits(out, tokens)).abs().max().item() <= 1e-4
    # Training started from the HF weights and changed them: close to the input (an independent random
    # init would be sqrt(2) away in relative norm), not equal to it.
    with HFCheckpoint(hf_dir) as before, HFCheckpoint(out) as after:
        for name in ("layers.1.moe.experts.w1", "layers.1.attention.wo.weight", "tok_embeddings.weight"):
            a, b = before.read(name), after.read(name)
            assert not torch.equal(a, b), name
            assert (b - a).norm() < 0.5 * a.norm(), name


def test_finetune_from_an_imported_checkpoint(tmp_path: Path) -> None:
    """``moesys ckpt import-hf`` output is a valid ``checkpoint.initial_load_path``: the model shape from its
    saved job config, the weights through the resharding reader (saved by one process, loaded at EP=2)."""
    from system.checkpoint.model_io import load_model
    from system.hf.config import read_hf_config
    from system.models.model import MoETransformer

    hf_dir = save_model("mixtral", tmp_path / "hf", vocab_size=320)
    ckpt = tmp_path / "ckpt"
    _run("ckpt", "import-hf", str(hf_dir), "--out", str(ckpt))
    job = tmp_path / "job.toml"
    job.write_text(JOB.replace("steps = 4", "steps = 1"))
    run_dir = tmp_path / "run"
    proc = _run("train", "--config", str(job), "--checkpoint.initial_load_path", str(ckpt), "--training.lr", "1e-9",
                "--metrics.run_dir", str(run_dir))
    assert "initial weights:" in proc.stderr + proc.stdout
    hf = read_hf_config(hf_dir)
    trained, original = MoETransformer(hf.model, hf.moe), MoETransformer(hf.model, hf.moe)
    load_model(trained, run_dir / "model")
    load_model(original, hf_dir)
    for (name, a), b in zip(original.state_dict().items(), trained.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name  # one step at lr 1e-9 from the imported weights
