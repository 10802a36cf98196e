"""The privacy ledger's file: one JSON document, its backup, a lock, and atomic, durable writes.

Deployment starts a new process per Flower message, so every read-modify-write holds an
exclusive ``fcntl.flock`` on ``privacy_ledger.json.lock``, and every write is atomic and durable
(common.files.atomic_write_durable: temp file, fsync, ``os.replace``, folder fsync), followed by
the same for the backup copy ``privacy_ledger.json.bak``. A damaged ledger is never reset: it
raises :class:`LedgerCorruptError` naming the backup.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from client.ledger_records import (
    ALL_PATIENTS,
    LEDGER_FILENAME,
    LEDGER_FORMAT,
    LEDGER_VERSION,
    READABLE_VERSIONS,
    Contribution,
    LedgerCorruptError,
)
from common.cache import atomic_write_durable


class LedgerFile:
    """``<state_dir>/privacy_ledger.json``, its ``.bak`` copy and its lock file."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.state_dir / LEDGER_FILENAME
        self.backup_path = self.path.with_name(LEDGER_FILENAME + ".bak")
        self.lock_path = self.path.with_name(LEDGER_FILENAME + ".lock")

    @contextmanager
    def locked(self, *, exclusive: bool) -> Iterator[None]:
        """Hold the ledger's advisory lock; released by the OS even if the process dies."""
        with open(self.lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def corrupt(self, reason: str) -> LedgerCorruptError:
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

    def read(self, empty: dict[str, Any]) -> dict[str, Any]:
        """The ledger document, validated; an empty one when no ledger exists yet."""
        if not self.path.exists():
            if self.backup_path.exists():
                raise self.corrupt(
                    "the file is missing although its backup exists (was it deleted?)"
                )
            return empty
        try:
            raw = json.loads(self.path.read_bytes())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self.corrupt(f"not valid JSON ({err})") from err
        try:
            return validate_document(raw)
        except ValueError as err:
            raise self.corrupt(str(err)) from err

    def write(self, doc: dict[str, Any]) -> None:
        """Atomically and durably replace the ledger, then its backup copy (``.bak``)."""
        data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
        validate_document(json.loads(data))  # never persist what could not be read back
        atomic_write_durable(self.path, data, mode=0o600)
        # The backup is a second copy of this last good state, written only once the ledger
        # itself is safely in place: if the ledger is later damaged (disk, editor), restoring
        # the backup loses no entry. A crash between the two writes leaves a valid ledger and
        # a backup one update behind, never the other way round.
        atomic_write_durable(self.backup_path, data, mode=0o600)


def validate_document(raw: object) -> dict[str, Any]:
    """The ledger document checked entry by entry; ValueError naming what is wrong."""
    if not isinstance(raw, dict):
        raise ValueError(f"top level is {type(raw).__name__}, expected an object")
    if raw.get("format") != LEDGER_FORMAT:
        raise ValueError(f"format is {raw.get('format')!r}, expected {LEDGER_FORMAT!r}")
    version = raw.get("version")
    if version not in READABLE_VERSIONS:
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
    sets = raw.setdefault("patient_sets", {})
    if not isinstance(sets, dict) or not all(isinstance(v, list) for v in sets.values()):
        raise ValueError("'patient_sets' must map set keys to lists of patient pseudonyms")
    for index, item in enumerate(raw["contributions"]):
        ref = item.get("patient_set", ALL_PATIENTS)
        if ref != ALL_PATIENTS and not ref.startswith("dataset:") and ref not in sets:
            raise ValueError(f"contribution #{index} names patient set {ref!r}, which is not in 'patient_sets'")
    raw["version"] = LEDGER_VERSION  # format-1 entries read as touching every patient (the default)
    return raw
