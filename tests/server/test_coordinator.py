"""Coordinator bookkeeping: a killed SuperLink (even not yet reaped) does not block a restart."""

from __future__ import annotations

import json
import subprocess
import time

from common.processes import process_alive
from server.layout import Layout, running_state


def test_killed_process_counts_as_gone_even_as_zombie():
    proc = subprocess.Popen(["sleep", "30"])
    assert process_alive(proc.pid)
    proc.kill()
    time.sleep(0.3)  # killed, not yet reaped: a zombie
    assert not process_alive(proc.pid)
    proc.wait()


def test_running_state_ignores_a_dead_superlink(tmp_path):
    proc = subprocess.Popen(["sleep", "30"])
    layout = Layout(tmp_path)
    layout.state_file.write_text(json.dumps({"superlink_pid": proc.pid, "supervisor_pid": proc.pid}))
    assert running_state(layout) is not None
    proc.kill()
    proc.wait()
    assert running_state(layout) is None


def test_make_private_tightens_an_older_federation(tmp_path):
    """Issue 10 row 9: superlink.db was 0644 and its folder world-readable."""
    import stat

    from server.layout import make_private

    layout = Layout(tmp_path)
    layout.state_db.parent.mkdir(mode=0o755)
    for suffix in ("", "-wal", "-shm"):
        path = layout.state_db.with_name(layout.state_db.name + suffix)
        path.write_bytes(b"x")
        path.chmod(0o644)
    make_private(layout)
    for folder in (layout.state_db.parent, layout.logs, layout.runs, layout.flwr_home):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    for path in layout.state_db.parent.glob("superlink.db*"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_logs_are_rotated_while_the_writer_keeps_its_file(tmp_path):
    """Issue 10 row 10: the coordinator's logs grew without bound. A child appends, as the SuperLink does."""
    import sys

    from common.processes import LOG_BACKUPS, rotate_log

    log = Layout(tmp_path).logs / "superlink.log"
    log.parent.mkdir()
    writer = ("import sys, time\nfor i in range(int(sys.argv[1])):\n"
              "    sys.stdout.write(f'line {i:08d} ' + 'x' * 1000 + '\\n'); sys.stdout.flush()\n")
    max_bytes = 100_000
    for _ in range(LOG_BACKUPS + 2):
        with open(log, "ab") as fh:  # how fl-server start opens it
            subprocess.run([sys.executable, "-c", writer, "150"], stdout=fh, check=True)
        assert rotate_log(log, max_bytes=max_bytes)
        assert log.stat().st_size == 0
    backups = sorted(log.parent.glob("superlink.log.*"))
    assert [p.name for p in backups] == [f"superlink.log.{i}" for i in range(1, LOG_BACKUPS + 1)]
    assert all(p.stat().st_size > max_bytes for p in backups)
    assert not rotate_log(log, max_bytes=max_bytes)  # small: left alone

    # A writer that keeps its descriptor across the rotation (the SuperLink does) lands at the start of the file.
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-c", "import sys, time\nfor i in range(2):\n"
                                 "    print('x' * 200000 if i == 0 else 'after', flush=True); time.sleep(1.5)\n"],
                                stdout=fh)
    time.sleep(0.8)
    assert rotate_log(log, max_bytes=max_bytes)
    proc.wait(timeout=10)
    assert log.read_text() == "after\n"
