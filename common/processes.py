"""Starting and stopping the Flower processes fedxray runs, the same way everywhere.

fl-sim, fl-server and fl-client all start Flower executables (SuperLink, SuperNode, `flwr`).
Each must run offline (no telemetry, no update check, no runtime dependency installation),
with passive OpenMP threads (spinning threads made training 5-20x slower on 2 cores), and must
be stopped as a whole process group so that no child outlives the command that started it.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


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
