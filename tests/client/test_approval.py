"""Code approval at the site: the approval list, the installed bundle's hash, and the launcher's refusal."""

from __future__ import annotations

import io
import logging
import zipfile
from types import SimpleNamespace

import pytest

from client.approval import (
    APPROVALS_FILE,
    ApprovalError,
    _install_guard,
    approve,
    approved_hashes,
    installed_bundle,
    load_approvals,
    revoke,
)
from client.cli import main

HASH = "ab" * 32


def test_approve_revoke_roundtrip(tmp_path):
    assert approved_hashes(tmp_path) == set()
    assert approve(tmp_path, HASH.upper(), note="reviewed") is True  # normalised to lower case
    assert approve(tmp_path, HASH) is False  # idempotent
    assert approved_hashes(tmp_path) == {HASH}
    assert revoke(tmp_path, HASH) is True and approved_hashes(tmp_path) == set()
    entry = load_approvals(tmp_path)[0]
    assert entry["note"] == "reviewed" and entry["revoked"]  # kept for the audit trail


@pytest.mark.parametrize("bad", ["", "abc", "g" * 64, HASH + "0"])
def test_malformed_hash_is_refused(tmp_path, bad):
    with pytest.raises(ApprovalError, match="64 hex characters"):
        approve(tmp_path, bad)


def test_damaged_list_says_what_to_do(tmp_path):
    (tmp_path / APPROVALS_FILE).write_text("{not json")
    with pytest.raises(ApprovalError, match="damaged"):
        approved_hashes(tmp_path)


def test_installed_bundle_is_deterministic_and_holds_app_code_only():
    h1, fab = installed_bundle()
    h2, _ = installed_bundle()
    assert h1 == h2 and len(h1) == 64
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "client/app.py" in names and "server/app.py" in names and "pyproject.toml" in names
    assert not any(n.startswith(("tests/", "docs/", "benchmarks/", "simulations/")) for n in names)


def test_cli_approve_installed_and_list(tmp_path, capsys):
    assert main(["approve", "--installed", "--dry-run", "--state-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == installed_bundle()[0] and approved_hashes(tmp_path) == set()  # dry run approves nothing
    assert main(["approve", "--installed", "--state-dir", str(tmp_path)]) == 0
    assert approved_hashes(tmp_path) == {printed}
    assert main(["approve", "nothex", "--state-dir", str(tmp_path)]) == 2


def test_launcher_refuses_unapproved_bundle_without_launching(tmp_path, caplog):
    """The plugin the launcher installs never hands an unapproved task to the executor."""
    from flwr.supercore.superexec import run_superexec as rs

    original = rs.AutoExecPlugin
    launched = []

    class Executor:  # records what would be started; the real one starts flwr-clientapp
        def launch(self, spec):
            launched.append(spec)
            from flwr.supercore.superexec.executor import LaunchResult

            return LaunchResult.accepted()

    try:
        _install_guard(tmp_path)
        plugin = rs.AutoExecPlugin(runtime_api_address="127.0.0.1:1", insecure=True, root_certificates_path=None,
                                   executor=Executor())
        task = SimpleNamespace(fab_hash=HASH, run_id=7, task_id=1, type="flwr-clientapp")
        with caplog.at_level(logging.ERROR, logger="fedxray.approval"):
            result = plugin.launch_task("token", task)
        assert not launched and "not approved" in (result.message or "")
        assert HASH in caplog.text and "fl-client approve" in caplog.text
        approve(tmp_path, HASH)  # read at every task: no restart needed
        plugin.launch_task("token", task)
        assert len(launched) == 1 and launched[0].fab_hash == HASH
    finally:
        rs.AutoExecPlugin = original
