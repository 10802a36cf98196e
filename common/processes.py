"""Starting and stopping the Flower processes fedxray runs, the same way everywhere.

fl-sim, fl-server and fl-client all start Flower executables (SuperLink, SuperNode, `flwr`).
Each must run offline (no telemetry, no update check, no runtime dependency installation),
with passive OpenMP threads (spinning threads made training 5-20x slower on 2 cores), and must
be stopped as a whole process group so that no child outlives the command that started it.

Also here, because every supervisor needs them the same way:

- :func:`process_alive` counts a killed process that nobody reaped yet (a zombie) as gone. Where
  the init process does not reap orphans (some container and microVM inits), a plain
  ``os.kill(pid, 0)`` check would wait forever for a parent that died long ago.
- :func:`watch_parent`: a launcher (SuperNode, bundle launcher) ends itself when the process that
  started it is gone, so a ``kill -9`` of ``fl-client start`` does not leave a SuperNode behind.
- :func:`rotate_log`: the supervisors' logs are the children's stdout, opened in append mode;
  they are rotated by size with copy-and-truncate (what logrotate calls ``copytruncate``), the
  one way that works while the child keeps its file descriptor.
- :func:`write_local_secret`: a fresh random shared secret per start, mode 0600, for the local
  APIs that Flower can authenticate (docs/operations.md, "Local users on the same host").
- :func:`processes_with_env`, :func:`with_descendants`, :func:`stop_processes`: the processes of
  one job found by a marker in their environment (wherever they were re-parented) and by descent,
  and stopped all at once: Flower starts its SuperExec in a session of its own, so process groups
  do not reach it (simulations/run_guard.py).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

#: Size-based log rotation of the files fedxray opens: keep the live file plus 5 rotated ones of ~10 MB.
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5


def offline_env(flwr_home: Path | None = None) -> dict[str, str]:
    """Environment for every Flower process fedxray starts: telemetry and update checks off, offline."""
    env = os.environ.copy()
    env.update({
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_WAIT_POLICY": env.get("OMP_WAIT_POLICY", "PASSIVE"),
    })
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def free_port() -> int:
    """A TCP port nobody listens on right now (loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def wait_http(url: str, proc: subprocess.Popen | None, timeout: float, what: str, log_path: Path,
              context: ssl.SSLContext | None = None) -> None:
    """Wait until ``url`` answers (any HTTP status counts), or raise RuntimeError naming the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=0.5, context=context):  # noqa: S310 - our own loopback URL
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{what} did not start within {timeout:.0f} s; see {log_path}")


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a killed process not yet reaped (a zombie) counts as gone."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    except OSError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True  # no /proc (not Linux): os.kill said it exists


def process_table() -> dict[int, tuple[int, str, int]]:
    """pid -> (parent pid, state letter, start time in clock ticks) of every process, from /proc (empty without it)."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(entry.name)] = (int(fields[1]), fields[0], int(fields[19]))
    return table


def processes_with_env(name: str, value: str) -> set[int]:
    """Live (non-zombie) processes of this user whose environment holds ``name=value`` (inherited from their
    starter): how the processes of one job are found after their parents died and they were re-parented."""
    wanted = f"{name}={value}".encode()
    found = set()
    for pid, (_, state, _) in process_table().items():
        if pid == os.getpid() or state in ("Z", "X"):
            continue
        try:
            if wanted in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0"):
                found.add(pid)
        except OSError:  # gone, or another user's
            continue
    return found


def with_descendants(roots: set[int]) -> dict[int, int]:
    """``roots`` and every live descendant of them, as pid -> start time (to tell a reused pid apart)."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, [pid for pid in roots if pid in table]
    while todo:
        pid = todo.pop()
        if pid in found or pid == os.getpid() or table[pid][1] in ("Z", "X"):
            continue
        found[pid] = table[pid][2]
        todo.extend(children.get(pid, []))
    return found


def stop_processes(processes: dict[int, int], grace: float = 5.0) -> list[int]:
    """SIGTERM every process of ``processes`` (pid -> start time) at once, SIGKILL those still running after
    ``grace`` seconds; returns the pids still running after that (normally none). Zombies count as gone: their
    parents reap them (a Popen's owner, with its wait)."""

    def running() -> list[int]:
        table = process_table()
        return [pid for pid, started in processes.items()
                if pid in table and table[pid][2] == started and table[pid][1] not in ("Z", "X")]

    deadline = time.monotonic() + grace
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in running():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        while running() and time.monotonic() < deadline:
            time.sleep(0.1)
        deadline = time.monotonic() + 2.0
    return running()


def child_pids(pid: int) -> set[int]:
    """Live (non-zombie) direct children of ``pid``, read from /proc; empty where /proc is absent."""
    children = set()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            children.add(int(entry.name))
    return children


def watch_parent(parent_pid: int, on_gone: Callable[[], None], interval: float = 0.5) -> threading.Thread:
    """Call ``on_gone`` (once, from a daemon thread) as soon as ``parent_pid`` has exited.

    Flower's own ``--parent-pid`` monitor takes a zombie for a live process, so a launcher whose
    parent was killed and never reaped would live on; this one does not.
    """

    def watch() -> None:
        while process_alive(parent_pid):
            time.sleep(interval)
        on_gone()

    thread = threading.Thread(target=watch, name=f"watch-parent-{parent_pid}", daemon=True)
    thread.start()
    return thread


def rotate_log(path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> bool:
    """Rotate ``path`` when it is over ``max_bytes``: path.1 .. path.<backups>, oldest dropped.

    Copy, then truncate in place: the writer (a child process or nginx) keeps appending to the same
    file descriptor, which must be open in append mode (``open(path, "ab")``), so its next line
    lands at the start of the emptied file. Lines written between the copy and the truncation are
    lost (at most a few, checked twice a second). Returns True when it rotated.
    """
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except OSError:
        return False
    for i in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
    shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    os.chmod(path.with_name(f"{path.name}.1"), path.stat().st_mode & 0o777)
    with open(path, "r+b") as fh:
        fh.truncate(0)
    return True


def write_local_secret(path: Path) -> Path:
    """A fresh random secret (64 hex characters) in ``path``, mode 0600 from creation on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(secrets.token_hex(32).encode())
    os.replace(tmp, path)
    return path
