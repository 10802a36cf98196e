"""Tests for client/ledger.py: the site privacy ledger (interface 5, docs/interfaces.md). No training, only files."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.ledger import (
    LEDGER_FILENAME,
    BudgetExceeded,
    Contribution,
    DeltaTooLargeError,
    LedgerConflictError,
    LedgerCorruptError,
    PrivacyLedger,
    dataset_fingerprint,
)
from common.privacy import epsilon_for

DELTA = 1e-5
SITE = "st-mary"
FP = dataset_fingerprint(["a" * 64, "b" * 64, "c" * 64])
OTHER_FP = dataset_fingerprint(["d" * 64])
# One round: sigma 1.0, q 0.05, 20 steps costs about 1.2 epsilon alone at delta 1e-5.
ROUND: dict[str, Any] = dict(noise_multiplier=1.0, sample_rate=0.05, steps=20)


def _ledger(state_dir: Path, max_epsilon: float = 100.0, **kwargs: Any) -> PrivacyLedger:
    return PrivacyLedger(state_dir, site=SITE, max_epsilon=max_epsilon, delta=DELTA, **kwargs)


def _reserve(ledger: PrivacyLedger, run_id: str, rnd: int, fingerprint: str = FP, **overrides: Any) -> Contribution:
    kwargs: dict[str, Any] = dict(ROUND, max_grad_norm=1.0, n_train=1000)
    kwargs.update(overrides)
    return ledger.reserve(run_id=run_id, round=rnd, fingerprint=fingerprint, **kwargs)


def _epsilon_of_rounds(n: int) -> float:
    return epsilon_for([OneRound()] * n, DELTA)


class OneRound:
    """The round used throughout, in the shape epsilon_for composes."""

    noise_multiplier = ROUND["noise_multiplier"]
    sample_rate = ROUND["sample_rate"]
    steps = ROUND["steps"]


class TestDatasetFingerprint:
    def test_order_independent(self) -> None:
        assert dataset_fingerprint(["x1", "x2", "x3"]) == dataset_fingerprint(["x3", "x1", "x2"])

    def test_sensitive_to_content_and_membership(self) -> None:
        base = dataset_fingerprint(["x1", "x2", "x3"])
        assert dataset_fingerprint(["x1", "x2", "x4"]) != base  # one file changed
        assert dataset_fingerprint(["x1", "x2"]) != base  # one file removed
        assert dataset_fingerprint(["x1", "x2", "x3", "x3"]) != base  # a duplicate counts
        assert len(base) == 64 and int(base, 16) >= 0

    def test_not_fooled_by_concatenation(self) -> None:
        assert dataset_fingerprint(["ab", "c"]) != dataset_fingerprint(["a", "bc"])

    def test_empty_or_bad_input_is_refused(self) -> None:
        with pytest.raises(ValueError, match="empty training split"):
            dataset_fingerprint([])
        with pytest.raises(ValueError, match="non-empty one-line"):
            dataset_fingerprint(["ok", ""])


class TestSpendAndCompose:
    def test_new_ledger_has_spent_nothing(self, tmp_path: Path) -> None:
        ledger = _ledger(tmp_path)
        assert ledger.spent(FP) == 0.0
        assert ledger.contributions() == [] and ledger.refusals() == []
        assert not (tmp_path / LEDGER_FILENAME).exists()  # nothing written until a round

    def test_cumulative_epsilon_grows_and_composes_across_runs(self, tmp_path: Path) -> None:
        ledger = _ledger(tmp_path)
        previous = 0.0
        for run_id, rnd in [("run-a", 1), ("run-a", 2), ("run-a", 3), ("run-b", 1), ("run-b", 2)]:
            preview = ledger.preview(FP, **ROUND)
            entry = _reserve(ledger, run_id, rnd)
            assert entry.epsilon_after == pytest.approx(preview, rel=1e-12)
            assert entry.epsilon_after > previous
            assert ledger.spent(FP) == pytest.approx(entry.epsilon_after, rel=1e-12)
            previous = entry.epsilon_after
        # Five rounds over two runs compose as one history of five rounds.
        assert ledger.spent(FP) == pytest.approx(_epsilon_of_rounds(5), rel=1e-12)
        assert ledger.spent(OTHER_FP) == 0.0  # another dataset has its own budget
        entries = ledger.contributions(FP)
        assert [(c.run_id, c.round) for c in entries][-2:] == [("run-b", 1), ("run-b", 2)]
        assert all(c.delta == DELTA and c.n_train == 1000 and c.recorded_at.endswith("+00:00") for c in entries)

    def test_preview_records_nothing(self, tmp_path: Path) -> None:
        ledger = _ledger(tmp_path)
        _reserve(ledger, "run-a", 1)
        before = (tmp_path / LEDGER_FILENAME).read_bytes()
        assert ledger.preview(FP, **ROUND) > ledger.spent(FP)
        assert (tmp_path / LEDGER_FILENAME).read_bytes() == before

    def test_survives_restart(self, tmp_path: Path) -> None:
        _reserve(_ledger(tmp_path), "run-a", 1)
        _reserve(_ledger(tmp_path), "run-a", 2)
        assert _ledger(tmp_path).spent(FP) == pytest.approx(_epsilon_of_rounds(2), rel=1e-12)

    def test_heterogeneous_rounds(self, tmp_path: Path) -> None:
        ledger = _ledger(tmp_path)
        _reserve(ledger, "run-a", 1)
        _reserve(ledger, "run-b", 1, noise_multiplier=2.0, sample_rate=0.1, steps=7)
        expected = epsilon_for(ledger.contributions(FP), DELTA)
        assert ledger.spent(FP) == pytest.approx(expected, rel=1e-12)
        assert ledger.spent(FP) > _epsilon_of_rounds(1)

    def test_epsilon_is_recomputed_from_history_with_the_chosen_accountant(self, tmp_path: Path) -> None:
        rdp = _ledger(tmp_path)
        _reserve(rdp, "run-a", 1)
        _reserve(rdp, "run-a", 2)
        prv = _ledger(tmp_path, accountant="prv")
        assert 0 < prv.spent(FP) < rdp.spent(FP)  # PRV is the tighter accountant

    def test_summary_holds_numbers_only(self, tmp_path: Path) -> None:
        ledger = _ledger(tmp_path, max_epsilon=50.0)
        _reserve(ledger, "run-a", 1)
        _reserve(ledger, "run-a", 2)
        _reserve(ledger, "run-b", 1, fingerprint=OTHER_FP)
        summary = json.loads(json.dumps(ledger.summary()))  # serialisable as is
        mine = summary["datasets"][FP]
        assert mine["rounds"] == 2 and mine["runs"] == 1 and mine["run_ids"] == ["run-a"]
        assert mine["spent"] == pytest.approx(ledger.spent(FP))
        assert mine["remaining"] == pytest.approx(50.0 - mine["spent"])
        assert summary["datasets"][OTHER_FP]["rounds"] == 1
        # Every dataset composed: bigger than any single dataset's spend.
        assert summary["site_epsilon"] > mine["spent"]
        assert summary["site"] == SITE and summary["max_epsilon"] == 50.0 and summary["refusals"] == 0


class TestIdempotentRetry:
    def test_retried_round_is_not_charged_twice(self, tmp_path: Path) -> None:
        ledger = _ledger(tmp_path)
        first = _reserve(ledger, "run-a", 1)
        again = _reserve(ledger, "run-a", 1)
        from_restart = _reserve(_ledger(tmp_path), "run-a", 1)
        assert again == first and from_restart == first
        assert len(ledger.contributions()) == 1
        assert ledger.spent(FP) == pytest.approx(_epsilon_of_rounds(1), rel=1e-12)

    def test_same_round_on_another_dataset_is_charged(self, tmp_path: Path) -> None:
        ledger = _ledger(tmp_path)
        _reserve(ledger, "run-a", 1)
        _reserve(ledger, "run-a", 1, fingerprint=OTHER_FP)
        assert len(ledger.contributions()) == 2

    def test_retry_with_another_plan_is_a_conflict(self, tmp_path: Path) -> None:
        ledger = _ledger(tmp_path)
        _reserve(ledger, "run-a", 1)
        with pytest.raises(LedgerConflictError, match="must repeat its DP plan"):
            _reserve(ledger, "run-a", 1, noise_multiplier=0.5)
        assert len(ledger.contributions()) == 1


class TestRefusal:
    def test_round_past_max_epsilon_is_refused_and_recorded(self, tmp_path: Path) -> None:
        max_epsilon = (_epsilon_of_rounds(2) + _epsilon_of_rounds(3)) / 2  # 2 rounds fit, 3 do not
        ledger = _ledger(tmp_path, max_epsilon=max_epsilon)
        _reserve(ledger, "run-a", 1)
        _reserve(ledger, "run-a", 2)
        spent = ledger.spent(FP)
        with pytest.raises(BudgetExceeded) as info:
            _reserve(ledger, "run-a", 3)
        message = str(info.value)
        for part in (SITE, FP[:12], f"{spent:.4f}", f"{max_epsilon:.4f}", "privacy officer", "new dataset"):
            assert part in message
        assert info.value.cost == pytest.approx(_epsilon_of_rounds(3) - spent, rel=1e-9)
        assert isinstance(info.value, RuntimeError)
        copy = pickle.loads(pickle.dumps(info.value))  # Ray / multiprocessing send it pickled
        assert str(copy) == message and copy.max_epsilon == max_epsilon
        assert ledger.spent(FP) == spent and len(ledger.contributions()) == 2
        (refusal,) = ledger.refusals()
        assert (refusal["run_id"], refusal["round"], refusal["reason"]) == ("run-a", 3, "max-epsilon")
        assert refusal["attempts"] == 1

    def test_refusal_survives_restart(self, tmp_path: Path) -> None:
        max_epsilon = (_epsilon_of_rounds(1) + _epsilon_of_rounds(2)) / 2
        _reserve(_ledger(tmp_path, max_epsilon), "run-a", 1)
        with pytest.raises(BudgetExceeded):
            _reserve(_ledger(tmp_path, max_epsilon), "run-a", 2)
        restarted = _ledger(tmp_path, max_epsilon)
        with pytest.raises(BudgetExceeded):
            _reserve(restarted, "run-a", 2)
        with pytest.raises(BudgetExceeded):  # a new run on the same dataset is refused as well
            _reserve(restarted, "run-b", 1)
        refusals = restarted.refusals()
        assert [(r["run_id"], r["round"], r["attempts"]) for r in refusals] == [("run-a", 2, 2), ("run-b", 1, 1)]
        assert restarted.summary()["refusals"] == 2
        # The refused dataset does not block another one.
        _reserve(restarted, "run-b", 1, fingerprint=OTHER_FP)

    def test_raised_max_lets_rounds_through_lowered_max_refuses(self, tmp_path: Path) -> None:
        low = (_epsilon_of_rounds(1) + _epsilon_of_rounds(2)) / 2
        _reserve(_ledger(tmp_path, low), "run-a", 1)
        with pytest.raises(BudgetExceeded):
            _reserve(_ledger(tmp_path, low), "run-a", 2)
        _reserve(_ledger(tmp_path, 100.0), "run-a", 2)  # raised (officer-approved) limit
        with pytest.raises(BudgetExceeded):
            _reserve(_ledger(tmp_path, low), "run-a", 3)  # lowered again: refused
        history = json.loads((tmp_path / LEDGER_FILENAME).read_text())["max_epsilon_history"]
        assert [h["max_epsilon"] for h in history] == [100.0, low]

    def test_exactly_max_epsilon_is_allowed(self, tmp_path: Path) -> None:
        ledger = _ledger(tmp_path, max_epsilon=_epsilon_of_rounds(2))
        _reserve(ledger, "run-a", 1)
        _reserve(ledger, "run-a", 2)
        assert ledger.remaining(FP) == pytest.approx(0.0, abs=1e-9)

    def test_zero_max_epsilon_refuses_every_round(self, tmp_path: Path) -> None:
        with pytest.raises(BudgetExceeded, match="max-epsilon=0.0000"):
            _reserve(_ledger(tmp_path, max_epsilon=0.0), "run-a", 1)
        assert _ledger(tmp_path).contributions() == []

    def test_delta_larger_than_the_sites_is_refused(self, tmp_path: Path) -> None:
        ledger = _ledger(tmp_path)
        with pytest.raises(DeltaTooLargeError, match="delta=0.001"):
            _reserve(ledger, "run-a", 1, delta=1e-3)
        assert ledger.contributions() == []
        assert ledger.refusals()[0]["reason"] == "delta"
        assert _reserve(ledger, "run-a", 1, delta=1e-6).delta == 1e-6  # a stricter delta is fine


class TestAtomicWrites:
    def test_crash_during_write_leaves_previous_ledger(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        ledger = _ledger(tmp_path)
        _reserve(ledger, "run-a", 1)
        path = tmp_path / LEDGER_FILENAME
        before = path.read_bytes()

        def crash(src: Any, dst: Any) -> None:
            raise OSError("simulated crash in os.replace")

        monkeypatch.setattr(os, "replace", crash)
        with pytest.raises(OSError, match="simulated crash"):
            _reserve(ledger, "run-a", 2)
        monkeypatch.undo()
        assert path.read_bytes() == before
        assert not list(tmp_path.glob("*.tmp"))  # no temp file left behind
        assert len(_ledger(tmp_path).contributions()) == 1

    def test_crash_before_the_backup_update_leaves_both_files_valid(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        ledger = _ledger(tmp_path)
        _reserve(ledger, "run-a", 1)
        path, backup = tmp_path / LEDGER_FILENAME, tmp_path / (LEDGER_FILENAME + ".bak")
        before = path.read_bytes()
        real_replace = os.replace
        calls: list[str] = []

        def crash_on_backup(src: Any, dst: Any) -> None:
            calls.append(str(dst))
            if Path(dst) == backup:
                raise OSError("simulated crash replacing the backup")
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", crash_on_backup)
        with pytest.raises(OSError):
            _reserve(ledger, "run-a", 2)
        monkeypatch.undo()
        assert calls == [str(path), str(backup)]  # the ledger first, then its copy
        assert backup.read_bytes() == before  # one update behind, still valid
        assert len(_ledger(tmp_path).contributions()) == 2  # the ledger holds the new round
        assert not list(tmp_path.glob("*.tmp"))

    def test_backup_is_a_copy_of_the_last_good_ledger(self, tmp_path: Path) -> None:
        ledger = _ledger(tmp_path)
        _reserve(ledger, "run-a", 1)
        _reserve(ledger, "run-a", 2)
        path = tmp_path / LEDGER_FILENAME
        assert (tmp_path / (LEDGER_FILENAME + ".bak")).read_bytes() == path.read_bytes()


def _reserve_rounds(state_dir: str, run_id: str, rounds: list[int], barrier: Any) -> None:
    ledger = _ledger(Path(state_dir))
    barrier.wait(timeout=30)
    for rnd in rounds:
        _reserve(ledger, run_id, rnd)


class TestConcurrency:
    def test_two_processes_never_lose_an_entry(self, tmp_path: Path) -> None:
        ctx = multiprocessing.get_context("fork")  # children inherit the imports: fast
        barrier = ctx.Barrier(2)
        rounds = list(range(1, 13))
        workers = [
            ctx.Process(target=_reserve_rounds, args=(str(tmp_path), run_id, rounds, barrier))
            for run_id in ("run-a", "run-b")
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        assert [w.exitcode for w in workers] == [0, 0]
        entries = _ledger(tmp_path).contributions(FP)
        assert sorted((c.run_id, c.round) for c in entries) == sorted(
            (run_id, rnd) for run_id in ("run-a", "run-b") for rnd in rounds
        )
        # Each entry's epsilon_after was computed on everything recorded before it.
        afters = [c.epsilon_after for c in entries]
        assert afters == sorted(afters)
        assert afters[-1] == pytest.approx(_epsilon_of_rounds(24), rel=1e-12)


class TestCorruptLedger:
    def test_garbage_is_an_error_not_a_reset(self, tmp_path: Path) -> None:
        ledger = _ledger(tmp_path)
        _reserve(ledger, "run-a", 1)
        _reserve(ledger, "run-a", 2)
        path = tmp_path / LEDGER_FILENAME
        path.write_text('{"format": "fedxray-privacy-ledger", "contributions": [')  # truncated
        with pytest.raises(LedgerCorruptError) as info:
            _ledger(tmp_path)
        message = str(info.value)
        assert str(path) in message and str(path) + ".bak" in message and "NOT reset" in message
        # An instance opened before the damage refuses to train on it too, and writes nothing.
        with pytest.raises(LedgerCorruptError):
            _reserve(ledger, "run-a", 3)
        with pytest.raises(LedgerCorruptError):
            ledger.spent(FP)
        assert path.read_text().endswith("[")
        # The backup is a good copy an operator can restore, and it lost no round.
        (tmp_path / (LEDGER_FILENAME + ".bak")).replace(path)
        assert len(_ledger(tmp_path).contributions()) == 2

    @pytest.mark.parametrize(
        "content",
        [
            "[]",
            '{"format": "something-else", "version": 1, "contributions": [], "refusals": []}',
            '{"format": "fedxray-privacy-ledger", "version": 99, "contributions": [], "refusals": []}',
            '{"format": "fedxray-privacy-ledger", "version": 1, "contributions": [{"run_id": "x"}], "refusals": []}',
            "",
        ],
        ids=["list", "format", "version", "entry", "empty"],
    )
    def test_invalid_structure_is_an_error(self, tmp_path: Path, content: str) -> None:
        (tmp_path / LEDGER_FILENAME).write_text(content)
        with pytest.raises(LedgerCorruptError, match="no backup"):
            _ledger(tmp_path)
        assert (tmp_path / LEDGER_FILENAME).read_text() == content

    def test_deleted_ledger_with_a_backup_is_an_error(self, tmp_path: Path) -> None:
        ledger = _ledger(tmp_path)
        _reserve(ledger, "run-a", 1)
        _reserve(ledger, "run-a", 2)
        (tmp_path / LEDGER_FILENAME).unlink()
        with pytest.raises(LedgerCorruptError, match="missing although its backup exists"):
            _ledger(tmp_path)


class TestValidation:
    def test_bad_policy(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError) as info:
            PrivacyLedger(tmp_path, site="", max_epsilon=-1.0, delta=2.0, accountant="nope")
        for word in ("site", "max_epsilon", "delta", "accountant"):
            assert word in str(info.value)

    def test_numpy_scalars_are_stored_as_plain_json(self, tmp_path: Path) -> None:
        ledger = _ledger(tmp_path)
        entry = _reserve(ledger, "run-a", np.int64(1), noise_multiplier=np.float32(1.0),
                         steps=np.int64(20), n_train=np.int64(1000))
        assert type(entry.steps) is int and type(entry.round) is int
        assert _ledger(tmp_path).contributions() == [entry]

    def test_bad_round(self, tmp_path: Path) -> None:
        ledger = _ledger(tmp_path)
        with pytest.raises(ValueError, match="sample_rate"):
            _reserve(ledger, "run-a", 1, sample_rate=1.5)
        with pytest.raises(ValueError, match="round must be"):
            _reserve(ledger, "run-a", -1)
        assert not (tmp_path / LEDGER_FILENAME).exists()


class TestPerPatientBudget:
    """Format 2: the budget belongs to patients, so no choice of split, seed, task or labels resets it."""

    def test_a_patient_in_two_training_sets_composes_both(self, tmp_path: Path) -> None:
        one_round = _epsilon_of_rounds(1)
        ledger = _ledger(tmp_path, max_epsilon=1.1 * one_round)
        _reserve(ledger, "run-a", 1, patients=["p1", "p2", "p3"])
        # Another run whose split (another seed, other labels) shares p3: p3 would pass the budget.
        with pytest.raises(BudgetExceeded):
            _reserve(ledger, "run-b", 1, fingerprint=OTHER_FP, patients=["p3", "p4"])
        # Patients nobody has trained on yet can still train.
        entry = _reserve(ledger, "run-c", 1, fingerprint=OTHER_FP, patients=["p4", "p5"])
        assert entry.epsilon_after == pytest.approx(one_round)
        assert ledger.spent_epsilon() == pytest.approx(one_round)

    def test_evaluation_charges_validation_patients_only(self, tmp_path: Path) -> None:
        ledger = _ledger(tmp_path)
        _reserve(ledger, "run-a", 1, patients=["t1", "t2"])
        _reserve(ledger, "run-a", 1, patients=["v1"], kind="evaluate", noise_multiplier=5.0, sample_rate=1.0, steps=1)
        groups = ledger.patient_epsilons()
        assert sorted(g["patients"] for g in groups) == [1, 2]
        train = next(g for g in groups if g["patients"] == 2)
        assert train["epsilon"] == pytest.approx(_epsilon_of_rounds(1)) and train["kinds"] == ["train"]

    def test_entries_of_a_format_1_ledger_count_against_everyone(self, tmp_path: Path) -> None:
        ledger = _ledger(tmp_path, max_epsilon=1.1 * _epsilon_of_rounds(1))
        _reserve(ledger, "old-run", 1)
        doc = json.loads((tmp_path / LEDGER_FILENAME).read_text())
        doc["version"] = 1
        for item in doc["contributions"]:
            del item["patient_set"], item["kind"], item["accountant"]
        doc.pop("patient_sets")
        (tmp_path / LEDGER_FILENAME).write_text(json.dumps(doc))
        (tmp_path / (LEDGER_FILENAME + ".bak")).write_text(json.dumps(doc))
        upgraded = _ledger(tmp_path, max_epsilon=1.1 * _epsilon_of_rounds(1))
        with pytest.raises(BudgetExceeded):  # a brand-new patient list is still charged for the old round
            _reserve(upgraded, "new-run", 1, fingerprint=OTHER_FP, patients=["q1"])
        assert upgraded.spent_epsilon() == pytest.approx(_epsilon_of_rounds(1))

    def test_pseudonyms_stay_in_the_ledger_file_only(self, tmp_path: Path) -> None:
        ledger = _ledger(tmp_path)
        _reserve(ledger, "run-a", 1, patients=["p-secret-1"])
        assert "p-secret-1" in (tmp_path / LEDGER_FILENAME).read_text()
        assert "p-secret-1" not in json.dumps(ledger.patient_epsilons()) + json.dumps(ledger.summary())
