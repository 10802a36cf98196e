"""Before the first round: the run config checked, the initial model built, the run's folder and id, the sites.

Flower-free (the grid only needs ``get_node_ids``), so the coordinator's start-up is unit-tested
without a SuperLink.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from common.cache import atomic_write_bytes
from common.config import RunConfig
from common.config_fields import ConfigError
from common.models import ModelError, WeightsError, build_model

log = logging.getLogger("flwr.fedxray")


class PreflightError(RuntimeError):
    """The run cannot start: config or model problems, found before any site spends anything."""


def preflight(raw_config: dict[str, Any]) -> tuple[RunConfig, torch.nn.Module]:
    """Validate the whole run config and dry-run the model at its input size and output count."""
    try:
        run = RunConfig.from_mapping(raw_config)
    except ConfigError as err:
        raise PreflightError(str(err)) from err
    torch.manual_seed(run.seed)  # the initial global model is reproducible from the run's seed
    weights = None
    if run.init_weights:
        weights = Path(run.init_weights).expanduser()
        if not weights.is_file():
            raise PreflightError(f"init-weights {weights} is not a file: give a local weights file (a state_dict saved "
                                 "with torch.save, or torchvision weights from your own cache); nothing is downloaded")
    try:
        model = build_model(run.model, dp=True, weights_path=weights, **run.model_kwargs())
    except (ModelError, WeightsError) as err:
        raise PreflightError(str(err)) from err
    if run.model != "scatternet" and run.optimizer == "sgd" and run.learning_rate > 0.1:
        log.warning("model %s with SGD at learning-rate %g: that rate suits the scatternet head; CNNs usually need "
                    "about 0.01 (SGD) or 1e-3 (Adam)", run.model, run.learning_rate)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, run.image_size, run.image_size))
    if tuple(out.shape) != (2, run.num_outputs):
        raise PreflightError(f"model {run.model} gives output shape {tuple(out.shape)}, expected (2, {run.num_outputs})")
    return run, model


def run_directory(run: RunConfig) -> tuple[Path, str]:
    if run.resume_from:
        path = Path(run.resume_from).expanduser().resolve()
        return path, path.name
    name = run.run_name or datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S")
    return (Path(run.runs_dir).expanduser().resolve() / name), name


def run_identity(run_dir: Path, resuming: bool) -> str:
    """A random id for this run, kept in ``run_dir/run-id`` so a resumed run keeps it.

    Sites key their stored replies and ledger entries by run name, this id and round. The name
    alone is not enough: two runs with the same name and seed send the same round-1 weights, and
    a site would take the second run for a retry of the first and re-send the old update. A
    resumed run is the same run, so it reads the id back and a retried round stays a retry.
    """
    path = run_dir / "run-id"
    if resuming and path.is_file():
        found = path.read_text().strip()
        if found:
            return found
    uid = uuid.uuid4().hex[:16]
    atomic_write_bytes(path, (uid + "\n").encode())
    return uid


def wait_for_sites(grid: Any, needed: int, give_up_after: float, every: float = 10.0) -> int:
    """Wait until ``needed`` sites are connected, saying how many are there; give up after a while."""
    start = time.monotonic()
    last_said = -math.inf
    while True:
        have = len(list(grid.get_node_ids()))
        if have >= needed:
            log.info("%d site(s) connected (%d needed): starting", have, needed)
            return have
        waited = time.monotonic() - start
        if waited > give_up_after:
            raise PreflightError(
                f"only {have} of {needed} site(s) connected after {give_up_after:.0f} s; "
                "check that the sites are running `fl-client start`, or lower min-sites / raise wait-timeout"
            )
        if waited - last_said >= every:
            log.info("waiting for sites: %d connected, %d needed (giving up in %.0f s)", have, needed,
                     give_up_after - waited)
            last_said = waited
        time.sleep(1.0)
