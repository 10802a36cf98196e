"""common/accountant_cache.py: the DP plan's noise and RDP curves reused across processes, never weakening DP."""

from __future__ import annotations

import json
from dataclasses import dataclass

from opacus.accountants import RDPAccountant

from common.accountant_cache import FILENAME, AccountantCache
from common.privacy import EPSILON_REL_TOLERANCE, accountant_cache, epsilon_for, plan_dp

DELTA = 1e-5
TARGET = 3.0
# n_train=1000, batch 50, 1 local epoch, 5 rounds: sample rate 0.05, 100 steps in all.
PLAN = dict(n_train=1000, batch_size=50, local_epochs=1, rounds=5, delta=DELTA, max_grad_norm=1.0)
SEARCH = (TARGET, DELTA, 0.05, 100, "rdp", EPSILON_REL_TOLERANCE)


@dataclass(frozen=True)
class Step:
    noise_multiplier: float
    sample_rate: float
    steps: int


def _planted(state_dir, sigma: float) -> None:
    """Another process's cache entry for exactly this search (as a damaged or doctored file could hold)."""
    cache = accountant_cache(state_dir)
    cache.put_noise(*SEARCH, sigma)
    cache.save()


class TestPlanCache:
    def test_cached_plan_equals_a_fresh_one(self, tmp_path):
        fresh = plan_dp(**PLAN, target_epsilon=TARGET)
        first = plan_dp(**PLAN, target_epsilon=TARGET, cache=accountant_cache(tmp_path))
        again = plan_dp(**PLAN, target_epsilon=TARGET, cache=accountant_cache(tmp_path))  # a new process's view
        assert first == fresh and again == fresh
        doc = json.loads((tmp_path / FILENAME).read_text())
        assert list(doc["noise"].values()) == [fresh.noise_multiplier]

    def test_a_cached_noise_is_what_the_site_uses(self, tmp_path):
        fresh = plan_dp(**PLAN, target_epsilon=TARGET)
        _planted(tmp_path, fresh.noise_multiplier * 1.5)  # more noise than needed: safe, so it is taken
        plan = plan_dp(**PLAN, target_epsilon=TARGET, cache=accountant_cache(tmp_path))
        assert plan.noise_multiplier == fresh.noise_multiplier * 1.5
        assert plan.epsilon_planned < fresh.epsilon_planned

    def test_a_cached_noise_that_overspends_is_never_used(self, tmp_path):
        fresh = plan_dp(**PLAN, target_epsilon=TARGET)
        _planted(tmp_path, fresh.noise_multiplier * 0.5)  # would spend more than the target
        plan = plan_dp(**PLAN, target_epsilon=TARGET, cache=accountant_cache(tmp_path))
        assert plan == fresh and plan.epsilon_planned <= TARGET
        assert accountant_cache(tmp_path).noise(*SEARCH) == fresh.noise_multiplier  # the entry was replaced

    def test_a_forged_curve_does_not_make_a_low_noise_pass(self, tmp_path):
        """Even a signed file (written through the API) whose curve for the low noise says 'free'."""
        fresh = plan_dp(**PLAN, target_epsilon=TARGET)
        cache = accountant_cache(tmp_path)
        cache.put_noise(*SEARCH, fresh.noise_multiplier * 0.1)
        cache.put_rdp(fresh.noise_multiplier * 0.1, 0.05, tuple(0.0 for _ in RDPAccountant.DEFAULT_ALPHAS))
        cache.save()
        plan = plan_dp(**PLAN, target_epsilon=TARGET, cache=accountant_cache(tmp_path))
        assert plan == fresh  # the accountant itself said the low noise overspends
        assert plan.epsilon_planned <= TARGET

    def test_a_hand_edited_file_is_ignored_whole(self, tmp_path):
        _planted(tmp_path, 50.0)
        path = tmp_path / FILENAME
        doc = json.loads(path.read_text())
        doc["noise"] = {key: 0.05 for key in doc["noise"]}
        path.write_text(json.dumps(doc))
        assert accountant_cache(tmp_path).noise(*SEARCH) is None  # no longer signed by the site's key
        assert oct((tmp_path / "accountant_cache.key").stat().st_mode & 0o777) == "0o600"

    def test_a_file_signed_by_another_sites_key_is_ignored(self, tmp_path):
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        _planted(tmp_path / "a", 50.0)
        accountant_cache(tmp_path / "b")  # site b has its own key
        (tmp_path / "b" / FILENAME).write_bytes((tmp_path / "a" / FILENAME).read_bytes())
        assert accountant_cache(tmp_path / "a").noise(*SEARCH) == 50.0
        assert accountant_cache(tmp_path / "b").noise(*SEARCH) is None

    def test_any_other_setting_is_another_search(self, tmp_path):
        _planted(tmp_path, 50.0)
        plan = plan_dp(**{**PLAN, "rounds": 6}, target_epsilon=TARGET, cache=accountant_cache(tmp_path))
        assert plan == plan_dp(**{**PLAN, "rounds": 6}, target_epsilon=TARGET)  # steps are in the key
        plan = plan_dp(**PLAN, target_epsilon=TARGET * 2, cache=accountant_cache(tmp_path))
        assert plan.noise_multiplier != 50.0

    def test_a_file_from_another_opacus_is_ignored(self, tmp_path):
        _planted(tmp_path, 50.0)
        doc = json.loads((tmp_path / FILENAME).read_text())
        (tmp_path / FILENAME).write_text(json.dumps({**doc, "opacus": "0.0.1"}))
        assert accountant_cache(tmp_path).noise(*SEARCH) is None


class TestEpsilonCache:
    def test_ledger_epsilon_with_cache_equals_without(self, tmp_path):
        history = [Step(1.1, 0.05, 100), Step(0.9, 0.1, 30)]
        plain = epsilon_for(history, DELTA)
        assert epsilon_for(history, DELTA, cache=accountant_cache(tmp_path)) == plain
        assert epsilon_for(history, DELTA, cache=accountant_cache(tmp_path)) == plain  # from the file
        assert len(json.loads((tmp_path / FILENAME).read_text())["rdp"]) == 2

    def test_unreadable_file_is_ignored(self, tmp_path):
        (tmp_path / FILENAME).write_text("{not json")
        cache = AccountantCache(tmp_path, [2.0, 3.0])
        assert cache.noise(*SEARCH) is None and cache.rdp(1.0, 0.1) is None
