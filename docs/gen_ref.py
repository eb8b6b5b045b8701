"""MkDocs hook: the pages that are generated from the code and the repository at build time.

Registered in ``mkdocs.yml`` under ``hooks:``. Nothing here is written to ``docs/``; the pages exist
only in the build:

- ``reference/config.md``: every section and key of the job configuration, from the dataclasses of
  :mod:`system.config` (type, default, and the field's ``metadata["help"]``, or the docstring or
  comment under it), and the whole default configuration as TOML;
- ``reference/cli.md``: every ``moesys`` subcommand and option, walked from
  :func:`system.cli.build_parser` (new subcommands appear without touching the docs);
- ``benchmarks/index.md`` (``benchmarks/README.md``) and one page per ``benchmarks/results/*.md``
  table, with the raw JSON and profiles beside it; the nav lists every result file found;
- ``guides/docker.md``: ``docker/README.md``.

The functions that render the pages are plain (no MkDocs objects) so the tests can call them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import logging
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BENCH_NAV_TITLE = "Benchmarks"

log = logging.getLogger("mkdocs.hooks.gen_ref")

if str(ROOT) not in sys.path:  # build from a checkout even when the package is not installed
    sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------------ markdown helpers


def rst_to_md(text: str) -> str:
    """Docstring markup to Markdown: ``x`` and :role:`x` become `x`."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def escape_cell(text: str) -> str:
    """Plain text made safe for a Markdown table cell (no HTML, emphasis, links or column breaks)."""
    text = rst_to_md(" ".join(text.split()))
    out = []
    for part in re.split(r"(`[^`]*`)", text):  # code spans stay as they are (tables skip their pipes)
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(part)
            continue
        part = part.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        for ch in "\\*_[]|":
            part = part.replace(ch, "\\" + ch)
        out.append(part)
    return "".join(out)


def escape_text(text: str) -> str:
    """Free text (argparse descriptions) for a Markdown paragraph: docstring markup converted, no raw HTML."""
    return rst_to_md(text).replace("<", "&lt;").replace(">", "&gt;")


# ------------------------------------------------------------------------------------- configuration


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"no TOML form for {value!r}")


def type_name(typ: Any) -> str:
    """A field type as the TOML user sees it: ``int``, ``"a" | "b"``, ..."""
    if get_origin(typ) is Literal:
        return " | ".join(toml_value(v) for v in get_args(typ))
    return getattr(typ, "__name__", str(typ))


