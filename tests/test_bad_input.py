"""Bad input at every CLI entry point: one ``error:`` line naming the problem, a non-zero exit, no
traceback, and nothing the user had is changed or left behind.

Every case runs ``system.cli.main([...])`` in-process on tiny checkpoints built here (nothing is
downloaded) and compares a hash of the whole temporary tree before and after. The ``moesys ckpt
export`` cases are the regressions of the export that wiped a run folder given as ``--out`` and put a
folder in place of a file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from system.checkpoint import save
from system.checkpoint.errors import ExportTargetError, ModelFileError
from system.checkpoint.model_io import EXPORT_MARKER, MODEL_FILE, load_model, write_model
from system.cli import main
from system.config import JobConfig, config_to_dict
from system.models import MoETransformer

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# helpers


def tree_state(root: Path) -> dict[str, str]:
    """``relative path -> sha256 | "dir" | "link:<target>"`` of everything under ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = f"link:{os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(err: str, *needles: str) -> str:
    """Exactly one ``error:`` line, containing every needle; no traceback. Returns that line."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def fails_cleanly(argv: list[str], capsys, root: Path, *needles: str, code: int | None = None) -> str:
    """Run ``argv``: non-zero exit (``code`` when given), one error line with ``needles``, ``root`` unchanged."""
    before = tree_state(root)
    rc, _, err = run_cli(argv, capsys)
    assert rc != 0 and (code is None or rc == code), (rc, err)
    line = assert_one_error(err, *needles)
    assert tree_state(root) == before, "files changed, appeared or vanished"
    return line


def make_job() -> JobConfig:
    job = JobConfig()
    for k, v in {"dim": 32, "n_layers": 2, "n_heads": 4, "ffn_dim": 48, "vocab_size": 320, "max_seq_len": 32,
                 "tie_embeddings": False}.items():
        setattr(job.model, k, v)
    for k, v in {"num_experts": 4, "top_k": 2, "expert_dim": 24}.items():
        setattr(job.moe, k, v)
    job.training.seq_len = job.model.max_seq_len
    job.validate()
    return job


def model_tensors(job: JobConfig, seed: int) -> dict[str, torch.Tensor]:
    model = MoETransformer(job.model, job.moe)
    model.init_weights(seed)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Two training checkpoints (different weights), an export of the first, a DCP folder."""
    import torch.distributed.checkpoint as dcp

    root = tmp_path_factory.mktemp("bad_input")
    job = make_job()
    out = {"root": root}
    for name, seed in (("ckpt_a", 0), ("ckpt_b", 1)):
        state = {f"model.{k}": v for k, v in model_tensors(job, seed).items()}
        save(state, root / name / "step_00000003", extra={"step": 3, "config": config_to_dict(job)},
             layout={"world_size": 1}, no_dist=True, update_latest=True)
        out[name] = root / name / "step_00000003"
    out["model"] = write_model(model_tensors(job, 0), root / "model", config_to_dict(job))
    dcp.save({"model": MoETransformer(job.model, job.moe).state_dict()}, checkpoint_id=str(root / "dcp"), no_dist=True)
    out["dcp"] = root / "dcp"
    return out


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# ---------------------------------------------------------------------------------------------
# moesys ckpt export: never delete or replace what it did not create


def export(world, out: Path, *extra: str, ckpt: str = "ckpt_a") -> list[str]:
    return ["ckpt", "export", world[ckpt], "--format", "safetensors", "--out", out, *extra]


def test_export_into_a_run_folder_leaves_it_alone(world, tmp_path, capsys) -> None:
    run = tmp_path / "runs" / "a"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "summary.json").write_text("{}")
    for flags in ((), ("--overwrite",)):
        fails_cleanly(export(world, run, *flags), capsys, tmp_path, str(run), "not an earlier export", code=1)


def test_export_onto_a_file_or_link_leaves_it_alone(world, tmp_path, capsys) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("precious")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    for flags in ((), ("--overwrite",)):
        fails_cleanly(export(world, f, *flags), capsys, tmp_path, str(f), "is a file")
        fails_cleanly(export(world, link, *flags), capsys, tmp_path, str(link), "symbolic link")


