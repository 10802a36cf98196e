"""One fl-sim at a time in a simulation folder, and every process of a run stopped with it.

A simulated run trains in processes that fl-sim does not start itself: its SuperLink starts
Flower's SuperExec in a session of its own, which starts ``flwr-simulation``, which starts a
private Ray cluster (gcs_server, raylet, the site actors, Ray's agents). Stopping fl-sim's own
children (their process groups) left all of these running: they kept training, charged the
sites' ledgers and exported a model a minute and a half later, and a ``fl-sim resume`` started
meanwhile trained the same rounds a second time (a site's epsilon past its target). So:

- every process started for a simulation folder carries ``FEDXRAY_SIM_RUN=<the folder's marker>``
  in its environment, which Flower and Ray pass on to what they start; :func:`stop_run_processes`
  finds them wherever they were re-parented, with their descendants (Ray's agents are started
  with an environment of their own), and stops them all at once;
- :class:`RunLock`: ``fl-sim.lock`` in the folder is locked (``flock``) while an fl-sim works there,
  and taking it fails while another fl-sim holds it or a marked process still runs (an orphan of
  an fl-sim killed with SIGKILL). The kernel drops the lock with its holder, so a crash leaves no
  stale lock behind;
- :func:`finished`: a run whose model was exported is not resumed (that registered a second model
  version and overwrote the run's log).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from types import TracebackType

from common.processes import process_alive, processes_with_env, stop_processes, with_descendants

#: The environment variable that marks every process started for one simulation folder.
MARK_ENV = "FEDXRAY_SIM_RUN"
LOCK_FILE = "fl-sim.lock"
#: Seconds the run's processes get to exit after SIGTERM before SIGKILL.
STOP_GRACE_S = 5.0


class SimulationBusyError(RuntimeError):
    """Another fl-sim, or processes of an earlier one, still work in this simulation folder."""


def run_marker(sim_root: Path) -> str:
    """The value of ``FEDXRAY_SIM_RUN`` for a simulation folder (a hash of its absolute path)."""
    return hashlib.sha256(str(Path(sim_root).resolve()).encode()).hexdigest()[:16]


def run_processes(sim_root: Path) -> dict[int, int]:
    """Running processes of the simulation in ``sim_root`` (marked ones and their descendants): pid -> start time."""
    return with_descendants(processes_with_env(MARK_ENV, run_marker(sim_root)))


def stop_run_processes(sim_root: Path, grace: float = STOP_GRACE_S) -> list[int]:
    """Stop every process of the simulation in ``sim_root``: SIGTERM, SIGKILL after ``grace`` s; returns survivors."""
    return stop_processes(run_processes(sim_root), grace)


def describe(pids: list[int] | dict[int, int], most: int = 4) -> str:
    """'123 (flwr-simulation), 456 (raylet), ... and 3 more' for a message."""
    names = []
    for pid in sorted(pids)[:most]:
        try:
            argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            argv = [b""]
        words = [a.decode(errors="replace") for a in argv if a and not a.startswith(b"-")]
        script = next((w for w in words[1:] if "/" in w and not w.endswith("python")), None) if words else None
        name = Path(script or (words[0] if words else "?")).name
        names.append(f"{pid} ({name})")
    more = f" and {len(pids) - most} more" if len(pids) > most else ""
    return ", ".join(names) + more


def finished(run_dir: Path) -> bool:
    """True once the run's model was exported (``metrics.json`` holds the export's record)."""
    try:
        return "export" in json.loads((Path(run_dir) / "metrics.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def last_checkpoint(run_dir: Path) -> int | None:
    """The last round checkpointed under ``run_dir/checkpoints`` (from the file names), or None."""
    rounds = [int(p.stem.split("-")[1]) for p in (Path(run_dir) / "checkpoints").glob("round-[0-9]*.pt")
              if p.stem.split("-")[1].isdigit()]
    return max(rounds, default=None)


def lock_holder(sim_root: Path) -> int | None:
    """The pid of the fl-sim that holds the folder's lock now, or None when nobody does."""
    path = Path(sim_root) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return -1
    finally:
        os.close(fd)  # closing drops a lock taken just now
    return None


class RunLock:
    """Held while an fl-sim works in ``sim_root``; on the way out (an end, an error, a signal) every process
    of the run is stopped. Raises :class:`SimulationBusyError` when the folder is busy."""

    def __init__(self, sim_root: Path) -> None:
        self.sim_root = Path(sim_root).resolve()
        self._fd: int | None = None
        self._previous_mark: str | None = None

    def __enter__(self) -> RunLock:
        self.sim_root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.sim_root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = lock_holder(self.sim_root)
            raise SimulationBusyError(
                f"{self.sim_root} is in use by a running fl-sim (pid {holder}): let it finish, or stop it with "
                f"`fl-sim stop {self.sim_root}` (Ctrl-C in its terminal does the same)") from None
        left = run_processes(self.sim_root)
        if left:
            os.close(fd)
            raise SimulationBusyError(
                f"processes of an earlier fl-sim in {self.sim_root} still run ({describe(left)}): stop them with "
                f"`fl-sim stop {self.sim_root}`, then try again")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        self._previous_mark = os.environ.get(MARK_ENV)
        os.environ[MARK_ENV] = run_marker(self.sim_root)  # inherited by everything started from here on
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            stop_run_processes(self.sim_root)
        finally:
            if self._previous_mark is None:
                os.environ.pop(MARK_ENV, None)
            else:
                os.environ[MARK_ENV] = self._previous_mark
            if self._fd is not None:
                os.close(self._fd)  # releases the lock
                self._fd = None


def stop_simulation(sim_root: Path, wait: float = 30.0) -> tuple[int | None, int, list[int]]:
    """``fl-sim stop``: SIGTERM the fl-sim working in ``sim_root`` (it stops its run and says how to resume),
    wait up to ``wait`` s for it, then stop whatever of the run is left (orphans of an fl-sim killed with
    SIGKILL). Returns (the fl-sim's pid or None, how many processes were left to stop, the survivors)."""
    holder = lock_holder(sim_root)
    if holder is not None and holder > 0 and process_alive(holder):
        os.kill(holder, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while lock_holder(sim_root) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
    left = run_processes(sim_root)
    return holder, len(left), stop_processes(left, STOP_GRACE_S)
