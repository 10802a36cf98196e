"""fl-sim study: the quick smoke study on a few dozen real images, its cache, and the table/goal helpers."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from simulations import study
from simulations.study import StudyError, StudySettings, goals, plan_arms, render_table, run_order, settings_from_args


class TestSettings:
    def test_quick_is_tiny(self):
        s = StudySettings.quick()
        assert s.image_size == 32 and s.sites == 2 and s.rounds == 1 and s.max_images <= 100

    def test_cli_options_override_the_defaults(self):
        args = argparse.Namespace(quick=False, image_size=48, rounds=None, epsilons="1,8", data="x", out="y", arms=None)
        s = settings_from_args(args)
        assert s.image_size == 48 and s.rounds == StudySettings().rounds and s.epsilons == (1.0, 8.0)

    def test_a_resume_with_other_settings_is_refused(self, tmp_path: Path):
        study._check_settings(tmp_path, StudySettings())
        study._check_settings(tmp_path, StudySettings())  # same settings: fine
        with pytest.raises(StudyError, match="image_size"):
            study._check_settings(tmp_path, StudySettings(image_size=32))


class TestArms:
    def test_every_arm_of_the_issue(self):
        names = [a.name for a in plan_arms(StudySettings(), [f"hospital-{c}" for c in "abcde"])]
        assert names == ["pooled", "alone-a", "alone-b", "alone-c", "alone-d", "alone-e", "fedavg", "fedprox", "fedadam",
                         "fedavg-dp-eps1", "fedavg-dp-eps3", "fedavg-dp-eps8", "pooled-dp-eps8"]

    def test_goal_arms_run_first(self):
        order = [a.name for a in run_order(plan_arms(StudySettings(), ["hospital-a"]))]
        assert order.index("fedavg-dp-eps8") < order.index("fedavg-dp-eps1") < order.index("fedprox")
        assert order[:3] == ["pooled", "alone-a", "fedavg"]


def _result(auc: float, kind: str = "federated", dp: bool = False) -> dict:
    return {"kind": kind, "dp": dp, "wall_seconds": 60.0, "epsilon": {"hospital-a": 8.0} if dp else {},
            "test": {"auc": auc, "auc_ci": [auc - 0.01, auc + 0.01], "sensitivity": 0.9, "specificity": 0.8, "ece": 0.05}}


class TestGoals:
    def test_margins_and_verdicts(self):
        results = {"pooled": _result(0.975, "pooled"), "fedavg": _result(0.96), "fedavg-dp-eps8": _result(0.92, dp=True),
                   "alone-a": {**_result(0.95, "alone"), "arm": "alone-a"}}
        by_goal = {g["goal"]: g for g in goals(results, None, [results["alone-a"]])}
        assert by_goal["pooled AUC >= 0.97"]["met"]
        assert not by_goal["FedAvg within 0.01 of pooled"]["met"]
        assert math.isclose(by_goal["FedAvg within 0.01 of pooled"]["margin"], -0.005, abs_tol=1e-9)
        assert not by_goal["FedAvg DP eps 8 within 0.03 of FedAvg"]["met"]
        assert by_goal["every hospital alone below FedAvg"]["met"]

    def test_table_has_a_row_per_arm(self):
        doc = {"arms": {"pooled": _result(0.97, "pooled"), "fedavg-dp-eps8": _result(0.9, dp=True)}, "alt_strategy": None}
        table = render_table(doc)
        assert table.count("\n") == 3 and "0.970 [0.960, 0.980]" in table and "8.00" in table


@pytest.mark.slow
def test_quick_study_runs_and_resumes(fedxray_data: Path, tmp_path: Path, capsys):
    """The --quick study end to end (federated arms through `fl-sim run`), then again from its cache."""
    from simulations.cli import main

    images = fedxray_data / "kermany-pneumonia"
    if not images.is_dir():
        pytest.skip(f"{images} not found")
    out = tmp_path / "study"
    assert main(["study", "--quick", "--data", str(images), "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    arms = doc["arms"]
    assert set(arms) == {"pooled", "alone-a", "alone-b", "fedavg", "fedavg-dp-eps8", "pooled-dp-eps8"}
    for name, r in arms.items():
        t = r["test"]
        assert 0.0 <= t["auc"] <= 1.0, name
        assert t["auc_ci"][0] <= t["auc"] <= t["auc_ci"][1], name
        assert 0.0 <= t["sensitivity"] <= 1.0 and 0.0 <= t["specificity"] <= 1.0, name
        assert 0.0 <= t["ece"] <= 1.0, name
        assert r["wall_seconds"] > 0 and Path(r["onnx"]).is_file(), name
        assert t["n"] == doc["test_images"]
    fed_dp = arms["fedavg-dp-eps8"]
    assert set(fed_dp["epsilon"]) == {"hospital-a", "hospital-b"}
    assert all(0 < e <= 8.0 + 1e-6 for e in fed_dp["epsilon"].values())
    assert 0 < next(iter(arms["pooled-dp-eps8"]["epsilon"].values())) <= 8.0 + 1e-6
    assert arms["fedavg"]["curve"][0]["round"] == 1
    assert (Path(arms["fedavg"]["run_dir"]) / "model_card.md").is_file()
    for name in ("results.md", "roc.png", "rounds.png"):
        assert (out / name).is_file()
    assert {g["goal"] for g in doc["goals"]} >= {"pooled AUC >= 0.97", "every hospital alone below FedAvg"}
    capsys.readouterr()

    stamps = {n: (out / "arms" / n / "result.json").stat().st_mtime_ns for n in arms}
    assert main(["study", "--quick", "--data", str(images), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": cached (AUC") == len(arms)
    assert "| pooled |" in printed
    assert {n: (out / "arms" / n / "result.json").stat().st_mtime_ns for n in arms} == stamps
