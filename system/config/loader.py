"""TOML files and ``--section.key value`` overrides mapped onto :class:`JobConfig`.

Precedence: command line > TOML > dataclass defaults. Unknown sections or keys and values of
the wrong type raise :class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from system.config.job import JobConfig
from system.errors import MoesysError


class ConfigError(MoesysError, ValueError):
    """A configuration key or value is wrong; the message names the key."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert ``value`` (from TOML or a CLI string) to ``typ``; raise ConfigError naming ``key``."""
    if get_origin(typ) is Literal:
        choices = get_args(typ)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, choices))}")
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected a boolean (true/false), got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value), 0)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {typ}")  # pragma: no cover - programming error


def apply_dict(cfg: JobConfig, data: dict[str, Any], source: str = "config",
               record: dict[str, str] | None = None) -> JobConfig:
    """Apply a nested ``{section: {key: value}}`` mapping onto ``cfg`` in place and return it.

    Args:
        record: when given, ``record["section.key"] = source`` for every key applied (``record["name"]``
            for a top-level key), so a later step knows which keys were set explicitly and where.

    Raises:
        ConfigError: for an unknown section or key (naming the allowed ones) or a bad value.
    """
    top = _field_types(JobConfig)
    for section, values in data.items():
        if section not in top:
            raise ConfigError(f"{source}: unknown section or key {section!r}; allowed: {', '.join(top)}")
        if not dataclasses.is_dataclass(top[section]):
            setattr(cfg, section, _coerce(section, values, top[section]))
            if record is not None:
                record[section] = source
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of keys, got {values!r}")
        sub = getattr(cfg, section)
        types = _field_types(type(sub))
        for key, value in values.items():
            if key not in types:
                raise ConfigError(
                    f"{source}: unknown key {section}.{key}; allowed keys of [{section}]: {', '.join(types)}"
                )
            setattr(sub, key, _coerce(f"{section}.{key}", value, types[key]))
            if record is not None:
                record[f"{section}.{key}"] = source
    return cfg


def parse_overrides(args: list[str]) -> dict[str, dict[str, str]]:
    """Parse ``["--section.key", "value", "--section.key=value", ...]`` into a nested dict.

    Raises:
        ConfigError: for an argument that is not ``--section.key`` or lacks a value.
    """
    out: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"expected an override of the form --section.key value, got {arg!r}")
        if "=" in arg:
            name, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            name, value = arg[2:], args[i + 1]
            i += 2
        section, key = name.split(".", 1)
        out.setdefault(section, {})[key] = value
    return out


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """The config path does not exist or is not a file (a ``ConfigError`` and a ``FileNotFoundError``)."""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                initial_load_missing_ok: bool = False) -> JobConfig:
    """Build a validated :class:`JobConfig` from defaults, a TOML file and CLI overrides.

    With ``checkpoint.initial_load_path`` set, the ``[model]``/``[moe]`` keys neither the TOML nor the
    command line set come from that folder's config (a Hugging Face ``config.json`` or our exported
    job config), and ``data.tokenizer`` left unset becomes the folder when it holds a ``tokenizer.json``
    (:func:`system.config.initial_load.merge_initial_load`). The launcher and every worker call this,
    so all see the same merged config.

    Args:
        path: TOML file (sections ``[model]``, ``[moe]``, ...); ``None`` for defaults only.
        overrides: ``--section.key value`` strings, applied last.
        initial_load_missing_ok: a ``checkpoint.initial_load_path`` that does not exist is skipped (the
            config's own ``[model]``/``[moe]`` stand) instead of refused: ``moesys train --dry-run`` on a
            machine without the model folder. Every other problem with the path is still an error.

    Raises:
        ConfigFileNotFoundError: ``path`` does not exist or is a directory (a ``ConfigError`` and a
            ``FileNotFoundError``).
        ConfigError: ``path`` is not a readable UTF-8 TOML file (a directory, binary, bad TOML); unknown
            keys, bad values, or failed validation; a ``checkpoint.initial_load_path`` that is missing,
            not a folder, not a model folder or of an unsupported architecture, or a ``[model]``/``[moe]``
            key set to a value that contradicts it (both values named).
    """
    from system.config.initial_load import merge_initial_load

    cfg = JobConfig()
    explicit: dict[str, str] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigFileNotFoundError(f"config file not found: {p} does not exist")
        if not p.is_file():
            kind = "a directory" if p.is_dir() else "not a regular file"
            raise ConfigFileNotFoundError(f"config {p} is {kind}, not a TOML file (e.g. configs/cpu-tiny.toml)")
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise ConfigError(f"config {p} cannot be read: {e.strerror or e}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config {p} is not a UTF-8 TOML file (byte {e.start} is {raw[e.start]:#04x})") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
        cfg.name = p.stem
        apply_dict(cfg, data, source=str(p), record=explicit)
    if overrides:
        apply_dict(cfg, parse_overrides(overrides), source="command line", record=explicit)
    merge_initial_load(cfg, explicit, missing_ok=initial_load_missing_ok)
    try:
        cfg.validate()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


def config_to_dict(cfg: JobConfig) -> dict[str, Any]:
    """The config as plain nested dicts (JSON/TOML serialisable)."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any]) -> JobConfig:
    """Inverse of :func:`config_to_dict` (validated)."""
    data = dict(data)
    name = data.pop("name", "job")
    cfg = apply_dict(JobConfig(), data, source="saved config")
    cfg.name = name
    cfg.validate()
    return cfg


def dump_json(cfg: JobConfig) -> str:
    """The config as indented JSON."""
    return json.dumps(config_to_dict(cfg), indent=2, sort_keys=True)
