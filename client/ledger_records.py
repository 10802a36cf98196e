"""What the privacy ledger is made of: its entries, its errors, the dataset fingerprint.

Split from client/ledger.py (the budget logic) and client/ledger_store.py (the file): these are
the plain records both use, and what callers catch.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any

LEDGER_FILENAME = "privacy_ledger.json"
LEDGER_FORMAT = "fedxray-privacy-ledger"
LEDGER_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: A contribution's patient set when it touched every patient of the site (format-1 entries).
ALL_PATIENTS = "*"
#: Characters of a dataset fingerprint shown in messages and logs.
SHORT_FINGERPRINT = 12
#: Relative slack when comparing with max-epsilon, so that a plan made for exactly max-epsilon
#: is not refused because of float rounding in the accountant.
_EPSILON_SLACK = 1e-9
_FINGERPRINT_DOMAIN = b"fedxray-dataset-fingerprint-v1\n"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _short(fingerprint: str) -> str:
    return fingerprint[:SHORT_FINGERPRINT]


class BudgetExceeded(RuntimeError):  # noqa: N818 - name fixed by interface 5 (docs/interfaces.md)
    """A round would push a dataset's cumulative epsilon past the site's max-epsilon.

    The message names no patient and no file: it may travel back to the coordinator.
    """

    def __init__(
        self,
        *,
        site: str,
        fingerprint: str,
        run_id: str,
        round: int,
        spent: float,
        cost: float,
        max_epsilon: float,
        delta: float,
    ) -> None:
        self.site = site
        self.fingerprint = fingerprint
        self.run_id = run_id
        self.round = round
        self.spent = spent
        self.cost = cost
        self.max_epsilon = max_epsilon
        self.delta = delta
        super().__init__(
            f"privacy budget exceeded at site {site!r}: round {round} of run {run_id!r} was "
            f"refused before training. Dataset {_short(fingerprint)} has already spent "
            f"epsilon={spent:.4f} (delta={delta:g}, all runs on this dataset); this round would "
            f"cost {cost:.4f} more ({spent + cost:.4f} in all), above max-epsilon="
            f"{max_epsilon:.4f}. The refusal is recorded in the site's privacy ledger and repeats "
            "after every restart. To train further, use a new dataset, or raise max-epsilon "
            "only with your privacy officer's approval."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only __init__: rebuild from the fields so the error survives pickling
        # (Ray actors and multiprocessing send exceptions back that way).
        fields_ = ("site", "fingerprint", "run_id", "round", "spent", "cost", "max_epsilon", "delta")
        return (_rebuild_budget_exceeded, ({name: getattr(self, name) for name in fields_},))


def _rebuild_budget_exceeded(kwargs: dict[str, Any]) -> BudgetExceeded:
    return BudgetExceeded(**kwargs)


class DeltaTooLargeError(ValueError):
    """A contribution planned with a weaker delta than the site allows."""


class LedgerConflictError(ValueError):
    """A retried round asks for a different DP plan than the one already recorded for it."""


class LedgerCorruptError(RuntimeError):
    """The ledger file cannot be read; it is never reset silently."""


@dataclass(frozen=True)
class Contribution:
    """One round of DP-SGD on one dataset, as recorded before it trained.

    ``epsilon_after`` is the dataset's cumulative epsilon over all runs, this round included,
    at ``delta`` (the site's delta when it was recorded).
    """

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    dataset_fingerprint: str
    epsilon_after: float
    recorded_at: str  # ISO 8601, UTC
    max_grad_norm: float
    n_train: int
    # Which patients it touched: a key of the ledger's patient_sets, ALL_PATIENTS, or
    # "dataset:<fingerprint>" (a caller that did not say: the dataset is the group).
    patient_set: str = ALL_PATIENTS
    kind: str = "train"  # train (DP-SGD) | evaluate (noised validation histograms) | reference (noised drift statistics)
    accountant: str = "rdp"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: object) -> Contribution:
        """Parse one ledger entry; raises ``ValueError`` naming the bad field."""
        if not isinstance(raw, dict):
            raise ValueError(f"a contribution must be an object, got {type(raw).__name__}")
        optional = {"patient_set", "kind", "accountant"}  # absent from format-1 ledgers
        expected = {f.name for f in fields(cls)}
        missing = sorted(expected - optional - raw.keys())
        if missing:
            raise ValueError(f"contribution lacks {missing}")
        for name in optional & raw.keys():
            if not isinstance(raw[name], str) or not raw[name]:
                raise ValueError(f"contribution field {name!r} has bad value {raw[name]!r}")
        types: dict[str, tuple[type, ...]] = {
            "run_id": (str,), "round": (int,), "steps": (int,), "n_train": (int,),
            "dataset_fingerprint": (str,), "recorded_at": (str,),
            "noise_multiplier": (int, float), "sample_rate": (int, float),
            "delta": (int, float), "epsilon_after": (int, float), "max_grad_norm": (int, float),
        }
        for name, allowed in types.items():
            value = raw[name]
            if isinstance(value, bool) or not isinstance(value, allowed):
                raise ValueError(f"contribution field {name!r} has bad value {value!r}")
        kwargs = {name: raw[name] for name in expected if name in raw}
        for name in ("noise_multiplier", "sample_rate", "delta", "epsilon_after", "max_grad_norm"):
            kwargs[name] = float(kwargs[name])
        return cls(**kwargs)


def dataset_fingerprint(content_hashes: Iterable[str]) -> str:
    """Order-independent SHA-256 over the per-file content hashes of a training split.

    The same files in any order give the same fingerprint; adding, removing or changing one file
    gives another (a multiset: a duplicated file counts twice). Only hashes of pixel files go in,
    so the fingerprint reveals nothing about patients.
    """
    items: list[str] = []
    for value in content_hashes:
        if not isinstance(value, str) or not value.strip() or "\n" in value:
            raise ValueError(
                f"content hashes must be non-empty one-line strings, got {value!r}"
            )
        items.append(value.strip())
    if not items:
        raise ValueError("cannot fingerprint an empty training split: no content hashes given")
    digest = hashlib.sha256(_FINGERPRINT_DOMAIN)
    for value in sorted(items):
        digest.update(value.encode("utf-8") + b"\n")
    return digest.hexdigest()


def _positive_finite(value: object) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _is_zero(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == 0


def _positive_int(value: object, minimum: int = 1) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


@dataclass(frozen=True)
class _Step:
    """A not-yet-recorded round, in the shape :func:`common.privacy.epsilon_for` composes."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def check_step(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    """ValueError listing every problem of a DP round's (noise multiplier, sample rate, steps)."""
    problems = []
    if not _positive_finite(noise_multiplier):
        problems.append(f"noise_multiplier must be a finite number > 0, got "
                        f"{noise_multiplier!r}")
    if not (_positive_finite(sample_rate) and sample_rate <= 1):
        problems.append(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
    if not _positive_int(steps):
        problems.append(f"steps must be an integer >= 1, got {steps!r}")
    if problems:
        raise ValueError("invalid DP round: " + "; ".join(problems))

def check_reservation(
    run_id: str, round: int, fingerprint: str, max_grad_norm: float, n_train: int
) -> None:
    """ValueError listing every problem of a reservation's run id, round, fingerprint, clip and size."""
    problems = []
    if not isinstance(run_id, str) or not run_id:
        problems.append(f"run_id must be a non-empty string, got {run_id!r}")
    if not _positive_int(round, minimum=0):
        problems.append(f"round must be an integer >= 0, got {round!r}")
    if not isinstance(fingerprint, str) or not fingerprint:
        problems.append("fingerprint must be dataset_fingerprint(...) of the training split")
    if not _positive_finite(max_grad_norm):
        problems.append(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
    if not _positive_int(n_train):
        problems.append(f"n_train must be an integer >= 1, got {n_train!r}")
    if problems:
        raise ValueError("invalid privacy reservation: " + "; ".join(problems))


def empty_document(*, site: str, accountant: str, delta: float, max_epsilon: float) -> dict[str, Any]:
    """A new ledger document (format 2) for a site that has recorded nothing yet."""
    return {
        "format": LEDGER_FORMAT,
        "version": LEDGER_VERSION,
        "site": site,
        "accountant": accountant,
        "delta": delta,
        "max_epsilon": max_epsilon,
        "max_epsilon_history": [],
        "datasets": {},
        "patient_sets": {},
        "contributions": [],
        "refusals": [],
    }


def add_refusal(doc: dict[str, Any], *, run_id: str, round: int, fingerprint: str, reason: str, spent: float,
                after: float, max_epsilon: float, delta: float, run_delta: float) -> None:
    """Record a refused round in ``doc`` (a repeat of the same refusal counts an attempt)."""
    now = _now()
    for item in doc["refusals"]:
        if (item["run_id"], item["round"], item["dataset_fingerprint"], item["reason"]) == (
            run_id, round, fingerprint, reason
        ):
            item.update(attempts=int(item.get("attempts", 1)) + 1, last_refused_at=now,
                        spent=spent, epsilon_after=after, max_epsilon=max_epsilon)
            return
    doc["refusals"].append({
        "run_id": run_id,
        "round": int(round),
        "dataset_fingerprint": fingerprint,
        "reason": reason,
        "spent": spent,
        "epsilon_after": after,
        "max_epsilon": max_epsilon,
        "delta": delta,
        "run_delta": run_delta,
        "refused_at": now,
        "last_refused_at": now,
        "attempts": 1,
    })
