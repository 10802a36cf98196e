"""Anchoring an audit log: the head an operator keeps elsewhere, and what the command line tells them.

A hash chain (common/audit.py) shows any edit made without rewriting the lines after it, but a log
whose last lines were cut, or whose whole chain was recomputed after an edit, is a valid chain on
its own. Only a head hash recorded where the machine's administrators cannot write (the run's
ticket, an e-mail) catches that: ``verify(path, anchor=HEAD)`` fails unless the head is still in
the chain. So both audit commands, and every ``fl-server run``, print the head with this advice.
"""

from __future__ import annotations

from common.audit import VerifyReport

#: What `audit --help` says about anchoring (both CLIs), in one place.
ANCHOR_HELP = ("Without --anchor, a log whose last lines were cut, or whose whole chain was recomputed after an "
               "edit, still verifies. Every run of this command (and every `fl-server run`) prints the log's head "
               "hash: keep it where this machine's administrators cannot write (the run's ticket, an e-mail) and "
               "pass it as --anchor HASH later; the check then fails unless that head is still in the chain.")


def anchor_hint(report: VerifyReport, command: str) -> str:
    """One line naming the head to record and how to check against it later (``command``: e.g. ``fl-server audit``)."""
    return (f"head {report.head}: record it where this machine's administrators cannot write; "
            f"`{command} --verify --anchor {report.head}` later fails if lines after it were cut or the chain was "
            "recomputed")

