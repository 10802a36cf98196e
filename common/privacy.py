"""Planning and accounting of what a site's DP-SGD training spends, in (epsilon, delta).

A site works out its own DP plan from its own dataset size before it trains: Poisson sampling at
``sample_rate = batch_size / n_train`` and ``steps_per_round = ceil(local_epochs * n_train /
batch_size)`` noisy steps per round. Epsilon here is always *record-level* (one training image)
and is composed with the Rényi-DP accountant of Opacus by default; ``"prv"`` (Opacus' PRV
accountant, tighter, slower) is available as an option.

Framework-free on purpose: no flwr import. The ClientApp calls :func:`plan_dp` and the ledger
(:mod:`client.ledger`) calls :func:`epsilon_for`.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis

from common.accountant_cache import AccountantCache

logger = logging.getLogger(__name__)

#: Accountants this module knows how to compose heterogeneous contributions with.
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")

#: Relative precision of the noise search: the planned epsilon lands in
#: [target * (1 - EPSILON_REL_TOLERANCE), target], never above the target.
EPSILON_REL_TOLERANCE = 1e-3

#: RDP orders searched when converting to (epsilon, delta): the same as Opacus' accountant.
_RDP_ORDERS: list[float] = list(RDPAccountant.DEFAULT_ALPHAS)


class DpStep(Protocol):
    """Anything that describes a run of identical DP-SGD steps (a ledger contribution does)."""

    @property
    def noise_multiplier(self) -> float: ...

    @property
    def sample_rate(self) -> float: ...

    @property
    def steps(self) -> int: ...


@dataclass(frozen=True)
class DpPlan:
    """What one run will spend on one site's training split.

    ``epsilon_per_round`` is the cost of one round alone; ``epsilon_planned`` is the cost of all
    ``rounds`` rounds of this run composed, both at ``delta``, on a dataset with no prior spend.
    What the dataset already spent in earlier runs is the ledger's business, not the plan's.
    """

    noise_multiplier: float  # sigma: Gaussian noise std / max_grad_norm
    sample_rate: float  # Poisson sampling probability of each training image per step
    steps_per_round: int  # noisy optimizer steps per federated round
    rounds: int  # federated rounds this run plans to train
    delta: float  # delta the epsilons below are stated at
    max_grad_norm: float  # per-sample gradient clipping bound (L2)
    epsilon_per_round: float  # epsilon of one round alone
    epsilon_planned: float  # epsilon of all planned rounds composed


def _is_positive(value: object) -> bool:
    """A finite real number > 0 (numpy scalars included, booleans not)."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _is_count(value: object) -> bool:
    """An integer >= 1 (numpy integers included, booleans not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"unknown privacy accountant {accountant!r}: expected one of {list(ACCOUNTANTS)}"
        )


@functools.lru_cache(maxsize=256)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """RDP curve of one subsampled-Gaussian step at Opacus' default orders.

    A pure function, memoised because evaluating it is the slow part (up to ~0.3 s on this
    CPU) and a ledger asks for the same few (sigma, q) pairs again and again.
    """
    return tuple(
        float(x)
        for x in rdp_analysis.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=_RDP_ORDERS
        )
    )


def _rdp_curve(noise_multiplier: float, sample_rate: float, cache: AccountantCache | None) -> tuple[float, ...]:
    """:func:`_rdp_of_one_step`, through the site's accountant cache when one is given."""
    if cache is None:
        return _rdp_of_one_step(noise_multiplier, sample_rate)
    curve = cache.rdp(noise_multiplier, sample_rate)
    if curve is None:
        curve = _rdp_of_one_step(noise_multiplier, sample_rate)
        cache.put_rdp(noise_multiplier, sample_rate, curve)
    return curve


def accountant_cache(state_dir: str | Path) -> AccountantCache:
    """The accountant cache of a site's state dir, for :func:`plan_dp` and :func:`epsilon_for`."""
    return AccountantCache(state_dir, _RDP_ORDERS)


