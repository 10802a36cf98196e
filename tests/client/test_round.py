"""The site's round core (client/round.py) without Flower: ledger before training, retries, refusals, features."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from client.ledger import PrivacyLedger
from client.round import (
    ERR_BUDGET,
    ERR_DP_REQUIRED,
    ERR_WEIGHTS,
    RoundRefused,
    RoundRequest,
    evaluate_round,
    load_data,
    train_round,
)
from common.config import RunConfig
from common.models import build_model
from common.pooled_metrics import BINARY_EDGES
from common.site_config import SiteConfig
from simulations.hospitals import make_synthetic_hospitals


@pytest.fixture(autouse=True, scope="module")
def _threads(one_torch_thread: None) -> None:
    """Every test here on one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hospitals")
    make_synthetic_hospitals(root, 1, patients_per_site=14, prevalence=0.5, corrupt_per_site=1, seed=3)
    return root / "hospital-a"


def _run(**kw) -> RunConfig:
    base = {"image-size": 32, "num-server-rounds": 2, "target-epsilon": 4.0, "local-epochs": 1}
    return RunConfig.from_mapping({**base, **kw})


def _site(hospital: Path, state: Path, **kw) -> SiteConfig:
    return SiteConfig.from_mapping({"data-dir": str(hospital), "state-dir": str(state), "site-name": "hospital-a",
                                    "max-epsilon": 10.0, **kw})


def _request(run: RunConfig, server_round: int = 1, name: str = "run-x") -> RoundRequest:
    weights = build_model(run.model, dp=True, **run.model_kwargs()).state_dict()
    return RoundRequest(server_round=server_round, weights=weights, run_name=name)


def test_dp_round_is_charged_before_it_trains_and_replies_head_weights(hospital, tmp_path):
    run, site = _run(), _site(hospital, tmp_path / "state")
    reply = train_round(run, site, _request(run))
    assert set(reply.weights) == {"head.classifier.weight", "head.classifier.bias"}
    n = int(reply.metrics["num-examples"])
    assert n > 0 and reply.metrics["steps"] == 1  # one epoch at the default sample rate 1.0: one full-batch step
    entries = PrivacyLedger(site.state_dir, site="hospital-a", max_epsilon=10, delta=1e-5).contributions()
    assert len(entries) == 1
    assert entries[0].epsilon_after == pytest.approx(reply.metrics["epsilon-total"])
    assert entries[0].steps == reply.metrics["steps"]
    assert 0 < reply.metrics["epsilon-round"] <= reply.metrics["epsilon-total"] <= 4.0 + 1e-6


def test_a_retry_resends_the_stored_reply_and_charges_nothing(hospital, tmp_path):
    run, site = _run(), _site(hospital, tmp_path / "state")
    request = _request(run)
    first = train_round(run, site, request)
    again = train_round(run, site, request)
    assert torch.equal(first.weights["head.classifier.weight"], again.weights["head.classifier.weight"])
    assert len(PrivacyLedger(site.state_dir, site="hospital-a", max_epsilon=10, delta=1e-5).contributions()) == 1


def test_the_same_round_of_two_runs_releases_different_noise(hospital, tmp_path):
    run, site = _run(), _site(hospital, tmp_path / "state")
    a = train_round(run, site, _request(run, name="run-a"))
    b = train_round(run, site, _request(run, name="run-b"))
    assert not torch.equal(a.weights["head.classifier.weight"], b.weights["head.classifier.weight"])


def test_a_round_past_max_epsilon_is_refused_and_recorded(hospital, tmp_path):
    run, site = _run(), _site(hospital, tmp_path / "state", **{"max-epsilon": 4.5})
    train_round(run, site, _request(run, 1, name="run-a"))
    train_round(run, site, _request(run, 2, name="run-a"))  # the planned 4.0 spent
    with pytest.raises(RoundRefused) as info:  # a new run on the same patients (any seed or split) passes 4.5
        train_round(run, site, _request(run, 1, name="run-b"))
    assert info.value.code == ERR_BUDGET and "max-epsilon" in info.value.reason
    ledger = PrivacyLedger(site.state_dir, site="hospital-a", max_epsilon=4.5, delta=1e-5)
    assert len(ledger.contributions()) == 2 and len(ledger.refusals()) == 1
    assert ledger.spent_epsilon() == pytest.approx(4.0, rel=1e-3)


def test_a_site_that_requires_dp_refuses_a_run_without(hospital, tmp_path):
    run, site = _run(dp=False), _site(hospital, tmp_path / "state")
    with pytest.raises(RoundRefused) as info:
        train_round(run, site, _request(run))
    assert info.value.code == ERR_DP_REQUIRED
    assert not (tmp_path / "state" / "replies").exists()


def test_features_are_cached_once_per_image(hospital, tmp_path):
    run, site = _run(), _site(hospital, tmp_path / "state")
    train_round(run, site, _request(run, 1))
    cached = sorted((tmp_path / "state" / "cache").rglob("features/*/*/*.npy"))
    assert cached, "the scattering features were not cached"
    stamps = [p.stat().st_mtime_ns for p in cached]
    train_round(run, site, _request(run, 2))
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # round 2 read them, it did not recompute


