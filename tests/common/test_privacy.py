"""Tests for common/privacy.py: DP planning and heterogeneous epsilon composition (no training)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common.privacy import EPSILON_REL_TOLERANCE, DpPlan, _search_sigma, epsilon_for, noise_for_target, plan_dp

DELTA = 1e-5


@dataclass(frozen=True)
class Step:
    noise_multiplier: float
    sample_rate: float
    steps: int


def _plan(**overrides: object) -> DpPlan:
    kwargs: dict[str, object] = dict(
        n_train=1000, batch_size=50, local_epochs=1, rounds=5, delta=DELTA, max_grad_norm=1.0
    )
    kwargs.update(overrides)
    return plan_dp(**kwargs)  # type: ignore[arg-type]


TARGETS = (0.5, 2.0, 8.0)


@pytest.fixture(scope="module")
def target_plans() -> dict[float, DpPlan]:
    """One plan per target epsilon, shared: each noise search takes about a second."""
    return {target: _plan(target_epsilon=target) for target in TARGETS}


class TestPlanDpTargetEpsilon:
    @pytest.mark.parametrize("target", TARGETS)
    def test_planned_rounds_spend_the_target_within_one_percent(
        self, target: float, target_plans: dict[float, DpPlan]
    ) -> None:
        plan = target_plans[target]
        assert plan.epsilon_planned <= target * (1 + 1e-9)
        assert plan.epsilon_planned == pytest.approx(target, rel=0.01)
        # The ledger composes round by round; that must land on the same figure.
        rounds = [Step(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)] * plan.rounds
        assert epsilon_for(rounds, DELTA) == pytest.approx(plan.epsilon_planned, rel=1e-9)

    def test_smaller_epsilon_needs_more_noise(self, target_plans: dict[float, DpPlan]) -> None:
        sigmas = [target_plans[eps].noise_multiplier for eps in sorted(TARGETS, reverse=True)]
        assert sigmas[0] < sigmas[1] < sigmas[2]

    def test_more_rounds_need_more_noise_for_the_same_target(self) -> None:
        assert _plan(target_epsilon=2.0, rounds=2).noise_multiplier < _plan(
            target_epsilon=2.0, rounds=20
        ).noise_multiplier

    def test_unreachable_target_says_what_to_change(self) -> None:
        with pytest.raises(ValueError, match="raise target_epsilon"):
            _plan(target_epsilon=1e-9, rounds=50, local_epochs=5)


class TestNoiseSearch:
    """noise_for_target: Opacus' answer (epsilon within 0.1 % under the target) in fewer evaluations."""

    @pytest.mark.parametrize(("accountant", "sample_rate", "steps", "target"), [
        ("rdp", 0.2, 480, 8.0),  # the demo's sites
        ("rdp", 0.2, 40, 3.0),  # the study's
        ("rdp", 0.01, 3000, 1.0),
        ("rdp", 1.0, 24, 6.0),  # full batch
        ("prv", 0.2, 40, 3.0),
    ])
    def test_same_answer_as_opacus_in_fewer_evaluations(self, accountant: str, sample_rate: float, steps: int,
                                                        target: float) -> None:
        evaluations: list[float] = []
        acct = create_accountant(mechanism=accountant)

        def epsilon(sigma: float) -> float:
            evaluations.append(sigma)
            acct.history = [(sigma, sample_rate, steps)]
            return float(acct.get_epsilon(delta=DELTA))

        tolerance = target * EPSILON_REL_TOLERANCE
        sigma = _search_sigma(epsilon, target, tolerance)
        assert target - tolerance <= epsilon(sigma) <= target
        assert len(evaluations) <= 12  # Opacus' bisection from [0, 20] takes 15-20
        reference = get_noise_multiplier(target_epsilon=target, target_delta=DELTA, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant, epsilon_tolerance=tolerance)
        assert sigma == pytest.approx(reference, rel=2e-3)
        assert noise_for_target(target, DELTA, sample_rate, steps, accountant) == pytest.approx(sigma, rel=1e-12)


class TestPlanDpNoiseMultiplier:
    def test_sampling_and_steps_follow_the_dataset(self) -> None:
        plan = _plan(n_train=100, batch_size=30, local_epochs=2, rounds=3, noise_multiplier=1.1)
        assert plan.sample_rate == pytest.approx(0.3)
        assert plan.steps_per_round == 7  # ceil(2 * 100 / 30)
        assert plan.noise_multiplier == 1.1
        assert plan.rounds == 3 and plan.max_grad_norm == 1.0 and plan.delta == DELTA

    def test_epsilon_per_round_and_planned_are_consistent(self) -> None:
        plan = _plan(noise_multiplier=1.0)
        one = Step(1.0, plan.sample_rate, plan.steps_per_round)
        assert plan.epsilon_per_round == pytest.approx(epsilon_for([one], DELTA))
        assert plan.epsilon_per_round < plan.epsilon_planned < plan.rounds * plan.epsilon_per_round

    def test_more_noise_spends_less(self) -> None:
        assert _plan(noise_multiplier=2.0).epsilon_planned < _plan(noise_multiplier=0.8).epsilon_planned

    def test_batch_equal_to_dataset_is_full_batch(self) -> None:
        plan = _plan(n_train=64, batch_size=64, noise_multiplier=1.0)
        assert plan.sample_rate == 1.0 and plan.steps_per_round == 1


