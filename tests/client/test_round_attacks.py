"""A hostile coordinator against the site's round core (client/round.py), each attack as it was found.

Every test here failed on the code before the fix: free re-releases (a pruned reply, a shortened
weights hash), limits stepped around (noise-multiplier, rounds past the run, a new run id per
message), settings changed within a run, exact counts and data-dependent refusal texts, and an
edited accountant cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import client.round as round_module
from client.ledger import PrivacyLedger
from client.round import ERR_BUDGET, ERR_CONFIG, RoundRefused, RoundRequest, evaluate_round, train_round
from common.config import RunConfig
from common.models import build_model
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
    base = {"image-size": 32, "num-server-rounds": 6, "target-epsilon": 4.0, "local-epochs": 1}
    return RunConfig.from_mapping({**base, **kw})


def _site(hospital: Path, state: Path, **kw) -> SiteConfig:
    return SiteConfig.from_mapping({"data-dir": str(hospital), "state-dir": str(state), "site-name": "hospital-a",
                                    "max-epsilon": 100.0, **kw})


def _weights(run: RunConfig, shift: float = 0.0) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    weights = build_model(run.model, dp=True, **run.model_kwargs()).state_dict()
    weights["head.classifier.bias"] = weights["head.classifier.bias"] + shift
    return weights


def _request(run: RunConfig, server_round: int = 1, *, shift: float = 0.0, name: str = "run-x",
             flower_run: int | None = 7) -> RoundRequest:
    extra = {"flower_run_id": flower_run} if "flower_run_id" in RoundRequest.__dataclass_fields__ else {}
    return RoundRequest(server_round=server_round, weights=_weights(run, shift), run_name=name, **extra)


def _ledger(site: SiteConfig) -> PrivacyLedger:
    return PrivacyLedger(site.state_dir, site=site.site_name, max_epsilon=site.max_epsilon, delta=site.delta)


def _trained(site: SiteConfig) -> int:
    return sum(1 for c in _ledger(site).contributions() if c.kind == "train")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- item 1: free re-releases


def test_an_old_round_sent_again_after_its_reply_was_pruned_is_charged_again(hospital, tmp_path):
    run, site = _run(), _site(hospital, tmp_path / "state")
    first = train_round(run, site, _request(run, 1, shift=0.0))
    for r in (2, 3, 4):
        train_round(run, site, _request(run, r, shift=float(r)))
    assert _trained(site) == 4
    again = train_round(run, site, _request(run, 1, shift=0.0))  # its stored reply was pruned at round 3
    # Either the very reply released before (nothing new) or a new release, charged in the ledger.
    assert _same(again.weights, first.weights) or _trained(site) == 5
    assert not _same(again.weights, first.weights)  # pruned: it cannot be re-sent ...
    assert _trained(site) == 5  # ... so it was charged as the new release it is
    assert train_round(run, site, _request(run, 1, shift=0.0)).weights.keys() == first.weights.keys()
    assert _trained(site) == 5  # that release is stored now: its retry is free again


def test_weights_sharing_a_shortened_hash_do_not_share_a_reply_or_a_charge(hospital, tmp_path, monkeypatch):
    """Two weight sets whose digests agree on the first 48 bits (a collision found by search, simulated here)."""
    real = round_module.weights_digest
    monkeypatch.setattr(round_module, "weights_digest", lambda w: "c0ffee" * 2 + real(w)[12:])
    run, site = _run(), _site(hospital, tmp_path / "state")
    a = train_round(run, site, _request(run, 1, shift=0.0))
    b = train_round(run, site, _request(run, 1, shift=0.5))
    assert not _same(a.weights, b.weights)
    assert _trained(site) == 2  # two different global models: two releases, two charges


def test_a_retry_returns_the_stored_reply_byte_for_byte(hospital, tmp_path):
    run, site = _run(), _site(hospital, tmp_path / "state")
    first = train_round(run, site, _request(run, 1))
    again = train_round(run, site, _request(run, 1))
    assert _same(first.weights, again.weights) and first.metrics == again.metrics
    assert _trained(site) == 1


# ----------------------------------------------------------------------------- item 6: limits stepped around


def test_a_fixed_noise_multiplier_does_not_skip_max_run_epsilon(hospital, tmp_path):
    run = _run(**{"noise-multiplier": 0.3, "num-server-rounds": 1})
    site = _site(hospital, tmp_path / "state", **{"max-run-epsilon": 2.0})
    with pytest.raises(RoundRefused, match="max-run-epsilon") as info:
        train_round(run, site, _request(run, 1))
    assert info.value.code == ERR_CONFIG
    assert _trained(site) == 0


def test_rounds_past_the_runs_num_server_rounds_are_refused(hospital, tmp_path):
    run, site = _run(**{"num-server-rounds": 2}), _site(hospital, tmp_path / "state")
    train_round(run, site, _request(run, 1))
    train_round(run, site, _request(run, 2, shift=1.0))
    with pytest.raises(RoundRefused, match="num-server-rounds") as info:
        train_round(run, site, _request(run, 3, shift=2.0))
    assert info.value.code == ERR_CONFIG and _trained(site) == 2
    with pytest.raises(RoundRefused, match="num-server-rounds"):
        evaluate_round(run, site, _request(run, 3, shift=2.0))


def test_a_new_run_id_per_message_does_not_reset_max_evaluations(hospital, tmp_path):
    run, site = _run(), _site(hospital, tmp_path / "state", **{"max-evaluations": 1})
    evaluate_round(run, site, _request(run, 1, name="run-x-0001"))
    with pytest.raises(RoundRefused):  # the same Flower run, claiming another run id
        evaluate_round(run, site, _request(run, 2, name="run-x-0002"))
    evaluations = [c for c in _ledger(site).contributions() if c.kind == "evaluate"]
    assert len(evaluations) == 1


def test_evaluations_per_day_hold_across_runs(hospital, tmp_path):
    run = _run()
    site = _site(hospital, tmp_path / "state", **{"max-evaluations": 5, "max-evaluations-per-day": 2})
    for i in (1, 2):
        evaluate_round(run, site, _request(run, 1, name=f"run-{i}", flower_run=i))
    with pytest.raises(RoundRefused, match="max-evaluations-per-day") as info:
        evaluate_round(run, site, _request(run, 1, name="run-3", flower_run=3))
    assert info.value.code == ERR_BUDGET


# ----------------------------------------------------------------------------- item 7: settings fixed per run


def test_a_run_cannot_change_its_privacy_settings_between_rounds(hospital, tmp_path):
    site = _site(hospital, tmp_path / "state")
    low = _run(**{"target-epsilon": 2.0})
    train_round(low, site, _request(low, 1))
    high = _run(**{"target-epsilon": 8.0, "sample-rate": 0.5})
    with pytest.raises(RoundRefused, match="target-epsilon") as info:
        train_round(high, site, _request(high, 2, shift=1.0))
    assert info.value.code == ERR_CONFIG and "sample-rate" in info.value.reason
    assert _trained(site) == 1
    spent = _ledger(site).spent_epsilon()
    assert spent <= 2.0 + 1e-6


def test_the_sites_policy_refuses_settings_it_did_not_approve(hospital, tmp_path):
    from client.run_policy import save_policy

    site = _site(hospital, tmp_path / "state")
    save_policy(site.state_dir, {"target-epsilon": {"max": 3.0}, "task": "binary", "label-column": {"one-of": [""]}})
    run = _run(**{"target-epsilon": 4.0, "label-column": "age"})
    with pytest.raises(RoundRefused) as info:
        train_round(run, site, _request(run, 1))
    assert info.value.code == ERR_CONFIG
    assert "`target-epsilon` = 4" in info.value.reason and "`label-column`" in info.value.reason
    assert _trained(site) == 0
    ok = _run(**{"target-epsilon": 3.0})
    train_round(ok, site, _request(ok, 1, name="run-y", flower_run=8))
    assert _trained(site) == 1


# ----------------------------------------------------------------------------- item 5: exact counts, refusal texts


def test_nothing_sent_counts_the_images_a_coordinator_filter_selects(hospital, tmp_path):
    """Two filters that select different numbers of images: the replies must not tell them apart by a count."""
    site = _site(hospital, tmp_path / "state", **{"declared-images": 500})
    binary, multi = _run(), _run(task="multiclass", labels="normal,opacity")
    train_a = train_round(binary, site, _request(binary, 1, name="a", flower_run=1)).metrics
    exact = round_module.load_data(binary, site).n_train
    assert train_a["num-examples"] == 500 and exact != 500  # the site's declared size, not the count
    for key in ("sample-rate", "steps", "noise-multiplier", "epsilon-round", "local-epochs"):
        assert key in train_a
    assert "train-seconds" not in train_a
    sample_rates = {train_a["sample-rate"]}
    for rate in (0.5,):
        run = _run(**{"sample-rate": rate})
        sample_rates.add(train_round(run, site, _request(run, 1, name=f"r{rate}", flower_run=2)).metrics["sample-rate"])
    assert sample_rates == {1.0, 0.5}  # exactly the run's rate: no n_train in it
    evaluated = evaluate_round(multi, site, _request(multi, 1, name="b", flower_run=3))
    assert "n-train" not in evaluated


def test_refusals_caused_by_the_data_read_the_same_whatever_the_data(hospital, tmp_path):
    site = _site(hospital, tmp_path / "state")
    absent = _run(labels="no-such-finding")
    with pytest.raises(RoundRefused) as no_label:
        train_round(absent, site, _request(absent, 1, name="a", flower_run=1))
    tiny = _site(hospital, tmp_path / "state2", **{"declared-images": 100000})
    few = _run(**{"sample-rate": 0.0, "batch-size": 1})  # fewer than one image expected per batch at this site
    with pytest.raises(RoundRefused) as too_few:
        train_round(few, tiny, _request(few, 1, name="b", flower_run=2))
    assert (no_label.value.code, no_label.value.reason) == (too_few.value.code, too_few.value.reason)
    assert not any(ch.isdigit() for ch in no_label.value.reason.replace("hospital-a", ""))


# ----------------------------------------------------------------------------- item 9: the accountant cache


def test_an_edited_accountant_cache_never_lowers_the_noise(hospital, tmp_path):
    run, site = _run(), _site(hospital, tmp_path / "state")
    honest = train_round(run, site, _request(run, 1, name="a", flower_run=1)).metrics["noise-multiplier"]
    path = site.state_dir / "accountant_cache.json"
    doc = json.loads(path.read_text())
    for key in doc["noise"]:
        doc["noise"][key] = 0.05
    doc["rdp"] = {k: [0.0] * len(v) for k, v in doc["rdp"].items()}
    doc["rdp"][json.dumps([0.05, 1.0], separators=(",", ":"))] = [1e-9] * len(next(iter(doc["rdp"].values())))
    path.write_text(json.dumps(doc))
    again = train_round(run, site, _request(run, 1, name="b", flower_run=2)).metrics
    assert again["noise-multiplier"] == pytest.approx(honest)
    entries = _ledger(site).contributions()
    assert all(c.noise_multiplier == pytest.approx(honest) for c in entries)
    assert _ledger(site).spent_epsilon() > 1.0  # the ledger does not read zeroed RDP curves either
