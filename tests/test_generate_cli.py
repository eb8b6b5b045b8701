"""``moesys generate`` as a tool: JSON lines, token-id prompts, a clean stdout, and Hugging Face
model-folder tokenizers (BOS/EOS from ``generation_config.json``/``config.json``/``tokenizer_config.json``,
checked against ``transformers``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from system.checkpoint.model_io import write_model
from system.cli import main as cli_main
from system.config import JobConfig, config_to_dict
from system.data import ByteTokenizer, build_tokenizer
from system.data.tokenizer import HFTokenizer, tokenizer_from_folder
from system.inference import generate
from system.models import MoETransformer

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = ["the cat sat on the mat", "a dog ate the bone", "hello world", "the quick brown fox"] * 10


def save_tiny_model(path: Path, tokenizer: str = "byte", vocab_size: int = 320) -> Path:
    """A tiny MoE model written with ``write_model`` (config.json + model.safetensors), ``data.tokenizer`` as given."""
    job = JobConfig()
    for k, v in {"dim": 32, "n_layers": 2, "n_heads": 4, "ffn_dim": 48, "vocab_size": vocab_size,
                 "max_seq_len": 64, "tie_embeddings": False, "init_std": 0.3}.items():
        setattr(job.model, k, v)
    for k, v in {"num_experts": 4, "top_k": 2, "expert_dim": 24}.items():
        setattr(job.moe, k, v)
    job.training.seq_len = job.model.max_seq_len
    job.data.tokenizer = tokenizer
    job.validate()
    model = MoETransformer(job.model, job.moe)
    model.init_weights(0)
    write_model({k: v.contiguous() for k, v in model.state_dict().items()}, path, config_to_dict(job))
    return path


def train_bpe(path: Path, *, template: str | None = None) -> Path:
    """A tiny byte-level BPE (specials ``<s>``=0, ``</s>``=1, ``<|eot|>``=2) saved as ``path``;
    ``template``: a ``TemplateProcessing`` single-sequence post-processor, e.g. ``"<s> $A"``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<|eot|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(SENTENCES, trainer=trainer)
    if template is not None:
        tk.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 0), ("</s>", 1)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tk.save(str(path))
    return path


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("gen") / "byte")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m system.cli generate ...`` in a subprocess (stdout and stderr apart)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "system.cli", "generate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------------ output


