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
- Every read-modify-write holds the file's lock and writes atomically and durably, then the
  backup copy (client/ledger_store.py). A damaged ledger is never reset: it raises
  :class:`LedgerCorruptError` naming the backup. The entries, errors and input checks are in
  client/ledger_records.py.
- Epsilon is composed with the RDP accountant (delta-free), then stated at the *site's* delta.
- The budget is per patient (format 2). Each contribution records the set of patients whose
  images it touched (their salted pseudonyms, kept only here at the site); a patient's epsilon
  composes every contribution that touched them, whatever the run, seed, task, labels or image
  size, and a round is refused when any patient it touches would pass max-epsilon. Training
  charges the training patients; evaluation (noised score histograms) charges the validation
  patients. Entries of a format-1 ledger did not record patients: they count against everyone.
  The grouping of patients by shared history is client/ledger_groups.py.

Framework-free on purpose: no flwr import.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from client.ledger_groups import patient_groups, patient_set_key, worst_group
from client.ledger_records import (  # noqa: F401 - re-exported: callers import these from client.ledger
    _EPSILON_SLACK,
    LEDGER_FILENAME,
    BudgetExceeded,
    Contribution,
    DeltaTooLargeError,
    LedgerConflictError,
    LedgerCorruptError,
    _is_zero,
    _now,
    _positive_finite,
    _positive_int,
    _short,
    _Step,
    add_refusal,
    check_reservation,
    check_step,
    dataset_fingerprint,
    empty_document,
)
from client.ledger_store import LedgerFile
from common.privacy import ACCOUNTANTS, accountant_cache, epsilon_for

