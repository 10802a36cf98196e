"""Progress of a long step: a bar on a terminal, a line every few seconds in a log.

Making hospitals, decoding a site's images and computing its fixed features take minutes before
the first round; with output going to a file (a service's log, CI, ``make demo > log``) a run
said nothing for three minutes. :func:`progress` gives a tqdm bar when asked for one and stderr is
a terminal; otherwise, whatever was asked, a line on stderr every ``LINE_EVERY_S`` seconds once the
step has lasted that long (a quick step prints nothing), and one when it ends::

    progress: reading images 1200/3005 (40%), 10 s

The words ``progress:`` start the message, so that fl-sim can pass on the lines of the simulated
sites (which reach it through Flower's log stream) and leave out the rest.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

#: Seconds between two progress lines when stderr is not a terminal.
LINE_EVERY_S = 5.0
#: What every progress line starts with (fl-sim looks for it in the simulated sites' output).
PREFIX = "progress: "


class ProgressLines:
    """tqdm's ``update`` / ``close`` / ``write``, as a line every ``every`` seconds on ``stream``."""

    def __init__(self, total: int, desc: str, unit: str, *, every: float | None = None,
                 stream: TextIO | None = None) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.every = LINE_EVERY_S if every is None else every
        self.stream = stream
        self.n = 0
        self._started = self._last = time.monotonic()
        self._printed = False

    def _line(self, now: float) -> None:
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        print(f"{PREFIX}{self.desc} {self.n}/{self.total} {self.unit}{pct}, {now - self._started:.0f} s",
              file=self.stream or sys.stderr, flush=True)
        self._last, self._printed = now, True

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._line(now)

    def write(self, text: str) -> None:
        print(text, file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        """The last line (only when a line was printed already: a quick step stays silent)."""
        if self._printed:
            self._line(time.monotonic())
            self._printed = False

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, desc: str, unit: str = "img", *, bar: bool = False, leave: bool = True) -> Any:
    """A tqdm bar when ``bar`` and stderr is a terminal, else :class:`ProgressLines` (both: update/write/close)."""
    if bar and sys.stderr.isatty():
        from tqdm import tqdm  # deferred: only a terminal needs it

        return tqdm(total=total, desc=desc, unit=unit, leave=leave)
    return ProgressLines(total, desc, unit)
