"""The coordinator's audit log: what fl-server records, and `fl-server audit [--verify]`."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from client.provision import init_site
from common.audit import read_entries, verify
from server import control_api, coordinator, runs
from server.audit import coordinator_log, federation_of, record_run_event, record_run_finished, settings_for_audit
from server.cli import main as server_main

ADDRESS = "fl.example.org:9443"


@pytest.fixture
def fed(tmp_path: Path) -> Path:
    root = tmp_path / "coord"
    assert server_main(["init", "--dir", str(root), "--address", ADDRESS]) == 0
    return root


def _events(root: Path) -> list[str]:
    return [e["event"] for e in read_entries(coordinator_log(root))]


def test_provisioning_is_recorded_with_who_and_what(fed, tmp_path, capsys):
    request = init_site(tmp_path / "site", "st-marys")
    assert server_main(["admit", str(request), "--dir", str(fed)]) == 0
    assert server_main(["remove", "st-marys", "--dir", str(fed)]) == 0
    assert server_main(["renew-crl", "--dir", str(fed)]) == 0
    entries = read_entries(coordinator_log(fed))
    assert [e["event"] for e in entries] == ["federation-created", "site-admitted", "site-removed", "crl-renewed"]
    created, admitted, removed = entries[0]["details"], entries[1]["details"], entries[2]["details"]
    assert created["address"] == ADDRESS and created["replaced"] is False
    site = json.loads((fed / "sites" / "st-marys" / "site.json").read_text())
    assert admitted["site"] == "st-marys" and admitted["serial"] == site["serial"]
    assert admitted["auth_key_sha256"] == site["auth_key_sha256"] and admitted["registered_now"] is False
    assert removed == {"site": "st-marys", "serial": site["serial"], "node_id": None, "proxy_reloaded": False,
                       "unregistered_now": False}
    assert all(e["who"] for e in entries)
    assert verify(coordinator_log(fed)).ok


def test_the_log_outlives_a_replaced_federation(fed):
    assert server_main(["init", "--dir", str(fed), "--address", ADDRESS, "--force"]) == 0
    assert _events(fed) == ["federation-created", "federation-created"]
    assert read_entries(coordinator_log(fed))[1]["details"]["replaced"] is True


class TestAuditCommand:
    def test_verify_passes_then_names_the_edited_line(self, fed, tmp_path, capsys):
        assert server_main(["admit", str(init_site(tmp_path / "site", "st-marys")), "--dir", str(fed)]) == 0
        capsys.readouterr()
        assert server_main(["audit", "--verify", "--dir", str(fed)]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 1 and "intact, 2 event(s)" in out[0]
        log = coordinator_log(fed)
        log.write_bytes(log.read_bytes().replace(b'"st-marys"', b'"st-mary5"', 1))  # one byte of line 2
        assert server_main(["audit", "--verify", "--dir", str(fed)]) == 1
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 1 and "NOT intact: line 2: altered" in out[0]

    def test_listing_and_json(self, fed, capsys):
        capsys.readouterr()
        assert server_main(["audit", "--dir", str(fed)]) == 0
        out = capsys.readouterr().out
        assert "federation-created" in out and "intact, 1 event(s)" in out
        assert server_main(["audit", "--json", "--dir", str(fed)]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["verify"]["ok"] is True and doc["entries"][0]["event"] == "federation-created"

    def test_not_a_federation_is_one_line_exit_2(self, tmp_path, capsys):
        assert server_main(["audit", "--verify", "--dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fl-server audit:") and "fl-server init" in err[0]

    def test_deleted_log_fails_verification(self, fed, capsys):
        coordinator_log(fed).unlink()
        assert server_main(["audit", "--verify", "--dir", str(fed)]) == 1
        assert "no audit log" in capsys.readouterr().out


def test_stop_run_is_recorded(fed, monkeypatch, capsys):
    """`fl-server stop-run`: the run's Flower id from state/runs.jsonl, `flwr stop`, then the audit event."""
    state = fed / "state"
    state.mkdir()
    (state / "runs.jsonl").write_text(json.dumps({"run_id": 41, "run_name": "old", "bundle": "ab" * 32}) + "\n"
                                      + json.dumps({"run_id": 42, "run_name": "lungs", "bundle": "cd" * 32}) + "\n")
    calls = []

    def fake_flwr(layout, *args, timeout=120.0):  # the SuperLink's answer; the rest is real
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, stdout=json.dumps({"success": True, "run-id": args[1]}), stderr="")

    monkeypatch.setattr(runs, "require_running", lambda layout: {})
    monkeypatch.setattr(runs, "flwr", fake_flwr)
    assert server_main(["stop-run", "lungs", "--dir", str(fed)]) == 0
    assert calls == [("stop", "42", control_api.CONNECTION, "--format", "json")]
    assert "fl-server resume lungs" in capsys.readouterr().out
    last = read_entries(coordinator_log(fed))[-1]
    assert last["event"] == "run-stopped" and last["details"]["flower_run_id"] == 42
    assert server_main(["stop-run", "nope", "--dir", str(fed)]) == 2
    err = capsys.readouterr().err
    assert "no run 'nope'" in err and "lungs, old" in err


