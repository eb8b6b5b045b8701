"""``checkpoint.initial_load_path``: the model folder's shape merged into the job config at load time,
the bad paths refused in one line before any worker starts, and the ``--dry-run`` memory plan (checked
against a hand count, and on the shipped fine-tuning configs against 80 GB devices)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hf_tiny import read_config, save_model
from system.cli import main
from system.config.initial_load import FREE_KEYS
from system.config.job import JobConfig
from system.config.loader import ConfigError, apply_dict, config_to_dict, load_config
from system.hf.config import read_hf_config

ROOT = Path(__file__).resolve().parents[1]
FT_CONFIGS = ["mixtral-8x7b-ft", "qwen3-30b-a3b-ft", "olmoe-1b-7b-ft", "deepseek-v3-lite-ft"]
GB80 = 80 * 10**9


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    return save_model("mixtral", tmp_path_factory.mktemp("hf") / "mixtral")


def _toml(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _job(tmp_path: Path, folder: Path, extra: str = "", name: str = "job.toml") -> Path:
    """A TOML that names ``folder`` and sets only ``extra`` (plus a short sequence)."""
    return _toml(tmp_path, f'[checkpoint]\ninitial_load_path = "{folder}"\n[training]\nseq_len = 32\n{extra}', name)


# ------------------------------------------------------------------------------ apply_dict records keys
def test_apply_dict_records_the_keys_it_sets_and_where() -> None:
    cfg, seen = JobConfig(), {}
    out = apply_dict(cfg, {"model": {"dim": 64}, "name": "x"}, source="a.toml", record=seen)
    apply_dict(cfg, {"model": {"dim": "32"}, "moe": {"top_k": "1"}}, source="command line", record=seen)
    assert out is cfg and cfg.model.dim == 32 and cfg.moe.top_k == 1
    assert seen == {"model.dim": "command line", "name": "a.toml", "moe.top_k": "command line"}
    assert apply_dict(JobConfig(), {"model": {"dim": 64}}).model.dim == 64  # without record: as before


# ---------------------------------------------------------------------------------- merge from HF folders
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3"])
def test_unset_model_and_moe_keys_come_from_the_hf_folder(tmp_path: Path, family: str) -> None:
    folder = save_model(family, tmp_path / family)
    cfg = load_config(_job(tmp_path, folder))
    hf = read_hf_config(folder)
    assert cfg.model == hf.model and cfg.moe == hf.moe
    assert cfg.model.vocab_size == read_config(folder)["vocab_size"]
    assert cfg.data.tokenizer == "byte"  # no tokenizer.json in the folder


def test_explicit_keys_equal_to_the_folder_and_free_keys_are_accepted(tmp_path: Path, mixtral: Path) -> None:
    extra = """