def test_export_into_an_empty_or_missing_folder(world, tmp_path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (empty, tmp_path / "new" / "deeper"):
        rc, stdout, err = run_cli(export(world, out), capsys)
        assert rc == 0, err
        assert sorted(p.name for p in out.iterdir()) == [EXPORT_MARKER, "config.json", MODEL_FILE]
        marker = json.loads((out / EXPORT_MARKER).read_text())
        assert marker["producer"] == "moe-system" and marker["format"] == "safetensors"
        assert sorted(marker["files"]) == ["config.json", MODEL_FILE] and marker["created_unix_s"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]  # no temporary siblings left


def test_export_replaces_an_earlier_export_only_with_overwrite(world, tmp_path, capsys) -> None:
    out = tmp_path / "export"
    assert run_cli(export(world, out), capsys)[0] == 0
    first = load_file(out / MODEL_FILE)
    fails_cleanly(export(world, out, ckpt="ckpt_b"), capsys, tmp_path, str(out), "--overwrite")
    rc, _, err = run_cli(export(world, out, "--overwrite", ckpt="ckpt_b"), capsys)
    assert rc == 0, err
    reference = tmp_path / "reference"
    assert run_cli(export(world, reference, ckpt="ckpt_b"), capsys)[0] == 0
    new, ref = load_file(out / MODEL_FILE), load_file(reference / MODEL_FILE)
    assert new.keys() == ref.keys() == first.keys()
    assert all(torch.equal(new[k], ref[k]) for k in new)
    assert not all(torch.equal(new[k], first[k]) for k in new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "reference"]


def test_export_refuses_an_earlier_export_holding_user_files(world, tmp_path, capsys) -> None:
    out = tmp_path / "export"
    assert run_cli(export(world, out), capsys)[0] == 0
    (out / "README.md").write_text("my notes")
    fails_cleanly(export(world, out, "--overwrite"), capsys, tmp_path, str(out), "README.md", "would be lost")


def test_export_refuses_a_foreign_marker(world, tmp_path, capsys) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / EXPORT_MARKER).write_bytes(b"\xff\xfe not json")
    fails_cleanly(export(world, out, "--overwrite"), capsys, tmp_path, EXPORT_MARKER)


def test_failed_export_removes_only_its_temporary_folder(world, tmp_path, monkeypatch) -> None:
    """A write that fails half-way leaves the earlier export intact and no temporary sibling behind."""
    import system.checkpoint.model_io as model_io

    out = write_model({"w": torch.ones(3)}, tmp_path / "export", {"a": 1})
    before = tree_state(tmp_path)

    def broken(tensors, file, metadata=None):
        Path(file).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_io, "save_file", broken)
    with pytest.raises(Exception, match="No space left") as info:
        write_model({"w": torch.zeros(3)}, out, {"a": 2}, overwrite=True)
    assert "cannot write the export" in str(info.value)
    assert tree_state(tmp_path) == before
    with pytest.raises(ExportTargetError):
        write_model({"w": torch.zeros(3)}, tmp_path / "export" / MODEL_FILE, {})  # a file: refused


# ---------------------------------------------------------------------------------------------
# moesys ckpt import-dcp: only a checkpoint is ever replaced