def test_json_lines_on_a_clean_stdout(byte_model: Path) -> None:
    """One JSON object per prompt and line, nothing else on stdout; ids agree with the text and the API."""
    proc = run_cli("--checkpoint", str(byte_model), "--prompt", "def f(", "--prompt", "", "--max-new-tokens", "5",
                   "--output-format", "json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2 and proc.stdout.endswith("\n")
    tok = ByteTokenizer()
    assert rows[0]["prompt_ids"] == list(b"def f(") and rows[1]["prompt_ids"] == [tok.eos_id]
    for row in rows:
        assert set(row) == {"prompt_ids", "generated_ids", "text"}
        assert 1 <= len(row["generated_ids"]) <= 5
        assert row["text"] == tok.decode(row["generated_ids"])
    api = generate(byte_model, ["def f(", ""], 5)
    assert [r["generated_ids"] for r in rows] == api.tokens and [r["text"] for r in rows] == api.texts
    assert "tokens/s" in proc.stderr and "--- plan:" in proc.stderr


def test_text_mode_prints_only_the_generated_text(byte_model: Path, capsys) -> None:
    rc = cli_main(["generate", "--checkpoint", str(byte_model), "--prompt", "import ", "--prompt", "x = ",
                   "--max-new-tokens", "4", "--offload", "ring", "--slots", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    api = generate(byte_model, ["import ", "x = "], 4)
    assert out == "".join(t + "\n" for t in api.texts)
    assert "import" not in out and "---" not in out and "tokens/s" not in out
    assert err.count("--- prompt") == 2 and "tokens/s" in err and "--- plan: mode=ring" in err


def test_prompt_ids_and_text_keep_their_order(byte_model: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("zz\n")
    rc = cli_main(["generate", "--checkpoint", str(byte_model), "--prompt-ids", "1, 2", "--prompt", "ab",
                   "--prompt-ids", "3", "--prompts-file", str(prompts), "--max-new-tokens", "2",
                   "--output-format", "json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert [json.loads(line)["prompt_ids"] for line in out.splitlines()] == [[1, 2], [97, 98], [3], [122, 122]]


# ------------------------------------------------------------------------------- no tokenizer, bad ids


@pytest.mark.parametrize("spec", ["none", "gone/tokenizer.json"])
def test_prompt_ids_on_a_model_without_tokenizer(tmp_path: Path, capsys, spec: str) -> None:
    """``data.tokenizer`` unset ("none") or naming a file that is gone: ids work, text is null / ids printed."""
    ck = save_tiny_model(tmp_path / "m", tokenizer=spec)
    rc = cli_main(["generate", "--checkpoint", str(ck), "--prompt-ids", "5,9,2", "--prompt-ids", "300",
                   "--max-new-tokens", "3", "--output-format", "json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt_ids"] for r in rows] == [[5, 9, 2], [300]]
    assert all(r["text"] is None and len(r["generated_ids"]) == 3 for r in rows)
    assert all(0 <= i < 320 for r in rows for i in r["generated_ids"])
    rc = cli_main(["generate", "--checkpoint", str(ck), "--prompt-ids", "5,9,2", "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert rc == 0 and out == ",".join(map(str, rows[0]["generated_ids"])) + "\n"
    rc = cli_main(["generate", "--checkpoint", str(ck), "--prompt", "hi", "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert ("no tokenizer" in err) if spec == "none" else ("gone" in err and "not found" in err)


@pytest.mark.parametrize("ids, needle", [
    ("1,x", "'x' is not a token id"),
    ("", "has no token id"),
    (" , ", "has no token id"),
    ("1,,2", "'' is not a token id"),
    ("1.5", "'1.5' is not a token id"),
    ("7,320", "token id 320: outside [0, vocab_size) for the model's vocab_size 320"),
    ("-1", "token id -1: outside [0, vocab_size)"),
])
def test_bad_prompt_ids_fail_in_one_line_before_the_weights(tmp_path: Path, capsys, ids: str, needle: str) -> None:
    """Checked before the weights are read: the folder below has a config and no model file at all."""
    ck = save_tiny_model(tmp_path / "m")
    (ck / "model.safetensors").unlink()
    rc = cli_main(["generate", "--checkpoint", str(ck), "--prompt", "ok", f"--prompt-ids={ids}"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


# ------------------------------------------------------------------------- Hugging Face folder tokenizers


def hf_reference(path: Path, **kw):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>", **kw)


def test_folder_tokenizer_bos_eos_from_the_config_files(tmp_path: Path) -> None:
    """generation_config.json's ids win over config.json's, then tokenizer_config.json's token names;
    add_bos_token prepends BOS once; the ids equal ``transformers``' encoding."""
    folder = tmp_path / "hf"
    file = train_bpe(folder / "tokenizer.json")
    write_json(folder / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    tok = tokenizer_from_folder(folder)
    assert tok.bos_id == 0 and tok.eos_ids == (1,) and tok.eos_id == 1  # token names only
    write_json(folder / "config.json", {"bos_token_id": 0, "eos_token_id": 2, "vocab_size": 320})
    assert tokenizer_from_folder(folder).eos_ids == (2,)
    write_json(folder / "generation_config.json", {"bos_token_id": 0, "eos_token_id": [2, 1]})
    for tok in (tokenizer_from_folder(folder), tokenizer_from_folder(file), build_tokenizer(str(folder)),
                build_tokenizer(str(file))):
        assert isinstance(tok, HFTokenizer) and tok.bos_id == 0 and tok.eos_ids == (2, 1) and tok.eos_id == 2
    ref = hf_reference(file, add_bos_token=True)
    for text in ("the cat sat", "hello world", "a"):
        ids = tok.encode_prompt(text)
        assert ids == ref(text)["input_ids"] and ids[0] == 0 and ids[1] != 0
    assert tok.encode_prompt("<s>the cat") == tok.encode_prompt("the cat")  # BOS not doubled
    assert tok.encode_prompt("") == [0]
    assert tok.decode(tok.encode("the cat") + [2]) == "the cat" == tok.decode(tok.encode("the cat") + [1])
    write_json(folder / "tokenizer_config.json", {"bos_token": "<s>", "add_bos_token": False})
    tok = tokenizer_from_folder(folder)
    assert tok.encode_prompt("the cat") == hf_reference(file, add_bos_token=False)("the cat")["input_ids"]
    assert tok.encode_prompt("the cat") == tok.encode("the cat")
    assert tokenizer_from_folder(tmp_path) is None  # no tokenizer.json there


def test_folder_tokenizer_bos_from_the_post_processor_is_not_doubled(tmp_path: Path) -> None:
    """A tokenizer.json whose post-processor adds BOS (Llama style) and no add_bos_token: one BOS, as
    transformers encodes; a post-processor that also appends EOS does not end the prompt with it."""
    file = train_bpe(tmp_path / "llama" / "tokenizer.json", template="<s> $A")
    write_json(tmp_path / "llama" / "config.json", {"bos_token_id": 0, "eos_token_id": 1})
    tok = tokenizer_from_folder(tmp_path / "llama")
    ref = hf_reference(file)
    for text in ("the cat sat", "hello"):
        assert tok.encode_prompt(text) == ref(text)["input_ids"] == [0] + tok.encode(text)
    file = train_bpe(tmp_path / "both" / "tokenizer.json", template="<s> $A </s>")
    tok = tokenizer_from_folder(tmp_path / "both")
    assert hf_reference(file)("hello")["input_ids"][-1] == 1
    assert tok.encode_prompt("hello") == [0] + tok.encode("hello")


def test_folder_tokenizer_errors(tmp_path: Path) -> None:
    from system.errors import DataError

    folder = tmp_path / "hf"
    train_bpe(folder / "tokenizer.json")
    (folder / "generation_config.json").write_text("{oops")
    with pytest.raises(DataError, match="generation_config.json is not valid JSON"):
        tokenizer_from_folder(folder)
    write_json(folder / "generation_config.json", {"eos_token_id": "</s>"})
    with pytest.raises(DataError, match="eos_token_id must be a token id"):
        tokenizer_from_folder(folder)
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        build_tokenizer(str(tmp_path))


def test_engine_uses_the_model_folder_tokenizer_and_stops_at_any_eos(tmp_path: Path) -> None:
    """A model folder with tokenizer.json beside the weights (not named by data.tokenizer): prompts get
    its BOS, generation stops at every EOS id of generation_config.json unless --ignore-eos."""
    ck = save_tiny_model(tmp_path / "m", tokenizer="byte")
    train_bpe(ck / "tokenizer.json")
    write_json(ck / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    free = generate(ck, ["the cat"], 8, stop_at_eos=False)
    tok = tokenizer_from_folder(ck)
    assert free.prompt_ids == [tok.encode_prompt("the cat")] and free.prompt_ids[0][0] == 0
    gen = free.tokens[0]
    assert len(gen) == 8 and all(i < tok.vocab_size for i in gen)
    stop = next((i for i in range(1, len(gen)) if gen[i] not in gen[:i]), 0)
    write_json(ck / "generation_config.json", {"bos_token_id": 0, "eos_token_id": [1, gen[stop]]})
    out = generate(ck, ["the cat"], 8)
    assert out.tokens[0] == gen[: stop + 1] and out.texts[0] == tokenizer_from_folder(ck).decode(gen[:stop])
    assert generate(ck, ["the cat"], 8, stop_at_eos=False).tokens[0] == gen
