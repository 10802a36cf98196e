"""The run settings a site has approved: a policy file that every run must fit before anything is read or spent.

The node config's ranges (max-image-size, max-run-epsilon, ...) bound the run settings every site
cares about. A site that wants more, e.g. to accept only binary runs on its ``opacity`` column at
epsilon 3 or less, so that a coordinator cannot pick filters (task, labels, label-column) that
select a handful of patients, approves a policy::

    fl-client approve --policy policy.toml

with one line per run setting (kebab-case, as in the run config)::

    task = "binary"                      # exactly this value
    labels = ["opacity"]
    label-column = { one-of = ["", "label"] }
    target-epsilon = { max = 3.0 }       # a range: min, max or both
    num-server-rounds = { min = 1, max = 20 }

The policy is kept in ``<state-dir>/run-policy.json`` (approval recorded in the site's audit log)
and shown by ``fl-client status``. A run outside it is refused with one line per setting; settings
the policy does not name are left to the node config's ranges. A damaged policy file refuses every
run (fail closed).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.audit import audit_path, try_record
from common.cache import atomic_write_bytes
from common.config import RunConfig
from common.config_fields import coerce_value, config_key

POLICY_FILE = "run-policy.json"
_NUMBER_TYPES = ("int", "float")


class PolicyError(ValueError):
    """A policy file that cannot be used; the message lists every problem and the fix."""


def _fields() -> dict[str, dataclasses.Field]:
    return {config_key(f.name): f for f in dataclasses.fields(RunConfig)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def normalise(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Rules from a policy mapping: ``{key: {"equals": v} | {"min": a, "max": b} | {"one-of": [...]}}``."""
    fields = _fields()
    problems: list[str] = []
    rules: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        if key not in fields:
            problems.append(f"`{key}` is not a run setting (known: {', '.join(sorted(fields))})")
            continue
        typ = fields[key].type
        kind = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
        if isinstance(value, dict) and set(value) <= {"min", "max"} and value:
            if kind not in _NUMBER_TYPES:
                problems.append(f"`{key}`: a range (min, max) needs a numeric setting; give the value or one-of")
                continue
            bounds = {b: coerce_value(v, typ, key, problems) for b, v in value.items()}
            if None not in bounds.values():
                if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
                    problems.append(f"`{key}`: min {bounds['min']} is above max {bounds['max']}")
                rules[key] = bounds
        elif isinstance(value, dict) and set(value) == {"one-of"} and isinstance(value["one-of"], list):
            allowed = [coerce_value(v, typ, key, problems) for v in value["one-of"]]
            if value["one-of"] and None not in allowed:
                rules[key] = {"one-of": [_plain(v) for v in allowed]}
            elif not value["one-of"]:
                problems.append(f"`{key}`: one-of is empty")
        elif isinstance(value, dict):
            problems.append(f"`{key}`: give a value, {{ min = .., max = .. }} or {{ one-of = [..] }}")
        else:
            exact = coerce_value(value, typ, key, problems)
            if exact is not None:
                rules[key] = {"equals": _plain(exact)}
    if problems:
        raise PolicyError("the run policy cannot be used: " + "; ".join(problems))
    return rules


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise PolicyError(f"cannot read the run policy {path}: {err}; write one `setting = value` per line "
                          "(TOML)") from None


def read_policy_file(path: Path) -> dict[str, dict[str, Any]]:
    """Rules from a TOML policy file (see the module docstring)."""
    return normalise(_read_toml(path))


def approve_policy_file(state_dir: Path, path: Path, note: str = "") -> dict[str, dict[str, Any]]:
    """``fl-client approve --policy FILE``: the file's rules become the site's run policy; returns them."""
    return save_policy(state_dir, _read_toml(path), note=note)["rules"]


def save_policy(state_dir: Path, raw: dict[str, Any], note: str = "") -> dict[str, Any]:
    """Approve ``raw`` (a policy mapping) as the site's run policy; replaces any earlier one. Audited."""
    rules = normalise(raw)
    doc = {"rules": rules, "approved": datetime.now(UTC).isoformat(timespec="seconds"), "note": note}
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(state_dir) / POLICY_FILE, json.dumps(doc, indent=2, sort_keys=True).encode())
    try_record(audit_path(state_dir), "run-policy-approved", rules=rules, note=note)
    return doc


def clear_policy(state_dir: Path) -> bool:
    """Withdraw the run policy (the node config's ranges remain); False when there was none. Audited."""
    path = Path(state_dir) / POLICY_FILE
    if not path.exists():
        return False
    path.unlink()
    try_record(audit_path(state_dir), "run-policy-withdrawn")
    return True


def load_policy(state_dir: Path) -> dict[str, Any] | None:
    """The approved policy document, or None; PolicyError when the file is damaged (runs are then refused)."""
    path = Path(state_dir) / POLICY_FILE
    try:
        doc = json.loads(path.read_text())
        return {**doc, "rules": normalise({k: _as_raw(r) for k, r in doc["rules"].items()})}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise PolicyError(f"{path} is damaged ({err}): every run is refused until the policy is approved again "
                          "(fl-client approve --policy FILE)") from None


def _as_raw(rule: dict[str, Any]) -> Any:
    return rule["equals"] if "equals" in rule else rule


def describe(key: str, rule: dict[str, Any]) -> str:
    """One rule as a person reads it: ``target-epsilon <= 3``, ``task = binary``, ``model one of ...``."""
    if "equals" in rule:
        return f"{key} = {json.dumps(rule['equals'])}"
    if "one-of" in rule:
        return f"{key} one of {', '.join(json.dumps(v) for v in rule['one-of'])}"
    lo, hi = rule.get("min"), rule.get("max")
    if lo is not None and hi is not None:
        return f"{lo:g} <= {key} <= {hi:g}"
    return f"{key} >= {lo:g}" if lo is not None else f"{key} <= {hi:g}"


def policy_refusals(rules: dict[str, dict[str, Any]], run: RunConfig) -> list[str]:
    """Every run setting outside the site's approved policy, each naming the key, its value and the rule."""
    values = {config_key(f.name): _plain(getattr(run, f.name)) for f in dataclasses.fields(run)}
    out = []
    for key, rule in rules.items():
        value = values[key]
        ok = (value == rule["equals"] if "equals" in rule else value in rule["one-of"] if "one-of" in rule
              else rule.get("min", value) <= value <= rule.get("max", value))
        if not ok:
            out.append(f"`{key}` = {json.dumps(value)}: this site's policy accepts only {describe(key, rule)} "
                       "(fl-client approve --policy)")
    return out