def _attribute_docs(cls: type) -> dict[str, str]:
    """Docstrings written under fields (``x: int = 1`` then ``\"\"\"doc\"\"\"``) and ``# comments`` beside them."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    tree = ast.parse(source.lstrip() if source[:1].isspace() else source)
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        nxt = body[i + 1] if i + 1 < len(body) else None
        if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                and isinstance(nxt.value.value, str):
            docs[name] = inspect.cleandoc(nxt.value.value)
            continue
        line = lines[node.end_lineno - 1] if node.end_lineno else ""
        if "#" in line:
            docs[name] = line.split("#", 1)[1].strip()
    return docs


def field_help(cls: type, f: dataclasses.Field) -> str:
    """The documentation of one config field: ``metadata["help"]``, else its docstring or comment."""
    return str(f.metadata.get("help") or _attribute_docs(cls).get(f.name, "")).strip()


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def config_sections() -> list[tuple[str, type | None, list[tuple[str, Any, Any, str]]]]:
    """``[(section, dataclass or None for top-level keys, [(key, type, default, help)])]`` of :class:`JobConfig`."""
    from system.config.job import JobConfig

    top_hints = typing.get_type_hints(JobConfig)
    sections, top = [], []
    for f in dataclasses.fields(JobConfig):
        typ = top_hints[f.name]
        if dataclasses.is_dataclass(typ):
            hints = typing.get_type_hints(typ)
            rows = [(g.name, hints[g.name], field_default(g), field_help(typ, g)) for g in dataclasses.fields(typ)]
            sections.append((f.name, typ, rows))
        else:
            top.append((f.name, typ, field_default(f), field_help(JobConfig, f)))
    if top:
        sections.insert(0, ("", None, top))
    return sections


def config_reference_md() -> str:
    """The configuration reference page."""
    from system.config.job import JobConfig

    out = [
        "# Configuration reference",
        "",
        "<!-- Generated at build time by docs/gen_ref.py from the dataclasses in system/config/. "
        "Edit the field's help there, not here. -->",
        "",
        "A job is a TOML file whose tables are the sections below (`[model]`, `[moe]`, ...). Every key "
        "can be overridden on the command line as `--section.key value` (or `--section.key=value`), "
        "which wins over the TOML file, which wins over the defaults listed here. An unknown section or "
        "key, or a value of the wrong type, is an error that names the key and what is allowed.",
        "",
        "```bash",
        "moesys train --config configs/cpu-tiny.toml --training.steps 50 --moe.top_k 1",
        "```",
        "",
    ]
    undocumented = []
    for section, cls, rows in config_sections():
        if cls is None:
            out += ["## Top-level keys { #top-level }", "",
                    "Keys outside any table (at the top of the TOML file).", ""]
        else:
            doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
            out += [f"## `[{section}]` {{ #{section} }}", ""]
            if doc:
                out += [escape_text(doc[0]), ""]
            cdoc = inspect.cleandoc(cls.__doc__ or "")
            if cdoc and not cdoc.startswith(cls.__name__ + "("):
                out += [escape_text(cdoc), ""]
            out += [f"Class `{cls.__module__}.{cls.__qualname__}`.", ""]
        out += ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
        for key, typ, default, help_text in rows:
            full = f"{section}.{key}" if section else key
            if not help_text:
                undocumented.append(full)
            shown = "(required)" if default is dataclasses.MISSING else f"`{toml_value(default)}`"
            out.append(f"| `{full}` | `{type_name(typ)}` | {shown} | "
                       f"{escape_cell(help_text) if help_text else '*(undocumented)*'} |")
        out.append("")
    if undocumented:
        log.info("config fields without help: %s", ", ".join(undocumented))

    out += ["## All defaults as TOML { #defaults }", "",
            "`JobConfig()` written out: a complete job file to start from.", "", "```toml"]
    default = dataclasses.asdict(JobConfig())
    for key, value in default.items():
        if not isinstance(value, dict):
            out.append(f"{key} = {toml_value(value)}")
    for key, value in default.items():
        if isinstance(value, dict):
            out += ["", f"[{key}]"] + [f"{k} = {toml_value(v)}" for k, v in value.items()]
    out += ["```", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- CLI


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """``[(name, help, parser)]`` of the direct subcommands of ``parser`` (aliases folded)."""
    out, seen = [], set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    out.append((name, helps.get(name, ""), sub))
    return out


def walk_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Yield ``(path, help, parser)`` for every (nested) subcommand, depth first."""
    for name, help_text, sub in subcommands(parser):
        yield path + (name,), help_text, sub
        yield from walk_commands(sub, path + (name,))


def _options_table(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._SubParsersAction, argparse._HelpAction)) or action.help == argparse.SUPPRESS:
            continue
        invocation = formatter._format_action_invocation(action)
        help_text = formatter._expand_help(action) if action.help else ""
        if action.option_strings and action.nargs == 0:
            default = "flag"
        elif action.required:
            default = "required"
        elif action.default in (None, argparse.SUPPRESS) or action.default == []:
            default = "-"
        elif isinstance(action.default, str):
            default = f"`{json.dumps(action.default)}`"
        else:
            default = f"`{action.default}`"
        if action.choices is not None and not isinstance(action.choices, dict):
            help_text = (help_text + " " if help_text else "") + f"Choices: {', '.join(map(str, action.choices))}."
        rows.append(f"| `{invocation}` | {default} | {escape_cell(help_text) or '-'} |")
    if not rows:
        return []
    return ["| Argument | Default | Description |", "| --- | --- | --- |", *rows, ""]


def cli_reference_md(parser: argparse.ArgumentParser | None = None) -> str:
    """The CLI reference page, for ``parser`` (default: :func:`system.cli.build_parser`)."""
    if parser is None:
        from system.cli import build_parser

        parser = build_parser()
    prog = parser.prog
    old_columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"  # argparse wraps usage lines to the terminal width
    try:
        out = [
            f"# `{prog}` command line",
            "",
            "<!-- Generated at build time by docs/gen_ref.py from system.cli.build_parser(). "
            "Edit the parser's help strings, not this page. -->",
            "",
            escape_text(parser.description or ""),
            "",
            "```text",
            parser.format_usage().strip(),
            "```",
            "",
            "| Command | What it does |",
            "| --- | --- |",
        ]
        commands = list(walk_commands(parser))
        for path, help_text, _ in commands:
            full = " ".join((prog, *path))
            out.append(f"| [`{full}`](#{'-'.join(path)}) | {escape_cell(help_text) or '-'} |")
        out.append("")
        out += _options_table(parser)
        for path, help_text, sub in commands:
            full = " ".join((prog, *path))
            level = "#" * min(2 + len(path) - 1, 4)
            out += [f"{level} `{full}` {{ #{'-'.join(path)} }}", ""]
            if sub.description and sub.description.strip() != (help_text or "").strip():
                out += [escape_text(inspect.cleandoc(sub.description)), ""]
            elif help_text:
                out += [escape_text(help_text[:1].upper() + help_text[1:]) + ".", ""]
            out += ["```text", sub.format_usage().strip(), "```", ""]
            if path == ("train",):
                out += ["Any further `--section.key value` arguments override the job's TOML config: see the "
                        "[configuration reference](config.md).", ""]
            out += _options_table(sub)
    finally:
        if old_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old_columns
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- benchmarks


