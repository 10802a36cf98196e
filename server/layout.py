"""Where the coordinator keeps everything, under the federation folder that ``fl-server init`` made.

:class:`Layout` names the folders and files (pki, state database, local secrets, runs, logs, the
proxy, ``coordinator.json``); :func:`running_state` reads ``coordinator.json`` and says whether
the coordinator it describes still runs. Shared by server/coordinator.py, server/control_api.py
and server/runs.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.bundle import BundleError, project_root
from common.processes import process_alive

STATE_FILE = "coordinator.json"


class CoordinatorError(RuntimeError):
    """Something the operator must fix; the message is one line that says what and how."""


@dataclass(frozen=True)
class Layout:
    """Where the coordinator keeps everything, under the federation folder made by ``fl-server init``."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def state_db(self) -> Path:
        return self.root / "state" / "superlink.db"

    @property
    def control_token(self) -> Path:
        """The Control API's bearer token (0600), new at each start."""
        return self.root / "state" / "control.token"

    @property
    def superexec_secret(self) -> Path:
        """The secret the SuperLink and its SuperExec share (0600), new at each start."""
        return self.root / "state" / "superexec.secret"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def proxy_dir(self) -> Path:
        return self.root / "proxy"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    def log_files(self) -> list[Path]:
        """Every log fedxray or nginx appends to, rotated by size while the coordinator runs."""
        return [self.logs / "superlink.log", self.logs / "proxy.log", self.proxy_dir / "proxy-error.log",
                self.proxy_dir / "proxy-access.log"]


def make_private(layout: Layout) -> None:
    """State, logs, runs and the flwr CLI's home: 0700; the SuperLink's database files 0600.

    Other users of the coordinator host must not read the state database (registered keys, runs),
    the Control token, the models or the logs. Folders made by an earlier fedxray are tightened too.
    """
    for folder in (layout.state_db.parent, layout.runs, layout.logs, layout.flwr_home):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
    for path in layout.state_db.parent.glob(layout.state_db.name + "*"):  # the database, -wal, -shm
        os.chmod(path, 0o600)


def running_state(layout: Layout) -> dict[str, Any] | None:
    """coordinator.json if its SuperLink process is alive, else None."""
    if not layout.state_file.is_file():
        return None
    state = json.loads(layout.state_file.read_text())
    try:
        return state if process_alive(int(state["superlink_pid"])) else None
    except (KeyError, ValueError):
        return None


def require_running(layout: Layout) -> dict[str, Any]:
    """coordinator.json of the running coordinator, or CoordinatorError saying how to start one."""
    state = running_state(layout)
    if state is None:
        raise CoordinatorError(f"no coordinator is running for {layout.root}: start it with `fl-server start --dir "
                               f"{layout.root}`")
    return state


def run_dirs(layout: Layout) -> list[Path]:
    """The run folders under ``runs/`` (a run writes ``run-id`` first); not the tracking store kept beside them."""
    if not layout.runs.is_dir():
        return []
    return sorted(p for p in layout.runs.iterdir()
                  if p.is_dir() and any((p / name).exists() for name in ("run-id", "metrics.json", "checkpoints")))


def source_root() -> Path:
    """fedxray's source folder (common/bundle.py), or CoordinatorError: runs are launched from a checkout."""
    try:
        return project_root()
    except BundleError as err:
        raise CoordinatorError(str(err)) from None