class TestPlanDpValidation:
    def test_batch_larger_than_dataset(self) -> None:
        with pytest.raises(ValueError, match=r"batch_size \(64\) is larger than the training split \(10"):
            _plan(n_train=10, batch_size=64, noise_multiplier=1.0)

    @pytest.mark.parametrize(
        "extra", [{}, {"noise_multiplier": 1.0, "target_epsilon": 1.0}], ids=["neither", "both"]
    )
    def test_exactly_one_of_noise_or_target(self, extra: dict[str, float]) -> None:
        with pytest.raises(ValueError, match="exactly one of noise_multiplier"):
            _plan(**extra)

    def test_all_problems_are_listed_at_once(self) -> None:
        with pytest.raises(ValueError) as info:
            _plan(rounds=0, delta=1.5, max_grad_norm=-1.0, noise_multiplier=0.0, accountant="gdp")
        message = str(info.value)
        for word in ("rounds", "delta", "max_grad_norm", "noise_multiplier", "accountant"):
            assert word in message

    def test_weak_delta_is_logged(self, caplog: pytest.LogCaptureFixture) -> None:
        with caplog.at_level(logging.WARNING, logger="common.privacy"):
            _plan(n_train=1000, delta=1e-3, noise_multiplier=1.0)
        assert any("1/n_train" in r.getMessage() for r in caplog.records)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="common.privacy"):
            _plan(n_train=1000, delta=1e-5, noise_multiplier=1.0)
        assert not caplog.records


class TestEpsilonFor:
    def test_empty_history_spent_nothing(self) -> None:
        assert epsilon_for([], DELTA) == 0.0

    def test_grows_monotonically(self) -> None:
        history: list[Step] = []
        previous = 0.0
        for sigma in (1.0, 2.0, 0.9, 1.5):
            history.append(Step(sigma, 0.05, 20))
            current = epsilon_for(history, DELTA)
            assert current > previous
            previous = current

    def test_heterogeneous_composition_matches_stepping_an_accountant(self) -> None:
        history = [Step(1.0, 0.1, 5), Step(2.0, 0.02, 30), Step(1.0, 0.1, 2)]
        accountant = RDPAccountant()
        for item in history:
            for _ in range(item.steps):
                accountant.step(noise_multiplier=item.noise_multiplier, sample_rate=item.sample_rate)
        assert epsilon_for(history, DELTA) == pytest.approx(accountant.get_epsilon(delta=DELTA), rel=1e-9)
        # Composition costs more than any part and less than adding the parts' epsilons.
        parts = [epsilon_for([item], DELTA) for item in history]
        assert max(parts) < epsilon_for(history, DELTA) < sum(parts)

    def test_order_and_splitting_do_not_matter(self) -> None:
        a, b = Step(1.2, 0.05, 10), Step(0.9, 0.2, 4)
        assert epsilon_for([a, b], DELTA) == pytest.approx(epsilon_for([b, a], DELTA), rel=1e-12)
        assert epsilon_for([Step(1.2, 0.05, 3), Step(1.2, 0.05, 7)], DELTA) == pytest.approx(
            epsilon_for([a], DELTA), rel=1e-12
        )

    def test_smaller_delta_reports_larger_epsilon(self) -> None:
        history = [Step(1.0, 0.05, 100)]
        assert epsilon_for(history, 1e-7) > epsilon_for(history, 1e-3)

    def test_prv_is_tighter_than_rdp(self) -> None:
        history = [Step(1.0, 0.05, 100)]
        prv, rdp = epsilon_for(history, DELTA, "prv"), epsilon_for(history, DELTA, "rdp")
        assert 0 < prv < rdp

    def test_rejects_bad_inputs(self) -> None:
        with pytest.raises(ValueError, match="unknown privacy accountant"):
            epsilon_for([], DELTA, "moments")
        with pytest.raises(ValueError, match="delta"):
            epsilon_for([], 0.0)
        with pytest.raises(ValueError, match="invalid DP contribution"):
            epsilon_for([Step(0.0, 0.1, 1)], DELTA)
