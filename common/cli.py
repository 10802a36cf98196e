"""What fedxray's command lines share: ``KEY=VALUE`` run settings, and fedxray's version.

``fl-sim --set`` and ``fl-server run -c`` read each value as a TOML value, as in a run-config file:
``dp=false`` is a boolean, ``rounds=3`` an integer, ``labels="a,b"`` a string; a value that is not
valid TOML (``labels=opacity``) is kept as the string it is. common/config.py then checks every
setting's type and range.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any


def parse_settings(pairs: Iterable[str], option: str = "--set") -> dict[str, Any]:
    """``["key=value", ...]`` -> {key: TOML value}; ValueError naming ``option`` for an item without ``=``."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} {pair!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()
    return out


def fedxray_version() -> str:
    """The installed fedxray's version ("unknown" when run from a checkout that was never installed)."""
    try:
        return version("fedxray")
    except PackageNotFoundError:
        return "unknown"
