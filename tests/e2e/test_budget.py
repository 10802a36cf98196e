"""A site whose privacy budget is spent refuses, from a fresh process, without stalling the run."""

from __future__ import annotations

import json

import pytest

from client.ledger import PrivacyLedger
from simulations.cli import main

pytestmark = pytest.mark.e2e


def test_second_run_refused_at_max_epsilon(tmp_path):
    common = ["--sites", "2", "--image-size", "32", "--patients", "8", "--local-epochs", "1",
              "--partition", "iid", "--state-dir", str(tmp_path / "state"), "--max-epsilon", "5", "--out", str(tmp_path)]
    assert main(["run", "--name", "first", "--rounds", "1", "--target-epsilon", "4", *common]) == 0
    first = json.loads((tmp_path / "first" / "run" / "metrics.json").read_text())["rounds"]
    spent = first[-1]["epsilon"]
    assert len(spent) == 2 and all(3.0 < e <= 4.0 + 1e-6 for e in spent.values())

    # Same sites, same data, a new run that would spend another ~4: every site must refuse round 1.
    assert main(["run", "--name", "second", "--rounds", "1", "--target-epsilon", "4",
                 "--data", str(tmp_path / "first" / "hospitals"), *common]) == 0
    second = json.loads((tmp_path / "second" / "run" / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in second] == [1]
    failures = second[0]["failures"]
    assert len(failures) == 2 and all("max-epsilon" in f or "budget" in f for f in failures), failures
    assert second[0]["epsilon"] == {}
    for site, eps in spent.items():
        ledger = PrivacyLedger(tmp_path / "state" / site, site=site, max_epsilon=5.0, delta=1e-5)
        trained = [c for c in ledger.contributions() if c.kind == "train"]
        assert len(trained) == 1  # the refused round spent nothing
        assert trained[0].epsilon_after == pytest.approx(eps)
        assert len(ledger.refusals()) == 1