def test_settings_are_recorded_without_paths():
    out = settings_for_audit({"parity-data": "/srv/pacs/export", "runs-dir": "runs/x", "labels": "opacity",
                              "num-server-rounds": 3, "init-weights": "~/w.pt"})
    assert out["labels"] == "opacity" and out["num-server-rounds"] == 3
    assert all(out[k] == "(a path: not recorded)" for k in ("parity-data", "runs-dir", "init-weights"))


def test_run_events_go_to_the_federation_of_a_deployed_run_only(fed, tmp_path):
    run_dir = fed / "runs" / "lungs"
    run_dir.mkdir(parents=True)
    assert federation_of(run_dir) == fed.resolve()
    record_run_event(run_dir, "run-finished", rounds=3, export_round=2, pooled_auc=0.81)
    last = read_entries(coordinator_log(fed))[-1]
    assert last["event"] == "run-finished" and last["details"] == {"run": "lungs", "rounds": 3, "export_round": 2,
                                                                   "pooled_auc": 0.81}
    (run_dir / "metrics.json").write_text(json.dumps({"rounds": [{"round": 1}, {"round": 3}], "export": {
        "round": 2, "pooled_auc": float("nan"), "bundle_sha256": "ab" * 32, "warnings": ["near chance"]}}))
    (run_dir / "model.onnx").write_bytes(b"model")
    record_run_finished(run_dir)
    last = read_entries(coordinator_log(fed))[-1]
    assert last["event"] == "run-finished" and last["details"]["rounds"] == 3 and last["details"]["pooled_auc"] is None
    assert last["details"]["onnx_sha256"] == hashlib.sha256(b"model").hexdigest()
    sim_run = tmp_path / "sim" / "runs" / "x"
    sim_run.mkdir(parents=True)
    assert federation_of(sim_run) is None
    record_run_event(sim_run, "run-finished", rounds=1)  # a simulation: nothing, no error
    assert not (tmp_path / "sim" / "audit.log").exists()


def test_status_lists_only_run_folders(fed):
    """The tracking store (mlflow.db, mlartifacts/) lives beside the runs: it is not a run."""
    layout = coordinator.Layout(fed.resolve())
    (layout.runs / "lungs").mkdir(parents=True)
    (layout.runs / "lungs" / "run-id").write_text("abc\n")
    (layout.runs / "mlartifacts").mkdir()
    (layout.runs / "mlflow.db").write_bytes(b"")
    assert [p.name for p in coordinator.run_dirs(layout)] == ["lungs"]


def test_a_launch_prints_the_logs_head_to_anchor_it(fed, monkeypatch, capsys):
    """Without an anchor a cut tail verifies; `fl-server run` prints the head, and the anchor then catches the cut."""
    def fake_flwr(layout, *args, timeout=120.0):  # the SuperLink's answer; the rest is real
        return subprocess.CompletedProcess(args, 0, stdout=json.dumps({"success": True, "run-id": 7}), stderr="")

    monkeypatch.setattr(runs, "require_running", lambda layout: {})
    monkeypatch.setattr(runs, "flwr", fake_flwr)
    assert server_main(["run", "--dir", str(fed), "-c", "run-name=lungs"]) == 0
    out = capsys.readouterr().out
    head = verify(coordinator_log(fed)).head
    assert f"head {head}" in out and f"--anchor {head}" in out
    log = coordinator_log(fed)
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:-1]))  # the launch's line cut off
    assert server_main(["audit", "--verify", "--dir", str(fed)]) == 0  # a cut tail alone still verifies ...
    assert "not anchored" in capsys.readouterr().out
    assert server_main(["audit", "--verify", "--dir", str(fed), "--anchor", head]) == 1  # ... the anchor does not


def test_audit_help_says_what_the_anchor_is_for(capsys):
    with pytest.raises(SystemExit):
        server_main(["audit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Without --anchor, a log whose last lines were cut" in text and "prints the log's head hash" in text
