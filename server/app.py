"""The coordinator's Flower ServerApp: a thin adapter between Flower and fedxray's plain modules.

Flower's strategy runs the rounds (server/strategy.py adds fedxray's checks and pooled metrics);
the rest is plain Python: server/run_setup.py (preflight, run folder and id, waiting for sites),
server/rounds.py (after every round: record, checkpoint, best round, metrics.json, early stop)
and server/export.py (ONNX, model card, plots). This file only translates records.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from server.audit import record_run_event, record_run_finished
from server.checkpoint import latest_checkpoint
from server.export import finish, provenance
from server.polling import PollingGrid
from server.rounds import EarlyStop, RoundKeeper
from server.run_setup import PreflightError, preflight, run_directory, run_identity, wait_for_sites
from server.strategy import load_strategy_state, make_strategy
from server.tracking import start_tracking

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# A child of Flower's logger: its handler is the one that reaches `flwr run --stream` and the run log.
log = logging.getLogger("flwr.fedxray")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    grid = PollingGrid(grid)  # replies polled at 0.02-0.5 s instead of Flower's fixed 3 s
    run, model = preflight(dict(context.run_config))
    run_dir, run_name = run_directory(run)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_map = run.to_mapping()
    run_id = run_identity(run_dir, resuming=bool(run.resume_from))

    start_round, history, state = 0, [], {}
    weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    if run.resume_from:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise PreflightError(f"nothing to resume in {run_dir}: no readable checkpoint under checkpoints/")
        start_round, history, state, weights = ckpt.round, ckpt.history, ckpt.strategy_state, ckpt.weights
        config_map = {**ckpt.run_config, "resume-from": str(run_dir)}
        run = RunConfig.from_mapping(config_map)
        log.info("resuming %s after round %d of %d", run_name, start_round, run.num_server_rounds)
    tracker = start_tracking(run_dir, run_name, config_map)  # None when tracking is off
    try:
        _rounds(grid, run, run_dir, run_name, run_id, config_map, history, state, weights, start_round, tracker)
        try:
            bundle = str(grid.run.fab_hash or "")
        except (AttributeError, RuntimeError):  # a grid without run details (tests)
            bundle = ""
        finish(run_dir, run_name, run, provenance(run, bundle))
    except BaseException as err:
        if tracker:
            tracker.abort(type(err).__name__)
        record_run_event(run_dir, "run-failed", error=type(err).__name__)
        raise
    if tracker:
        tracker.finish(run_dir)
    record_run_finished(run_dir)


def _rounds(grid: Grid, run: RunConfig, run_dir, run_name: str, run_id: str, config_map: dict, history: list,
            state: dict, weights: dict, start_round: int, tracker) -> None:
    """The rounds left: Flower's strategy with fedxray's checks, the round keeper as evaluate_fn."""
    rounds_left = run.num_server_rounds - start_round
    if rounds_left > 0:
        wait_for_sites(grid, run.min_sites, run.wait_timeout)
        strategy = make_strategy(run, round_offset=start_round)
        load_strategy_state(strategy, state)
        keeper = RoundKeeper(strategy=strategy, run_dir=run_dir, run_name=run_name, config_map=config_map,
                             history=history, start_round=start_round, total_rounds=run.num_server_rounds,
                             patience=run.early_stop_patience)

        def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            rec = keeper.after_round(server_round, {k: v.numpy() for k, v in arrays.items()})
            if rec is None:
                return None
            if tracker:
                tracker.log_round(rec)
            auc = rec["pooled_auc"]
            return MetricRecord({"pooled-auc": float(auc) if auc == auc else 0.0})

        config = {"run-name": run_name, "run-id": run_id}
        try:
            strategy.start(grid=grid, initial_arrays=ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v))
                                                                  for k, v in weights.items()}),
                           num_rounds=rounds_left, timeout=run.round_timeout, train_config=ConfigRecord(config),
                           evaluate_config=ConfigRecord(config), evaluate_fn=after_round)
        except EarlyStop:
            pass
