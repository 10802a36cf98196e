"""The site's limits on a run, held whatever the run config and the run id in a message say.

client/round.py asks here, in this order, before anything is read or charged:

1. :func:`admission_problems` (after the node config's ranges, ``SiteConfig.refusals``): the site's
   approved policy (client/run_policy.py), the run's pinned settings and its launched run
   (client/run_pin.py), and the round number: a round past the run's ``num-server-rounds`` or the
   site's ``max-rounds`` is refused (the run planned its noise for that many rounds, so one more
   would spend past the plan);
2. for a training round, once the site has planned it (:func:`run_epsilon_problem`):
   ``max-run-epsilon`` holds for the run's *plan* whether it came from a target epsilon or from a
   fixed ``noise-multiplier``, and for what the run has actually been charged so far plus this round;
3. for an evaluation (:func:`evaluation_problem`): at most ``max-evaluations`` per run and
   ``max-evaluations-per-day`` over all runs in any 24 hours, counted from the ledger. A run's
   identity is what the site pinned (a launched run keeps one), so a new run id per message
   starts no new count, and launching new runs does not pass the daily count.

Every text returned here depends on the run config, the round and the site's own settings and
ledger, never on the site's images or labels: it may be sent to the coordinator as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from client.eval_noise import EVALUATION_KINDS
from client.ledger import Contribution, PrivacyLedger
from client.run_pin import RunPinError, RunPins
from client.run_policy import PolicyError, load_policy, policy_refusals
from common.config import RunConfig
from common.privacy import DpPlan, epsilon_for
from common.site_config import SiteConfig

#: Relative slack when comparing an epsilon with a limit (the accountant's float rounding).
_SLACK = 1e-9
_DAY = timedelta(hours=24)


def admission_problems(run: RunConfig, site: SiteConfig, *, run_key: str, server_round: int,
                       flower_run_id: int | None) -> list[str]:
    """Everything that refuses this message before any data is read; pins the run at its first message."""
    problems: list[str] = []
    try:
        policy = load_policy(site.state_dir)
    except PolicyError as err:
        return [str(err)]
    if policy is not None:
        problems += policy_refusals(policy["rules"], run)
    if not 1 <= server_round <= run.num_server_rounds:
        problems.append(f"round {server_round} is outside the run's `num-server-rounds` = {run.num_server_rounds} "
                        "(its noise was planned for that many rounds)")
    if server_round > site.max_rounds:
        problems.append(f"round {server_round}: this site answers at most {site.max_rounds} rounds of a run "
                        "(node config max-rounds)")
    if problems:
        return problems
    try:
        RunPins(site.state_dir).pin(run_key, run, flower_run_id)
    except RunPinError as err:
        return [str(err)]
    return []


def _of_run(entries: Iterable[Contribution], run_key: str, kind: str) -> list[Contribution]:
    prefix = f"{run_key}@"
    return [c for c in entries if c.kind == kind and c.run_id.startswith(prefix)]


def run_limit(site: SiteConfig) -> float:
    """The most one run may spend at this site: max-run-epsilon, or max-epsilon when that is 0."""
    return site.max_run_epsilon or site.max_epsilon


def run_epsilon_problem(plan: DpPlan, site: SiteConfig, ledger: PrivacyLedger, run_key: str) -> str | None:
    """Why a planned training round passes ``max-run-epsilon`` (plan or actual spend), or None."""
    limit = run_limit(site)
    if plan.epsilon_planned > limit * (1 + _SLACK):
        return (f"the run's plan spends epsilon {plan.epsilon_planned:.3g} over its {plan.rounds} round(s) (noise "
                f"multiplier {plan.noise_multiplier:.3g}); this site allows at most {limit:g} per run (node config "
                "max-run-epsilon)")
    history: list[Contribution | PlannedStep] = [*_of_run(ledger.contributions(), run_key, "train"), plan_step(plan)]
    spent = epsilon_for(history, ledger.delta, ledger.accountant)
    if spent > limit * (1 + _SLACK):
        return (f"this round would take the run to epsilon {spent:.3g}; this site allows at most {limit:g} per run "
                "(node config max-run-epsilon)")
    return None


@dataclass(frozen=True)
class PlannedStep:
    """One round of a plan, in the shape common.privacy.epsilon_for composes with the ledger's entries."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def plan_step(plan: DpPlan) -> PlannedStep:
    return PlannedStep(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)


def evaluation_problem(site: SiteConfig, ledger: PrivacyLedger, run_key: str, *, now: datetime | None = None) -> str | None:
    """Why one more evaluation would pass max-evaluations (this run) or max-evaluations-per-day (the site), or None."""
    entries = [c for c in ledger.contributions() if c.kind in EVALUATION_KINDS]
    done = sum(len(_of_run(entries, run_key, kind)) for kind in EVALUATION_KINDS)
    if done >= site.max_evaluations:
        return f"this site has answered {done} evaluations of this run, its limit (node config max-evaluations)"
    since = (now or datetime.now(UTC)) - _DAY
    recent = sum(1 for c in entries if _when(c.recorded_at) >= since)
    if recent >= site.max_evaluations_per_day:
        return (f"this site has answered {recent} evaluations in the last 24 hours, its limit over all runs "
                "(node config max-evaluations-per-day)")
    return None


def _when(stamp: str) -> datetime:
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return datetime.now(UTC)  # an unreadable time counts as recent: the limit errs on the safe side
    return when if when.tzinfo else when.replace(tzinfo=UTC)
