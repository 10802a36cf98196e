"""Values a DICOM peer sent, made safe for a log line.

A SOP Instance UID, an AE title or a Modality is whatever the sender wrote: a CR or LF in one would
start a forged line in the service's log (``...\\nERROR forwarding ... failed``), a 10 kB value
would drown it. :func:`loggable` is applied to every received value a log line quotes: control
characters become ``\\xNN`` / ``\\n`` escapes and the value is cut at ``limit`` characters.
:class:`OneLineRecords` guards the whole message once more, for values that reach a log line
through an exception text or a library (pynetdicom logs AE titles it was sent).
"""

from __future__ import annotations

import logging

DEFAULT_LIMIT = 64  # a UID has at most 64 characters, an AE title 16


def loggable(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """``value`` as one printable line of at most ``limit`` characters (plus "..." when cut)."""
    text = "" if value is None else str(value)
    cut = len(text) > limit
    text = text[:limit]
    return _escape(text) + ("..." if cut else "")


class OneLineRecords(logging.Filter):
    """A handler filter: a record's message becomes one line (CR, LF and other control characters escaped).

    The traceback of ``logger.exception`` is kept as it is: it is not received text and reads
    better on several lines.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.isprintable():
            record.msg = _escape(message)
            record.args = None
        return True


def _escape(text: str) -> str:
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
