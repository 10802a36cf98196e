"""The coordinator's audit log: ``<federation dir>/audit.log``, in the format of common/audit.py.

What ``fl-server`` records there (event: details), each with the OS user and the UTC time:

- ``federation-created``: federation, address, sans, replaced (``fl-server init``; the log
  outlives ``init --force``, which moves the old CA aside but keeps the log);
- ``site-admitted``: site, serial, auth_key_sha256, cert_sha256, check_code, registered_now;
- ``site-removed``: site, serial, node_id, unregistered_now;
- ``crl-renewed``: proxy_reloaded;
- ``coordinator-started`` / ``coordinator-stopped`` (reason) / ``coordinator-stop-requested``;
- ``bundle-published``: bundle_sha256, run: the first run of an app bundle, i.e. the hash the
  sites are asked to approve (``fl-server run`` prints it);
- ``run-launched`` (run, flower_run_id, bundle_sha256, settings), ``run-resumed``,
  ``run-stopped``; and, from the ServerApp through :func:`record_run_event`, ``run-finished``
  and ``run-failed``.

Without an anchor, a log whose last lines were cut or whose chain was recomputed still verifies: every
``fl-server run`` / ``resume`` prints the head (:func:`audit_head_line`) to be kept where the coordinator's
administrators cannot write, and ``fl-server audit --anchor HASH`` checks against it.

Run settings are recorded without their paths (:func:`settings_for_audit`): ``parity-data`` names
a folder of radiographs, and no path goes into an audit log.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from common.audit import audit_path, read_entries, try_record, verify
from common.audit_anchor import anchor_hint
from common.cache import file_sha256

log = logging.getLogger("fedxray.server")

#: The federation folder's marker (server/pki.py writes it): a run directory under ``<federation>/runs``.
_FEDERATION_FILE = "federation.json"
_NOT_RECORDED = "(a path: not recorded)"


def coordinator_log(root: str | os.PathLike[str]) -> Path:
    """``<federation dir>/audit.log``."""
    return audit_path(root)


def record_coordinator(root: str | os.PathLike[str], event: str, /, **details: Any) -> str | None:
    """Record a coordinator event; None when written, else the one-line reason (the action itself stands)."""
    return try_record(coordinator_log(root), event, **details)


def record_or_warn(root: str | os.PathLike[str], event: str, /, **details: Any) -> None:
    """:func:`record_coordinator`, where a failed write is one warning line on stderr and the action stands."""
    problem = record_coordinator(root, event, **details)
    if problem:
        print(f"fl-server: warning: audit log: {problem}", file=sys.stderr, flush=True)


def settings_for_audit(values: dict[str, Any]) -> dict[str, Any]:
    """Run settings as recorded: every value, except that strings holding a path are replaced by a note."""
    return {key: (_NOT_RECORDED if isinstance(value, str) and ("/" in value or "\\" in value or value.startswith("~"))
                  else value)
            for key, value in sorted(values.items())}


def bundle_published_before(root: str | os.PathLike[str], bundle_sha256: str) -> bool:
    """True when the log already records this bundle as published (so it is recorded once, at its first run)."""
    return any(e["event"] == "bundle-published" and e["details"].get("bundle_sha256") == bundle_sha256
               for e in read_entries(coordinator_log(root)))


def federation_of(run_dir: str | os.PathLike[str]) -> Path | None:
    """The federation folder a deployed run's directory lies in (``<federation>/runs/<run>``); None in a simulation."""
    run_dir = Path(run_dir).resolve()
    root = run_dir.parent.parent
    if run_dir.parent.name == "runs" and (root / _FEDERATION_FILE).is_file():
        return root
    return None


def record_run_event(run_dir: str | os.PathLike[str], event: str, /, **details: Any) -> None:
    """From the ServerApp: record ``run-finished`` / ``run-failed`` in the federation's log. Never raises.

    A simulated run (its folder is not under a federation) records nothing: fl-sim has no coordinator.
    """
    root = federation_of(run_dir)
    if root is None:
        return
    problem = record_coordinator(root, event, run=Path(run_dir).name, **details)
    if problem:
        log.warning("audit log: %s", problem)


def audit_head_line(run_dir: str | os.PathLike[str]) -> str:
    """After a launch: the federation log's head, to record in the run's ticket (an anchor for `audit --anchor`)."""
    root = federation_of(run_dir)
    if root is None:
        return "audit log: none (this run is not under a federation folder)"
    return "audit log " + anchor_hint(verify(coordinator_log(root)), "fl-server audit")


def record_run_finished(run_dir: str | os.PathLike[str]) -> None:
    """From the ServerApp after the export: ``run-finished`` with rounds, the exported round, its pooled AUC,
    the bundle and the model's sha256, read from ``run_dir/metrics.json``. Never raises; nothing in a simulation."""
    if federation_of(run_dir) is None:
        return
    run_dir = Path(run_dir)
    try:
        doc = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        doc = {}
    export = doc.get("export") or {}
    rounds = doc.get("rounds") or []
    auc = export.get("pooled_auc")
    onnx = run_dir / "model.onnx"
    record_run_event(run_dir, "run-finished", rounds=rounds[-1].get("round") if rounds else 0,
                     export_round=export.get("round"),
                     pooled_auc=auc if isinstance(auc, (int, float)) and math.isfinite(auc) else None,
                     bundle_sha256=export.get("bundle_sha256") or None, warnings=len(export.get("warnings") or []),
                     onnx_sha256=file_sha256(onnx) if onnx.is_file() else None)