def _epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str,
             cache: AccountantCache | None = None) -> float:
    """Epsilon of a composed history of (noise_multiplier, sample_rate, steps) entries.

    Each entry is self-composed ``steps`` times and the entries are composed with each other:
    heterogeneous composition. For RDP this is the sum of the entries' RDP curves, exactly as
    Opacus' ``RDPAccountant`` computes it; PRV goes through Opacus' ``PRVAccountant``.
    """
    if not history:
        return 0.0
    if accountant == "rdp":
        total = np.zeros(len(_RDP_ORDERS))
        for sigma, q, steps in history:
            total += steps * np.asarray(_rdp_curve(float(sigma), float(q), cache))
        eps, _ = rdp_analysis.get_privacy_spent(orders=_RDP_ORDERS, rdp=total, delta=delta)
        return float(eps)
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)  # the accountant's state is a plain list of such entries
    return float(acc.get_epsilon(delta=delta))


def epsilon_for(history: Iterable[DpStep], delta: float, accountant: str = "rdp",
                cache: AccountantCache | None = None) -> float:
    """Cumulative epsilon at ``delta`` of a list of contributions, composed in any order.

    Each contribution may have its own noise multiplier, sample rate and step count. Entries with
    the same (noise multiplier, sample rate) are merged first (adding their steps), which leaves
    the result unchanged for both accountants and keeps long ledgers cheap to evaluate.
    An empty history has spent nothing (0.0). ``cache``: the site's accountant cache (RDP curves).
    """
    _check_accountant(accountant)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
    merged: dict[tuple[float, float], int] = {}
    for item in history:
        if (
            not _is_positive(item.noise_multiplier)
            or not (_is_positive(item.sample_rate) and item.sample_rate <= 1.0)
            or not (isinstance(item.steps, numbers.Integral) and item.steps >= 0)
        ):
            raise ValueError(
                "invalid DP contribution: need noise_multiplier > 0, 0 < sample_rate <= 1 and "
                f"steps >= 0, got ({item.noise_multiplier!r}, {item.sample_rate!r}, "
                f"{item.steps!r})"
            )
        key = (float(item.noise_multiplier), float(item.sample_rate))
        merged[key] = merged.get(key, 0) + int(item.steps)
    entries = [(sigma, q, steps) for (sigma, q), steps in sorted(merged.items()) if steps > 0]
    eps = _epsilon(entries, delta, accountant, cache)
    if cache is not None:
        cache.save()
    return eps


