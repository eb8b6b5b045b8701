"""Tests for ``system.config``: TOML files, ``--section.key value`` overrides, coercion, validation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from system.config import (
    ConfigError,
    JobConfig,
    ModelConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO_ROOT / "configs").glob("*.toml"))


def _toml(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------------------
# defaults, TOML, overrides and precedence


def test_defaults_only() -> None:
    cfg = load_config()
    assert cfg == JobConfig()
    assert cfg.name == "job"


def test_toml_sets_values_and_name_from_stem(tmp_path: Path) -> None:
    p = _toml(
        tmp_path,
        '[model]\ndim = 64\nn_heads = 2\n[moe]\nscore_func = "sigmoid"\n[training]\nlr = 1\n',
        name="my-run.toml",
    )
    cfg = load_config(p)
    assert cfg.name == "my-run"
    assert cfg.model.dim == 64 and cfg.model.n_heads == 2
    assert cfg.moe.score_func == "sigmoid"
    # TOML integer for a float field becomes a float.
    assert cfg.training.lr == 1.0 and isinstance(cfg.training.lr, float)
    # Untouched keys keep their defaults.
    assert cfg.model.n_layers == ModelConfig().n_layers
    assert cfg.moe.top_k == 2


def test_precedence_cli_over_toml_over_defaults(tmp_path: Path) -> None:
    p = _toml(tmp_path, "[model]\ndim = 64\nn_layers = 3\n[training]\nsteps = 7\n")
    cfg = load_config(p, ["--model.dim", "32", "--training.steps=9"])
    assert cfg.model.dim == 32  # CLI beats TOML
    assert cfg.training.steps == 9  # CLI (= form) beats TOML
    assert cfg.model.n_layers == 3  # TOML beats default
    assert cfg.model.n_heads == ModelConfig().n_heads  # default


def test_overrides_without_file() -> None:
    cfg = load_config(None, ["--moe.num_experts=16", "--moe.top_k", "4", "--data.path", "a=b.txt"])
    assert cfg.moe.num_experts == 16 and cfg.moe.top_k == 4
    assert cfg.data.path == "a=b.txt"  # '=' in the value of the space form is kept


def test_parse_overrides_forms() -> None:
    out = parse_overrides(["--model.dim", "8", "--model.n_heads=2", "--data.path=x=y", "--moe.top_k", "1"])
    assert out == {"model": {"dim": "8", "n_heads": "2"}, "data": {"path": "x=y"}, "moe": {"top_k": "1"}}
    assert parse_overrides([]) == {}


@pytest.mark.parametrize(
    "args",
    [["model.dim", "8"], ["--modeldim", "8"], ["--model.dim"], ["-model.dim", "8"]],
)
def test_parse_overrides_malformed(args: list[str]) -> None:
    with pytest.raises(ConfigError):
        parse_overrides(args)


def test_last_override_wins() -> None:
    cfg = load_config(None, ["--model.dim", "32", "--model.dim=64"])
    assert cfg.model.dim == 64


# ------------------------------------------------------------------------------------------
# coercion


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("True", True), ("1", True), ("yes", True), ("on", True),
     ("false", False), ("FALSE", False), ("0", False), ("no", False), ("off", False)],
)
def test_bool_coercion_from_cli(text: str, expected: bool) -> None:
    cfg = load_config(None, [f"--metrics.tensorboard={text}"])
    assert cfg.metrics.tensorboard is expected


def test_bool_from_toml(tmp_path: Path) -> None:
    cfg = load_config(_toml(tmp_path, "[model]\ntie_embeddings = false\n"))
    assert cfg.model.tie_embeddings is False


@pytest.mark.parametrize("text", ["maybe", "2", ""])
def test_bad_bool(text: str) -> None:
    with pytest.raises(ConfigError, match=r"model\.tie_embeddings"):
        load_config(None, ["--model.tie_embeddings", text])


def test_bool_rejects_toml_int(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.tie_embeddings"):
        load_config(_toml(tmp_path, "[model]\ntie_embeddings = 1\n"))


def test_int_coercion() -> None:
    cfg = load_config(None, ["--model.dim", "128", "--training.steps", "0x10", "--training.seed=-3"])
    assert cfg.model.dim == 128 and isinstance(cfg.model.dim, int)
    assert cfg.training.steps == 16
    assert cfg.training.seed == -3


@pytest.mark.parametrize("text", ["3.5", "abc", "1e3", ""])
def test_non_integer_int_from_cli(text: str) -> None:
    with pytest.raises(ConfigError, match=r"training\.steps.*integer"):
        load_config(None, ["--training.steps", text])


@pytest.mark.parametrize("value", ["3.5", "true", '"abc"'])
def test_non_integer_int_from_toml(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"training\.steps"):
        load_config(_toml(tmp_path, f"[training]\nsteps = {value}\n"))


def test_int_from_toml_string(tmp_path: Path) -> None:
    assert load_config(_toml(tmp_path, '[training]\nsteps = "12"\n')).training.steps == 12


def test_float_coercion() -> None:
    cfg = load_config(None, ["--training.lr", "1e-4", "--training.beta2=0.99", "--model.rope_theta", "500000"])
    assert cfg.training.lr == pytest.approx(1e-4) and isinstance(cfg.training.lr, float)
    assert cfg.training.beta2 == 0.99
    assert cfg.model.rope_theta == 500000.0 and isinstance(cfg.model.rope_theta, float)


def test_bad_float() -> None:
    with pytest.raises(ConfigError, match=r"training\.lr.*number"):
        load_config(None, ["--training.lr", "fast"])


def test_float_rejects_toml_bool(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"training\.lr"):
        load_config(_toml(tmp_path, "[training]\nlr = true\n"))


def test_literal_coercion() -> None:
    cfg = load_config(None, ["--moe.score_func", "sigmoid", "--parallel.dense=fsdp", "--moe.grouped_mm", "off"])
    assert cfg.moe.score_func == "sigmoid"
    assert cfg.parallel.dense == "fsdp"
    assert cfg.moe.grouped_mm == "off"


def test_bad_literal_lists_choices() -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["--moe.score_func", "tanh"])
    msg = str(ei.value)
    assert "moe.score_func" in msg and "'tanh'" in msg
    assert "'softmax'" in msg and "'sigmoid'" in msg


def test_bad_literal_from_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"parallel\.backend.*'auto'.*'nccl'.*'gloo'"):
        load_config(_toml(tmp_path, '[parallel]\nbackend = "mpi"\n'))


def test_string_field_rejects_non_string(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.path.*string"):
        load_config(_toml(tmp_path, "[data]\npath = 3\n"))


# ------------------------------------------------------------------------------------------
# unknown sections / keys, files


def test_unknown_section_cli() -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["--optim.lr", "1"])
    msg = str(ei.value)
    assert "'optim'" in msg
    for section in ("model", "moe", "parallel", "data", "training", "checkpoint", "metrics"):
        assert section in msg


def test_unknown_section_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="optimizer"):
        load_config(_toml(tmp_path, "[optimizer]\nlr = 1\n"))


def test_unknown_key_names_key_and_lists_allowed() -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["--model.hidden", "8"])
    msg = str(ei.value)
    assert "model.hidden" in msg
    for key in (f.name for f in dataclasses.fields(ModelConfig)):
        assert key in msg
    assert "command line" in msg


def test_unknown_key_toml_names_file(tmp_path: Path) -> None:
    p = _toml(tmp_path, "[moe]\nexperts = 4\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert "moe.experts" in msg and "num_experts" in msg and "top_k" in msg
    assert str(p) in msg


def test_section_must_be_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[model\] must be a table"):
        load_config(_toml(tmp_path, "model = 3\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path)  # a directory is not a config file


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(_toml(tmp_path, "[model\ndim = 3\n"))


# ------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["--moe.num_experts", "4", "--moe.top_k", "5"], "moe.top_k"),
        (["--moe.top_k", "0"], "moe.top_k"),
        (["--moe.num_experts", "0"], "moe.num_experts"),
        (["--model.dim", "30", "--model.n_heads", "4"], "model.dim"),
        (["--model.n_heads", "4", "--model.n_kv_heads", "3"], "model.n_heads"),
        (["--model.n_layers", "0"], "model.n_layers"),
        (["--model.vocab_size", "-1"], "model.vocab_size"),
        (["--training.seq_len", "2048", "--model.max_seq_len", "1024"], "training.seq_len"),
        (["--training.batch_size", "0"], "training.batch_size"),
        (["--training.lr", "-1"], "training.lr"),
        (["--training.mixed_precision", "fp16"], "training.mixed_precision"),
        (["--moe.capacity_factor", "-0.5"], "moe.capacity_factor"),
        (["--moe.interleave", "0"], "moe.interleave"),
        (["--moe.aux_loss_coef", "-1"], "moe.aux_loss_coef"),
        (["--parallel.ep", "0"], "parallel.ep"),
        (["--parallel.dp", "0"], "parallel.dp"),
        (["--data.val_fraction", "1.0"], "data.val_fraction"),
    ],
)
def test_validation_errors_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_validation_boundaries_pass() -> None:
    cfg = load_config(
        None,
        ["--moe.num_experts", "4", "--moe.top_k", "4", "--training.seq_len", "64", "--model.max_seq_len", "64",
         "--model.n_kv_heads", "2", "--parallel.dp", "-1"],
    )
    assert cfg.moe.top_k == cfg.moe.num_experts == 4
    assert cfg.training.seq_len == cfg.model.max_seq_len == 64


def test_validation_error_from_toml(tmp_path: Path) -> None:
    p = _toml(tmp_path, "[moe]\nnum_experts = 2\ntop_k = 3\n")
    with pytest.raises(ConfigError, match=r"moe\.top_k"):
        load_config(p)
    # ... and a CLI override can repair it.
    assert load_config(p, ["--moe.top_k", "2"]).moe.top_k == 2


def test_negative_n_kv_heads_rejected() -> None:
    with pytest.raises(ConfigError, match=r"model\.n_kv_heads"):
        load_config(None, ["--model.n_heads", "4", "--model.n_kv_heads", "-2"])


# ------------------------------------------------------------------------------------------
# round trip and shipped configs


def test_dict_round_trip() -> None:
    cfg = load_config(
        None, ["--model.dim", "64", "--moe.score_func", "sigmoid", "--metrics.progress", "false", "--training.lr=5e-4"]
    )
    cfg.name = "rt"
    d = config_to_dict(cfg)
    assert d["model"]["dim"] == 64 and d["name"] == "rt"
    back = config_from_dict(d)
    assert back == cfg
    # Through JSON as well (what a run directory stores).
    assert config_from_dict(json.loads(json.dumps(d))) == cfg
    # config_from_dict does not mutate its input.
    assert d["name"] == "rt"


def test_config_from_dict_validates_and_rejects_unknown() -> None:
    d = config_to_dict(JobConfig())
    d["moe"]["top_k"] = 99
    with pytest.raises(ValueError, match=r"moe\.top_k"):
        config_from_dict(d)
    d = config_to_dict(JobConfig())
    d["model"]["bogus"] = 1
    with pytest.raises(ConfigError, match=r"model\.bogus"):
        config_from_dict(d)


def test_shipped_configs_exist() -> None:
    assert CONFIG_FILES, "no configs/*.toml found"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path, initial_load_missing_ok=True)  # the *-ft configs name a model folder absent here
    assert cfg.name == path.stem
    cfg.validate()
    assert config_from_dict(config_to_dict(cfg)) == cfg
