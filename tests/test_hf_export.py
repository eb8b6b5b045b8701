"""``moesys ckpt import-hf`` and ``ckpt export --format hf``: tiny random models of every family made with
``transformers`` go through our checkpoint format and back, byte for byte, and load in ``transformers``
with the same logits; :func:`system.hf.export.to_hf_config` inverts :func:`system.hf.config.read_hf_config`.
CPU, no downloads.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from hf_tiny import FAMILIES, VOCAB, hf_logits, make_config, save_model, transformers

import torch  # noqa: E402 (after hf_tiny's importorskip)
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from system.cli import main  # noqa: E402
from system.config.model import ModelConfig  # noqa: E402
from system.config.moe import MoEConfig  # noqa: E402
from system.hf.config import HFCheckpointError, read_hf_config  # noqa: E402
from system.hf.export import to_hf_config, write_hf_checkpoint  # noqa: E402

TOKENS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder (single file or shards)."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _assert_identical(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb), set(wa) ^ set(wb)
    for name, t in wa.items():
        assert t.dtype == wb[name].dtype and torch.equal(t, wb[name]), name


def _load(folder: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), (key, info[key])
    return model


def _roundtrip(tmp_path: Path, family: str, dtype, **save_kwargs) -> tuple[Path, Path, Path]:
    src = save_model(family, tmp_path / "hf", dtype=dtype, **save_kwargs)
    ckpt, out = tmp_path / "ckpt", tmp_path / "export"
    assert main(["ckpt", "import-hf", str(src), "--out", str(ckpt)]) == 0
    assert main(["ckpt", "verify", str(ckpt)]) == 0
    return src, ckpt, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_import_export_is_byte_identical_and_loads(tmp_path: Path, family: str, dtype) -> None:
    src, ckpt, out = _roundtrip(tmp_path, family, dtype)
    assert main(["ckpt", "export", str(ckpt), "--format", "hf", "--out", str(out)]) == 0
    _assert_identical(src, out)
    _load(out)
    assert torch.equal(hf_logits(out, TOKENS), hf_logits(src, TOKENS))
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    theirs, ours = read_hf_config(src), read_hf_config(out)
    assert (ours.model, ours.moe, ours.bos_token_id, ours.eos_token_ids) == \
        (theirs.model, theirs.moe, theirs.bos_token_id, theirs.eos_token_ids)


def test_sharded_import_and_export(tmp_path: Path) -> None:
    src, ckpt, out = _roundtrip(tmp_path, "qwen3_moe", torch.float32, max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").is_file()
    assert main(["ckpt", "export", str(ckpt), "--format", "hf", "--out", str(out), "--max-shard-size", "30kB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.name.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    weights = _weights(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in weights.values())
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
            assert len(sizes) == 1 or sum(weights[k].numel() * 4 for k in f.keys()) <= 30_000
            assert all(index["weight_map"][k] == shard.name for k in f.keys())
    _assert_identical(src, out)
    _load(out)
    assert torch.equal(hf_logits(out, TOKENS), hf_logits(src, TOKENS))


def test_export_from_a_model_folder_with_tokenizer(tmp_path: Path, capsys) -> None:
    """An exported model folder (model.safetensors + job config.json) exports too; data.tokenizer = the
    imported HF folder brings its tokenizer files and BOS/EOS."""
    tokenizers = pytest.importorskip("tokenizers")
    src = save_model("mixtral", tmp_path / "hf")
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0")).save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "t1", "eos_token": "t2"}))
    ckpt, model_dir, out = tmp_path / "ckpt", tmp_path / "model", tmp_path / "export"
    assert main(["ckpt", "import-hf", str(src), "--out", str(ckpt)]) == 0
    assert main(["ckpt", "inspect", str(ckpt), "--json"]) == 0
    saved = json.loads(capsys.readouterr().out.split("\n", 1)[1])["extra"]["config"]
    assert saved["data"]["tokenizer"] == str(src.absolute()) and saved["model"]["hf_model_type"] == "mixtral"
    assert main(["ckpt", "export", str(ckpt), "--format", "safetensors", "--out", str(model_dir)]) == 0
    assert main(["ckpt", "export", str(model_dir), "--format", "hf", "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert "tokenizer from" in capsys.readouterr().out
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    weights = _weights(out)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert set(weights) == set(_weights(src))
    _load(out)
    assert transformers.AutoTokenizer.from_pretrained(out) is not None


def test_our_model_exports_to_hf_with_the_same_logits(tmp_path: Path) -> None:
    """Models of ours (interleaved rotary, tied embeddings, no hf_model_type) export as the inferred family
    and transformers computes our logits: query/key rows permuted for the half rotary pairing; a
    DeepSeek-V3 trained with aux-loss balancing gets a zero score bias."""
    from system.models.model import MoETransformer

    mla = dict(attention_type="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
               v_head_dim=8)
    cases = {
        "MixtralForCausalLM": ({}, {}),
        "Qwen3MoeForCausalLM": (dict(qk_norm="head", head_dim=16, qkv_bias=True, o_bias=True), {}),
        "OlmoeForCausalLM": (dict(qk_norm="full"), {}),
        "Qwen2MoeForCausalLM": (dict(qkv_bias=True), dict(num_shared_experts=1, shared_expert_dim=40,
                                                           shared_expert_gate=True)),
        "DeepseekV3ForCausalLM": (mla, dict(score_func="sigmoid", first_dense_layers=1, num_shared_experts=1,
                                            route_scale=2.0)),
    }
    for arch, (model_kwargs, moe_kwargs) in cases.items():
        m = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=64, **model_kwargs)
        e = MoEConfig(num_experts=4, top_k=2, expert_dim=24, **moe_kwargs)
        model = MoETransformer(m, e)
        model.init_weights(seed=1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
        out = write_hf_checkpoint(lambda: iter(model.state_dict().items()), m, e, tmp_path / arch)
        hf = _load(out)
        assert type(hf).__name__ == arch
        assert "lm_head.weight" not in _weights(out)
        with torch.no_grad():
            torch.testing.assert_close(hf(TOKENS).logits, model.eval()(TOKENS), rtol=0, atol=1e-4)


# -- config ------------------------------------------------------------------------------------------
CONFIG_VARIANTS = [
    ("mixtral", {}), ("mixtral", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="linear", factor=2.0, rope_theta=5e5))),
    ("qwen3_moe", {}), ("qwen3_moe", dict(mlp_only_layers=[0], num_hidden_layers=3)),
    ("qwen2_moe", {}), ("qwen2_moe", dict(decoder_sparse_step=2, num_hidden_layers=4, qkv_bias=False)),
    ("olmoe", {}), ("olmoe", dict(attention_bias=True)),
    ("deepseek_v3", {}), ("deepseek_v3", dict(q_lora_rank=None, n_group=1, topk_group=1, rope_interleave=False)),
    ("deepseek_v3", dict(rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                                              rope_theta=1e4, beta_fast=32, beta_slow=1, mscale=1.0,
                                              mscale_all_dim=1.0))),
    ("mixtral", dict(rope_parameters=dict(rope_type="llama3", factor=8.0, original_max_position_embeddings=64,
                                          rope_theta=5e5, low_freq_factor=1.0, high_freq_factor=4.0))),
]


@pytest.mark.parametrize("family,overrides", CONFIG_VARIANTS,
                         ids=[f"{f}-{i}" for i, (f, _) in enumerate(CONFIG_VARIANTS)])
def test_to_hf_config_inverts_read_hf_config(tmp_path: Path, family: str, overrides: dict) -> None:
    make_config(family, bos_token_id=1, eos_token_id=[2, 3], **overrides).save_pretrained(tmp_path / "a")
    a = read_hf_config(tmp_path / "a")
    cfg = to_hf_config(a.model, a.moe, bos_token_id=a.bos_token_id, eos_token_id=a.eos_token_ids,
                       dtype=torch.bfloat16)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    b = read_hf_config(tmp_path / "b")
    assert (b.family, b.model, b.moe, b.bos_token_id, b.eos_token_ids) == \
        (family, a.model, a.moe, a.bos_token_id, a.eos_token_ids)
    theirs = transformers.AutoConfig.from_pretrained(tmp_path / "b")  # the library's class accepts it
    assert type(theirs).model_type == family and theirs.architectures == cfg["architectures"]
    assert theirs.dtype == torch.bfloat16 and theirs.hidden_size == a.model.dim
    assert theirs.rope_parameters["rope_type"] == cfg["rope_parameters"]["rope_type"]


def test_family_is_inferred_and_what_it_cannot_state_is_named() -> None:
    m, e = ModelConfig(vocab_size=64), MoEConfig()
    assert to_hf_config(m, e)["model_type"] == "mixtral"
    mla = to_hf_config(replace(m, attention_type="mla"), replace(e, score_func="sigmoid"))
    assert mla["model_type"] == "deepseek_v3"
    assert to_hf_config(m, replace(e, num_shared_experts=1, shared_expert_gate=True))["model_type"] == "qwen2_moe"
    with pytest.raises(HFCheckpointError, match=r"mixtral .*moe.num_shared_experts = 2 \(mixtral has no shared"):
        to_hf_config(replace(m, hf_model_type="mixtral"), replace(e, num_shared_experts=2))
    with pytest.raises(HFCheckpointError, match=r"moe.score_func = 'sigmoid'.*moe.route_scale = 2.5"):
        to_hf_config(m, replace(e, score_func="sigmoid", route_scale=2.5))
    with pytest.raises(HFCheckpointError, match="model.hf_model_type = 'llama'.*supported: mixtral"):
        to_hf_config(replace(m, hf_model_type="llama"), e)


def test_non_zero_expert_bias_is_not_dropped(tmp_path: Path) -> None:
    from system.models.model import MoETransformer

    m = ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=64, max_seq_len=16)
    e = MoEConfig(num_experts=4, top_k=2, expert_dim=16, load_balance="bias")
    state = MoETransformer(m, e).state_dict()
    assert torch.count_nonzero(state["layers.0.moe.router.expert_bias"]) == 0
    write_hf_checkpoint(state, m, e, tmp_path / "zero")  # a zero bias changes nothing: dropped
    assert not any("e_score" in k for k in _weights(tmp_path / "zero"))
    state["layers.0.moe.router.expert_bias"] = torch.tensor([0.1, 0.0, 0.0, 0.0])
    with pytest.raises(HFCheckpointError, match=r"layers.0.moe.router.expert_bias .*non-zero.*mixtral"):
        write_hf_checkpoint(state, m, e, tmp_path / "bias")
    assert not (tmp_path / "bias").exists() and not list(tmp_path.glob(".bias.tmp-*"))


# -- refusals and bad input --------------------------------------------------------------------------
def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_export_refuses_a_folder_it_did_not_write(tmp_path: Path, capsys) -> None:
    _, ckpt, out = _roundtrip(tmp_path, "olmoe", torch.float32)
    capsys.readouterr()  # transformers' progress bars
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["ckpt", "export", str(ckpt), "--format", "hf", "--out", str(out)]
    assert main(argv + ["--overwrite"]) == 1
    assert "not an earlier export" in _error(capsys)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    other = tmp_path / "other"
    assert main(argv[:-1] + [str(other)]) == 0
    assert main(argv[:-1] + [str(other)]) == 1
    assert "--overwrite" in _error(capsys)
    assert main(argv[:-1] + [str(other), "--overwrite"]) == 0
    assert main(argv[:-1] + [str(tmp_path / "x"), "--max-shard-size", "lots"]) == 1
    assert "cannot read 'lots' as a size" in _error(capsys)
    assert main(["ckpt", "export", str(ckpt), "--out", str(tmp_path / "y"), "--tokenizer", str(tmp_path)]) == 1
    assert "--format hf only" in _error(capsys)


def _rewrite(file: Path, name: str, tensor: torch.Tensor) -> None:
    tensors = load_file(str(file))
    tensors[name] = tensor
    save_file(tensors, str(file), metadata={"format": "pt"})


BAD_INPUTS = {
    "missing": (lambda d: d / "nope", "does not exist"),
    "not_hf": (lambda d: (d / "plain").mkdir() or d / "plain", "is not a Hugging Face model folder: no config.json"),
    "llama": (lambda d: _llama(d), "architecture LlamaForCausalLM (model_type 'llama') is not supported; supported: "
                                   "MixtralForCausalLM (mixtral)"),
    "shard": (lambda d: _shard_missing(d), "names shard model-00002-of-"),
    "shape": (lambda d: _bad_tensor(d, torch.zeros(5)), "tensor model.norm.weight has shape [5], the model (from "
                                                        "config.json) needs [32]"),
    "dtype": (lambda d: _bad_tensor(d, torch.zeros(32, dtype=torch.int64)), "tensor model.norm.weight has dtype "
                                                                            "torch.int64"),
}


def _llama(d: Path) -> Path:
    (d / "llama").mkdir()
    (d / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return d / "llama"


def _shard_missing(d: Path) -> Path:
    src = save_model("mixtral", d / "sharded", max_shard_size="40KB")
    next(src.glob("model-00002-of-*.safetensors")).unlink()
    return src


def _bad_tensor(d: Path, tensor: torch.Tensor) -> Path:
    src = save_model("mixtral", d / "bad")
    _rewrite(src / "model.safetensors", "model.norm.weight", tensor)
    return src


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_import_hf_bad_input_is_one_named_line(tmp_path: Path, capsys, case: str) -> None:
    make, expected = BAD_INPUTS[case]
    src = make(tmp_path)
    capsys.readouterr()
    assert main(["ckpt", "import-hf", str(src), "--out", str(tmp_path / "out")]) == 1
    err = _error(capsys)
    assert expected in err, err
    assert not (tmp_path / "out").exists()


def test_import_hf_refuses_a_non_checkpoint_out(tmp_path: Path, capsys) -> None:
    src = save_model("mixtral", tmp_path / "hf")
    capsys.readouterr()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["ckpt", "import-hf", str(src), "--out", str(out), "--overwrite"]) == 1
    assert "not a checkpoint" in _error(capsys)
    ok = tmp_path / "ok"
    assert main(["ckpt", "import-hf", str(src), "--out", str(ok)]) == 0
    assert main(["ckpt", "import-hf", str(src), "--out", str(ok)]) == 1
    assert "--overwrite" in _error(capsys)
    assert main(["ckpt", "import-hf", str(src), "--out", str(ok), "--overwrite"]) == 0


def test_export_needs_the_saved_model_config(tmp_path: Path, capsys) -> None:
    from system.checkpoint import save

    save({"model.norm.weight": torch.ones(4)}, tmp_path / "ck", layout={"world_size": 1}, no_dist=True)
    assert main(["ckpt", "export", str(tmp_path / "ck"), "--format", "hf", "--out", str(tmp_path / "out")]) == 1
    assert "holds no job config with a [model] section" in _error(capsys)
    assert main(["ckpt", "export", str(tmp_path / "nope"), "--format", "hf", "--out", str(tmp_path / "out")]) == 1
    assert "does not exist" in _error(capsys)
    assert not (tmp_path / "out").exists()