def _plan_problems(*, n_train: int, batch_size: int, local_epochs: int, rounds: int, delta: float, max_grad_norm: float,
                   noise_multiplier: float | None, target_epsilon: float | None, accountant: str,
                   sample_rate: float | None = None) -> list[str]:
    """Every problem with the plan's inputs, so the caller fixes them all at once."""
    problems: list[str] = []
    for name, value in (
        ("n_train", n_train),
        ("batch_size", batch_size),
        ("local_epochs", local_epochs),
        ("rounds", rounds),
    ):
        if not _is_count(value):
            problems.append(f"{name} must be an integer >= 1, got {value!r}")
    if sample_rate is not None and not (_is_positive(sample_rate) and sample_rate <= 1.0):
        problems.append(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
    if sample_rate is None and _is_count(n_train) and _is_count(batch_size) and n_train < batch_size:
        problems.append(
            f"batch_size ({batch_size}) is larger than the training split ({n_train} images): "
            "lower batch-size to at most the number of training images"
        )
    if not (_is_positive(delta) and delta < 1.0):
        problems.append(f"delta must lie in (0, 1), got {delta!r}")
    if not _is_positive(max_grad_norm):
        problems.append(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
    if (noise_multiplier is None) == (target_epsilon is None):
        problems.append(
            "give exactly one of noise_multiplier (then epsilon follows) or target_epsilon "
            f"(then the noise follows), got noise_multiplier={noise_multiplier!r}, "
            f"target_epsilon={target_epsilon!r}"
        )
    if noise_multiplier is not None and not _is_positive(noise_multiplier):
        problems.append(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    if target_epsilon is not None and not _is_positive(target_epsilon):
        problems.append(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if accountant not in ACCOUNTANTS:
        problems.append(f"accountant must be one of {list(ACCOUNTANTS)}, got {accountant!r}")
    return problems


#: Largest noise multiplier the search tries (as Opacus' own search) before calling the budget too low.
MAX_SIGMA = 1e6


@functools.lru_cache(maxsize=64)
def noise_for_target(
    target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str = "rdp"
) -> float:
    """Smallest noise multiplier (within the search tolerance) spending at most the target.

    Same answer as Opacus' ``get_noise_multiplier`` (an epsilon in [target * (1 - 1e-3), target],
    never above), found in about half the accountant evaluations: epsilon falls roughly as a
    power of sigma, so a secant step in log-log space lands near the answer where Opacus bisects
    from [0, 20]. Each evaluation takes 20-60 ms on 2 cores, and a site's first round, the
    coordinator and each of 1,000 simulated sites search once. Memoised per process.
    """
    tolerance = target_epsilon * EPSILON_REL_TOLERANCE
    acct = create_accountant(mechanism=accountant)

    def epsilon(sigma: float) -> float:
        acct.history = [(sigma, sample_rate, total_steps)]
        return float(acct.get_epsilon(delta=delta))

    try:
        with warnings.catch_warnings():
            # The search may try tiny noise levels whose epsilon is huge; Opacus then warns that
            # the best RDP order is the largest one. Only the final plan's epsilon matters.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            sigma = _search_sigma(epsilon, target_epsilon, tolerance)
    except ValueError as err:
        raise ValueError(
            f"no noise multiplier reaches epsilon={target_epsilon:g} at delta={delta:g} "
            f"over {total_steps} steps at sample rate {sample_rate:.4g} ({err}): raise "
            "target_epsilon, or lower rounds, local-epochs or batch-size"
        ) from err
    return sigma


def _search_sigma(epsilon: Callable[[float], float], target: float, tolerance: float) -> float:
    """The sigma with ``target - tolerance <= epsilon(sigma) <= target`` (epsilon decreasing in sigma).

    First a bracket [low, high] with epsilon(low) > target >= epsilon(high), growing sigma as if
    epsilon were proportional to 1 / sigma, shrinking it by 4; then secant steps on
    (log sigma, log epsilon) aimed a little under the target (so they tend to land on the safe
    side), bisecting in log sigma whenever a step would not shrink the bracket enough."""
    sigma = 1.0
    e = epsilon(sigma)
    low, e_low, high, e_high = 0.0, math.inf, math.inf, 0.0
    while not (low > 0 and high < math.inf):
        if e > target:
            low, e_low = sigma, e
            sigma *= min(max(1.2 * e / target, 2.0), 1e3)
            if sigma > MAX_SIGMA:
                raise ValueError("the privacy budget is too low")
        else:
            high, e_high = sigma, e
            if target - e <= tolerance:
                return sigma
            sigma /= 4.0  # not faster: tiny noise makes the PRV accountant's grid (and memory) explode
        e = epsilon(sigma)
    aim = math.log(target - tolerance / 2)
    for _ in range(100):
        if target - e_high <= tolerance:
            return high
        lo, hi = math.log(low), math.log(high)
        guess = (lo + hi) / 2
        if math.isfinite(e_low) and e_low > 0 and e_high > 0:
            slope = (math.log(e_high) - math.log(e_low)) / (hi - lo)
            if slope < 0:
                guess = lo + (aim - math.log(e_low)) / slope
        margin = (hi - lo) / 20
        sigma = math.exp(min(max(guess, lo + margin), hi - margin))
        e = epsilon(sigma)
        if e <= target:
            high, e_high = sigma, e
        else:
            low, e_low = sigma, e
    raise ValueError("the noise search did not converge")


def plan_dp(
    *,
    n_train: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    delta: float,
    max_grad_norm: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    accountant: str = "rdp",
    cache: AccountantCache | None = None,
    sample_rate: float | None = None,
) -> DpPlan:
    """Plan one run's DP-SGD on a site's training split of ``n_train`` images.

    Give ``noise_multiplier`` to get the epsilon it costs, or ``target_epsilon`` to get the
    smallest noise (within 0.1 %) whose ``rounds`` rounds spend at most ``target_epsilon``.
    ``cache``: the site's accountant cache (common.accountant_cache): the noise found for these exact
    inputs and the RDP curves, reused across processes; a cached noise is used only if it still
    spends at most ``target_epsilon`` by the accountant itself (never by a cached curve).
    ``sample_rate``: plan at exactly this rate, ``ceil(local_epochs / sample_rate)`` steps a round, whatever
    ``n_train`` (client/sampling.py); else the rate is ``batch_size / n_train``. Raises ``ValueError`` listing
    every bad input. Logs a warning when ``delta >= 1 / n_train``: such a delta allows a mechanism that leaks
    one whole record outright.
    """
    problems = _plan_problems(n_train=n_train, batch_size=batch_size, local_epochs=local_epochs, rounds=rounds, delta=delta,
                              max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                              target_epsilon=target_epsilon, accountant=accountant, sample_rate=sample_rate)
    if problems:
        raise ValueError("cannot plan DP-SGD: " + "; ".join(problems))
    if delta >= 1.0 / n_train:
        logger.warning(
            "delta=%g is not below 1/n_train=%g (%d training images): the guarantee is weak; "
            "use delta well below 1/n_train, e.g. %g",
            delta, 1.0 / n_train, n_train, 0.1 / n_train,
        )

    n_train, batch_size, local_epochs, rounds = int(n_train), int(batch_size), int(local_epochs), int(rounds)
    if sample_rate is None:
        sample_rate = batch_size / n_train
        # ceil(local_epochs / sample_rate) in exact integer arithmetic.
        steps_per_round = -(-local_epochs * n_train // batch_size)
    else:
        sample_rate = float(sample_rate)
        steps_per_round = max(1, math.ceil(local_epochs / sample_rate - 1e-9))
    total_steps = rounds * steps_per_round

    search = (float(target_epsilon), float(delta), sample_rate, total_steps, accountant,
              EPSILON_REL_TOLERANCE) if target_epsilon is not None else None
    cached = cache.noise(*search) if cache is not None and search is not None else None
    if noise_multiplier is not None:
        sigma = float(noise_multiplier)
    elif cached is not None:
        sigma = cached
    elif target_epsilon is not None:
        sigma = noise_for_target(target_epsilon, delta, sample_rate, total_steps, accountant)
    else:  # unreachable: _plan_problems demands exactly one of the two
        raise ValueError("give exactly one of noise_multiplier or target_epsilon")

    # The plan's epsilon comes from the accountant itself, never from a cached curve: a cache entry
    # must never weaken DP, and one noise multiplier's curve costs 20-300 ms (memoised per process).
    per_round = _epsilon([(sigma, sample_rate, steps_per_round)], delta, accountant)
    planned = _epsilon([(sigma, sample_rate, total_steps)], delta, accountant)
    if cached is not None and target_epsilon is not None and planned > target_epsilon:
        # A cached noise that overspends is ignored and searched again.
        logger.warning("cached noise multiplier %.4f spends epsilon %.4f > target %g: searching again",
                       sigma, planned, target_epsilon)
        cached, sigma = None, noise_for_target(target_epsilon, delta, sample_rate, total_steps, accountant)
        per_round = _epsilon([(sigma, sample_rate, steps_per_round)], delta, accountant)
        planned = _epsilon([(sigma, sample_rate, total_steps)], delta, accountant)
    if cache is not None and accountant == "rdp":
        cache.put_rdp(sigma, sample_rate, _rdp_of_one_step(sigma, sample_rate))  # the ledger composes this curve next
    if cache is not None:
        if search is not None and cached is None:
            cache.put_noise(*search, sigma)
        cache.save()
    plan = DpPlan(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        rounds=rounds,
        delta=float(delta),
        max_grad_norm=float(max_grad_norm),
        epsilon_per_round=per_round,
        epsilon_planned=planned,
    )
    logger.info(
        "DP plan: sigma=%.4f q=%.4g steps/round=%d rounds=%d -> epsilon %.3f/round, %.3f planned "
        "(delta=%g, %s)",
        sigma, sample_rate, steps_per_round, rounds, per_round, planned, delta, accountant,
    )
    return plan
