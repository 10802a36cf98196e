"""Coordinator bookkeeping: a killed SuperLink (even not yet reaped) does not block a restart."""

from __future__ import annotations

import json
import subprocess
import time

from server.coordinator import Layout, _alive, running_state


def test_killed_process_counts_as_gone_even_as_zombie():
    proc = subprocess.Popen(["sleep", "30"])
    assert _alive(proc.pid)
    proc.kill()
    time.sleep(0.3)  # killed, not yet reaped: a zombie
    assert not _alive(proc.pid)
    proc.wait()


def test_running_state_ignores_a_dead_superlink(tmp_path):
    proc = subprocess.Popen(["sleep", "30"])
    layout = Layout(tmp_path)
    layout.state_file.write_text(json.dumps({"superlink_pid": proc.pid, "supervisor_pid": proc.pid}))
    assert running_state(layout) is not None
    proc.kill()
    proc.wait()
    assert running_state(layout) is None