def test_import_dcp_out_semantics(world, tmp_path, capsys) -> None:
    dcp = world["dcp"]
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "data.txt").write_text("keep me")
    f = tmp_path / "file.bin"
    f.write_bytes(b"\x00\x01")
    for flags in ((), ("--overwrite",)):
        fails_cleanly(["ckpt", "import-dcp", dcp, "--out", folder, *flags], capsys, tmp_path, str(folder),
                      "not a checkpoint", code=1)
        fails_cleanly(["ckpt", "import-dcp", dcp, "--out", f, *flags], capsys, tmp_path, str(f), "not a folder")
    out = tmp_path / "ours"
    assert run_cli(["ckpt", "import-dcp", dcp, "--out", out], capsys)[0] == 0
    fails_cleanly(["ckpt", "import-dcp", dcp, "--out", out], capsys, tmp_path, str(out), "--overwrite")
    rc, _, err = run_cli(["ckpt", "import-dcp", dcp, "--out", out, "--overwrite"], capsys)
    assert rc == 0, err
    assert run_cli(["ckpt", "verify", out], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin", "mine", "ours"]
    (out / "notes.txt").write_text("mine")
    fails_cleanly(["ckpt", "import-dcp", dcp, "--out", out, "--overwrite"], capsys, tmp_path, "notes.txt")


def test_import_dcp_bad_source(world, tmp_path, capsys) -> None:
    (tmp_path / "notdcp").mkdir()
    (tmp_path / "notdcp" / ".metadata").write_bytes(b"\x00garbage, not a pickle")
    fails_cleanly(["ckpt", "import-dcp", tmp_path / "nope", "--out", tmp_path / "o"], capsys, tmp_path,
                  "does not exist", code=1)
    fails_cleanly(["ckpt", "import-dcp", tmp_path / "notdcp", "--out", tmp_path / "o"], capsys, tmp_path,
                  ".metadata cannot be read")


# ---------------------------------------------------------------------------------------------
# moesys ckpt inspect / verify / export on bad checkpoints


@pytest.mark.parametrize("cmd", ["inspect", "verify", "export"])
def test_ckpt_missing_path_says_it_does_not_exist(cmd, tmp_path, capsys) -> None:
    argv = ["ckpt", cmd, tmp_path / "nope"] + (["--out", tmp_path / "o"] if cmd == "export" else [])
    line = fails_cleanly(argv, capsys, tmp_path, str(tmp_path / "nope"), "does not exist", code=1)
    assert "did not finish" not in line


def test_ckpt_newer_format_and_broken_metadata(world, tmp_path, capsys) -> None:
    newer = copy_of(world["ckpt_a"], tmp_path / "newer")
    meta = json.loads((newer / "metadata.json").read_text())
    meta["version"] = 7
    (newer / "metadata.json").write_text(json.dumps(meta))
    broken = copy_of(world["ckpt_a"], tmp_path / "broken")
    (broken / "metadata.json").write_bytes(b"\x89PNG\x00\x01")
    nokeys = copy_of(world["ckpt_a"], tmp_path / "nokeys")
    (nokeys / "metadata.json").write_text(json.dumps({"format": "moesys-ckpt", "version": 1}))
    for cmd in ("inspect", "verify", "export"):
        extra = ["--out", tmp_path / "o"] if cmd == "export" else []
        fails_cleanly(["ckpt", cmd, newer, *extra], capsys, tmp_path, "newer moe-system", "version 7",
                      "reads version 1", code=1)
        fails_cleanly(["ckpt", cmd, broken, *extra], capsys, tmp_path, "metadata.json", code=1)
        fails_cleanly(["ckpt", cmd, nokeys, *extra], capsys, tmp_path, "metadata.json", "malformed", code=1)


def test_generate_on_a_newer_checkpoint_suggests_export(world, tmp_path, capsys) -> None:
    fails_cleanly(["generate", "--checkpoint", world["ckpt_a"], "--prompt", "x"], capsys, world["root"],
                  "training checkpoint", "moesys ckpt export", code=2)


def test_broken_pipe_is_quiet(world, capsys, monkeypatch) -> None:
    class Closed(io.TextIOBase):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["ckpt", "inspect", str(world["ckpt_a"])]) == 141
    assert capsys.readouterr().err == ""


