"""Experiment tracking against a real MLflow store in a tmp dir, read back with MLflow's own client."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from common.cache import file_sha256  # noqa: E402
from server.tracking import (  # noqa: E402
    STATE_FILE,
    find_model,
    resolve_tracking_uri,
    start_tracking,
    tracking_hint,
    ui_command,
)

CONFIG = {"num-server-rounds": 2, "model": "scatternet", "task": "binary", "labels": "opacity", "dp": True,
          "target-epsilon": 8.0, "runs-dir": "/srv/fedxray/runs", "parity-data": "/data/radiographs", "tracking-uri": ""}
BUNDLE = "cd" * 32


def _record(r: int, auc: float, eps_a: float, eps_b: float) -> dict:
    return {"round": r, "pooled_auc": auc, "train_loss": None, "eval_loss": 0.6 - 0.1 * r, "sensitivity": 0.7,
            "specificity": float("nan"), "threshold": 0.4, "seconds": 12.5, "epsilon": {"site-a": eps_a, "site-b": eps_b},
            "sites": {"site-a": {"num_examples": 120, "val_examples": 30, "val_positive": 9, "auc": auc + 0.01},
                      "site-b": {"num_examples": 80, "val_examples": 20, "val_positive": 5, "auc": auc - 0.01}},
            "rejected": {}, "failures": []}


def _write_run_files(run_dir: Path, rounds: list[dict]) -> None:
    (run_dir / "metrics.json").write_text(json.dumps({"run": run_dir.name, "rounds": rounds}))
    (run_dir / "model_card.md").write_text("# Model card\n")
    (run_dir / "rounds.png").write_bytes(b"\x89PNG fake plot")
    (run_dir / "model.onnx").write_bytes(b"onnx model bytes " + run_dir.name.encode())


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One runs folder (and so one SQLite store, ~5 s to create) shared by the tests of this module."""
    return tmp_path_factory.mktemp("runs")


def _run_dir(store: Path, name: str) -> Path:
    run_dir = store / name
    run_dir.mkdir()
    (run_dir / "run-id").write_text("0123456789abcdef\n")
    return run_dir


def test_a_run_is_tracked_and_its_model_registered_with_lineage(store):
    from mlflow import MlflowClient

    run_dir = _run_dir(store, "lungs")
    tracker = start_tracking(run_dir, "lungs", CONFIG)
    assert tracker is not None and tracker.tracking_uri == f"sqlite:///{store.resolve() / 'mlflow.db'}"
    rounds = [_record(1, 0.71, 1.2, 1.5), _record(2, 0.78, 2.3, 2.9)]
    for rec in rounds:
        tracker.log_round(rec)
    _write_run_files(run_dir, rounds)
    export = {"round": 2, "pooled_auc": 0.78, "version": "0.1.0", "bundle_sha256": BUNDLE, "warnings": [],
              "data_source": "synthetic"}
    assert tracker.finish(run_dir, export) == "fedxray-binary-opacity version 1"
    assert not tracker.disabled

    client = MlflowClient(tracking_uri=tracker.tracking_uri, registry_uri=tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "lungs"
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "pooled_auc")] == [(1, 0.71), (2, 0.78)]
    assert [m.value for m in client.get_metric_history(tracker.run_id, "epsilon/site-b")] == [1.5, 2.9]
    assert run.data.metrics["epsilon_max"] == 2.9 and run.data.metrics["auc/site-a"] == pytest.approx(0.79)
    assert "specificity" not in run.data.metrics and "train_loss" not in run.data.metrics  # NaN / None: no point
    assert run.data.params["labels"] == "opacity" and run.data.params["target-epsilon"] == "8.0"
    assert run.data.params["parity-data"] == "(a path: not recorded)"  # no path of radiographs leaves in a param
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"model", "plots", "model_card.md", "metrics.json"} <= artifacts
    assert [a.path for a in client.list_artifacts(tracker.run_id, "model")] == ["model/model.onnx"]

    (version,) = client.search_model_versions("name='fedxray-binary-opacity'")
    tags = version.tags
    assert version.run_id == tracker.run_id
    assert tags["fedxray.onnx_sha256"] == file_sha256(run_dir / "model.onnx")
    assert tags["fedxray.bundle_sha256"] == BUNDLE and tags["fedxray.version"] == "0.1.0"
    assert tags["fedxray.rounds"] == "2" and tags["fedxray.export_round"] == "2"
    assert json.loads(tags["fedxray.sites"]) == ["site-a", "site-b"]
    assert json.loads(tags["fedxray.epsilon"]) == {"site-a": 2.3, "site-b": 2.9}
    assert json.loads(tags["fedxray.data"])["site-a"] == {"num_examples": 120, "val_examples": 30, "val_positive": 9}
    assert tags["fedxray.run_id"] == "0123456789abcdef" and tags["fedxray.data_source"] == "synthetic"
    assert "epsilon site-a 2.30, site-b 2.90" in version.description

    # "Which model is this?": the ONNX file alone finds its record.
    found = find_model(run_dir / "model.onnx", tracker.tracking_uri)
    assert found is not None and found["model_version"] == 1 and found["run_name"] == "lungs"
    assert found["registered_model"] == "fedxray-binary-opacity" and found["version"] == "0.1.0"
    assert "fedxray.onnx_sha256" not in found and found["bundle_sha256"] == BUNDLE
    hint = tracking_hint(run_dir)
    assert hint is not None and tracker.run_id in hint and "mlflow ui --backend-store-uri sqlite:///" in hint


