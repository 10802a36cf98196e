"""client/run_policy.py: the run settings a site approved, as exact values, ranges or choices."""

from __future__ import annotations

import json

import pytest

from client.run_policy import (
    POLICY_FILE,
    PolicyError,
    clear_policy,
    describe,
    load_policy,
    policy_refusals,
    read_policy_file,
    save_policy,
)
from common.audit import audit_path, read_entries
from common.config import RunConfig

POLICY = """
task = "binary"
labels = ["opacity"]
label-column = { one-of = ["", "label"] }
target-epsilon = { max = 3.0 }
num-server-rounds = { min = 1, max = 20 }
"""


def test_a_policy_file_reads_into_rules(tmp_path):
    (tmp_path / "p.toml").write_text(POLICY)
    rules = read_policy_file(tmp_path / "p.toml")
    assert rules["task"] == {"equals": "binary"} and rules["labels"] == {"equals": ["opacity"]}
    assert rules["target-epsilon"] == {"max": 3.0} and rules["label-column"] == {"one-of": ["", "label"]}
    assert describe("target-epsilon", rules["target-epsilon"]) == "target-epsilon <= 3"


def test_runs_outside_the_policy_are_named_setting_by_setting(tmp_path):
    (tmp_path / "p.toml").write_text(POLICY)
    rules = read_policy_file(tmp_path / "p.toml")
    assert policy_refusals(rules, RunConfig.from_mapping({"target-epsilon": 3.0})) == []
    bad = RunConfig.from_mapping({"target-epsilon": 5.0, "label-column": "age", "labels": "97", "num-server-rounds": 40})
    problems = policy_refusals(rules, bad)
    assert len(problems) == 4 and any(p.startswith("`label-column` = \"age\"") for p in problems)


def test_bad_policies_list_every_problem():
    with pytest.raises(PolicyError) as info:
        from client.run_policy import normalise

        normalise({"no-such": 1, "task": {"min": 1}, "target-epsilon": {"min": 5, "max": 2}, "labels": {"one-of": []}})
    text = str(info.value)
    assert "`no-such` is not a run setting" in text and "`task`: a range" in text
    assert "min 5.0 is above max 2.0" in text and "one-of is empty" in text


def test_approval_is_saved_audited_and_withdrawn(tmp_path):
    save_policy(tmp_path, {"target-epsilon": {"max": 3.0}}, note="privacy board 2026-12-01")
    assert load_policy(tmp_path)["rules"] == {"target-epsilon": {"max": 3.0}}
    assert clear_policy(tmp_path) and load_policy(tmp_path) is None and not clear_policy(tmp_path)
    events = [e["event"] for e in read_entries(audit_path(tmp_path))]
    assert events == ["run-policy-approved", "run-policy-withdrawn"]


def test_a_damaged_policy_fails_closed(tmp_path):
    (tmp_path / POLICY_FILE).write_text(json.dumps({"rules": {"task": {"min": 1}}}))
    with pytest.raises(PolicyError, match="every run is refused"):
        load_policy(tmp_path)
