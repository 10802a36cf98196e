"""Code approval: a hospital runs only the app bundles it approved, checked before any code runs.

In open-source Flower the coordinator's code runs at every site: ``flwr run`` ships a Flower App
Bundle (FAB) and each SuperNode installs and executes it for every message, with no approval step.
fedxray closes that gap at the site:

- the SuperNode runs with ``--isolation process``, so it never starts app code itself;
- fedxray's own launcher (``python -m client.approval guard``, started by ``fl-client start``) is
  the only process that starts app code. It is Flower's SuperExec loop with one change: before a
  task is launched, the sha256 of its FAB is looked up in the site's approval list
  (``<state-dir>/approved-bundles.json``). An unknown hash is refused with a log line naming it;
  the FAB is never installed, none of its code imported or executed, and the coordinator sees the
  site as not answering that round.

The launcher is also the only process that may take tasks from the SuperNode's Runtime API (a
loopback port any local user can open): ``fl-client start`` gives it and the SuperNode a fresh
shared secret (``--superexec-auth-secret-file``, Flower's SuperExec authentication in process
isolation), so another user of the hospital's host cannot take a task, read its messages or
answer in the site's name. It stops, with the ClientApps it started (its process group), when the
SuperNode is gone.

Every approval, withdrawal and refusal is also recorded in the site's hash-chained audit log
(``<state-dir>/audit.log``, common/audit.py): ``bundle-approved``, ``approval-revoked``,
``bundle-refused`` (once per run and bundle, by the launcher).

The FAB hash is Flower's own (sha256 of the bundle bytes; FAB builds are deterministic). The bundle
of the installed fedxray version is reproducible from the source (``fl-client approve
--installed``), so a site that reviewed a release can approve exactly that code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.audit import audit_path, try_record
from common.cache import atomic_write_bytes
from common.processes import watch_parent

APPROVALS_FILE = "approved-bundles.json"
_HASH = re.compile(r"^[0-9a-f]{64}$")

log = logging.getLogger("fedxray.approval")


class ApprovalError(ValueError):
    """A malformed hash or an unreadable approval list; the message says what to do."""


def _path(state_dir: Path) -> Path:
    return Path(state_dir) / APPROVALS_FILE


def load_approvals(state_dir: Path) -> list[dict[str, Any]]:
    """Approved bundles, oldest first (empty when the site approved nothing yet)."""
    path = _path(state_dir)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        return list(data["approved"])
    except (ValueError, KeyError, TypeError) as err:
        raise ApprovalError(f"{path} is damaged ({err}); restore it from backup or approve the bundles again") from None


def approved_hashes(state_dir: Path) -> set[str]:
    return {entry["hash"] for entry in load_approvals(state_dir) if not entry.get("revoked")}


def _save(state_dir: Path, entries: list[dict[str, Any]]) -> None:
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(_path(state_dir), json.dumps({"approved": entries}, indent=2).encode())


def approve(state_dir: Path, fab_hash: str, note: str = "") -> bool:
    """Add ``fab_hash`` to the site's approval list; False when it was already approved."""
    fab_hash = fab_hash.strip().lower()
    if not _HASH.match(fab_hash):
        raise ApprovalError(f"'{fab_hash}' is not a bundle hash: expected 64 hex characters (sha256), as printed "
                            "by `fl-server run` or `fl-client approve --installed --dry-run`")
    entries = load_approvals(state_dir)
    for entry in entries:
        if entry["hash"] == fab_hash and not entry.get("revoked"):
            return False
    entries.append({"hash": fab_hash, "approved": datetime.now(UTC).isoformat(timespec="seconds"),
                    "note": note})
    _save(state_dir, entries)
    try_record(audit_path(state_dir), "bundle-approved", bundle_sha256=fab_hash, note=note)
    return True


