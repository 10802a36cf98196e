"""Experiment tracking: each run's settings, per-round metrics, artefacts and registered model, in MLflow.

Why MLflow (the ``mlflow-skinny`` client, no server needed): it is what ML teams already browse,
and its model registry gives the exported model one record of how it was made. Every run,
simulated (``fl-sim``) or deployed (``fl-server run``), is one MLflow run in the experiment
``fedxray``:

- params: the run settings (``[tool.flwr.app.config]``), paths left out (as in the audit log);
- metrics, one step per round: ``pooled_auc``, ``eval_loss``, ``train_loss`` (non-DP only),
  ``sensitivity``, ``specificity``, ``threshold``, ``seconds``, ``epsilon/<site>`` (cumulative over
  all runs, as the sites report it), ``epsilon_max``, ``auc/<site>``, ``sites_answered``,
  ``sites_rejected``, ``sites_failed``;
- artefacts: ``model/model.onnx``, ``model_card.md``, ``metrics.json``, ``plots/*.png``;
- the registered model ``fedxray-<task>-<labels>``, one version per exported run, tagged with its
  lineage: fedxray run name and id, rounds trained, exported round, sites, per-site epsilon,
  per-site data counts, app bundle sha256, fedxray version, the ONNX file's sha256 (so
  ``sha256sum model.onnx`` finds its record) and the reasons it is not fit for use, if any.

Where. The run setting ``tracking-uri``: empty (the default) is a SQLite store beside the run
folders, ``<runs-dir>/mlflow.db`` with artefacts in ``<runs-dir>/mlartifacts/``, so one
``mlflow ui`` shows every run of a coordinator (or of an ``fl-sim`` folder) side by side; ``off``
turns tracking off; anything else is an MLflow tracking URI (``http://mlflow.internal:5000``,
``sqlite:////abs/path.db``). MLflow's own file store (``./mlruns``) is refused by MLflow 3.

No network unless a server is configured: the SQLite store is a local file, and MLflow's usage
telemetry is switched off before MLflow is imported (``MLFLOW_DISABLE_TELEMETRY``).

Tracking never fails a run: when the backend cannot be reached or refuses a write, one warning is
logged and tracking stops for the rest of the run (a dead server costs one timeout, not one per
round); the run's own files (metrics.json, model card) are the record of truth. Cost, measured on
the 2-core machine, once per run: about 1.5 s to import MLflow and open an existing store (4.5 s
when the store is created); then 20-35 ms per round, and 0.1-0.4 s at the end for the artefacts
and the registration (a 30 MB model: 0.4 s). See docs/operations.md, "Experiment tracking".
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import numbers
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from common.audit import current_user
from common.cache import atomic_write_bytes, file_sha256

log = logging.getLogger("fedxray.tracking")

#: The run setting naming the tracking backend ("" = local SQLite store beside the runs, "off" = none).
TRACKING_KEY = "tracking-uri"
OFF_VALUES = frozenset({"off", "none", "false", "no", "0"})
EXPERIMENT = "fedxray"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
#: In each run folder: which tracking run it is, so a resumed run continues the same one.
STATE_FILE = "tracking.json"
#: The MLflow release of the pinned client; `mlflow ui` of the same release reads the store as written.
MLFLOW_RELEASE = "3.17.2"

_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
_TAG_MAX = 5000
_PARAM_MAX = 500
_NOT_RECORDED = "(a path: not recorded)"

T = TypeVar("T")


def _offline_mlflow_env() -> None:
    """Before MLflow is imported: no usage telemetry, logging left to fedxray's entry points, short HTTP retries.

    ``setdefault``: an operator who sets these deliberately keeps their values.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")  # GitPython (an MLflow dependency) warns when git is absent


def resolve_tracking_uri(setting: str, run_dir: str | os.PathLike[str]) -> str | None:
    """The MLflow URI for a run setting: None when tracking is off; "" means the SQLite store beside the runs.

    A bare path (no ``scheme://``) is a folder for ``mlflow.db``, or the ``.db`` file itself.
    """
    value = (setting or "").strip()
    if value.lower() in OFF_VALUES:
        return None
    if not value:
        return "sqlite:///" + str(Path(run_dir).resolve().parent / STORE_FILE)
    if ":" not in value:
        path = Path(value).expanduser().resolve()
        return "sqlite:///" + str(path if path.suffix == ".db" else path / STORE_FILE)
    return value


