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


def apply_dict(cfg: JobConfig, data: dict[str, Any], source: str = "config") -> JobConfig:
    """Apply a nested ``{section: {key: value}}`` mapping onto ``cfg`` in place and return it.

    Raises:
        ConfigError: for an unknown section or key (naming the allowed ones) or a bad value.
    """
    top = _field_types(JobConfig)
    for section, values in data.items():
        if section not in top:
            raise ConfigError(f"{source}: unknown section or key {section!r}; allowed: {', '.join(top)}")
        if not dataclasses.is_dataclass(top[section]):
            setattr(cfg, section, _coerce(section, values, top[section]))
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Build a validated :class:`JobConfig` from defaults, a TOML file and CLI overrides.

    Args:
        path: TOML file (sections ``[model]``, ``[moe]``, ...); ``None`` for defaults only.
        overrides: ``--section.key value`` strings, applied last.

    Raises:
        ConfigFileNotFoundError: ``path`` does not exist or is a directory (a ``ConfigError`` and a
            ``FileNotFoundError``).
        ConfigError: ``path`` is not a readable UTF-8 TOML file (a directory, binary, bad TOML); unknown
            keys, bad values, or failed validation.
    """
    cfg = JobConfig()
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
        apply_dict(cfg, data, source=str(p))
    if overrides:
        apply_dict(cfg, parse_overrides(overrides), source="command line")
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
