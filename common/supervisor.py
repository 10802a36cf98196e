"""The supervisor loop that ``fl-server start`` and ``fl-client start`` share; SIGTERM and SIGINT for fl-sim.

Both run their children in the foreground (for systemd or a container) and watch them until told
to stop: SIGTERM and SIGINT only ask the loop to end (the caller then stops the children itself,
in order), a child that exits ends it too, and the children's logs are rotated by size meanwhile.

``fl-sim`` blocks on its children's output instead of polling, so there the two signals raise
:class:`StopSignal` (:func:`stop_signals_raise`): the ``finally`` blocks on the way out stop what
was started, and the command says how to go on instead of printing a traceback.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from common.processes import rotate_log

#: How often the loop looks at the children and the size of their logs (seconds).
POLL_SECONDS = 0.5


@contextmanager
def stop_requested() -> Iterator[Callable[[], bool]]:
    """While inside, SIGTERM and SIGINT set a flag instead of ending the process; yields the flag's check.

    The previous handlers are restored on the way out, so a signal during the caller's clean-up
    afterwards acts as it did before.
    """
    flag = threading.Event()

    def _stop(signum, frame):  # noqa: ANN001 - signal handler signature
        flag.set()

    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag.is_set
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class StopSignal(BaseException):
    """SIGTERM or SIGINT arrived inside :func:`stop_signals_raise`.

    A BaseException, as KeyboardInterrupt is: ``except Exception`` clauses let it pass, ``finally``
    blocks run.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(self.name)

    @property
    def exit_code(self) -> int:
        """The shell's convention for a command ended by a signal: 128 + its number (130 Ctrl-C, 143 SIGTERM)."""
        return 128 + self.signum


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While inside, the first SIGTERM or SIGINT raises :class:`StopSignal` in the main thread; later ones
    are ignored (a second Ctrl-C must not break off the clean-up the first one started).

    A SIGINT that the process inherited as ignored (a shell starts background jobs so) stays ignored:
    the terminal's Ctrl-C is not meant for such a job. The previous handlers come back on the way out.
    """
    raised = False

    def _raise(signum, frame):  # noqa: ANN001 - signal handler signature
        nonlocal raised
        if not raised:
            raised = True
            raise StopSignal(signum)

    old = {s: signal.signal(s, _raise) for s in (signal.SIGTERM, signal.SIGINT)
           if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def supervise(children: Mapping[str, subprocess.Popen], logs: Iterable[Path], stop: Callable[[], bool],
              interval: float = POLL_SECONDS) -> str | None:
    """Watch ``children`` until ``stop()`` is true (returns None) or one of them exits (returns its name).

    Children are checked in the mapping's order; between checks every file in ``logs`` is rotated
    by size (common/processes.py ``rotate_log``).
    """
    logs = list(logs)
    while not stop():
        for name, proc in children.items():
            if proc.poll() is not None:
                return name
        for path in logs:
            rotate_log(path)
        time.sleep(interval)
    return None