def ui_command(tracking_uri: str) -> str:
    """What to run (or open) to browse the runs: one line for the operator."""
    if tracking_uri.startswith("sqlite:"):
        return (f"MLFLOW_DISABLE_TELEMETRY=true mlflow ui --backend-store-uri {tracking_uri} --port 5000, then open "
                f"http://127.0.0.1:5000 (the UI is in the full package: pip install mlflow=={MLFLOW_RELEASE})")
    return f"open {tracking_uri} (experiment {EXPERIMENT})"


def model_name(run_config: dict[str, Any]) -> str:
    """The registered model's name: one per task and label set, each exported run a new version."""
    labels = str(run_config.get("labels", "")).replace(",", "-")
    return _NAME_CHARS.sub("-", f"fedxray-{run_config.get('task', 'model')}-{labels}").strip("-")


def _metric_key(*parts: str) -> str:
    return "/".join(_KEY_CHARS.sub("_", p) for p in parts)


def _number(value: Any) -> float | None:
    """A finite float, or None (not measured: no point is drawn rather than a NaN)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars are Real too
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _param_value(value: Any) -> str:
    if isinstance(value, str) and ("/" in value or "\\" in value or value.startswith("~")):
        return _NOT_RECORDED
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:_PARAM_MAX]


def _tag(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text[:_TAG_MAX]


def _one_line(err: BaseException, limit: int = 240) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fedxray_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedxray")
    except PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Raise these loggers to WARNING for the block only (their levels are restored after)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


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
                        self.run_name, method.__name__, type(err).__name__, _one_line(err))
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
        """Log one round's record (the metrics.json entry, contract 4) at step = its round number."""
        from mlflow.entities import Metric

        step = int(record["round"])
        now = int(time.time() * 1000)
        values: dict[str, float | None] = {
            key: _number(record.get(key))
            for key in ("pooled_auc", "eval_loss", "train_loss", "sensitivity", "specificity", "threshold", "seconds")
        }
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
        for name in ("model_card.md", "metrics.json"):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        for plot in sorted(run_dir.glob("*.png")):
            self.client.log_artifact(self.run_id, str(plot), "plots")
        onnx = run_dir / "model.onnx"
        warnings = list(export.get("warnings") or [])
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
            "version": export.get("version") or _fedxray_version(),
            "warnings": warnings or "none",  # fitness_warnings: why the model is not fit for use, if it is not
        }
        if onnx.is_file():
            lineage["onnx_sha256"] = file_sha256(onnx)
        tags = {f"fedxray.{key}": _tag(value) for key, value in lineage.items() if value not in (None, "", [], {})}
        self.client.log_batch(self.run_id, tags=_tags(tags))
        result = None
        if onnx.is_file():
            self.client.log_artifact(self.run_id, str(onnx), "model")
            result = self._register(tags, lineage)
        self.client.set_terminated(self.run_id, "FINISHED")
        _save_state(run_dir, {"tracking_uri": self.tracking_uri, "mlflow_run_id": self.run_id,
                              "registered_model": result})
        log.info("tracking: %s%s", self.where(), f"; model {result}" if result else "")
        return result

    def _register(self, tags: dict[str, str], lineage: dict[str, Any]) -> str:
        from mlflow.exceptions import MlflowException

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
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag("fedxray.failure", reason[:_TAG_MAX])])
        self.client.set_terminated(self.run_id, "FAILED")


