"""UIDs that arrive in a file or from a DICOM peer, and the file names fl-predict derives from them.

A SOP Instance UID is a value the sender chose: ``../escaped``, an absolute path or
``1.2.3/../../x`` are all bytes a peer can put there. So no output path is ever built from one as
it arrived: a file key is either a UID that passes the DICOM rules (PS3.5 9.1: digits and dots,
components without a leading zero, at most 64 characters), which cannot name another folder, or
``sha256-`` and 24 hex digits of the input file's hash (an image without a valid UID, and PNG/JPEG
research images). A UID key never contains ``-``, so the two kinds never collide, and a second
image with a key already used in one run becomes ``<key>-2``, ``<key>-3``... instead of
overwriting the first one's results.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

MAX_UID_LENGTH = 64
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_HASH_KEY = re.compile(r"sha256-[0-9a-f]{24}")
_KEY = re.compile(r"(.*?)(-[1-9][0-9]{0,5})?")  # a key, then an optional -N of OutputNames


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is one DICOM UID: digits and dots, no empty or zero-led component, <= 64 characters."""
    return isinstance(value, str) and 0 < len(value) <= MAX_UID_LENGTH and _UID.fullmatch(value) is not None


def file_key(uid: object, path: Path) -> str:
    """The output file stem of one input: its UID when valid, else ``sha256-`` + 24 hex digits of the file."""
    if is_valid_uid(uid):
        return str(uid)
    with Path(path).open("rb") as fh:
        return "sha256-" + hashlib.file_digest(fh, "sha256").hexdigest()[:24]


def is_safe_key(key: str) -> bool:
    """True for a stem :func:`file_key` or :class:`OutputNames` can produce (and nothing else)."""
    match = _KEY.fullmatch(key)
    return match is not None and (is_valid_uid(match.group(1)) or _HASH_KEY.fullmatch(match.group(1)) is not None)


class OutputNames:
    """The keys one run has written under: a key used twice gets ``-2``, ``-3``... (issue: one UID, two images).

    Two input files with one SOP Instance UID are either copies or two different images a
    modality gave the same UID; either way the second must not overwrite the first one's results.
    """

    def __init__(self) -> None:
        self._first: dict[str, Path] = {}
        self._count: dict[str, int] = {}

    def claim(self, key: str, path: Path) -> tuple[str, Path | None]:
        """The key to write ``path``'s results under, and the earlier input that had ``key`` (None if none)."""
        if key not in self._first:
            self._first[key] = path
            self._count[key] = 1
            return key, None
        self._count[key] += 1
        return f"{key}-{self._count[key]}", self._first[key]
