"""The site's privacy ledger: every DP-SGD contribution ever made from a site's datasets.

One JSON file per site, ``<state-dir>/privacy_ledger.json``, covering all runs. Before a round
trains, the ClientApp calls :meth:`PrivacyLedger.reserve`; the ledger composes the new round with
everything already spent on the same dataset (identified by :func:`dataset_fingerprint`) and
either records it or refuses it with :class:`BudgetExceeded` when the cumulative epsilon would
pass the site's ``max-epsilon``. Refusals are recorded too, so ``fl-client status`` shows them.

Design choices (see docs/privacy.md):

- Recorded *before* training. A crash mid-training then over-counts (a round that released
  nothing is still charged) instead of under-counting (a released update never charged).
- Idempotent per (run, round, dataset): a retried round returns the entry already recorded.
- Deployment starts a new process per Flower message, so every read-modify-write runs under an
  exclusive ``fcntl.flock`` on ``privacy_ledger.json.lock``, and every write is atomic (temp
  file in the same folder, fsync, ``os.replace``), followed by the same for the backup copy
  ``privacy_ledger.json.bak``. A damaged ledger is never reset: it raises
  :class:`LedgerCorruptError` naming the backup.
- Epsilon is composed with the RDP accountant (delta-free), then stated at the *site's* delta.

Framework-free on purpose: no flwr import.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import numbers
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client.privacy import ACCOUNTANTS, epsilon_for

logger = logging.getLogger(__name__)

LEDGER_FILENAME = "privacy_ledger.json"
LEDGER_FORMAT = "fedxray-privacy-ledger"
LEDGER_VERSION = 1
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


class BudgetExceeded(RuntimeError):  # noqa: N818 - name fixed by contract 5 (DESIGN.md)
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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: object) -> Contribution:
        """Parse one ledger entry; raises ``ValueError`` naming the bad field."""
        if not isinstance(raw, dict):
            raise ValueError(f"a contribution must be an object, got {type(raw).__name__}")
        expected = {f.name for f in fields(cls)}
        missing = sorted(expected - raw.keys())
        if missing:
            raise ValueError(f"contribution lacks {missing}")
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
        kwargs = {name: raw[name] for name in expected}
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


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; some filesystems refuse fsync on a folder, which is harmless."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old or the new file, never a mix."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


class PrivacyLedger:
    """The privacy budget of one site, kept in ``<state_dir>/privacy_ledger.json``.

    ``max_epsilon`` and ``delta`` are the site's current policy, read from its configuration
    on every start: they are not taken from the file, so raising max-epsilon lets new rounds
    through and lowering it refuses them. Every epsilon reported is cumulative over all runs
    on one dataset, at the site's ``delta``.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        site: str,
        max_epsilon: float,
        delta: float,
        accountant: str = "rdp",
    ) -> None:
        problems: list[str] = []
        if not isinstance(site, str) or not site.strip():
            problems.append(f"site must be a non-empty name, got {site!r}")
        if not (_positive_finite(max_epsilon) or _is_zero(max_epsilon)):
            problems.append(f"max_epsilon must be a finite number >= 0 (0 refuses every DP round), "
                            f"got {max_epsilon!r}")
        if not (_positive_finite(delta) and delta < 1):
            problems.append(f"delta must lie in (0, 1), got {delta!r}")
        if accountant not in ACCOUNTANTS:
            problems.append(f"accountant must be one of {list(ACCOUNTANTS)}, got {accountant!r}")
        if problems:
            raise ValueError("cannot open the privacy ledger: " + "; ".join(problems))
        self.site = site
        self.max_epsilon = float(max_epsilon)
        self.delta = float(delta)
        self.accountant = accountant
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.state_dir / LEDGER_FILENAME
        self.backup_path = self.path.with_name(LEDGER_FILENAME + ".bak")
        self.lock_path = self.path.with_name(LEDGER_FILENAME + ".lock")
        # Fail fast on a damaged ledger, before anyone plans a round against it.
        with self._locked(exclusive=False):
            doc = self._read()
        self._warn_on_policy_change(doc)

    # ----------------------------------------------------------------- public API

    def spent(self, fingerprint: str) -> float:
        """Cumulative epsilon of all runs on this dataset so far, at the site's delta."""
        with self._locked(exclusive=False):
            doc = self._read()
        return self._epsilon(self._history(doc, fingerprint))

    def remaining(self, fingerprint: str) -> float:
        """Epsilon still allowed on this dataset before max-epsilon (never below 0)."""
        return max(0.0, self.max_epsilon - self.spent(fingerprint))

    def preview(
        self, fingerprint: str, *, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        """The dataset's cumulative epsilon if such a round were recorded now (nothing is)."""
        self._check_step(noise_multiplier, sample_rate, steps)
        with self._locked(exclusive=False):
            doc = self._read()
        return self._epsilon(
            [*self._history(doc, fingerprint), _Step(noise_multiplier, sample_rate, steps)]
        )

    def reserve(
        self,
        *,
        run_id: str,
        round: int,
        fingerprint: str,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        max_grad_norm: float,
        n_train: int,
        delta: float | None = None,
    ) -> Contribution:
        """Charge one round to the dataset's budget BEFORE it trains, or refuse it.

        Returns the recorded entry (the existing one for a retried (run, round, dataset)).
        Raises :class:`BudgetExceeded` (recorded as a refusal) when the cumulative epsilon
        would pass max-epsilon, :class:`DeltaTooLargeError` when the run planned with a delta above
        the site's, and :class:`LedgerConflictError` when a retried round changes its DP plan.
        ``delta`` is the delta the run planned with; it defaults to the site's.
        """
        self._check_reserve(run_id, round, fingerprint, max_grad_norm, n_train)
        self._check_step(noise_multiplier, sample_rate, steps)
        if delta is not None and not (_positive_finite(delta) and delta < 1):
            raise ValueError(f"invalid privacy reservation: delta must lie in (0, 1), got {delta!r}")
        run_delta = self.delta if delta is None else float(delta)
        if n_train * self.delta >= 1:
            logger.warning(
                "site %s: delta=%g is not below 1/n_train=%g for dataset %s: the guarantee is "
                "weak; configure a delta well below 1/n_train",
                self.site, self.delta, 1 / n_train, _short(fingerprint),
            )
        with self._locked(exclusive=True):
            doc = self._read()
            existing = self._find(doc, run_id, round, fingerprint)
            if existing is not None:
                self._check_same_plan(existing, noise_multiplier, sample_rate, steps,
                                      max_grad_norm)
                logger.info(
                    "privacy: site %s round %d of run %s on dataset %s already recorded "
                    "(epsilon %.4f): retry not charged again",
                    self.site, round, run_id, _short(fingerprint), existing.epsilon_after,
                )
                return existing
            history = self._history(doc, fingerprint)
            spent = self._epsilon(history)
            after = self._epsilon([*history, _Step(noise_multiplier, sample_rate, steps)])
            if run_delta > self.delta:
                self._refuse(doc, run_id, round, fingerprint, spent, after, "delta", run_delta)
                raise DeltaTooLargeError(
                    f"site {self.site!r} refused round {round} of run {run_id!r}: the run "
                    f"planned with delta={run_delta:g} but the site allows at most "
                    f"delta={self.delta:g}; plan the run with the site's delta"
                )
            if after > self.max_epsilon * (1 + _EPSILON_SLACK):
                self._refuse(doc, run_id, round, fingerprint, spent, after, "max-epsilon",
                             run_delta)
                raise BudgetExceeded(
                    site=self.site, fingerprint=fingerprint, run_id=run_id, round=round,
                    spent=spent, cost=after - spent, max_epsilon=self.max_epsilon,
                    delta=self.delta,
                )
            entry = Contribution(
                run_id=run_id,
                round=int(round),
                noise_multiplier=float(noise_multiplier),
                sample_rate=float(sample_rate),
                steps=int(steps),
                delta=run_delta,
                dataset_fingerprint=fingerprint,
                epsilon_after=after,
                recorded_at=_now(),
                max_grad_norm=float(max_grad_norm),
                n_train=int(n_train),
            )
            doc["contributions"].append(entry.to_json())
            self._write(doc)
        logger.info(
            "privacy: site %s round %d of run %s on dataset %s: epsilon %.4f -> %.4f of "
            "max %.4f (delta=%g)",
            self.site, round, run_id, _short(fingerprint), spent, after, self.max_epsilon,
            self.delta,
        )
        return entry

    def contributions(self, fingerprint: str | None = None) -> list[Contribution]:
        """Recorded contributions, oldest first; only one dataset's when ``fingerprint`` given."""
        with self._locked(exclusive=False):
            doc = self._read()
        entries = [Contribution.from_json(raw) for raw in doc["contributions"]]
        if fingerprint is None:
            return entries
        return [c for c in entries if c.dataset_fingerprint == fingerprint]

    def refusals(self) -> list[dict[str, Any]]:
        """Refused rounds, oldest first (one entry per (run, round, dataset, reason))."""
        with self._locked(exclusive=False):
            doc = self._read()
        return [dict(item) for item in doc["refusals"]]

    def summary(self) -> dict[str, Any]:
        """What ``fl-client status`` shows: per dataset, spent / max / rounds / runs.

        Holds fingerprints, run ids and numbers only, never patient data. ``site_epsilon`` is
        every contribution on every dataset composed: an upper bound for a patient whose images
        sit in several of the site's datasets.
        """
        with self._locked(exclusive=False):
            doc = self._read()
        entries = [Contribution.from_json(raw) for raw in doc["contributions"]]
        datasets: dict[str, dict[str, Any]] = {}
        for fingerprint in dict.fromkeys(c.dataset_fingerprint for c in entries):
            mine = [c for c in entries if c.dataset_fingerprint == fingerprint]
            spent = self._epsilon(mine)
            run_ids = sorted({c.run_id for c in mine})
            datasets[fingerprint] = {
                "spent": spent,
                "max_epsilon": self.max_epsilon,
                "remaining": max(0.0, self.max_epsilon - spent),
                "rounds": len(mine),
                "runs": len(run_ids),
                "run_ids": run_ids,
                "last_recorded_at": mine[-1].recorded_at,
            }
        return {
            "site": self.site,
            "accountant": self.accountant,
            "delta": self.delta,
            "max_epsilon": self.max_epsilon,
            "datasets": datasets,
            "site_epsilon": self._epsilon(entries),
            "refusals": len(doc["refusals"]),
        }

    # ----------------------------------------------------------------- internals

    def _epsilon(self, history: list[Any]) -> float:
        return epsilon_for(history, self.delta, self.accountant)

    @staticmethod
    def _history(doc: dict[str, Any], fingerprint: str) -> list[Contribution]:
        return [
            Contribution.from_json(raw)
            for raw in doc["contributions"]
            if raw["dataset_fingerprint"] == fingerprint
        ]

    @staticmethod
    def _find(
        doc: dict[str, Any], run_id: str, round: int, fingerprint: str
    ) -> Contribution | None:
        for raw in doc["contributions"]:
            if (
                raw["run_id"] == run_id
                and raw["round"] == round
                and raw["dataset_fingerprint"] == fingerprint
            ):
                return Contribution.from_json(raw)
        return None

    def _check_same_plan(
        self,
        existing: Contribution,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        max_grad_norm: float,
    ) -> None:
        asked = (float(noise_multiplier), float(sample_rate), int(steps), float(max_grad_norm))
        recorded = (existing.noise_multiplier, existing.sample_rate, existing.steps,
                    existing.max_grad_norm)
        if asked != recorded:
            raise LedgerConflictError(
                f"site {self.site!r}: round {existing.round} of run {existing.run_id!r} on "
                f"dataset {_short(existing.dataset_fingerprint)} was recorded with (noise "
                f"multiplier, sample rate, steps, max grad norm) = {recorded}, the retry asks "
                f"for {asked}. A retried round must repeat its DP plan; start a new run id "
                "to train with other settings"
            )

    def _refuse(
        self,
        doc: dict[str, Any],
        run_id: str,
        round: int,
        fingerprint: str,
        spent: float,
        after: float,
        reason: str,
        run_delta: float,
    ) -> None:
        """Record a refusal (or count a repeat of it); a failed write never hides the refusal."""
        now = _now()
        for item in doc["refusals"]:
            if (item["run_id"], item["round"], item["dataset_fingerprint"], item["reason"]) == (
                run_id, round, fingerprint, reason
            ):
                item.update(attempts=int(item.get("attempts", 1)) + 1, last_refused_at=now,
                            spent=spent, epsilon_after=after, max_epsilon=self.max_epsilon)
                break
        else:
            doc["refusals"].append({
                "run_id": run_id,
                "round": int(round),
                "dataset_fingerprint": fingerprint,
                "reason": reason,
                "spent": spent,
                "epsilon_after": after,
                "max_epsilon": self.max_epsilon,
                "delta": self.delta,
                "run_delta": run_delta,
                "refused_at": now,
                "last_refused_at": now,
                "attempts": 1,
            })
        try:
            self._write(doc)
        except OSError:
            logger.exception("privacy: could not record the refusal in %s", self.path)
        logger.error(
            "privacy: site %s REFUSED round %d of run %s on dataset %s (%s): epsilon %.4f -> "
            "%.4f, max %.4f",
            self.site, round, run_id, _short(fingerprint), reason, spent, after,
            self.max_epsilon,
        )

    @staticmethod
    def _check_step(noise_multiplier: float, sample_rate: float, steps: int) -> None:
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

    @staticmethod
    def _check_reserve(
        run_id: str, round: int, fingerprint: str, max_grad_norm: float, n_train: int
    ) -> None:
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

    def _warn_on_policy_change(self, doc: dict[str, Any]) -> None:
        if not doc["contributions"] and not doc["refusals"]:
            return
        if doc.get("site") not in (None, self.site):
            logger.warning(
                "privacy ledger %s was written for site %r, now opened as site %r: the budget "
                "stays attached to the datasets, not the name",
                self.path, doc.get("site"), self.site,
            )
        previous = doc.get("max_epsilon")
        if previous is not None and previous != self.max_epsilon:
            logger.warning(
                "site %s: max-epsilon changed from %g to %g since the ledger was last written "
                "(%s)", self.site, previous, self.max_epsilon,
                "raised: rounds beyond the old limit will be allowed"
                if self.max_epsilon > previous else "lowered: more rounds will be refused",
            )

    @contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        """Hold the ledger's advisory lock; released by the OS even if the process dies."""
        with open(self.lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _corrupt(self, reason: str) -> LedgerCorruptError:
        if self.backup_path.exists():
            backup = (
                f"The last good copy is {self.backup_path} (a second copy written after each "
                f"update): check it, then restore it with `cp {self.backup_path} {self.path}`."
            )
        else:
            backup = f"There is no backup ({self.backup_path} does not exist)."
        return LedgerCorruptError(
            f"privacy ledger {self.path} is unreadable: {reason}. It was NOT reset, and no "
            f"round will train until it is repaired, because resetting it would forget the "
            f"privacy already spent. {backup} Keep the damaged file for your privacy officer."
        )

    def _read(self) -> dict[str, Any]:
        """The ledger document, validated; an empty one when no ledger exists yet."""
        if not self.path.exists():
            if self.backup_path.exists():
                raise self._corrupt(
                    "the file is missing although its backup exists (was it deleted?)"
                )
            return self._empty()
        try:
            raw = json.loads(self.path.read_bytes())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._corrupt(f"not valid JSON ({err})") from err
        try:
            return self._validate(raw)
        except ValueError as err:
            raise self._corrupt(str(err)) from err

    def _empty(self) -> dict[str, Any]:
        return {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "site": self.site,
            "accountant": self.accountant,
            "delta": self.delta,
            "max_epsilon": self.max_epsilon,
            "max_epsilon_history": [],
            "datasets": {},
            "contributions": [],
            "refusals": [],
        }

    @staticmethod
    def _validate(raw: object) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise ValueError(f"top level is {type(raw).__name__}, expected an object")
        if raw.get("format") != LEDGER_FORMAT:
            raise ValueError(f"format is {raw.get('format')!r}, expected {LEDGER_FORMAT!r}")
        version = raw.get("version")
        if version != LEDGER_VERSION:
            raise ValueError(
                f"version {version!r} is not {LEDGER_VERSION} (written by another fedxray "
                "release? use that release, or one that reads it)"
            )
        for key in ("contributions", "refusals"):
            if not isinstance(raw.get(key), list):
                raise ValueError(f"{key!r} is missing or not a list")
        for index, item in enumerate(raw["contributions"]):
            try:
                Contribution.from_json(item)
            except ValueError as err:
                raise ValueError(f"contribution #{index}: {err}") from err
        for index, item in enumerate(raw["refusals"]):
            if not isinstance(item, dict) or not {
                "run_id", "round", "dataset_fingerprint", "reason"
            } <= item.keys():
                raise ValueError(f"refusal #{index} is malformed")
        raw.setdefault("max_epsilon_history", [])
        raw.setdefault("datasets", {})
        return raw

    def _write(self, doc: dict[str, Any]) -> None:
        """Atomically replace the ledger, then its backup copy (``.bak``)."""
        now = _now()
        if doc.get("max_epsilon") != self.max_epsilon:
            doc["max_epsilon_history"].append(
                {"max_epsilon": self.max_epsilon, "previous": doc.get("max_epsilon"),
                 "from": now}
            )
        entries = [Contribution.from_json(raw) for raw in doc["contributions"]]
        datasets: dict[str, Any] = {}
        for fingerprint in dict.fromkeys(c.dataset_fingerprint for c in entries):
            mine = [c for c in entries if c.dataset_fingerprint == fingerprint]
            datasets[fingerprint] = {"epsilon": self._epsilon(mine), "rounds": len(mine)}
        doc.update(
            site=self.site, accountant=self.accountant, delta=self.delta,
            max_epsilon=self.max_epsilon, updated_at=now, datasets=datasets,
        )
        data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
        self._validate(json.loads(data))  # never persist what could not be read back
        _atomic_write(self.path, data)
        # The backup is a second copy of this last good state, written only once the ledger
        # itself is safely in place: if the ledger is later damaged (disk, editor), restoring
        # the backup loses no entry. A crash between the two writes leaves a valid ledger and
        # a backup one update behind, never the other way round.
        _atomic_write(self.backup_path, data)


@dataclass(frozen=True)
class _Step:
    """A not-yet-recorded round, in the shape :func:`client.privacy.epsilon_for` composes."""

    noise_multiplier: float
    sample_rate: float
    steps: int