def test_the_logged_metrics_json_holds_no_host_path(store):
    from mlflow import MlflowClient

    run_dir = _run_dir(store, "paths")
    tracker = start_tracking(run_dir, "paths", CONFIG)
    config = {**CONFIG, "sim-root": "/home/alice/sims/demo", "resume-from": "/srv/fedxray/runs/paths"}
    warning = "parity-data /data/hospital-a/SIM-A-0001 had 2 unreadable files; sensitivity/specificity unknown"
    (run_dir / "metrics.json").write_text(json.dumps({"run": "paths", "config": config, "rounds": [_record(1, 0.7, 1, 1)],
                                                      "export": {"round": 1, "warnings": [warning]}}))
    assert tracker.finish(run_dir) is None  # no model.onnx here: nothing registered, the artefacts logged
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    logged = Path(client.download_artifacts(tracker.run_id, "metrics.json", str(store / "download")))
    text = logged.read_text()
    for path in ("/srv/fedxray", "/data/radiographs", "/home/alice", "/data/hospital-a"):
        assert path not in text
    doc = json.loads(text)
    assert doc["config"]["runs-dir"] == "(a path: not recorded)" and doc["config"]["labels"] == "opacity"
    assert doc["export"]["warnings"] == ["parity-data (a path: not recorded) had 2 unreadable files; "
                                         "sensitivity/specificity unknown"]
    assert doc["rounds"][0]["pooled_auc"] == 0.7


def test_a_phantom_model_is_tagged_not_for_patients_and_its_threshold_metric_is_the_models(store):
    """Issue 24: the registry said `fedxray.warnings = none` for a phantom-trained model whose card said "not for use
    on patients", and its `threshold` metric was the raw round's, not the exported model's."""
    from mlflow import MlflowClient

    run_dir = _run_dir(store, "phantom")
    tracker = start_tracking(run_dir, "phantom", CONFIG)
    rounds = [_record(1, 0.9, 1.0, 1.0), _record(2, 0.95, 2.0, 2.0)]
    for rec in rounds:
        tracker.log_round(rec)  # each round's own threshold (0.4, on its raw scores)
    _write_run_files(run_dir, rounds)
    doc = json.loads((run_dir / "metrics.json").read_text())
    doc.update(threshold=0.731, operating_point={"rule": "youden", "set_by": "federation"},
               export={"round": 2, "pooled_auc": 0.95, "warnings": [], "data_source": "synthetic"})
    (run_dir / "metrics.json").write_text(json.dumps(doc))
    assert tracker.finish(run_dir) is not None
    client = MlflowClient(tracking_uri=tracker.tracking_uri, registry_uri=tracker.tracking_uri)
    (version,) = client.search_model_versions("name='fedxray-binary-opacity' and run_id='" + tracker.run_id + "'")
    assert "not for use on patients" in version.tags["fedxray.warnings"]
    assert "NOT FIT FOR USE" in version.description
    assert json.loads(version.tags["fedxray.operating_point"])["set_by"] == "federation"
    run = client.get_run(tracker.run_id)
    assert run.data.metrics["threshold"] == 0.731 and float(version.tags["fedxray.threshold"]) == 0.731
    assert [m.value for m in client.get_metric_history(tracker.run_id, "round_threshold")] == [0.4, 0.4]


