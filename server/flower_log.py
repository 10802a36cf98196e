"""A Flower run's log as the coordinator reads it: each record once.

The ServerApp's log reaches ``flwr log --stream`` (and ``flwr run --stream``) twice: once in
Flower's console form (``INFO :      message``, with colour codes) and once in its file form
(``12/07/2026 21:29:20:INFO:message``). ``fl-server run --follow`` printed both. :func:`once`
passes every line on except the second form of a record already shown in the other one; lines in
neither form (the CLI's own, a print) pass unchanged.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator

_LEVELS = "DEBUG|INFO|WARNING|ERROR|CRITICAL"
_CONSOLE = re.compile(rf"^(?:\x1b\[[0-9;]*m)?({_LEVELS})\s*(?:\x1b\[[0-9;]*m)?\s*:\s?(.*?)\s*$")
_FILE = re.compile(rf"^\d\d/\d\d/\d{{4}} \d\d:\d\d:\d\d:({_LEVELS}):(.*?)\s*$")
#: Records of one form still waiting for their twin; beyond this, the oldest are forgotten.
_PENDING_MAX = 256


def _record(line: str) -> tuple[str, tuple[str, str]] | None:
    """('console' | 'file', (level, message)) for a line in one of Flower's two forms, else None."""
    for form, pattern in (("file", _FILE), ("console", _CONSOLE)):
        m = pattern.match(line.rstrip("\n"))
        if m:
            return form, (m.group(1), m.group(2).strip())
    return None


def once(lines: Iterable[str]) -> Iterator[str]:
    """``lines`` without the twin of a record already passed on in Flower's other form."""
    pending: dict[str, Counter[tuple[str, str]]] = {"console": Counter(), "file": Counter()}
    for line in lines:
        parsed = _record(line)
        if parsed is None:
            yield line
            continue
        form, record = parsed
        other = pending["file" if form == "console" else "console"]
        if other[record]:
            other[record] -= 1  # its twin was shown: this one is the copy
            if not other[record]:
                del other[record]
            continue
        mine = pending[form]
        mine[record] += 1
        if sum(mine.values()) > _PENDING_MAX:
            mine.pop(next(iter(mine)))
        yield line