def test_evaluation_sends_noised_histograms_charged_to_validation_patients(hospital, tmp_path):
    run, site = _run(), _site(hospital, tmp_path / "state", **{"max-evaluations": 1})
    metrics = evaluate_round(run, site, _request(run))
    assert set(metrics) == {"num-examples", "hist-pos", "hist-neg", "eval-noise", "eval-final"}  # no exact score or count
    assert not all(float(v).is_integer() for v in metrics["hist-pos"])  # Gaussian noise on every count
    assert len(metrics["hist-pos"]) == len(BINARY_EDGES) - 1 and metrics["eval-final"] == 0.0
    ledger = PrivacyLedger(site.state_dir, site="hospital-a", max_epsilon=10, delta=1e-5)
    (entry,) = ledger.contributions()
    # A routine round: twice eval-noise per count (most of the budget is kept for the final evaluation).
    assert entry.kind == "evaluate" and entry.noise_multiplier == pytest.approx(20.0 / math.sqrt(2))
    assert metrics["eval-noise"] == 20.0
    assert evaluate_round(run, site, _request(run)) == metrics  # a retry re-sends, charges nothing
    assert len(ledger.contributions()) == 1
    with pytest.raises(RoundRefused, match="max-evaluations"):  # the site's limit per run
        evaluate_round(run, site, _request(run, server_round=2))


def test_the_final_evaluation_is_precise_charged_at_its_noise_and_limited_per_run(hospital, tmp_path):
    """Issue 20: the site spends most of its evaluation budget on the exported model's evaluation, from its own
    eval-noise; a coordinator calling every evaluation final is charged for each, and past max-final-evaluations
    gets routine answers."""
    run, site = _run(), _site(hospital, tmp_path / "state", **{"max-final-evaluations": 1})
    base = _request(run)

    def final(server_round: int) -> dict:
        return evaluate_round(run, site, RoundRequest(server_round, base.weights, base.run_name, final=True))

    first, second = final(1), final(2)
    assert first["eval-final"] == 1.0 and first["eval-noise"] == pytest.approx(4.0)
    assert second["eval-final"] == 0.0 and second["eval-noise"] == pytest.approx(20.0)  # the limit: routine noise
    entries = PrivacyLedger(site.state_dir, site="hospital-a", max_epsilon=10, delta=1e-5).contributions()
    assert [e.kind for e in entries] == ["final-evaluate", "evaluate"]
    assert entries[0].noise_multiplier == pytest.approx(4.0 / math.sqrt(2))  # charged at the noise it released
    assert entries[0].epsilon_after > 1.0  # a precise answer costs the validation patients far more than a routine one


def test_the_last_evaluation_adds_noised_reference_statistics_and_charges_them(hospital, tmp_path):
    run, site = _run(), _site(hospital, tmp_path / "state")
    request = _request(run)
    metrics = evaluate_round(run, site, RoundRequest(request.server_round, request.weights, request.run_name,
                                                     reference=True))
    assert {"ref-intensity", "ref-brightness", "ref-contrast", "ref-sharpness"} <= set(metrics)
    ledger = PrivacyLedger(site.state_dir, site="hospital-a", max_epsilon=10, delta=1e-5)
    kinds = sorted(c.kind for c in ledger.contributions())
    assert kinds == ["evaluate", "reference"]  # the histograms and the statistics: two charges to the validation patients


def test_a_run_outside_the_sites_ranges_is_refused_before_anything(hospital, tmp_path):
    run, site = _run(**{"image-size": 128}), _site(hospital, tmp_path / "state", **{"max-image-size": 64})
    with pytest.raises(RoundRefused, match=r"`image-size` = 128: this site accepts at most 64"):
        train_round(run, site, _request(run))
    assert not (tmp_path / "state" / "privacy_ledger.json").exists()


def test_nan_global_weights_are_refused_before_any_charge(hospital, tmp_path):
    run, site = _run(), _site(hospital, tmp_path / "state")
    request = _request(run)
    request.weights["head.classifier.bias"][0] = float("nan")
    with pytest.raises(RoundRefused, match="NaN") as info:
        train_round(run, site, request)
    assert info.value.code == ERR_WEIGHTS
    assert not (tmp_path / "state" / "privacy_ledger.json").exists()


def test_the_split_does_not_follow_the_run_seed(hospital, tmp_path):
    site = _site(hospital, tmp_path / "state")
    a = load_data(_run(seed=1), site)
    b = load_data(_run(seed=2, **{"val-fraction": 0.5}), site)
    assert a.patients("val") == b.patients("val")  # the site's salt and val-fraction decide, not the run


def test_data_errors_reach_the_coordinator_without_paths(hospital, tmp_path):
    run, site = _run(labels="no-such-finding"), _site(hospital, tmp_path / "state")
    with pytest.raises(RoundRefused) as info:
        train_round(run, site, _request(run))
    assert str(hospital) not in info.value.reason and "no-such-finding" not in info.value.reason


def test_multiclass_evaluation_sends_one_vs_rest_histograms_per_class(hospital, tmp_path):
    run = _run(task="multiclass", labels="normal,opacity")
    site = _site(hospital, tmp_path / "state")
    metrics = evaluate_round(run, site, _request(run))
    assert {"hist-pos-0", "hist-neg-0", "hist-pos-1", "hist-neg-1"} <= set(metrics) and "hist-pos" not in metrics
    (entry,) = PrivacyLedger(site.state_dir, site="hospital-a", max_epsilon=10, delta=1e-5).contributions()
    assert entry.noise_multiplier == pytest.approx(20.0 / math.sqrt(2 * 2))  # sqrt(2) per class, 2 classes