def benchmark_scripts() -> list[str]:
    """Benchmark script names (``moe_layer``, ...), longest first (for prefix matching)."""
    names = [p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in ("common", "__init__")]
    return sorted(names, key=len, reverse=True)


def result_files() -> list[Path]:
    """Every ``benchmarks/results/*.md`` table, by name."""
    return sorted(RESULTS.glob("*.md")) if RESULTS.is_dir() else []


def _script_of(stem: str, scripts: list[str]) -> str:
    return next((s for s in scripts if stem == s or stem.startswith(s + "_")), "other")


def benchmark_nav() -> list[Any]:
    """The Benchmarks nav section: the overview, then the result pages grouped by script."""
    scripts = benchmark_scripts()
    groups: dict[str, list[dict[str, str]]] = {}
    for md in result_files():
        groups.setdefault(_script_of(md.stem, scripts), []).append({md.stem: f"benchmarks/results/{md.stem}.md"})
    nav: list[Any] = [{"Overview and methods": "benchmarks/index.md"}]
    for script in sorted(groups):
        nav.append({f"{script}.py" if script != "other" else "Other": groups[script]})
    return nav


def benchmark_index_md() -> str:
    readme = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    scripts = benchmark_scripts()
    out = [readme.rstrip(), "", "## Result files", "",
           "<!-- Generated at build time by docs/gen_ref.py: every benchmarks/results/*.md. -->", "",
           "| Result | Script | Title |", "| --- | --- | --- |"]
    for md in result_files():
        title = next((ln[2:].strip() for ln in md.read_text(encoding="utf-8").splitlines() if ln.startswith("# ")),
                     md.stem)
        out.append(f"| [{md.stem}](results/{md.stem}.md) | `{_script_of(md.stem, scripts)}.py` | {escape_cell(title)} |")
    if not result_files():
        out.append("| (none yet) | | |")
    return "\n".join(out) + "\n"


def benchmark_result_md(md: Path) -> tuple[str, list[Path]]:
    """A result page and the raw files (JSON, profiles) published beside it."""
    text = md.read_text(encoding="utf-8").rstrip()
    if not text.lstrip().startswith("# "):
        text = f"# {md.stem}\n\n{text}"
    raw = sorted(p for p in RESULTS.glob(f"{md.stem}*")
                 if p.suffix in (".json", ".txt") and (p.stem == md.stem or p.stem.startswith(md.stem + "_profile")))
    links = ", ".join(f"[{p.name}]({p.name})" for p in raw)
    footer = [
        "", "---", "",
        f"Source: `benchmarks/results/{md.name}`, written by `benchmarks/{_script_of(md.stem, benchmark_scripts())}.py`"
        + (f"; raw data: {links}." if links else "."),
        "Methods and caveats: [benchmarks overview](../index.md).",
    ]
    return text + "\n" + "\n".join(footer) + "\n", raw


# --------------------------------------------------------------------------------------- MkDocs hooks


def on_config(config):
    """Fill the Benchmarks nav entry with every result file found."""
    nav = config.get("nav")
    if nav:
        for i, item in enumerate(nav):
            if isinstance(item, dict) and BENCH_NAV_TITLE in item:
                nav[i] = {BENCH_NAV_TITLE: benchmark_nav()}
    return config


def on_files(files, config):
    """Add the generated pages (and the benchmark raw files) to the build."""
    from mkdocs.structure.files import File

    def add(uri: str, content: str | bytes) -> None:
        existing = files.get_file_from_path(uri)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, uri, content=content))

    add("reference/config.md", config_reference_md())
    add("reference/cli.md", cli_reference_md())
    add("benchmarks/index.md", benchmark_index_md())
    for md in result_files():
        page, raw = benchmark_result_md(md)
        add(f"benchmarks/results/{md.name}", page)
        for p in raw:
            add(f"benchmarks/results/{p.name}", p.read_bytes())
    add("guides/docker.md", (ROOT / "docker" / "README.md").read_text(encoding="utf-8"))
    return files
