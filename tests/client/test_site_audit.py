"""The site's audit log: approvals, withdrawals and refusals are recorded; `fl-client audit [--verify]`."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

from client.approval import _install_guard, approve, revoke
from client.cli import main
from common.audit import audit_path, read_entries, record

HASH = "ab" * 32


def test_approvals_and_withdrawals_are_recorded(tmp_path):
    approve(tmp_path, HASH, note="release 0.1 reviewed by IT security")
    approve(tmp_path, HASH)  # already approved: nothing happened, nothing recorded
    revoke(tmp_path, HASH)
    revoke(tmp_path, HASH)  # nothing left to withdraw
    entries = read_entries(audit_path(tmp_path))
    assert [e["event"] for e in entries] == ["bundle-approved", "approval-revoked"]
    assert entries[0]["details"] == {"bundle_sha256": HASH, "note": "release 0.1 reviewed by IT security"}
    assert entries[1]["details"] == {"bundle_sha256": HASH}


def test_cli_approve_records(tmp_path, capsys):
    assert main(["approve", HASH, "--state-dir", str(tmp_path)]) == 0
    assert main(["approve", HASH, "--revoke", "--state-dir", str(tmp_path)]) == 0
    assert [e["event"] for e in read_entries(audit_path(tmp_path))] == ["bundle-approved", "approval-revoked"]


def test_refused_bundle_is_recorded_once_per_run(tmp_path, caplog):
    from flwr.supercore.superexec import run_superexec as rs

    original = rs.AutoExecPlugin

    class Executor:
        def launch(self, spec):  # never reached: the bundle is not approved
            raise AssertionError("an unapproved bundle was launched")

    try:
        _install_guard(tmp_path)
        plugin = rs.AutoExecPlugin(runtime_api_address="127.0.0.1:1", insecure=True, root_certificates_path=None,
                                   executor=Executor())
        task = SimpleNamespace(fab_hash=HASH, run_id=7, task_id=1, type="flwr-clientapp")
        with caplog.at_level(logging.ERROR, logger="fedxray.approval"):
            for _ in range(3):  # the SuperNode offers the task again and again
                plugin.launch_task("token", task)
    finally:
        rs.AutoExecPlugin = original
    entries = read_entries(audit_path(tmp_path))
    assert [e["event"] for e in entries] == ["bundle-refused"]
    assert entries[0]["details"] == {"flower_run_id": 7, "bundle_sha256": HASH}


class TestAuditCommand:
    def _site_log(self, tmp_path):
        path = audit_path(tmp_path)
        record(path, "round-trained", run="lungs", round=1, epsilon_round=0.4, epsilon_total=0.4)
        record(path, "round-refused", run="lungs", round=2, reason="max-epsilon 0.5 would be passed")
        return path

    def test_verify_exit_codes_and_one_line(self, tmp_path, capsys):
        path = self._site_log(tmp_path)
        assert main(["audit", "--verify", "--state-dir", str(tmp_path)]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 1 and "intact, 2 event(s)" in out[0]
        lines = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(lines[1])  # the first line deleted
        assert main(["audit", "--verify", "--state-dir", str(tmp_path)]) == 1
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 1 and "line 1: breaks the chain" in out[0] and "event(s) 1..1 are missing" in out[0]

    def test_listing_and_json(self, tmp_path, capsys):
        self._site_log(tmp_path)
        assert main(["audit", "--state-dir", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert "round-trained" in out and "round-refused" in out
        assert main(["audit", "--json", "--state-dir", str(tmp_path)]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["verify"]["ok"] and [e["seq"] for e in doc["entries"]] == [1, 2]

    def test_bad_anchor_is_exit_2(self, tmp_path, capsys):
        self._site_log(tmp_path)
        assert main(["audit", "--verify", "--anchor", "nothex", "--state-dir", str(tmp_path)]) == 2
        assert capsys.readouterr().err.startswith("fl-client audit: anchor")