def test_a_resumed_run_continues_the_same_tracking_run(store):
    from mlflow import MlflowClient

    run_dir = _run_dir(store, "resumed")
    first = start_tracking(run_dir, "resumed", CONFIG)
    first.log_round(_record(1, 0.6, 1.0, 1.0))
    # The ServerApp process dies; `resume` starts a new one in the same run folder.
    second = start_tracking(run_dir, "resumed", {**CONFIG, "resume-from": str(run_dir)})
    assert second.run_id == first.run_id
    second.log_round(_record(2, 0.65, 2.0, 2.0))
    _write_run_files(run_dir, [_record(1, 0.6, 1.0, 1.0), _record(2, 0.65, 2.0, 2.0)])
    doc = json.loads((run_dir / "metrics.json").read_text())
    doc["export"] = {"round": 2, "pooled_auc": 0.55, "warnings": ["pooled validation AUC 0.550 is near chance (0.5)"]}
    (run_dir / "metrics.json").write_text(json.dumps(doc))
    assert second.finish(run_dir) is not None  # the export entry is read from metrics.json
    client = MlflowClient(tracking_uri=second.tracking_uri)
    run = client.get_run(second.run_id)
    assert [m.step for m in client.get_metric_history(second.run_id, "pooled_auc")] == [1, 2]
    assert "fedxray.resumed" in run.data.tags and "near chance" in run.data.tags["fedxray.warnings"]


def test_a_broken_store_warns_once_and_never_fails_the_run(store, tmp_path, caplog):
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copy(store / "mlflow.db", runs / "mlflow.db")  # a ready store, without the 5 s of creating one
    run_dir = _run_dir(runs, "doomed")
    tracker = start_tracking(run_dir, "doomed", CONFIG)
    assert tracker is not None
    (runs / "mlflow.db").write_bytes(b"this is no longer a database" * 100)  # e.g. a full disk or a bad restore
    with caplog.at_level(logging.WARNING, logger="fedxray.tracking"):
        tracker.log_round(_record(1, 0.7, 1.0, 1.0))
        tracker.log_round(_record(2, 0.7, 1.0, 1.0))
        assert tracker.finish(run_dir, {"round": 2}) is None
    warnings = [r for r in caplog.records if r.name == "fedxray.tracking"]
    assert tracker.disabled and len(warnings) == 1 and "tracking off for the rest of run doomed" in warnings[0].message


def test_an_unreachable_server_is_a_warning_not_an_error(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="fedxray.tracking"):
        tracker = start_tracking(run_dir, "x", {**CONFIG, "tracking-uri": "http://127.0.0.1:9"})  # loopback, closed
    assert tracker is None and "cannot open the MLflow store http://127.0.0.1:9" in caplog.text
    assert time.monotonic() - started < 30


def test_tracking_off_creates_nothing(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    assert start_tracking(run_dir, "x", {**CONFIG, "tracking-uri": "off"}) is None
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["x"] and not (run_dir / STATE_FILE).exists()
    assert tracking_hint(run_dir) is None


def test_resolve_tracking_uri(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    assert resolve_tracking_uri("", run_dir) == f"sqlite:///{tmp_path.resolve() / 'runs' / 'mlflow.db'}"
    assert resolve_tracking_uri("OFF", run_dir) is None
    assert resolve_tracking_uri(str(tmp_path / "t.db"), run_dir) == f"sqlite:///{tmp_path.resolve() / 't.db'}"
    assert resolve_tracking_uri(str(tmp_path / "store"), run_dir) == f"sqlite:///{tmp_path.resolve() / 'store' / 'mlflow.db'}"
    assert resolve_tracking_uri("http://mlflow.internal:5000", run_dir) == "http://mlflow.internal:5000"
    assert "mlflow ui --backend-store-uri sqlite:///x.db" in ui_command("sqlite:///x.db")