def revoke(state_dir: Path, fab_hash: str) -> bool:
    """Withdraw an approval (kept in the file, marked revoked, for the audit trail)."""
    entries = load_approvals(state_dir)
    changed = False
    for entry in entries:
        if entry["hash"] == fab_hash.strip().lower() and not entry.get("revoked"):
            entry["revoked"] = datetime.now(UTC).isoformat(timespec="seconds")
            changed = True
    if changed:
        _save(state_dir, entries)
        try_record(audit_path(state_dir), "approval-revoked", bundle_sha256=fab_hash.strip().lower())
    return changed


def installed_bundle() -> tuple[str, bytes]:
    """(sha256, bytes) of the Flower App Bundle of this fedxray installation, as `flwr run` builds it."""
    from common.bundle import BundleError, build_bundle

    try:
        return build_bundle()
    except BundleError as err:
        raise ApprovalError(f"{err}; a site approves the installed version only from its source") from None


# ----------------------------------------------------------------------------- the guarded launcher
def _install_guard(state_dir: Path) -> None:
    """Replace Flower SuperExec's plugin with one that refuses unapproved bundles before launching."""
    from flwr.supercore.superexec import run_superexec as rs
    from flwr.supercore.superexec.executor import LaunchResult

    refused: dict[str, float] = {}
    recorded: set[tuple[Any, str]] = set()  # (run, bundle) refusals already in the audit log

    class ApprovedBundlesOnly(rs.AutoExecPlugin):
        """Flower's task plugin, but a task whose FAB hash the site did not approve is never launched."""

        def launch_task(self, token, task):  # noqa: ANN001 - Flower's signature
            fab_hash = getattr(task, "fab_hash", "") or ""
            if not fab_hash or fab_hash not in approved_hashes(state_dir):
                now = time.monotonic()
                if now - refused.get(fab_hash, -1e9) > 60:  # one line per bundle per minute, not per poll
                    refused[fab_hash] = now
                    log.error("refused run %s: app bundle %s is not approved at this site; review it and approve "
                              "with `fl-client approve %s`", task.run_id, fab_hash or "(no hash)", fab_hash or "HASH")
                if (task.run_id, fab_hash) not in recorded:
                    recorded.add((task.run_id, fab_hash))
                    try_record(audit_path(state_dir), "bundle-refused", flower_run_id=int(task.run_id),
                               bundle_sha256=fab_hash or None)
                return LaunchResult.failed(f"app bundle {fab_hash or '(no hash)'} is not approved at this site")
            log.info("run %s: app bundle %s is approved; launching", task.run_id, fab_hash[:12])
            return super().launch_task(token, task)

    rs.AutoExecPlugin = ApprovedBundlesOnly


def guard_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m client.approval guard",
                                 description="Flower SuperExec that launches approved app bundles only")
    ap.add_argument("--runtime-api-address", required=True)
    ap.add_argument("--state-dir", required=True, type=Path)
    ap.add_argument("--parent-pid", type=int, help="stop (with the ClientApps launched) when this process is gone")
    ap.add_argument("--superexec-auth-secret-file", type=Path,
                    help="the secret shared with the SuperNode (Flower's SuperExec authentication)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fedxray guard %(levelname)s: %(message)s",
                        stream=sys.stderr)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    _install_guard(args.state_dir)
    from flwr.supercore.superexec.run_superexec import run_superexec

    secret = args.superexec_auth_secret_file.read_bytes() if args.superexec_auth_secret_file else None
    if args.parent_pid is not None:
        watch_parent(args.parent_pid, _stop_group)
    log.info("launching only approved app bundles (%d approved in %s)", len(approved_hashes(args.state_dir)),
             _path(args.state_dir))
    run_superexec(runtime_api_address=args.runtime_api_address, insecure=True, superexec_auth_secret=secret,
                  runtime_dependency_install=False)


def _stop_group() -> None:
    """The SuperNode is gone: stop this launcher and the ClientApps it started (SIGTERM, then SIGKILL)."""
    leader = os.getpgrp() == os.getpid()  # fl-client starts the launcher in its own session
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if leader:
            os.killpg(os.getpgrp(), sig)
        else:
            os.kill(os.getpid(), sig)
        time.sleep(10)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "guard":
        guard_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m client.approval guard --runtime-api-address HOST:PORT --state-dir DIR")
