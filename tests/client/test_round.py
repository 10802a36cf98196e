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
    RoundRefused,
    RoundRequest,
    evaluate_round,
    train_round,
)
from common.config import RunConfig, SiteConfig
from common.models import build_model
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
    assert reply.metrics["num-examples"] > 0 and reply.metrics["steps"] == math.ceil(1 / 0.2)
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
    run, site = _run(), _site(hospital, tmp_path / "state", **{"max-epsilon": 1.0})
    with pytest.raises(RoundRefused) as info:
        train_round(run, site, _request(run))
    assert info.value.code == ERR_BUDGET and "max-epsilon" in info.value.reason
    ledger = PrivacyLedger(site.state_dir, site="hospital-a", max_epsilon=1.0, delta=1e-5)
    assert ledger.contributions() == [] and len(ledger.refusals()) == 1


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


def test_evaluate_round_reports_histograms_without_charging(hospital, tmp_path):
    run, site = _run(), _site(hospital, tmp_path / "state")
    metrics = evaluate_round(run, site, _request(run))
    assert metrics["num-examples"] > 0 and metrics["n-train"] > 0
    assert sum(metrics["hist-pos"]) + sum(metrics["hist-neg"]) == metrics["num-examples"]
    assert not (tmp_path / "state" / "privacy_ledger.json").exists()
