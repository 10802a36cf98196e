"""One MLflow run for one fedxray run: what a round and the end of a run log there, and where it is.

:class:`Tracker` logs each round's metrics, then the artefacts, the lineage tags and the registered
model version; every method is safe to call (the first error turns tracking off, never the run).
``tracking.json`` in the run folder names the MLflow run, so a resumed run continues it.
server/tracking.py opens the store and makes the Tracker; the module docstring there says what is
logged and why MLflow. MLflow itself is imported only inside the methods that call it (1.5 s).

No host path reaches the store: the run folder's ``metrics.json`` holds the run config (runs-dir,
sim-root, parity-data, in a simulation a hospital's folder), so what is logged is a copy with every
path replaced by a note (:func:`without_paths`), as the params and the audit log do.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import numbers
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from common.cache import atomic_write_bytes, file_sha256
from common.cli import fedxray_version
from server.audit import settings_for_audit
from server.report import data_warnings

log = logging.getLogger("fedxray.tracking")

EXPERIMENT = "fedxray"
#: In each run folder: which tracking run it is, so a resumed run continues the same one.
STATE_FILE = "tracking.json"
#: The MLflow release of the pinned client; `mlflow ui` of the same release reads the store as written.
MLFLOW_RELEASE = "3.17.2"

_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")
#: A path inside a text: absolute, home-relative or a Windows drive, not preceded by a word (so "a/b" words stay).
_PATH_IN_TEXT = re.compile(r"(?<![\w.])(?:~|/)[^\s'\"`,;)]*|\b[A-Za-z]:\\[^\s'\"`,;)]*")
_NO_PATH = "(a path: not recorded)"
_TAG_MAX = 5000

T = TypeVar("T")


def ui_command(tracking_uri: str) -> str:
    """What to run (or open) to browse the runs: one line for the operator."""
    if tracking_uri.startswith("sqlite:"):
        return (f"MLFLOW_DISABLE_TELEMETRY=true mlflow ui --backend-store-uri {tracking_uri} --port 5000, then open "
                f"http://127.0.0.1:5000 (the UI is in the full package: pip install mlflow=={MLFLOW_RELEASE})")
    return f"open {tracking_uri} (experiment {EXPERIMENT})"


def _metric_key(*parts: str) -> str:
    return "/".join(_KEY_CHARS.sub("_", p) for p in parts)


def _number(value: Any) -> float | None:
    """A finite float, or None (not measured: no point is drawn rather than a NaN)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars are Real too
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _tag(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text[:_TAG_MAX]


def without_paths(value: Any, key: str = "") -> Any:
    """``value`` (metrics.json, a tag) with every host path replaced by a note; the run config by the audit rule."""
    if isinstance(value, dict):
        if key == "config":
            return settings_for_audit(value)
        return {k: without_paths(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [without_paths(v) for v in value]
    if isinstance(value, str):
        return _PATH_IN_TEXT.sub(_NO_PATH, value)
    return value


def one_line(err: BaseException, limit: int = 240) -> str:
    """An error as one short line, for a warning."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _never_fails(method: Callable[..., T]) -> Callable[..., T | None]:
    """Tracking must not fail the run: the first error is one warning, then this tracker stays quiet."""

    @functools.wraps(method)
    def wrapper(self: Tracker, *args: Any, **kwargs: Any) -> T | None:
        if self.disabled:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - MLflow, SQLAlchemy and HTTP errors alike; the run goes on
            self.disabled = True
            log.warning("tracking off for the rest of run %s: %s failed (%s: %s); the run's own files are complete",
                        self.run_name, method.__name__, type(err).__name__, one_line(err))
            return None

    return wrapper


class Tracker:
    """One MLflow run for one fedxray run; every method is safe to call (errors turn tracking off, not the run)."""

    def __init__(self, client: Any, *, run_id: str, tracking_uri: str, run_name: str, run_dir: Path,
                 registered_model: str) -> None:
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.run_name = run_name
        self.run_dir = run_dir
        self.registered_model = registered_model
        self.disabled = False
        self.model_version: str | None = None

    def where(self) -> str:
        """One line: the MLflow run and how to browse it."""
        return f"MLflow run {self.run_id} (experiment {EXPERIMENT}) in {self.tracking_uri}; browse: {ui_command(self.tracking_uri)}"

    @_never_fails
    def log_round(self, record: dict[str, Any]) -> None:
        """Log one round's record (the metrics.json entry, interface 4) at step = its round number."""
        from mlflow.entities import Metric  # deferred (as every MLflow import): MLflow takes 1.5 s to import

        step = int(record["round"])
        now = int(time.time() * 1000)
        values: dict[str, float | None] = {
            key: _number(record.get(key))
            for key in ("pooled_auc", "eval_loss", "train_loss", "sensitivity", "specificity", "seconds")
        }
        # The round's threshold is on its raw scores; the metric `threshold` is the exported model's (finish).
        values["round_threshold"] = _number(record.get("threshold"))
        for key in ("pooled_auc", "sensitivity", "specificity"):  # the estimates' 95% intervals
            ci = record.get(f"{key}_ci") or (None, None)
            values[f"{key}_ci_low"], values[f"{key}_ci_high"] = _number(ci[0]), _number(ci[1])
        epsilon = record.get("epsilon") or {}
        for site, eps in epsilon.items():
            values[_metric_key("epsilon", site)] = _number(eps)
        finite = [v for v in (_number(e) for e in epsilon.values()) if v is not None]
        values["epsilon_max"] = max(finite) if finite else None
        sites = record.get("sites") or {}
        for site, m in sites.items():
            values[_metric_key("auc", site)] = _number((m or {}).get("auc"))
        values["sites_answered"] = float(len(sites))
        values["sites_rejected"] = float(len(record.get("rejected") or {}))
        values["sites_failed"] = float(len(record.get("failures") or []))
        metrics = [Metric(key, value, now, step) for key, value in values.items() if value is not None]
        self.client.log_batch(self.run_id, metrics=metrics)

    @_never_fails
    def finish(self, run_dir: str | os.PathLike[str], export: dict[str, Any] | None = None) -> str | None:
        """Log the run's artefacts, register the exported model with its lineage, end the MLflow run.

        ``export``: metrics.json's ``export`` entry (round, pooled_auc, version, bundle_sha256,
        warnings, data_source, ...), read from ``run_dir/metrics.json`` when not given, as are the
        rounds, sites, epsilon and data counts. Returns "name version N" of the registered model
        (None when the run exported no model).
        """
        run_dir = Path(run_dir)
        doc = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
        export = export if export is not None else (doc.get("export") or {})
        rounds = doc.get("rounds") or []
        last = rounds[-1] if rounds else {}
        chosen = next((r for r in rounds if r.get("round") == export.get("round")), last)
        if (run_dir / "model_card.md").is_file():
            self.client.log_artifact(self.run_id, str(run_dir / "model_card.md"))
        if doc:
            with tempfile.TemporaryDirectory() as tmp:  # the store gets metrics.json without host paths
                (Path(tmp) / "metrics.json").write_text(json.dumps(without_paths(doc), indent=2))
                self.client.log_artifact(self.run_id, str(Path(tmp) / "metrics.json"))
        for plot in sorted(run_dir.glob("*.png")):
            self.client.log_artifact(self.run_id, str(plot), "plots")
        onnx = run_dir / "model.onnx"
        # Every warning of the model, the data source's included ("not for use on patients" for a simulation).
        warnings = list(export.get("warnings") or doc.get("warnings") or [])
        warnings += [w for w in data_warnings(str(export.get("data_source") or "")) if w not in warnings]
        lineage: dict[str, Any] = {
            "run_name": self.run_name,
            "run_id": _read_text(run_dir / "run-id"),
            "rounds": last.get("round"),
            "export_round": export.get("round"),
            "pooled_auc": _number(export.get("pooled_auc")),
            "sites": sorted({site for r in rounds for site in (r.get("sites") or {})}),
            "epsilon": last.get("epsilon") or {},
            "data": {site: {k: m.get(k) for k in ("num_examples", "val_examples", "val_positive") if m.get(k) is not None}
                     for site, m in sorted((chosen.get("sites") or {}).items())},
            "data_source": export.get("data_source") or "",
            "bundle_sha256": export.get("bundle_sha256") or "",
            "version": export.get("version") or fedxray_version(),
            "warnings": warnings or "none",  # model_warnings: why the model is not fit for use, if it is not
            "threshold": _number(doc.get("threshold")),  # the exported model's (ONNX fedxray.threshold)
            "operating_point": doc.get("operating_point") or "",
        }
        if onnx.is_file():
            lineage["onnx_sha256"] = file_sha256(onnx)
        tags = {f"fedxray.{key}": _tag(without_paths(value)) for key, value in lineage.items()
                if value not in (None, "", [], {})}
        self.client.log_batch(self.run_id, tags=_tags(tags))
        if lineage["threshold"] is not None:  # the metric `threshold` is the model's own threshold
            from mlflow.entities import Metric  # deferred: MLflow

            step = int(export.get("round") or last.get("round") or 0)
            self.client.log_batch(self.run_id, metrics=[Metric("threshold", lineage["threshold"], int(time.time() * 1000),
                                                               step)])
        result = None
        if onnx.is_file():
            self.client.log_artifact(self.run_id, str(onnx), "model")
            if (run_dir / "model.pt").is_file():  # the TorchScript twin, same metadata (common/torchscript_export.py)
                self.client.log_artifact(self.run_id, str(run_dir / "model.pt"), "model")
            result = self._register(tags, lineage)
        self.client.set_terminated(self.run_id, "FINISHED")
        save_state(run_dir, {"tracking_uri": self.tracking_uri, "mlflow_run_id": self.run_id,
                              "registered_model": result})
        log.info("tracking: %s%s", self.where(), f"; model {result}" if result else "")
        return result

    def _register(self, tags: dict[str, str], lineage: dict[str, Any]) -> str:
        from mlflow.exceptions import MlflowException  # deferred: MLflow

        try:
            self.client.get_registered_model(self.registered_model)
        except MlflowException:
            self.client.create_registered_model(
                self.registered_model, description="fedxray global models: one version per exported federated run")
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/model"
        eps = ", ".join(f"{site} {value:.2f}" for site, value in sorted(lineage["epsilon"].items()))
        auc = lineage["pooled_auc"]
        description = (f"Run {self.run_name}: round {lineage['export_round']} of {lineage['rounds']} exported "
                       f"(pooled validation AUC {'n/a' if auc is None else f'{auc:.3f}'}); sites "
                       f"{', '.join(lineage['sites']) or '-'}; epsilon {eps or 'no DP'}; app bundle sha256 "
                       f"{lineage['bundle_sha256'] or 'unknown'}; fedxray {lineage['version']}"
                       + (f"; NOT FIT FOR USE: {'; '.join(lineage['warnings'])}." if lineage["warnings"] != "none" else "."))
        version = self.client.create_model_version(self.registered_model, source=source, run_id=self.run_id, tags=tags,
                                                   description=description)
        self.model_version = f"{self.registered_model} version {version.version}"
        return self.model_version

    @_never_fails
    def abort(self, reason: str) -> None:
        """End the MLflow run as FAILED (the run stopped with an error); ``reason`` is one short line, no paths."""
        from mlflow.entities import RunTag  # deferred: MLflow

        self.client.log_batch(self.run_id, tags=[RunTag("fedxray.failure", reason[:_TAG_MAX])])
        self.client.set_terminated(self.run_id, "FAILED")


def _tags(tags: dict[str, str]) -> list[Any]:
    from mlflow.entities import RunTag  # deferred: MLflow

    return [RunTag(key, value) for key, value in tags.items()]


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def load_state(run_dir: Path) -> dict[str, Any]:
    """``<run_dir>/tracking.json``: which tracking run this run folder is ({} when untracked)."""
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def save_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Write ``<run_dir>/tracking.json`` (atomically)."""
    atomic_write_bytes(run_dir / STATE_FILE, json.dumps(state, indent=2).encode())
