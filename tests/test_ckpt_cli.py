"""``moesys ckpt inspect|verify|export|import-dcp`` on a checkpoint saved from a real model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from system.checkpoint import load_model, save
from system.checkpoint.train_state import sharded_train_state
from system.cli import main
from system.config.model import ModelConfig
from system.config.moe import MoEConfig
from system.models.model import MoETransformer
from system.train.optim import build_optimizer
from system.config.training import TrainingConfig


def _model(seed: int) -> MoETransformer:
    model = MoETransformer(ModelConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, vocab_size=64, max_seq_len=16),
                           MoEConfig(num_experts=4, top_k=2, expert_dim=48))
    model.init_weights(seed=seed)
    return model


@pytest.fixture()
def checkpoint(tmp_path: Path) -> tuple[Path, MoETransformer]:
    model = _model(0)
    opt = build_optimizer(model, TrainingConfig())
    path = tmp_path / "ckpt" / "step_00000003"
    save(sharded_train_state(model, opt), path, extra={"step": 3, "config": {"model": {"dim": 32}}},
         layout={"world_size": 1}, no_dist=True, update_latest=True)
    return path, model


def test_inspect_and_verify(checkpoint, capsys) -> None:
    path, _ = checkpoint
    assert main(["ckpt", "inspect", str(path.parent)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.moe.experts.w1" in out and "[4, 32, 48]" in out and "step         3" in out
    assert "optim.exp_avg_sq.layers.1.moe.experts.w2" in out
    assert main(["ckpt", "verify", str(path)]) == 0


def test_verify_finds_a_flipped_byte(checkpoint, capsys) -> None:
    path, _ = checkpoint
    data = next(path.glob("data-*.bin"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))
    assert main(["ckpt", "verify", str(path)]) == 1
    assert "problem" in capsys.readouterr().out


def test_export_safetensors_loads_into_a_model(checkpoint, tmp_path: Path) -> None:
    path, model = checkpoint
    out = tmp_path / "export"
    assert main(["ckpt", "export", str(path), "--format", "safetensors", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    fresh = _model(1)
    load_model(fresh, out)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_import_dcp(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    model = _model(2)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    out = tmp_path / "ours"
    assert main(["ckpt", "import-dcp", str(tmp_path / "dcp"), "--out", str(out)]) == 0
    assert main(["ckpt", "verify", str(out)]) == 0


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["ckpt", "inspect", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "does not exist" in err and "did not finish" not in err


def test_missing_and_misnamed_checkpoints_say_what_is_wrong(checkpoint, tmp_path: Path, capsys) -> None:
    from system.checkpoint import resolve_checkpoint
    from system.checkpoint.errors import CheckpointNotFoundError, UncommittedCheckpointError

    path, _ = checkpoint
    with pytest.raises(CheckpointNotFoundError, match="does not exist") as info:
        resolve_checkpoint(tmp_path / "typo")
    assert isinstance(info.value, UncommittedCheckpointError)  # old except clauses still catch it
    (path.parent / "latest").write_text("step_00000099")
    with pytest.raises(CheckpointNotFoundError, match="names checkpoint 'step_00000099'.*does not exist"):
        resolve_checkpoint(path.parent)
    assert main(["ckpt", "inspect", str(next(path.glob("data-*.bin")))]) == 1
    assert "is a file, not a checkpoint folder" in capsys.readouterr().err
    path.with_name("step_00000004").mkdir()
    assert main(["ckpt", "verify", str(path.with_name("step_00000004"))]) == 1
    assert "the save did not finish" in capsys.readouterr().err  # exists, never committed
