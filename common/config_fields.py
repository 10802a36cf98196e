"""The machinery behind every typed configuration: coerce raw values, collect every problem, one error.

``common.config`` (the coordinator's run settings) and ``common.site_config`` (a hospital's own
settings) are frozen dataclasses built through :func:`build_config`, so both report every problem
in one :class:`ConfigError` and read TOML, command-line strings and Python values alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """One or more settings are invalid; the message lists every problem and how to fix it."""

    def __init__(self, where: str, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid {where} ({len(problems)} problem(s)):\n{lines}")


def config_key(name: str) -> str:
    return name.replace("_", "-")


def fields_to_mapping(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, tuple):
            value = ",".join(value)
        elif isinstance(value, Path):
            value = str(value)
        out[config_key(f.name)] = value
    return out


def coerce_value(value: Any, typ: Any, key: str, problems: list[str]) -> Any:
    """Convert a raw value (TOML, CLI string) to the field's type, or record why not."""
    type_name = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if type_name == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if type_name == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if type_name == "float":
            if isinstance(value, bool):
                raise ValueError
            result = float(value)
            if not math.isfinite(result):
                raise ValueError
            return result
        if type_name == "Path":
            return Path(str(value)).expanduser()
        if type_name.startswith("tuple"):
            if isinstance(value, (list, tuple)):
                items = [str(v).strip() for v in value]
            else:
                items = [v.strip() for v in str(value).split(",")]
            return tuple(v for v in items if v)
        return str(value)
    except (TypeError, ValueError):
        problems.append(f"`{key}` = {value!r} is not a valid {type_name}")
        return None


def build_config(cls: Any, raw: Mapping[str, Any], where: str, check: Any) -> Any:
    """``cls`` from raw settings; every coercion and range problem in one :class:`ConfigError`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems: list[str] = []
    values: dict[str, Any] = {}
    for raw_key, value in raw.items():
        name = str(raw_key).replace("-", "_")
        if name not in fields:
            known = ", ".join(sorted(config_key(n) for n in fields))
            problems.append(f"unknown key `{raw_key}` (known keys: {known})")
            continue
        coerced = coerce_value(value, fields[name].type, config_key(name), problems)
        if coerced is not None:
            values[name] = coerced
    for name, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and name not in values:
            problems.append(f"`{config_key(name)}` is required")
    if any("is required" in p for p in problems):
        raise ConfigError(where, problems)
    # Range checks run on whatever did coerce, so one error lists every problem at once.
    obj = cls(**values)
    problems += check(obj)
    if problems:
        raise ConfigError(where, problems)
    return obj


def check_one_of(problems: list[str], key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        problems.append(f"`{key}` = {value!r}: expected one of {', '.join(choices)}")


def check_range(problems: list[str], key: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if value < lo or value > hi or (lo_open and value == lo):
        left = "(" if lo_open else "["
        problems.append(f"`{key}` = {value}: expected a value in {left}{lo}, {hi}]")


def to_toml(values: Mapping[str, Any]) -> str:
    """Flat ``key = value`` TOML, as `flwr run --run-config FILE` and ``--node-config`` read it."""
    def one(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        return json.dumps(str(value))

    return "".join(f"{k} = {one(v)}\n" for k, v in values.items())
