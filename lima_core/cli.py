"""The command line of every lima-core command: a run's settings from defaults < `--config
FILE.toml` < `--key value` flags. Every field of lima_core.config is a flag; an unknown table or key
is an error, never a silent default, and a bad value names where it came from (`file.toml:LINE`
or `--flag`) in one line. Nothing here does I/O but reading the TOML file.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from pydantic import ValidationError

from lima_core.config import Config, ConfigError

# ---- loading: defaults < TOML < flags, every error naming where the value came from --------

_SECTIONS = {name: field.annotation for name, field in Config.model_fields.items()}


def load_config(argv: list[str] | None = None) -> Config:
    """Config from defaults < `--config FILE.toml` < `--key value` flags (every field is a flag)."""
    parser = argparse.ArgumentParser(prog="python -m lima_core.train", description=Config.__doc__)
    parser.add_argument("--config", help="TOML file with [train], [optim], [parallel] and [sampling] tables")
    add_flags(parser)
    return config_from_args(parser.parse_args(argv))


def add_flags(parser: argparse.ArgumentParser, sections=tuple(_SECTIONS)) -> None:
    """A `--key-name VALUE` flag for every field of `sections` (help: the field's docstring)."""
    for section in sections:
        for key, field in _SECTIONS[section].model_fields.items():
            parser.add_argument(f"--{key.replace('_', '-')}", dest=f"{section}.{key}", default=None, metavar="VALUE",
                                help=f"[{section}] {field.description} (default: {field.default})")


def config_from_args(args: argparse.Namespace) -> Config:
    """Config from the `--config` file (when the parser has one) and the flags `add_flags` made."""
    values: dict[str, dict] = {section: {} for section in _SECTIONS}
    sources: dict[tuple[str, str], str] = {}
    if getattr(args, "config", None):
        _read_toml(Path(args.config), values, sources)
    for dest, text in vars(args).items():
        section, _, key = dest.partition(".")
        if key and text is not None:
            values[section][key] = _flag_value(text, _SECTIONS[section].model_fields[key].annotation)
            sources[section, key] = f"--{key.replace('_', '-')}"
    try:
        return Config(**values)
    except ValidationError as e:
        raise ConfigError(_explain(e, sources)) from None


def _read_toml(path: Path, values: dict[str, dict], sources: dict[tuple[str, str], str]):
    try:
        text = path.read_text()
        tables = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    for section, table in tables.items():
        if section not in _SECTIONS or not isinstance(table, dict):
            raise ConfigError(f"{path}:{_line_of(text, section, None)}: unknown table [{section}]; "
                              f"known: {', '.join(f'[{s}]' for s in _SECTIONS)}")
        values[section].update(table)
        for key in table:
            sources[section, key] = f"{path}:{_line_of(text, section, key)}"


def _line_of(text: str, section: str, key: str | None) -> int:
    """The line of `key = ...` in `[section]`, else of `[section]` itself (1 if neither is found)."""
    current, found = None, 1
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("["):
            current = stripped.strip("[] ")
            if current == section:
                found = number
                if key is None:
                    return number
        elif current == section and stripped.split("=", 1)[0].strip() == key:
            return number
    return found


def _flag_value(text: str, annotation):
    """A flag's text as TOML when the field is not a string (lists, numbers); pydantic validates."""
    if annotation is str:
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # e.g. `true`/`yes` for a bool, or a bad value pydantic will name


def _explain(error: ValidationError, sources: dict[tuple[str, str], str]) -> str:
    """One line an error: where the value came from (file:line or flag), the key and what is wrong."""
    lines = []
    for e in error.errors():
        if not e["loc"]:  # a rule across fields (Config._consistent): its message names them
            lines.append(e["msg"].removeprefix("Value error, "))
            continue
        section, key = (e["loc"] + (None, None))[:2]
        where = sources.get((section, key), "default")
        if e["type"] == "extra_forbidden":
            known = ", ".join(_SECTIONS[section].model_fields) if section in _SECTIONS else ""
            lines.append(f"{where}: unknown key {key!r} in [{section}]; known: {known}")
        else:
            message = e["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {section}.{key} = {e.get('input')!r}: {message}")
    return "; ".join(lines)
