"""client/run_limits.py: per-run and per-day limits counted from the ledger, whatever the messages claim."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from client.ledger import PrivacyLedger
from client.run_limits import admission_problems, evaluation_problem, run_epsilon_problem
from common.config import RunConfig
from common.privacy import plan_dp
from common.site_config import SiteConfig


def _site(tmp_path, **kw) -> SiteConfig:
    return SiteConfig.from_mapping({"data-dir": str(tmp_path), "state-dir": str(tmp_path / "s"), "site-name": "a",
                                    "max-epsilon": 100.0, **kw})


def _ledger(site: SiteConfig) -> PrivacyLedger:
    return PrivacyLedger(site.state_dir, site="a", max_epsilon=site.max_epsilon, delta=site.delta)


def _charge(ledger: PrivacyLedger, run_id: str, kind: str = "train", noise: float = 1.0) -> None:
    ledger.reserve(run_id=run_id, round=1, fingerprint="f" * 64, noise_multiplier=noise, sample_rate=1.0, steps=1,
                   max_grad_norm=1.0, n_train=10, patients=["p1"], kind=kind)


def test_a_fixed_noise_is_held_to_max_run_epsilon_by_its_plan(tmp_path):
    site = _site(tmp_path, **{"max-run-epsilon": 2.0})
    plan = plan_dp(n_train=100, batch_size=100, local_epochs=1, rounds=1, delta=1e-5, max_grad_norm=0.1,
                   noise_multiplier=0.3, sample_rate=1.0)
    problem = run_epsilon_problem(plan, site, _ledger(site), "run-a")
    assert problem and "max-run-epsilon" in problem and "noise multiplier 0.3" in problem


def test_the_runs_charges_so_far_count_against_max_run_epsilon(tmp_path):
    site = _site(tmp_path, **{"max-run-epsilon": 3.0})
    plan = plan_dp(n_train=100, batch_size=100, local_epochs=1, rounds=1, delta=1e-5, max_grad_norm=0.1,
                   target_epsilon=2.0, sample_rate=1.0)
    ledger = _ledger(site)
    assert run_epsilon_problem(plan, site, ledger, "run-a") is None
    for i in range(3):
        _charge(ledger, f"run-a@{i}", noise=plan.noise_multiplier)
    assert "would take the run to epsilon" in run_epsilon_problem(plan, site, ledger, "run-a")
    assert run_epsilon_problem(plan, site, ledger, "run-b") is None  # another run: its own allowance


def test_evaluations_are_counted_per_run_and_per_day(tmp_path):
    site = _site(tmp_path, **{"max-evaluations": 2, "max-evaluations-per-day": 3})
    ledger = _ledger(site)
    _charge(ledger, "run-a@1", "evaluate", noise=7.0)
    _charge(ledger, "run-a@2", "evaluate", noise=7.0)
    assert "max-evaluations)" in evaluation_problem(site, ledger, "run-a")
    _charge(ledger, "run-b@1", "evaluate", noise=7.0)
    assert "max-evaluations-per-day" in evaluation_problem(site, ledger, "run-c")
    tomorrow = datetime.now(UTC) + timedelta(hours=25)
    assert evaluation_problem(site, ledger, "run-c", now=tomorrow) is None


def test_rounds_outside_the_run_or_the_sites_limit_are_refused_before_the_pin(tmp_path):
    site = _site(tmp_path, **{"max-rounds": 5})
    run = RunConfig.from_mapping({"num-server-rounds": 3})
    assert admission_problems(run, site, run_key="r", server_round=3, flower_run_id=1) == []
    assert "num-server-rounds" in admission_problems(run, site, run_key="r", server_round=4, flower_run_id=1)[0]
    assert "num-server-rounds" in admission_problems(run, site, run_key="r", server_round=0, flower_run_id=1)[0]
    long = RunConfig.from_mapping({"num-server-rounds": 9})
    problems = admission_problems(long, site, run_key="s", server_round=6, flower_run_id=2)
    assert any("max-rounds" in p for p in problems)
