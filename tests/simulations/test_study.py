"""fl-sim study: the arm plan, the goals and tables, and a quick study on a few dozen real images (then resumed)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from simulations import study
from simulations.study import StudyError, StudySettings, plan_arms, run_order, settings_from_args
from simulations.study_arms import Arm, arm_run_config, no_dp_candidates
from simulations.study_report import goals, loho_summary, render_loho, render_table, render_warm, warm_summary

SITES = [f"hospital-{c}" for c in "abcde"]


def _args(**kw) -> argparse.Namespace:
    base = {"quick": False, "data": "x", "out": "y", "arms": None, "nih": None}
    return argparse.Namespace(**{**base, **kw})


class TestSettings:
    def test_quick_is_tiny(self):
        s = StudySettings.quick()
        assert s.image_size == 32 and s.sites == 2 and s.rounds == 1 and s.max_images <= 100 and s.nih_max_images <= 200

    def test_cli_options_override_the_defaults(self):
        s = settings_from_args(_args(image_size=48, rounds=None, epsilons="1,8", models="scatternet,mobilenet_v2",
                                     no_dp_learning_rates="0.1"))
        assert s.image_size == 48 and s.rounds == StudySettings().rounds and s.epsilons == (1.0, 8.0)
        assert s.models == ("scatternet", "mobilenet_v2") and s.no_dp_learning_rates == (0.1,)

    def test_a_resume_with_other_settings_is_refused(self, tmp_path: Path):
        study._check_settings(tmp_path, StudySettings())
        study._check_settings(tmp_path, StudySettings(models=("scatternet", "mobilenet_v2")))  # more arms: fine
        with pytest.raises(StudyError, match="image_size"):
            study._check_settings(tmp_path, StudySettings(image_size=32))


class TestArms:
    def test_the_default_arms_are_issue_9s(self):
        names = [a.name for a in plan_arms(StudySettings(), SITES)]
        assert names == ["pooled", "alone-a", "alone-b", "alone-c", "alone-d", "alone-e", "fedavg",
                         "fedavg-dp-eps1", "fedavg-dp-eps3", "fedavg-dp-eps8", "pooled-dp-eps1", "pooled-dp-eps3",
                         "pooled-dp-eps8", "loho-a", "loho-b", "loho-c", "loho-d", "loho-e", "warm-dp-eps3"]

    def test_leave_one_out_and_warm_start_arms(self):
        arms = {a.name: a for a in plan_arms(StudySettings(), SITES)}
        assert arms["loho-c"].left_out == "hospital-c" and arms["loho-c"].dp and arms["loho-c"].epsilon == 3.0
        assert arms["warm-dp-eps3"].init == "nih" and arms["warm-dp-eps3"].epsilon == 3.0

    def test_mobilenet_arms_only_when_asked(self):
        default = plan_arms(StudySettings(), SITES)
        assert all(a.model == "scatternet" for a in default)
        both = {a.name: a for a in plan_arms(StudySettings(models=("scatternet", "mobilenet_v2")), SITES)}
        assert {"mnv2-pooled", "mnv2-fedavg", "mnv2-fedavg-dp-eps3", "mnv2-warm-dp-eps3"} <= set(both)
        assert both["mnv2-warm-dp-eps3"].train_part == "head" and both["warm-dp-eps3"].train_part == "all"

    def test_goal_arms_run_first(self):
        order = [a.name for a in run_order(plan_arms(StudySettings(models=("scatternet", "mobilenet_v2")), SITES))]
        assert order[0] == "pooled"
        assert order.index("fedavg-dp-eps3") < order.index("fedavg-dp-eps1") < order.index("fedavg") < order.index("loho-a")
        assert max(order.index(n) for n in order if not n.startswith("mnv2-")) < order.index("mnv2-pooled")


class TestRecipes:
    def test_dp_arms_use_the_product_defaults(self):
        run = arm_run_config(StudySettings(), Arm("x", "federated", dp=True, epsilon=3.0), "PNEUMONIA")
        assert (run.optimizer, run.learning_rate, run.max_grad_norm, run.sample_rate) == ("sgd", 1.0, 0.1, 1.0)
        assert run.target_epsilon == 3.0 and run.num_server_rounds == StudySettings().rounds

    def test_no_dp_scatternet_chooses_among_adam_rates(self):
        cands = no_dp_candidates(StudySettings(), "scatternet")
        assert [c["learning-rate"] for c in cands] == list(StudySettings().no_dp_learning_rates)
        run = arm_run_config(StudySettings(), Arm("x", "pooled"), "PNEUMONIA", recipe=cands[0])
        assert run.optimizer == "adam" and not run.dp
        assert no_dp_candidates(StudySettings(), "mobilenet_v2") == [{}]  # the CNN's recommended settings


def _result(auc: float, kind: str = "federated", dp: bool = False, **extra) -> dict:
    return {"kind": kind, "dp": dp, "wall_seconds": 60.0, "eval_seconds": 2.0, "epsilon": {"hospital-a": 3.0} if dp else {},
            "test": {"auc": auc, "auc_ci": [auc - 0.01, auc + 0.01], "sensitivity": 0.9, "specificity": 0.8, "ece": 0.05},
            **extra}


def _loho(site: str, auc: float) -> dict:
    return _result(0.95, dp=True, arm=f"loho-{site[-1]}", left_out={"site": site, "auc": auc, "auc_ci": [auc - 0.02, auc + 0.02],
                                                                     "n": 100, "n_pos": 70})


class TestGoals:
    def test_margins_and_verdicts(self):
        results = {"pooled": _result(0.990, "pooled"), "fedavg-dp-eps3": _result(0.986, dp=True),
                   "fedavg-dp-eps1": _result(0.965, dp=True), "loho-a": _loho("hospital-a", 0.9), "loho-b": _loho("hospital-b", 0.8)}
        by_goal = {g["goal"]: g for g in goals(results, n_sites=3, total_minutes=75.0)}
        eps3 = by_goal["FedAvg DP epsilon 3 within 0.005 AUC of non-DP pooled (held-out patients)"]
        assert eps3["met"] and math.isclose(eps3["margin"], 0.001, abs_tol=1e-9)
        eps1 = by_goal["FedAvg DP epsilon 1 within 0.02 AUC of non-DP pooled (held-out patients)"]
        assert not eps1["met"] and math.isclose(eps1["margin"], -0.005, abs_tol=1e-9)
        assert by_goal["FedAvg DP epsilon 3 AUC >= 0.96 on patients it never saw"]["met"]
        loho = by_goal["leave-one-hospital-out figures reported"]
        assert not loho["met"] and math.isclose(loho["value"], 0.85)  # 2 of 3 hospitals
        assert not by_goal["the study in under 60 minutes on this machine"]["met"]

    def test_a_missing_arm_is_no_goal(self):
        assert goals({"pooled": _result(0.99, "pooled")}, n_sites=5, total_minutes=None) == []


class TestReport:
    def test_table_has_a_row_per_arm_with_the_nih_column(self):
        nih = {"auc": 0.61, "auc_ci": [0.57, 0.65]}
        doc = {"arms": {"pooled": _result(0.97, "pooled", nih=nih), "warm-dp-eps3": _result(0.9, dp=True, init="nih")}}
        table = render_table(doc)
        assert table.count("\n") == 3 and "0.970 [0.960, 0.980]" in table and "0.610 [0.570, 0.650]" in table
        assert "(pretrained on NIH)" in table and "3.00" in table

    def test_leave_one_out_table_and_mean(self):
        summary = loho_summary({"loho-a": _loho("hospital-a", 0.9), "loho-b": _loho("hospital-b", 0.8), "pooled": _result(0.99)})
        assert list(summary["per_site"]) == ["hospital-a", "hospital-b"] and math.isclose(summary["mean_auc"], 0.85)
        assert "| mean | | 0.850 |" in render_loho({"loho": summary})

    def test_warm_start_verdict_reads_the_intervals(self):
        results = {"fedavg-dp-eps3": _result(0.95, dp=True, arm="fedavg-dp-eps3", target_epsilon=3.0),
                   "warm-dp-eps3": _result(0.90, dp=True, arm="warm-dp-eps3", target_epsilon=3.0)}
        w = warm_summary(results, {"n_pretrain": 800, "best_round": 2, "val_auc": 0.7})
        assert math.isclose(w["difference"], -0.05) and w["intervals_overlap"] is False
        assert "hurts" in render_warm({"warm": w})


@pytest.mark.slow
def test_quick_study_runs_and_resumes(fedxray_data: Path, tmp_path: Path, capsys):
    """The --quick study end to end (leave-one-out and warm start through `fl-sim run`), then again from its cache."""
    from simulations.cli import main

    images, nih = fedxray_data / "kermany-pneumonia", fedxray_data / "nih-cxr14-1000"
    if not images.is_dir() or not nih.is_dir():
        pytest.skip(f"{images} or {nih} not found")
    out = tmp_path / "study"
    argv = ["study", "--quick", "--data", str(images), "--out", str(out), "--arms", "alone-a,pooled-dp-eps8,loho-a,warm-dp-eps8"]
    assert main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    arms = doc["arms"]
    assert set(arms) == {"pooled", "alone-a", "pooled-dp-eps8", "loho-a", "warm-dp-eps8"}  # pooled: alone-a's recipe
    for name, r in arms.items():
        t = r["test"]
        assert 0.0 <= t["auc"] <= 1.0 and t["auc_ci"][0] <= t["auc"] <= t["auc_ci"][1], name
        assert t["n"] == doc["test_images"] and r["wall_seconds"] > 0 and Path(r["onnx"]).is_file(), name
        assert t["torch_max_abs_diff"] <= 1e-4 and 0.0 <= t["saturated"] <= 1.0, name  # the ONNX file is the arm's weights
        assert ("nih" in r) == (r["init"] is None), name  # the warm start has seen the NIH images
    assert arms["pooled"]["nih"]["n"] == StudySettings.quick().nih_max_images
    assert arms["alone-a"]["recipe"]["optimizer"] == "adam" == arms["pooled"]["no_dp_recipe"]["optimizer"]
    # Leave-one-out: trained without hospital-a, scored on every image of it.
    loho = arms["loho-a"]
    hospital_a = next(s for s in json.loads((out / "hospitals" / "manifest.json").read_text())["sites"] if s["name"] == "hospital-a")
    assert loho["left_out"]["n"] == hospital_a["n_images"] and set(loho["epsilon"]) == {"hospital-b"}
    assert 0 < loho["epsilon"]["hospital-b"] <= 8.0 + 1e-6
    # The study scores the exported model itself: the same AUC as `fl-sim run` printed for the hold-out.
    for name in ("loho-a", "warm-dp-eps8"):
        assert math.isclose(arms[name]["test"]["auc"], arms[name]["fl_sim_holdout"], abs_tol=1e-9), name
    card = (Path(arms["warm-dp-eps8"]["run_dir"]) / "model_card.md").read_text()
    assert "weights.pt" in card and (out / "pretrain" / "scatternet" / "pretrain.json").is_file()
    assert 0 < next(iter(arms["pooled-dp-eps8"]["epsilon"].values())) <= 8.0 + 1e-6
    for name in ("results.md", "roc.png", "rounds.png", "privacy.png"):
        assert (out / name).is_file()
    assert doc["loho"]["per_site"]["hospital-a"]["images"] == hospital_a["n_images"]
    capsys.readouterr()

    stamps = {n: (out / "arms" / n / "result.json").stat().st_mtime_ns for n in arms}
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count(": cached (AUC") == len(arms) and "| loho-a |" in printed
    assert {n: (out / "arms" / n / "result.json").stat().st_mtime_ns for n in arms} == stamps

    # An arm scored by an older version of the study is scored again from its saved weights, not retrained.
    for name in ("alone-a", "loho-a"):
        path = out / "arms" / name / "result.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "eval_version": 1}))
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())["arms"]
    for name in ("alone-a", "loho-a"):
        assert again[name]["eval_version"] == study.EVAL_VERSION and again[name]["wall_seconds"] == arms[name]["wall_seconds"]
        assert math.isclose(again[name]["test"]["auc"], arms[name]["test"]["auc"], abs_tol=1e-9), name
