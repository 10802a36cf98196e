"""The audit log: an append-only, hash-chained record of who did what, when, at a coordinator or a site.

Both sides use this one format: the coordinator's ``<federation dir>/audit.log`` (admissions,
removals, runs launched, resumed, stopped, bundles published; server/audit.py) and each
hospital's ``<state-dir>/audit.log`` (bundles approved and revoked, rounds trained with the
epsilon charged, rounds refused, evaluations answered).

One event per line, one JSON object::

    {"details":{...},"event":"site-admitted","prev_hash":"<64 hex>","seq":7,"time":"2026-11-30T16:49:15.123+00:00",
     "who":"alice","hash":"<64 hex>"}

``hash`` is the sha256 of the line's exact bytes up to (not including) ``,"hash":`` plus the closing
``}``: the canonical JSON of the other fields (sorted keys, no spaces, ASCII), which include
``prev_hash``, the hash of the line before (64 zeros for the first line), and ``seq``, the line's
number. So editing any byte of a line breaks its own hash, and deleting, inserting or reordering
lines breaks the chain at the first line that no longer follows its predecessor:
:func:`verify` names that line.

What a hash chain proves, and what it does not. Anyone who can write the file can also recompute
every hash after an edit, so the chain detects accidental damage and edits made without rewriting
the rest, and makes a rewrite a deliberate act. To make it evidence against whoever administers the
machine, keep the head hash (``fl-server audit`` / ``fl-client audit`` print it) where they cannot
write, e.g. in the run's ticket; ``verify(path, anchor=HASH)`` then also fails when lines after
that head were removed (removing lines from the end leaves a chain that is valid on its own).

Crash safety (the shape of client/ledger.py): a writer holds an exclusive ``flock`` on the log
itself (several processes append: deployment starts one per Flower message), writes each line
with one ``write`` on an ``O_APPEND`` descriptor and ``fsync``s before returning. A crash mid-write
leaves a torn last line without its newline; :func:`verify` reports it (and fails) and it is never
dropped: the next :func:`record` ends it with a newline and appends a ``torn-line`` event naming
its length and sha256, chained to the last whole line, after which :func:`verify` passes and
lists the torn line as a warning.

Nothing that identifies a patient goes in: details are counts, names of sites and runs, hashes and
epsilons. :func:`record` refuses any absolute file path in the details (paths can name patients),
and error messages from here never quote a detail's value.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("fedxray.audit")

#: The log's file name in a federation folder or a site state dir.
LOG_NAME = "audit.log"
#: ``prev_hash`` of the first line.
GENESIS = "0" * 64
#: The event a writer appends after ending a torn line, so the crash is on the record.
TORN_EVENT = "torn-line"

_EVENT = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
_HASH = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = re.compile(rb',"hash":"([0-9a-f]{64})"\}$')
_WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]")
_TAIL_CHUNK = 1 << 16
_FIELDS = ("details", "event", "prev_hash", "seq", "time", "who")


class AuditError(ValueError):
    """An event that cannot be recorded (bad event name or details, unwritable or damaged log); the message says the fix."""


def audit_path(folder: str | os.PathLike[str]) -> Path:
    """The audit log of a federation folder or a site state dir."""
    return Path(folder) / LOG_NAME


def current_user() -> str:
    """The OS account acting: the effective user (not an environment variable anyone can set), and who ran sudo."""
    try:
        import pwd

        name = pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):  # no passwd entry (some containers)
        try:
            name = getpass.getuser()
        except (KeyError, OSError):
            name = f"uid:{os.geteuid()}"
    sudo = os.environ.get("SUDO_USER")
    return f"{name} (sudo by {sudo})" if sudo and sudo != name else name


# ----------------------------------------------------------------------------- writing


def _check_details(value: Any, where: str) -> None:
    """Details are plain JSON and hold no file path: a path may name a patient (folder or file names)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditError(f"audit detail {where}: keys must be strings")
            _check_details(item, f"{where}.{key}" if where else key)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_details(item, f"{where}[{i}]")
    elif isinstance(value, str):
        if value.startswith(("/", "~")) or _WINDOWS_PATH.match(value):
            raise AuditError(f"audit detail {where} is a file path: the audit log records no paths (they can name "
                             "patients); record a name, a count or a hash instead")
    elif value is not None and not isinstance(value, (bool, int, float)):
        raise AuditError(f"audit detail {where} is a {type(value).__name__}: give JSON values (str, number, bool, "
                         "null, list, dict)")