def test_broken_pipe_in_a_real_pipe(world) -> None:
    """``moesys ckpt inspect PATH | head -0``: exit 141, nothing on stderr (no 'Exception ignored')."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from system.cli import main; sys.exit(main())",
                             "ckpt", "inspect", str(world["ckpt_a"])], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


# ---------------------------------------------------------------------------------------------
# moesys generate


def gen(world, *args) -> list:
    return ["generate", "--checkpoint", world["model"], "--prompt", "x", "--max-new-tokens", "2", *args]


@pytest.mark.parametrize("flags, needle", [
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-1"], "--batch-size"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--slots", "0"], "--slots"),
    (["--expert-cache", "0", "--offload", "experts"], "--expert-cache"), (["--offload", "experts"], "--expert-cache"),
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--top-p", "nan"], "--top-p"),
    (["--temperature", "0"], "--temperature"), (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"), (["--device", "foo"], "'foo'"), (["--device", "mps"], "'mps'"),
    (["--device-memory", "lots"], "--device-memory"), (["--link-bandwidth", "fast"], "--link-bandwidth"),
])
def test_generate_rejects_bad_arguments_before_any_work(flags, needle, tmp_path, capsys) -> None:
    # the checkpoint does not exist: the argument error must come first
    argv = ["generate", "--checkpoint", tmp_path / "nope", "--prompt", "x", *flags]
    fails_cleanly(argv, capsys, tmp_path, needle, code=2)


def test_generate_cuda_device_that_is_not_there(tmp_path, capsys) -> None:
    if torch.cuda.is_available():
        device, needle = f"cuda:{torch.cuda.device_count()}", "does not exist"
    else:
        device, needle = "cuda", "CUDA is not available"
    fails_cleanly(["generate", "--checkpoint", tmp_path, "--prompt", "x", "--device", device], capsys, tmp_path,
                  needle, code=2)


def test_generate_bad_checkpoint_folders(world, tmp_path, capsys) -> None:
    fails_cleanly(["generate", "--checkpoint", tmp_path / "nope", "--prompt", "x"], capsys, tmp_path,
                  str(tmp_path / "nope"), "does not exist", code=2)
    badcfg = copy_of(world["model"], tmp_path / "badcfg")
    (badcfg / "config.json").write_bytes(b"\xff\x00")
    fails_cleanly(gen({"model": badcfg}), capsys, tmp_path, "config.json", "not valid JSON")
    badval = copy_of(world["model"], tmp_path / "badval")
    cfg = json.loads((badval / "config.json").read_text())
    cfg["model"]["n_heads"] = 5
    (badval / "config.json").write_text(json.dumps(cfg))
    fails_cleanly(gen({"model": badval}), capsys, tmp_path, "config.json", "model.n_heads")


def lying_copies(world, tmp_path: Path) -> dict[str, Path]:
    """Model folders whose ``model.safetensors`` lies: header length, offsets, JSON, truncation."""
    raw = (world["model"] / MODEL_FILE).read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + hlen])
    name = next(k for k in header if k != "__metadata__")
    moved = dict(header)
    begin, end = header[name]["data_offsets"]
    moved[name] = dict(header[name], data_offsets=[begin + 10**6, end + 10**6])
    text = json.dumps(moved).encode()
    text += b" " * (-len(text) % 8)
    variants = {
        "header_length": struct.pack("<Q", len(raw) * 4) + raw[8:],
        "offsets": struct.pack("<Q", len(text)) + text + raw[8 + hlen :],
        "json": raw[:8] + b"{" * hlen + raw[8 + hlen :],
        "truncated": raw[: len(raw) - 100],
        "tiny": raw[:5],
    }
    out = {}
    for kind, data in variants.items():
        folder = copy_of(world["model"], tmp_path / kind)
        (folder / MODEL_FILE).write_bytes(data)
        out[kind] = folder
    return out


def test_generate_and_load_model_on_lying_safetensors(world, tmp_path, capsys) -> None:
    job = make_job()
    for kind, folder in lying_copies(world, tmp_path).items():
        fails_cleanly(gen({"model": folder}), capsys, tmp_path, str(folder / MODEL_FILE), code=2)
        with pytest.raises(ModelFileError, match=MODEL_FILE) as info:
            load_model(MoETransformer(job.model, job.moe), folder)
        assert str(folder) in str(info.value), kind


def test_generate_bad_prompts_files(world, tmp_path, capsys) -> None:
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"ok\n\xff\xfe\x00\x81 binary\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n")
    args = ["generate", "--checkpoint", world["model"], "--prompts-file"]
    fails_cleanly(args + [binary], capsys, tmp_path, str(binary), "not UTF-8", code=2)
    for f in (empty, blank):
        line = fails_cleanly(args + [f], capsys, tmp_path, str(f), "has no prompts", code=2)
        assert "give --prompt" not in line
    fails_cleanly(args + [tmp_path / "missing.txt"], capsys, tmp_path, "missing.txt", "cannot be read", code=2)
    fails_cleanly(args + [tmp_path], capsys, tmp_path, str(tmp_path), "cannot be read", code=2)


def test_generate_bad_tokenizer(world, tmp_path, capsys) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": ')
    for name, spec, needle in (("badtok", bad, "cannot load"), ("notok", tmp_path / "nope.json", "not found")):
        folder = copy_of(world["model"], tmp_path / name)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["data"]["tokenizer"] = str(spec)
        (folder / "config.json").write_text(json.dumps(cfg))
        fails_cleanly(gen({"model": folder}), capsys, tmp_path, str(spec), needle, code=2)


def test_generate_clamps_the_expert_cache(world, capsys, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="system.inference.plan"):
        rc, out, err = run_cli(gen(world, "--offload", "experts", "--expert-cache", "1000"), capsys)
    assert rc == 0, err
    assert "8 slots x" in err  # 2 MoE blocks x 4 experts (the plan goes to stderr)
    assert any("expert_cache (C) = 1000 exceeds the 8 routed experts" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# moesys train --config


def test_train_dry_run_with_a_binary_or_folder_config(tmp_path, capsys) -> None:
    binary = tmp_path / "job.toml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff")
    fails_cleanly(["train", "--config", binary, "--dry-run"], capsys, tmp_path, str(binary),
                  "not a UTF-8 TOML file", code=2)
    fails_cleanly(["train", "--config", tmp_path, "--dry-run"], capsys, tmp_path, str(tmp_path), "directory",
                  code=2)


def test_export_folder_gets_the_usual_permissions(tmp_path: Path) -> None:
    """Built under mkdtemp (0700) and renamed: the export must end with the modes mkdir/open give."""
    import os
    import stat

    from system.checkpoint.model_io import write_model

    out = write_model({"w": torch.zeros(2)}, tmp_path / "export", {"model": {}})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


HF_BAD = [
    ("sliding", "mixtral", {"sliding_window": 64}, ("sliding_window = 64", "config.json")),
    ("arch", "qwen3_moe", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
     ("LlamaForCausalLM", "supported: MixtralForCausalLM")),
    ("shape", "olmoe", {"hidden_size": 48}, ("model.embed_tokens.weight", "[128, 32]", "[128, 48]")),
    ("quantized", "deepseek_v3", {"quantization_config": {"quant_method": "fp8"}}, ("quantization_config (fp8)",)),
    ("clip", "olmoe", {"clip_qkv": 8.0}, ("clip_qkv = 8.0",)),
]


@pytest.mark.parametrize("case,family,fields,needles", HF_BAD, ids=[c[0] for c in HF_BAD])
def test_hf_folders_we_cannot_honour(case, family, fields, needles, tmp_path, capsys) -> None:
    """A Hugging Face folder with an unsupported architecture or field, or a tensor of the wrong shape:
    one line naming it from generate, and from the train launcher (before any worker starts); nothing written."""
    import json

    from hf_tiny import save_model

    path = save_model(family, tmp_path / "hf")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(fields)
    (path / "config.json").write_text(json.dumps(cfg))
    before = tree_state(tmp_path)
    code, out, err = run_cli(["generate", "--checkpoint", path, "--prompt-ids", "1,2", "--max-new-tokens", "2"], capsys)
    assert code != 0 and out == ""
    assert_one_error(err, *needles)
    if case != "shape":  # the config alone decides these: the launcher refuses them
        job = tmp_path / "job.toml"
        job.write_text('[data]\ntokenizer = "byte"\n')
        code, out, err = run_cli(["train", "--config", job, "--checkpoint.initial_load_path", path, "--dry-run"], capsys)
        assert code != 0
        assert_one_error(err, *needles[:1])
        job.unlink()
    assert tree_state(tmp_path) == before