logger = logging.getLogger(__name__)


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
        self.file = LedgerFile(Path(state_dir))
        self.state_dir = self.file.state_dir
        self.path = self.file.path
        self.backup_path = self.file.backup_path
        self._accountant_cache = accountant_cache(self.state_dir)  # RDP curves kept across processes
        # Fail fast on a damaged ledger, before anyone plans a round against it.
        with self.file.locked(exclusive=False):
            doc = self.file.read(self._empty())
        self._warn_on_policy_change(doc)

    # ----------------------------------------------------------------- public API

    def spent(self, fingerprint: str) -> float:
        """Cumulative epsilon of all runs on this dataset so far, at the site's delta."""
        with self.file.locked(exclusive=False):
            doc = self.file.read(self._empty())
        return self._epsilon(self._history(doc, fingerprint))

    def remaining(self, fingerprint: str) -> float:
        """Epsilon still allowed on this dataset before max-epsilon (never below 0)."""
        return max(0.0, self.max_epsilon - self.spent(fingerprint))

    def preview(
        self, fingerprint: str, *, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        """The dataset's cumulative epsilon if such a round were recorded now (nothing is)."""
        check_step(noise_multiplier, sample_rate, steps)
        with self.file.locked(exclusive=False):
            doc = self.file.read(self._empty())
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
        patients: Iterable[str] | None = None,
        kind: str = "train",
    ) -> Contribution:
        """Charge one round to the budget of every patient it touches BEFORE it trains, or refuse it.

        ``patients``: the pseudonyms of the patients whose images the round uses (training
        patients for a training round, validation patients for an evaluation); their cumulative
        epsilon over everything recorded must stay within max-epsilon. Without it the dataset
        (``fingerprint``) is the group, as in format 1.

        Returns the recorded entry (the existing one for a retried (run, round, dataset, kind)).
        Raises :class:`BudgetExceeded` (recorded as a refusal) when the cumulative epsilon
        would pass max-epsilon, :class:`DeltaTooLargeError` when the run planned with a delta above
        the site's, and :class:`LedgerConflictError` when a retried round changes its DP plan.
        ``delta`` is the delta the run planned with; it defaults to the site's.
        """
        members = None if patients is None else sorted({str(p) for p in patients})
        if members is not None and not members:
            raise ValueError("invalid privacy reservation: patients is empty; a round must touch at least one patient")
        check_reservation(run_id, round, fingerprint, max_grad_norm, n_train)
        check_step(noise_multiplier, sample_rate, steps)
        if delta is not None and not (_positive_finite(delta) and delta < 1):
            raise ValueError(f"invalid privacy reservation: delta must lie in (0, 1), got {delta!r}")
        run_delta = self.delta if delta is None else float(delta)
        if n_train * self.delta >= 1:
            logger.warning(
                "site %s: delta=%g is not below 1/n_train=%g for dataset %s: the guarantee is "
                "weak; configure a delta well below 1/n_train",
                self.site, self.delta, 1 / n_train, _short(fingerprint),
            )
        with self.file.locked(exclusive=True):
            doc = self.file.read(self._empty())
            existing = self._find(doc, run_id, round, fingerprint, kind)
            if existing is not None:
                self._check_same_plan(existing, noise_multiplier, sample_rate, steps,
                                      max_grad_norm)
                logger.info(
                    "privacy: site %s round %d of run %s on dataset %s already recorded "
                    "(epsilon %.4f): retry not charged again",
                    self.site, round, run_id, _short(fingerprint), existing.epsilon_after,
                )
                return existing
            set_ref = patient_set_key(members, fingerprint)
            step = _Step(noise_multiplier, sample_rate, steps)
            spent, after = worst_group(doc, set_ref, members, step, self._epsilon)
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
                patient_set=set_ref,
                kind=kind,
                accountant=self.accountant,
            )
            if members is not None:
                doc["patient_sets"].setdefault(set_ref, members)
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
        with self.file.locked(exclusive=False):
            doc = self.file.read(self._empty())
        entries = [Contribution.from_json(raw) for raw in doc["contributions"]]
        if fingerprint is None:
            return entries
        return [c for c in entries if c.dataset_fingerprint == fingerprint]

    def refusals(self) -> list[dict[str, Any]]:
        """Refused rounds, oldest first (one entry per (run, round, dataset, reason))."""
        with self.file.locked(exclusive=False):
            doc = self.file.read(self._empty())
        return [dict(item) for item in doc["refusals"]]

    def summary(self) -> dict[str, Any]:
        """What ``fl-client status`` shows: per dataset, spent / max / rounds / runs.

        Holds fingerprints, run ids and numbers only, never patient data. ``site_epsilon`` is
        every contribution on every dataset composed: an upper bound for a patient whose images
        sit in several of the site's datasets.
        """
        with self.file.locked(exclusive=False):
            doc = self.file.read(self._empty())
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
        return epsilon_for(history, self.delta, self.accountant, cache=self._accountant_cache)

    @staticmethod
    def _history(doc: dict[str, Any], fingerprint: str) -> list[Contribution]:
        return [
            Contribution.from_json(raw)
            for raw in doc["contributions"]
            if raw["dataset_fingerprint"] == fingerprint
        ]

    @staticmethod
    def _find(
        doc: dict[str, Any], run_id: str, round: int, fingerprint: str, kind: str = "train"
    ) -> Contribution | None:
        for raw in doc["contributions"]:
            if (
                raw["run_id"] == run_id
                and raw["round"] == round
                and raw["dataset_fingerprint"] == fingerprint
                and raw.get("kind", "train") == kind
            ):
                return Contribution.from_json(raw)
        return None

    def patient_epsilons(self) -> list[dict[str, Any]]:
        """Every group of patients with the same history: how many, their epsilon, what touched them.

        Largest epsilon first. Numbers only, never a pseudonym.
        """
        with self.file.locked(exclusive=False):
            doc = self.file.read(self._empty())
        out = []
        for sig, (count, history) in patient_groups(doc).items():
            out.append({"patients": count, "epsilon": self._epsilon(history), "entries": len(sig),
                        "kinds": sorted({h.kind for h in history})})
        return sorted(out, key=lambda g: -g["epsilon"])

    def spent_epsilon(self) -> float:
        """The largest cumulative epsilon any patient of the site has been exposed to (interface 6, docs/interfaces.md)."""
        groups = self.patient_epsilons()
        return groups[0]["epsilon"] if groups else 0.0

    def _check_same_plan(self, existing: Contribution, noise_multiplier: float, sample_rate: float, steps: int,
                         max_grad_norm: float) -> None:
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

    def _refuse(self, doc: dict[str, Any], run_id: str, round: int, fingerprint: str, spent: float, after: float,
                reason: str, run_delta: float) -> None:
        """Record a refusal (or count a repeat of it); a failed write never hides the refusal."""
        add_refusal(doc, run_id=run_id, round=round, fingerprint=fingerprint, reason=reason, spent=spent, after=after,
                    max_epsilon=self.max_epsilon, delta=self.delta, run_delta=run_delta)
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

    def _empty(self) -> dict[str, Any]:
        return empty_document(site=self.site, accountant=self.accountant, delta=self.delta, max_epsilon=self.max_epsilon)

    def _write(self, doc: dict[str, Any]) -> None:
        """Refresh the derived fields (policy, per-dataset figures for readers) and write the file."""
        now = _now()
        if doc.get("max_epsilon") != self.max_epsilon:
            doc["max_epsilon_history"].append(
                {"max_epsilon": self.max_epsilon, "previous": doc.get("max_epsilon"), "from": now}
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
        self.file.write(doc)