def _tags(tags: dict[str, str]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(key, value) for key, value in tags.items()]


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _load_state(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _save_state(run_dir: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(run_dir / STATE_FILE, json.dumps(state, indent=2).encode())


def start_tracking(run_dir: str | os.PathLike[str], run_name: str, run_config: dict[str, Any]) -> Tracker | None:
    """Open (or, for a resumed run, reopen) the run's MLflow run; None when tracking is off or unavailable.

    ``run_config``: the run settings as a kebab-case mapping (``RunConfig.to_mapping()``); its
    ``tracking-uri`` picks the backend. Never raises: a backend that cannot be opened is one
    warning and the run goes on untracked.
    """
    run_dir = Path(run_dir)
    try:
        uri = resolve_tracking_uri(str(run_config.get(TRACKING_KEY, "") or ""), run_dir)
    except (OSError, RuntimeError) as err:
        log.warning("tracking off: %s = %r is not usable (%s)", TRACKING_KEY, run_config.get(TRACKING_KEY), err)
        return None
    if uri is None:
        return None
    started = time.monotonic()
    try:
        _offline_mlflow_env()
        from mlflow import MlflowClient
    except ImportError as err:
        log.warning("tracking off: MLflow is not installed (%s): pip install mlflow-skinny==%s, or set %s = \"off\"",
                    err, MLFLOW_RELEASE, TRACKING_KEY)
        return None
    try:
        local = uri.startswith("sqlite:///")
        if local:
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings(), _quiet("alembic", "mlflow.store.db.utils"):
            # Creating a store runs ~70 schema migrations, each an INFO line, and trips one SQLAlchemy 2.1
            # deprecation inside MLflow: neither is the operator's concern.
            warnings.filterwarnings("ignore", message=r".*``noload`` loader strategy is deprecated")
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = (Path(uri[len("sqlite:///"):]).parent / ARTIFACTS_DIR).as_uri() if local else None
            experiment_id = client.create_experiment(EXPERIMENT, artifact_location=location)
        state = _load_state(run_dir)
        run_id = None
        if state.get("tracking_uri") == uri and state.get("mlflow_run_id"):
            try:
                client.update_run(state["mlflow_run_id"], status="RUNNING")
                run_id = state["mlflow_run_id"]
                client.set_tag(run_id, "fedxray.resumed", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            except Exception:  # noqa: BLE001 - the earlier run is gone from the store: start a new one
                run_id = None
        if run_id is None:
            # fl-sim names every run folder "run": the simulation's folder name tells them apart in the UI.
            display = Path(str(run_config["sim-root"])).name or run_name if run_config.get("sim-root") else run_name
            tags = {"mlflow.runName": display, "mlflow.user": current_user(), "mlflow.source.name": "fedxray",
                    "mlflow.source.type": "JOB", "fedxray.run_name": run_name,
                    "fedxray.mode": "simulation" if run_config.get("sim-root") else "deployment",
                    "fedxray.version": _fedxray_version()}
            run = client.create_run(experiment_id, run_name=display, tags=tags)
            run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(str(k), _param_value(v)) for k, v in sorted(run_config.items())]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(run_id, params=params[i:i + 100])
        _save_state(run_dir, {"tracking_uri": uri, "mlflow_run_id": run_id})
    except Exception as err:  # noqa: BLE001 - an unreachable server or a broken store must not stop the run
        log.warning("tracking off for run %s: cannot open the MLflow store %s (%s: %s); check %s or set it to \"off\"",
                    run_name, uri, type(err).__name__, _one_line(err), TRACKING_KEY)
        return None
    tracker = Tracker(client, run_id=run_id, tracking_uri=uri, run_name=run_name, run_dir=run_dir,
                      registered_model=model_name(run_config))
    log.info("tracking: %s (ready in %.1f s)", tracker.where(), time.monotonic() - started)
    return tracker


def tracking_hint(run_dir: str | os.PathLike[str]) -> str | None:
    """For ``fl-sim`` and ``fl-server status``: where this run is tracked and how to browse it (None if untracked)."""
    state = _load_state(Path(run_dir))
    uri = state.get("tracking_uri")
    if not uri:
        return None
    model = f", model {state['registered_model']}" if state.get("registered_model") else ""
    return f"tracking: MLflow run {state.get('mlflow_run_id')}{model}; browse: {ui_command(uri)}"


def find_model(onnx_path: str | os.PathLike[str], tracking_uri: str) -> dict[str, Any] | None:
    """Which registered model version is this ONNX file, and how was it made: its lineage tags (``version`` is
    fedxray's, ``model_version`` the registry's), or None.

    Looked up by the file's sha256, so a copy of ``model.onnx`` anywhere (a PACS gateway, a reviewer's
    laptop) finds its record.
    """
    _offline_mlflow_env()
    from mlflow import MlflowClient

    digest = file_sha256(onnx_path)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = client.search_model_versions(f"tags.`fedxray.onnx_sha256` = '{digest}'")
    if not found:
        return None
    mv = found[0]
    lineage = {key.removeprefix("fedxray."): value for key, value in mv.tags.items() if key.startswith("fedxray.")}
    return {**lineage, "registered_model": mv.name, "model_version": int(mv.version), "mlflow_run_id": mv.run_id,
            "description": mv.description}
