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
- artefacts: ``model/model.onnx`` (and ``model/model.pt``), ``model_card.md``, ``metrics.json``, ``plots/*.png``;
- the registered model ``fedxray-<task>-<labels>``, one version per exported run, tagged with its
  lineage: fedxray run name and id, rounds trained, exported round, sites, per-site epsilon,
  per-site data counts, app bundle sha256, fedxray version, the ONNX file's sha256 (so
  ``sha256sum model.onnx`` finds its record) and the reasons it is not fit for use, if any.

Where. The run setting ``tracking-uri``: empty (the default) is a SQLite store beside the run
folders, ``<runs-dir>/mlflow.db`` with artefacts in ``<runs-dir>/mlartifacts/``, so one
``mlflow ui`` shows every run of a coordinator (or of an ``fl-sim`` folder) side by side; ``off``
turns tracking off; anything else is an MLflow tracking URI (``http://mlflow.internal:5000``,
``sqlite:////abs/path.db``). MLflow's own file store (``./mlruns``) is refused by MLflow 3.
This module opens the store; what a run logs there is server/tracking_run.py.

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
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.audit import current_user
from common.cache import file_sha256
from common.cli import fedxray_version
from server.tracking_run import (  # noqa: F401 - STATE_FILE is part of this module's API
    EXPERIMENT,
    MLFLOW_RELEASE,
    STATE_FILE,
    Tracker,
    load_state,
    one_line,
    save_state,
    ui_command,
)

log = logging.getLogger("fedxray.tracking")

#: The run setting naming the tracking backend ("" = local SQLite store beside the runs, "off" = none).
TRACKING_KEY = "tracking-uri"
OFF_VALUES = frozenset({"off", "none", "false", "no", "0"})
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"

_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
_PARAM_MAX = 500
_NOT_RECORDED = "(a path: not recorded)"


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


def model_name(run_config: dict[str, Any]) -> str:
    """The registered model's name: one per task and label set, each exported run a new version."""
    labels = str(run_config.get("labels", "")).replace(",", "-")
    return _NAME_CHARS.sub("-", f"fedxray-{run_config.get('task', 'model')}-{labels}").strip("-")


def _param_value(value: Any) -> str:
    if isinstance(value, str) and ("/" in value or "\\" in value or value.startswith("~")):
        return _NOT_RECORDED
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:_PARAM_MAX]


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
        from mlflow import MlflowClient  # deferred (as every MLflow import): 1.5 s, and the environment first
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
        state = load_state(run_dir)
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
                    "fedxray.version": fedxray_version()}
            run = client.create_run(experiment_id, run_name=display, tags=tags)
            run_id = run.info.run_id
            from mlflow.entities import Param  # deferred: MLflow (see start_tracking)

            params = [Param(str(k), _param_value(v)) for k, v in sorted(run_config.items())]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(run_id, params=params[i:i + 100])
        save_state(run_dir, {"tracking_uri": uri, "mlflow_run_id": run_id})
    except Exception as err:  # noqa: BLE001 - an unreachable server or a broken store must not stop the run
        log.warning("tracking off for run %s: cannot open the MLflow store %s (%s: %s); check %s or set it to \"off\"",
                    run_name, uri, type(err).__name__, one_line(err), TRACKING_KEY)
        return None
    tracker = Tracker(client, run_id=run_id, tracking_uri=uri, run_name=run_name, run_dir=run_dir,
                      registered_model=model_name(run_config))
    log.info("tracking: %s (ready in %.1f s)", tracker.where(), time.monotonic() - started)
    return tracker


def tracking_hint(run_dir: str | os.PathLike[str]) -> str | None:
    """For ``fl-sim`` and ``fl-server status``: where this run is tracked and how to browse it (None if untracked)."""
    state = load_state(Path(run_dir))
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
    from mlflow import MlflowClient  # deferred: MLflow takes 1.5 s to import, and the environment first

    digest = file_sha256(onnx_path)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = client.search_model_versions(f"tags.`fedxray.onnx_sha256` = '{digest}'")
    if not found:
        return None
    mv = found[0]
    lineage = {key.removeprefix("fedxray."): value for key, value in mv.tags.items() if key.startswith("fedxray.")}
    return {**lineage, "registered_model": mv.name, "model_version": int(mv.version), "mlflow_run_id": mv.run_id,
            "description": mv.description}