def _plain(value: Any) -> Any:
    """Numpy scalars become Python numbers; NaN and infinities (not measured) become null: the log is strict JSON."""
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _body(entry: dict[str, Any]) -> bytes:
    """The canonical bytes the hash covers: every field but ``hash``, sorted keys, no spaces, ASCII."""
    return json.dumps({k: entry[k] for k in _FIELDS}, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def _line(entry: dict[str, Any]) -> tuple[bytes, str]:
    """(the line as written, with its newline; its hash)."""
    body = _body(entry)
    digest = hashlib.sha256(body).hexdigest()
    return body[:-1] + b',"hash":"' + digest.encode() + b'"}\n', digest


def _parse(raw: bytes) -> dict[str, Any] | None:
    """An intact entry from one line (without its newline), or None: not an entry, or its hash does not match."""
    match = _SUFFIX.search(raw)
    if match is None:
        return None
    body = raw[: match.start()] + b"}"
    if hashlib.sha256(body).hexdigest() != match.group(1).decode():
        return None
    try:
        entry = json.loads(body)
    except ValueError:
        return None
    if not isinstance(entry, dict) or set(entry) != set(_FIELDS):
        return None
    if not isinstance(entry["seq"], int) or not isinstance(entry["prev_hash"], str):
        return None
    entry["hash"] = match.group(1).decode()
    return entry


def _last_lines(fd: int, size: int) -> tuple[bytes | None, bytes]:
    """(the last whole line without its newline, or None; the bytes after the last newline: a torn write, or b"")."""
    end, data = size, b""
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        data = os.pread(fd, end - start, start) + data
        end = start
        newlines = data.count(b"\n")
        tail_start = data.rfind(b"\n") + 1
        if newlines >= 2 or (newlines == 1 and end == 0):
            prev_nl = data.rfind(b"\n", 0, tail_start - 1)
            return data[prev_nl + 1: tail_start - 1], data[tail_start:]
    return None, data  # no newline at all: only a torn first line


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def record(path: str | os.PathLike[str], event: str, /, **details: Any) -> dict[str, Any]:
    """Append one event to the audit log at ``path`` (made, 0600, if absent) and return the entry written.

    Durable when it returns (fsync). Safe with concurrent writers in other processes (an exclusive
    ``flock`` on the log). Non-finite numbers are recorded as null (not measured). Raises
    AuditError when the event name or the details are refused, when
    the log cannot be written, or when its last whole line is damaged (new events are not chained
    to a line that fails verification: the message says to verify the log and move it aside).
    """
    if not isinstance(event, str) or not _EVENT.match(event):
        raise AuditError(f"audit event {event!r} is not a name: use lowercase letters, digits and '-' (e.g. site-admitted)")
    if event == TORN_EVENT:
        raise AuditError(f"audit event {TORN_EVENT!r} is written by the log itself after a crash; choose another name")
    details = _plain(details)
    _check_details(details, "")
    path = Path(path)
    created = not path.exists()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        raise AuditError(f"cannot open the audit log {path}: {err.strerror}; check that the folder exists and that "
                         f"{current_user()} may write it") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if created:
            os.fchmod(fd, 0o600)
        size = os.fstat(fd).st_size
        last, torn = _last_lines(fd, size) if size else (None, b"")
        if torn:
            whole = _parse(torn)
            if whole is not None:  # the crash came between the line and its newline: the line is complete
                last, torn = torn, b""
        prev = _parse(last) if last is not None else None
        if last is not None and prev is None:
            raise AuditError(f"the audit log {path} is damaged at its last whole line, so a new event cannot be chained "
                             f"to it: run `audit --verify` to see where, keep the file as evidence and move it aside to "
                             "start a new log")
        prev_hash, seq = (prev["hash"], prev["seq"]) if prev else (GENESIS, 0)
        out = bytearray(b"\n") if size and not _ends_with_newline(fd, size) else bytearray()
        if torn:
            # Every line takes a number, the torn one too: it is line seq+1, this event seq+2, the new one seq+3.
            entry = _entry(TORN_EVENT, {"line": seq + 1, "bytes": len(torn), "sha256": hashlib.sha256(torn).hexdigest()},
                           seq + 2, prev_hash)
            line, prev_hash = _line(entry)
            out += line
            seq += 3
            log.warning("audit log %s: line %d was torn by a crash (%d bytes); recorded as a %s event", path,
                        entry["details"]["line"], len(torn), TORN_EVENT)
        else:
            seq += 1
        entry = _entry(event, details, seq, prev_hash)
        line, digest = _line(entry)
        out += line
        os.write(fd, bytes(out))
        os.fsync(fd)
    except OSError as err:
        raise AuditError(f"cannot write the audit log {path}: {err.strerror}; free disk space or fix its "
                         "permissions, then repeat the action or note it by hand") from None
    finally:
        os.close(fd)
    if created:
        _fsync_dir(path.parent)
    entry["hash"] = digest
    return entry


def _ends_with_newline(fd: int, size: int) -> bool:
    return os.pread(fd, 1, size - 1) == b"\n"


def _entry(event: str, details: dict[str, Any], seq: int, prev_hash: str) -> dict[str, Any]:
    return {"seq": seq, "time": datetime.now(UTC).isoformat(timespec="milliseconds"), "who": current_user(),
            "event": event, "details": details, "prev_hash": prev_hash}


def try_record(path: str | os.PathLike[str], event: str, /, **details: Any) -> str | None:
    """:func:`record`, for callers whose own work must go on: None when written, else the one-line reason (also logged)."""
    try:
        record(path, event, **details)
    except AuditError as err:
        log.warning("audit: %s not recorded: %s", event, err)
        return str(err)
    return None


# ----------------------------------------------------------------------------- reading and verifying


@dataclass(frozen=True)
class VerifyReport:
    """The result of :func:`verify`. ``bad_line`` and ``problem`` name the first line that breaks the chain."""

    path: str
    ok: bool
    events: int  # intact events read (up to the first bad line)
    head: str  # hash of the last intact event: record it elsewhere to anchor the chain
    bad_line: int | None = None  # 1-based line number
    problem: str | None = None
    torn: tuple[int, ...] = field(default_factory=tuple)  # lines torn by a crash and sealed by a torn-line event
    anchored: bool = False  # checked against a head recorded earlier (else a cut tail would pass too)

    def summary(self) -> str:
        """One line for the operator: what holds, or the first bad line, what it means and what to do."""
        if self.ok:
            note = f"; line(s) {', '.join(map(str, self.torn))} torn by a crash and sealed" if self.torn else ""
            note += ("; anchored" if self.anchored else "; not anchored: lines cut from its end or a recomputed chain "
                     "would pass too, so record the head and check with --anchor HEAD")
            return f"audit log {self.path}: intact, {self.events} event(s), head {self.head}{note}"
        where = f"line {self.bad_line}: " if self.bad_line else ""
        return f"audit log {self.path}: NOT intact: {where}{self.problem}"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "torn": list(self.torn)}


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(1-based line number, bytes without newline, ended by a newline) under a shared lock (no half-written line)."""
    with open(path, "rb") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
        try:
            for number, raw in enumerate(fh, start=1):
                ended = raw.endswith(b"\n")
                yield number, raw[:-1] if ended else raw, ended
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


_TAMPER_FIX = "keep the file as evidence, restore the log from a backup and find out who changed it"
_ALTERED = f"altered: it is not an intact audit entry (its content does not match its hash); {_TAMPER_FIX}"


def verify(path: str | os.PathLike[str], *, anchor: str | None = None) -> VerifyReport:
    """Check every line's hash and the chain; the first line that fails is named, with what it means.

    ``anchor``: a head hash recorded earlier; the chain must still contain it (lines removed from
    the end are otherwise undetectable). A torn last line fails (the log is incomplete); a torn line
    sealed by the ``torn-line`` event after it is a warning (``torn``), not a failure.
    """
    path = Path(path)
    if anchor is not None and not _HASH.match(anchor.strip().lower()):
        raise AuditError(f"anchor {anchor!r} is not a head hash: give the 64 hex characters `audit` printed")
    if not path.is_file():
        return VerifyReport(str(path), False, 0, GENESIS, None,
                            f"no audit log at {path}: it is written by every recorded action; if it was deleted, restore it "
                            "from a backup")
    prev_hash, seq, events = GENESIS, 0, 0
    torn: list[int] = []
    pending_torn: tuple[int, bytes] | None = None
    seen_anchor = anchor is None
    anchor = anchor.strip().lower() if anchor else None

    def fail(line: int, problem: str) -> VerifyReport:
        return VerifyReport(str(path), False, events, prev_hash, line, problem, tuple(torn))

    try:
        lines = list(_raw_lines(path))
    except OSError as err:
        return VerifyReport(str(path), False, 0, GENESIS, None, f"cannot read it: {err.strerror}")
    for number, raw, ended in lines:
        entry = _parse(raw)
        if entry is None:
            if not ended:
                return fail(number, f"incomplete ({len(raw)} bytes, no end of line): a write was cut off by a crash, "
                                    "or the file was truncated; the next recorded event seals it (if no crash happened "
                                    f"here, {_TAMPER_FIX})")
            if pending_torn is None:
                pending_torn = (number, raw)  # a torn write if the torn-line event sealing it follows
                continue
            return fail(pending_torn[0], _ALTERED)
        if pending_torn is not None:
            torn_number, torn_raw = pending_torn
            details = entry["details"] if isinstance(entry["details"], dict) else {}
            if (entry["event"] != TORN_EVENT or details.get("sha256") != hashlib.sha256(torn_raw).hexdigest()
                    or details.get("line") != torn_number):
                return fail(torn_number, _ALTERED)
            torn.append(torn_number)
            pending_torn = None
            seq += 1  # the torn line takes a number in the sequence
        if entry["prev_hash"] != prev_hash or entry["seq"] != seq + 1:
            if entry["seq"] > seq + 1:
                what = f"event(s) {seq + 1}..{entry['seq'] - 1} are missing: line(s) deleted before it"
            elif entry["seq"] <= seq:
                what = f"it is event {entry['seq']}, which came earlier: lines were reordered or copied"
            else:
                what = "it does not follow the line before (a line was replaced or inserted)"
            return fail(number, f"breaks the chain: {what}; {_TAMPER_FIX}")
        prev_hash, seq = entry["hash"], entry["seq"]
        events += 1
        seen_anchor = seen_anchor or prev_hash == anchor
    if pending_torn is not None:
        return fail(pending_torn[0], _ALTERED)
    if not seen_anchor:
        return VerifyReport(str(path), False, events, prev_hash, None,
                            f"the recorded head {anchor} is not in the chain: lines were removed from its end, or the log "
                            f"was replaced; {_TAMPER_FIX}", tuple(torn))
    return VerifyReport(str(path), True, events, prev_hash, None, None, tuple(torn), anchored=anchor is not None)


def read_entries(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every intact entry, in file order (empty if there is no log); :func:`verify` says whether the chain holds."""
    path = Path(path)
    if not path.is_file():
        return []
    return [entry for _, raw, _ in _raw_lines(path) if (entry := _parse(raw)) is not None]


def render_entry(entry: dict[str, Any]) -> str:
    """One line for a terminal: seq, time, who, event, details as key=value."""
    details = " ".join(f"{k}={json.dumps(v, separators=(',', ':')) if not isinstance(v, str) else v}"
                       for k, v in sorted(entry.get("details", {}).items()))
    return f"{entry['seq']:>5}  {entry['time']}  {entry['who']:<12} {entry['event']:<22} {details}".rstrip()
