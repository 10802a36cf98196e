"""The site's releases for the intended-use gate (client/gate_stats.py), through the round core."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from client.gate_stats import KIND_CUTOFF, KIND_REFERENCE
from client.ledger import PrivacyLedger
from client.round import RoundRequest, evaluate_round
from common.config import RunConfig
from common.models import build_model
from common.ood import SCORE_EDGES, GateReference
from common.site_config import SiteConfig
from simulations.hospitals import make_synthetic_hospitals


@pytest.fixture(autouse=True, scope="module")
def _threads(one_torch_thread: None) -> None:
    """Every test here on one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hospitals")
    make_synthetic_hospitals(root, 1, patients_per_site=14, prevalence=0.5, seed=4)
    return root / "hospital-a"


RUN = RunConfig.from_mapping({"image-size": 32, "num-server-rounds": 3, "target-epsilon": 4.0, "local-epochs": 1})


def _site(hospital: Path, state: Path) -> SiteConfig:
    return SiteConfig.from_mapping({"data-dir": str(hospital), "state-dir": str(state), "site-name": "hospital-a",
                                    "max-epsilon": 10.0})


def _request(server_round: int, **kw) -> RoundRequest:
    weights = build_model(RUN.model, dp=True, **RUN.model_kwargs()).state_dict()
    return replace(RoundRequest(server_round=server_round, weights=weights, run_name="run-g"), **kw)


def _ledger(site: SiteConfig) -> PrivacyLedger:
    return PrivacyLedger(site.state_dir, site="hospital-a", max_epsilon=10, delta=1e-5)


def test_reference_sums_are_released_once_per_run_and_re_sent_unchanged(hospital, tmp_path):
    site = _site(hospital, tmp_path / "state")
    first = evaluate_round(RUN, site, _request(1, gate_stats=True))
    assert len(first["gate-sum"]) == 48 and isinstance(first["gate-n"], float)
    charges = [c for c in _ledger(site).contributions() if c.kind == KIND_REFERENCE]
    assert len(charges) == 1 and charges[0].noise_multiplier == pytest.approx(10.0 / math.sqrt(2))
    assert charges[0].n_train < 14  # the validation patients, not the whole site
    second = evaluate_round(RUN, site, _request(2, gate_stats=True))
    assert (second["gate-sum"], second["gate-n"]) == (first["gate-sum"], first["gate-n"])  # the same release, not a new one
    assert len([c for c in _ledger(site).contributions() if c.kind == KIND_REFERENCE]) == 1  # charged once


def test_lost_numbers_are_not_drawn_again(hospital, tmp_path, caplog):
    """Fresh noise on the same images would be a second release the ledger never charged."""
    site = _site(hospital, tmp_path / "state")
    evaluate_round(RUN, site, _request(1, gate_stats=True))
    for kept in (site.state_dir / "gate").glob("*.json"):
        kept.unlink()
    with caplog.at_level("WARNING", logger="client.gate_stats"):
        again = evaluate_round(RUN, site, _request(2, gate_stats=True))
    assert "gate-sum" not in again and "hist-pos" in again  # the evaluation itself is still answered
    assert any("numbers are lost" in r.message for r in caplog.records)


def test_the_last_round_sends_a_noised_score_histogram_charged_to_validation_patients(hospital, tmp_path):
    site = _site(hospital, tmp_path / "state")
    reference = GateReference([1 / math.sqrt(48)] * 48, 0.5, 40.0).to_json()
    out = evaluate_round(RUN, site, _request(3, reference=True, gate_reference=reference))
    assert len(out["gate-hist"]) == len(SCORE_EDGES) - 1 and out["gate-noise"] == pytest.approx(10.0 / math.sqrt(2))
    assert not all(float(v).is_integer() for v in out["gate-hist"])  # noise on every count
    kinds = sorted(c.kind for c in _ledger(site).contributions())
    assert kinds == sorted(["evaluate", "reference", KIND_CUTOFF])


def test_no_histogram_before_the_last_round_or_for_a_reference_of_another_model(hospital, tmp_path):
    site = _site(hospital, tmp_path / "state")
    reference = GateReference([0.25] * 16, 0.5, 40.0).to_json()  # 16 values: another model's descriptor
    early = evaluate_round(RUN, site, _request(1, gate_reference=reference))
    assert "gate-hist" not in early
    last = evaluate_round(RUN, site, _request(3, reference=True, gate_reference=reference))
    assert "gate-hist" not in last and "hist-pos" in last
    malformed = evaluate_round(RUN, site, _request(2, reference=True, gate_reference=json.dumps({"schema": "x"})))
    assert "gate-hist" not in malformed
    assert KIND_CUTOFF not in {c.kind for c in _ledger(site).contributions()}  # nothing released, nothing charged
