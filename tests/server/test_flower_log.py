"""server/flower_log.py: a Flower run's log, each record once (fl-server run --follow printed every line twice)."""

from __future__ import annotations

from server.flower_log import once

# As `flwr log --stream` gives a ServerApp's records: console form (with colour codes), then file form.
STREAM = [
    "\x1b[92mINFO \x1b[0m:      Starting logstream for run_id `42`\n",
    "\x1b[92mINFO \x1b[0m:      [ROUND 1/2]\n",
    "12/07/2026 21:29:20:INFO:[ROUND 1/2]\n",
    "\x1b[92mINFO \x1b[0m:      \n",
    "12/07/2026 21:29:20:INFO:\n",
    "\x1b[92mINFO \x1b[0m:      \n",  # a second empty record: its own twin follows, not a copy of the first
    "12/07/2026 21:29:20:INFO:\n",
    "\x1b[93mWARNING \x1b[0m:   exported model: not for use on patients\n",
    "12/07/2026 21:29:21:WARNING:exported model: not for use on patients\n",
    "12/07/2026 21:29:22:DEBUG:Constructed ActorPool with: 2 actors\n",  # only in the file form: kept
    "Successfully started run 42\n",
    "\x1b[36m(ClientAppActor pid=7)\x1b[0m progress: reading images 10/30 file (33%), 5 s\n",
]


def test_each_record_once_whatever_its_form() -> None:
    shown = list(once(STREAM))
    assert sum("[ROUND 1/2]" in line for line in shown) == 1
    assert sum("not for use on patients" in line for line in shown) == 1
    assert sum(line.endswith(":      \n") for line in shown) == 2  # two empty records, each once
    assert not any(line.startswith("12/07/2026 21:29:20") for line in shown)
    for kept in (STREAM[0], STREAM[9], STREAM[10], STREAM[11]):
        assert kept in shown


def test_a_record_repeated_by_the_app_stays_repeated() -> None:
    twice = ["\x1b[92mINFO \x1b[0m:      waiting\n", "12/07/2026 21:29:20:INFO:waiting\n"] * 2
    assert list(once(twice)) == [twice[0], twice[0]]
    assert list(once(["12/07/2026 21:29:20:INFO:file first\n", "\x1b[92mINFO \x1b[0m:      file first\n"])) == [
        "12/07/2026 21:29:20:INFO:file first\n"]