[model]
dim = 32
n_layers = 2
head_dim = 8          # = dim / n_heads: the folder's 0 (derived) means the same
n_kv_heads = 2
rope_theta = 1e6
max_seq_len = 64      # free, <= max_position_embeddings (256)
init_std = 0.05
[moe]
num_experts = 4
capacity_factor = 1.25
aux_loss_coef = 0.05
z_loss_coef = 0.0
load_balance = "bias"
grouped_mm = "off"
router = "uncertainty"
"""
    cfg = load_config(_job(tmp_path, mixtral, extra), ["--moe.router_passes", "2"])
    assert (cfg.model.max_seq_len, cfg.model.init_std) == (64, 0.05)
    assert (cfg.moe.capacity_factor, cfg.moe.aux_loss_coef, cfg.moe.load_balance) == (1.25, 0.05, "bias")
    assert (cfg.moe.router, cfg.moe.router_passes, cfg.moe.grouped_mm) == ("uncertainty", 2, "off")
    assert cfg.moe.expert_dim == 48 and cfg.model.rope_style == "half"  # still taken from the folder
    assert "max_seq_len" in FREE_KEYS["model"] and "capacity_factor" in FREE_KEYS["moe"]


def test_a_contradicting_toml_key_names_both_values(tmp_path: Path, mixtral: Path) -> None:
    toml = _job(tmp_path, mixtral, "[model]\ndim = 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(toml)
    msg = str(e.value)
    assert f"model.dim = 64 ({toml}) contradicts hidden_size = 32 in {mixtral / 'config.json'}" in msg
    assert "\n" not in msg


def test_contradicting_command_line_keys_are_all_listed_in_one_line(tmp_path: Path, mixtral: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_job(tmp_path, mixtral), ["--moe.num_experts", "8", "--model.qk_norm", "head",
                                              "--model.max_seq_len", "512"])
    msg = str(e.value)
    assert "moe.num_experts = 8 (command line) contradicts num_local_experts = 4 in" in msg
    assert 'model.qk_norm = "head" (command line) contradicts model.qk_norm = "none" as read from' in msg
    assert "model.max_seq_len = 512 (command line) exceeds max_position_embeddings = 256 in" in msg
    assert "\n" not in msg


def test_the_folder_tokenizer_becomes_data_tokenizer_unless_set(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    folder = save_model("olmoe", tmp_path / "olmoe")
    Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))
    assert load_config(_job(tmp_path, folder)).data.tokenizer == str(folder)
    assert load_config(_job(tmp_path, folder), ["--data.tokenizer", "byte"]).data.tokenizer == "byte"


# ------------------------------------------------------------------------------ our exported model folder
def test_our_exported_model_folder_gives_its_saved_shape(tmp_path: Path) -> None:
    import torch

    from system.checkpoint.model_io import write_model

    saved = load_config(None, ["--model.dim", "48", "--model.n_layers", "3", "--model.n_heads", "4",
                               "--model.vocab_size", "320", "--moe.num_experts", "6", "--moe.top_k", "3",
                               "--moe.score_func", "sigmoid"])
    folder = write_model({"w": torch.zeros(2)}, tmp_path / "export", config_to_dict(saved))
    cfg = load_config(_job(tmp_path, folder, "[moe]\naux_loss_coef = 0.0\n"))
    assert cfg.model == saved.model
    assert cfg.moe.num_experts == 6 and cfg.moe.score_func == "sigmoid" and cfg.moe.aux_loss_coef == 0.0
    toml = _job(tmp_path, folder, "[model]\ndim = 64\n", name="bad.toml")
    with pytest.raises(ConfigError, match=re.escape(f"model.dim = 64 ({toml}) contradicts model.dim = 48 in "
                                                    f"{folder / 'config.json'}")):
        load_config(toml)


# ------------------------------------------------------------------------------------------- bad paths
def _bad_folders(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"x")
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"hello": 1}))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    ckpt = tmp_path / "step_00000010"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text("{}")
    return {
        "missing": (tmp_path / "nope", "does not exist"),
        "file": (file, "is a file, not a model folder"),
        "no config": (empty, "is not a model folder: no config.json"),
        "uncommitted checkpoint": (ckpt, "metadata.json is not a moesys-ckpt metadata file"),
        "neither": (other, "is neither a Hugging Face model folder"),
        "unsupported": (llama, "architecture LlamaForCausalLM (model_type 'llama') is not supported"),
    }


def test_bad_initial_load_paths_are_one_line_config_errors(tmp_path: Path) -> None:
    for what, (path, expected) in _bad_folders(tmp_path).items():
        with pytest.raises(ConfigError) as e:
            load_config(_job(tmp_path, path))
        assert expected in str(e.value) and "checkpoint.initial_load_path" in str(e.value), what
        assert "\n" not in str(e.value), what


def test_hf_folder_without_weights_is_refused(tmp_path: Path, mixtral: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((mixtral / "config.json").read_text())
    with pytest.raises(ConfigError, match="holds config.json but no safetensors weights"):
        load_config(_job(tmp_path, bare))


def _cli(capsys, *args: str) -> tuple[int, str, list[str]]:
    code = main(["train", *args])
    out, err = capsys.readouterr()
    return code, out, [ln for ln in err.splitlines() if ln.strip()]


def test_dry_run_reports_bad_paths_and_only_warns_for_a_missing_one(tmp_path: Path, capsys) -> None:
    run = ["--metrics.run_dir", str(tmp_path / "run"), "--nproc-per-node", "1", "--parallel.ep", "1",
           "--model.vocab_size", "320"]
    for what, (path, expected) in _bad_folders(tmp_path).items():
        code, out, err = _cli(capsys, "--config", str(_job(tmp_path, path)), *run, "--dry-run")
        if what == "missing":
            assert code == 0, err
            assert err == [f"warning: checkpoint.initial_load_path {path} does not exist: the model shape is the "
                           f"config's own [model]/[moe] (the real run refuses a missing folder)"]
            assert "memory per rank:" in out
        else:
            assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (what, err)
    code, out, err = _cli(capsys, "--config", str(_job(tmp_path, tmp_path / "nope")), *run)
    assert code == 2 and err == [f"error: checkpoint.initial_load_path {tmp_path / 'nope'} does not exist"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- memory plan
def _tiny(**parallel) -> JobConfig:
    cfg = load_config(None, ["--model.dim", "8", "--model.n_layers", "2", "--model.n_heads", "2",
                             "--model.vocab_size", "16", "--model.tie_embeddings", "false",
                             "--moe.num_experts", "4", "--moe.top_k", "2", "--moe.expert_dim", "12",
                             "--training.mixed_precision", "fp32", "--training.seq_len", "16",
                             "--model.max_seq_len", "16"])
    for key, value in parallel.items():
        setattr(cfg.parallel if hasattr(cfg.parallel, key) else cfg.training, key, value)
    return cfg


def test_estimate_memory_matches_a_hand_count() -> None:
    from system.train.memory import estimate_memory

    # Per block: attention_norm 8 + wq/wk/wv/wo 4 x 8x8 + ffn_norm 8 + router 4x8 = 304 dense;
    # experts w1/w3 4x8x12 and w2 4x12x8 = 1152 (288 per expert). Root: embedding 16x8 + norm 8 + head 16x8.
    dense, experts = 128 + 2 * 304 + 8 + 128, 2 * 1152
    est = estimate_memory(_tiny(ep=2, dp=1), world_size=2)
    assert (est.total_params, est.dense_params, est.expert_params) == (dense + experts, dense, experts)
    assert est.active_params == dense + 2 * 2 * 288  # top-2 of 4 experts in each of 2 layers
    rank = dense + experts // 2  # dense replicated, experts 2 of 4 per rank
    assert (est.rank_params, est.param_bytes, est.grad_bytes, est.optimizer_bytes) == (rank, 4 * rank, 4 * rank,
                                                                                     8 * rank)
    assert est.working_bytes == 0 and est.total_bytes == 16 * rank  # fp32: no compute copies

    bf16 = estimate_memory(_tiny(ep=2, dp=1, mixed_precision="bf16"), world_size=2)
    assert bf16.param_bytes == 4 * rank and bf16.working_bytes == 2 * rank  # master weights stay fp32

    fsdp = estimate_memory(_tiny(ep=2, dp=1, dense="fsdp"), world_size=2)
    # ceil(dim0 / 2) rows of every dense tensor: embedding 8x8, per block 4 + 4 x 4x8 + 4 + 2x8, norm 4, head 8x8
    dense_rank = 64 + 2 * (4 + 128 + 4 + 16) + 4 + 64
    assert fsdp.rank_params == dense_rank + experts // 2
    assert fsdp.working_bytes == (128 + 8 + 128 + 2 * 304) * 4  # gathered root + two blocks

    fssdp = estimate_memory(_tiny(ep=1, dp=-1, expert_mode="fssdp"), world_size=3)
    assert (fssdp.dp, fssdp.experts_per_rank) == (3, 2)  # ceil(4 / 3) owned experts on the fullest rank
    assert fssdp.rank_params == dense + 2 * 2 * 288
    rows = (2 + 2) * 288  # owned + fssdp.memory_budget (2) gathered rows per layer
    assert fssdp.working_bytes == rows * 4 * 2 + rows * 4  # kept in both layers + one layer's row gradients


def test_estimate_memory_agrees_with_transformers_parameter_count(tmp_path: Path) -> None:
    import transformers

    from system.train.memory import estimate_memory

    for family in ("mixtral", "qwen3_moe", "olmoe"):
        folder = save_model(family, tmp_path / family)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
        est = estimate_memory(load_config(_job(tmp_path, folder)), world_size=2)
        assert est.total_params == sum(p.numel() for p in hf.parameters()), family


def _dry_run_total(capsys, tmp_path: Path, name: str) -> tuple[int, str]:
    code, out, err = _cli(capsys, "--config", str(ROOT / "configs" / f"{name}.toml"), "--dry-run",
                          "--metrics.run_dir", str(tmp_path / name))
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("memory per rank:"))
    return int(re.search(r"\((\d+) bytes\)", line).group(1)), line


@pytest.mark.parametrize("name", FT_CONFIGS)
def test_fine_tuning_configs_dry_run_and_state_their_memory(capsys, tmp_path: Path, name: str) -> None:
    total, line = _dry_run_total(capsys, tmp_path, name)
    text = (ROOT / "configs" / f"{name}.toml").read_text()
    shown = re.search(r"= ([\d.]+ GB) \(", line).group(1)
    assert f"= {shown}" in text, f"configs/{name}.toml should state the dry-run's {shown} per device"
    if name == "mixtral-8x7b-ft":  # no layout fits 80 GB (see the config); one 141 GB H200 does
        assert GB80 < total < 141 * 10**9
    else:
        assert total < GB80, f"{name}: {total / 1e9:.1f} GB per rank does not fit an 80 GB device"
