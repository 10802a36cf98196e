"""Runs on the coordinator: launch (``fl-server run``), resume and stop them, each recorded in the audit log.

A run is a Flower run of the fedxray app bundle on the local SuperLink, launched through its
Control API with the ``flwr`` CLI (server/control_api.py holds the connection). Each launch is
appended to ``state/runs.jsonl`` (Flower run id, name, bundle hash, settings file), which
``resume`` and ``stop-run`` read back, and recorded in ``audit.log`` (server/audit.py): the
bundle's first run as ``bundle-published`` (the hash sites are asked to approve), then
``run-launched``, ``run-resumed`` or ``run-stopped``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.bundle import BundleError, build_bundle, stage_app
from common.config import RunConfig
from common.config_fields import ConfigError, to_toml
from common.processes import offline_env
from server.audit import bundle_published_before, record_or_warn, settings_for_audit
from server.control_api import CONNECTION, flwr, json_out, one_line
from server.flower_log import once
from server.layout import CoordinatorError, Layout, require_running, run_dirs, source_root


def launch(root: Path, *, config_file: Path | None = None, overrides: dict[str, Any] | None = None,
           follow: bool = False, audit_event: str = "run-launched",
           on_launched: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Start a run of the fedxray app on the running SuperLink; returns {run_id, run_name, bundle, run_dir}.

    Recorded in the audit log as ``audit_event`` (``run-resumed`` from :func:`resume`), preceded by
    ``bundle-published`` the first time this app bundle runs. With ``follow``, once the run is
    launched and recorded (with its Flower run id) ``on_launched(record)`` is called and the run's
    log is streamed to stdout, each record once (server/flower_log.py), until the run ends.
    """
    layout = Layout(Path(root).resolve())
    require_running(layout)
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values.update(tomllib.loads(Path(config_file).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise CoordinatorError(f"cannot read run config {config_file}: {err}") from None
    values.update(overrides or {})
    values.setdefault("run-name", time.strftime("run-%Y%m%d-%H%M%S"))
    values["runs-dir"] = str(layout.runs)
    defaults = tomllib.loads((source_root() / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise CoordinatorError(f"unknown run setting(s) {', '.join(unknown)}; known: {', '.join(sorted(defaults))}")
    try:
        RunConfig.from_mapping({**defaults, **values})
    except ConfigError as err:
        raise CoordinatorError(str(err)) from None
    run_dir = layout.runs / str(values["run-name"])
    if run_dir.exists() and "resume-from" not in values:
        raise CoordinatorError(f"{run_dir} exists: choose another run-name, or continue it with "
                               f"`fl-server resume {values['run-name']}`")
    cfg = layout.root / "state" / f"{values['run-name']}.run-config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(to_toml(values))
    try:
        fab_hash, _ = build_bundle()
    except BundleError as err:
        raise CoordinatorError(f"{err}; runs are launched from fedxray's source folder") from None
    app = stage_app(layout.root / "state")  # only the app files: `flwr run` walks all of its folder
    args = ["run", str(app), CONNECTION, "--run-config", str(cfg)]

    def audit_launch(run_id: int | None) -> None:
        if not bundle_published_before(layout.root, fab_hash):
            record_or_warn(layout.root, "bundle-published", bundle_sha256=fab_hash, run=str(values["run-name"]))
        record_or_warn(layout.root, audit_event, run=str(values["run-name"]), flower_run_id=run_id,
                       bundle_sha256=fab_hash, follow=follow, settings=settings_for_audit(values))

    # Launched without --stream even when following: `flwr run --stream` gives no run id (the audit log recorded
    # flower_run_id null and fl-server printed "Flower run id None"); the log is followed by id below.
    proc = flwr(layout, *args, "--format", "json")
    out = json_out(proc)
    if not out.get("success"):
        raise CoordinatorError(f"the SuperLink refused the run: {out.get('error-message', out)}")
    run_id = out.get("run-id")
    audit_launch(run_id)
    record = {"run_id": run_id, "run_name": values["run-name"], "bundle": fab_hash, "run_dir": str(run_dir),
              "config": str(cfg)}
    runs_index = layout.root / "state" / "runs.jsonl"
    with open(runs_index, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    if follow:
        if on_launched is not None:
            on_launched(record)
        follow_run(layout, record)
    return record


def follow_run(layout: Layout, record: dict[str, Any]) -> None:
    """Stream a launched run's log to stdout, each record once, until the run ends. Ctrl-C stops following
    only: the run goes on at the SuperLink (``fl-server stop-run`` stops it)."""
    cmd = ["flwr", "log", str(record["run_id"]), CONNECTION, "--stream"]
    with subprocess.Popen(cmd, env=offline_env(layout.flwr_home), cwd=layout.root, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        try:
            for line in once(proc.stdout):
                sys.stdout.write(line)
                sys.stdout.flush()
        except KeyboardInterrupt:
            proc.terminate()
            raise CoordinatorError(f"stopped following run {record['run_name']} (Flower run id {record['run_id']}); "
                                   f"it goes on: watch it with fl-server status, stop it with fl-server stop-run "
                                   f"{record['run_name']}") from None
    if proc.returncode != 0:
        raise CoordinatorError(f"`flwr log` failed (exit {proc.returncode}); see {layout.logs / 'superlink.log'}")


def _launched_runs(layout: Layout) -> list[dict[str, Any]]:
    """``state/runs.jsonl``: one record per launch (run_id, run_name, bundle, ...), oldest first."""
    path = layout.root / "state" / "runs.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def stop_run(root: Path, run_name: str) -> dict[str, Any]:
    """Stop a run launched here (its latest launch), through the SuperLink; returns its launch record.

    The run's checkpoints stay: ``fl-server resume RUN`` continues it later.
    """
    layout = Layout(Path(root).resolve())
    require_running(layout)
    launches = [r for r in _launched_runs(layout) if r.get("run_name") == run_name]
    if not launches or launches[-1].get("run_id") is None:
        known = sorted({str(r.get("run_name")) for r in _launched_runs(layout) if r.get("run_id") is not None})
        raise CoordinatorError(f"no run '{run_name}' launched from this coordinator with a known Flower run id (older runs "
                               f"launched with --follow have none recorded); runs here: "
                               f"{', '.join(known) or 'none'}")
    record = launches[-1]
    out = json_out(flwr(layout, "stop", str(record["run_id"]), CONNECTION, "--format", "json"))
    if not out.get("success"):
        raise CoordinatorError(f"the SuperLink did not stop run {run_name} (Flower run {record['run_id']}): "
                               f"{one_line(out.get('error-message', out))}; it may have ended already (fl-server status)")
    record_or_warn(layout.root, "run-stopped", run=run_name, flower_run_id=record["run_id"], bundle_sha256=record.get("bundle"))
    return record


def resume(root: Path, run_name: str, *, follow: bool = False,
           on_launched: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Continue ``runs/<run_name>`` from its last checkpoint with the rounds it has left."""
    layout = Layout(Path(root).resolve())
    run_dir = layout.runs / run_name
    cfg = layout.root / "state" / f"{run_name}.run-config.toml"
    if not (run_dir / "checkpoints").is_dir() or not cfg.is_file():
        known = [p.name for p in run_dirs(layout)]
        raise CoordinatorError(f"no run '{run_name}' with checkpoints under {layout.runs}; runs here: "
                               f"{', '.join(known) or 'none'}")
    values = tomllib.loads(cfg.read_text())
    values["resume-from"] = str(run_dir)
    values.pop("runs-dir", None)
    return launch(root, overrides=values, follow=follow, audit_event="run-resumed", on_launched=on_launched)
