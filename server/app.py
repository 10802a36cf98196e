"""The coordinator's Flower ServerApp: pre-flight, rounds with checkpoints, export and report.

Flower's strategy runs the rounds; fedxray hangs its work on Flower's hooks: the strategy's
aggregate methods (validation, pooled metrics; server/strategy.py) and ``evaluate_fn``, called
after every round, which writes the round record, an atomic checkpoint and metrics.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common.cache import atomic_write_bytes
from common.config import ConfigError, RunConfig
from common.metrics import weighted_mean
from common.models import ModelError, WeightsError, build_model, describe
from common.onnx_export import export_onnx, reference_batch
from server.checkpoint import Checkpoint, latest_checkpoint, load_best, save_best, save_checkpoint
from server.report import write_metrics, write_model_card, write_plots
from server.strategy import load_strategy_state, make_strategy, strategy_state

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
log = logging.getLogger("fedxray.server")
app = ServerApp()


class PreflightError(RuntimeError):
    """The run cannot start: config or model problems, found before any site spends anything."""


class EarlyStop(Exception):  # noqa: N818 - control flow, not an error
    """Raised from evaluate_fn to end the rounds early (Flower 1.41 has no should_stop)."""


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


def wait_for_sites(grid: Grid, needed: int, give_up_after: float, every: float = 10.0) -> int:
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


def round_record(strategy: Any, r: int, seconds: float) -> dict[str, Any]:
    """The contract-4 entry of round ``r``: pooled AUC, train loss, epsilon per site, per-site metrics."""
    entry = strategy.logs.get(r)
    pooled = strategy.pooled(r)
    pooled = dict(pooled) if pooled is not None else {}
    sites: dict[str, dict[str, Any]] = {}
    train_losses, train_n = [], []
    epsilon: dict[str, float] = {}
    if entry is not None:
        for site, m in entry.train.items():
            sites.setdefault(site, {}).update(
                num_examples=int(m.get("num-examples", 0)), train_loss=m.get("train-loss"),
                epsilon_round=m.get("epsilon-round"), epsilon_total=m.get("epsilon-total"),
                train_seconds=m.get("train-seconds"),
            )
            epsilon[site] = float(m.get("epsilon-total", 0.0))
            train_losses.append(m.get("train-loss", math.nan))
            train_n.append(int(m.get("num-examples", 0)))
        for site, m in entry.evaluate.items():
            sites.setdefault(site, {}).update(
                val_examples=int(m.get("num-examples", 0)), val_positive=int(m.get("num-positive", 0)),
                auc=m.get("auc"), sensitivity=m.get("sensitivity"), specificity=m.get("specificity"),
                eval_loss=m.get("eval-loss"), hist_pos=m.get("hist-pos"), hist_neg=m.get("hist-neg"),
            )
    return {
        "round": r,
        "pooled_auc": pooled.get("pooled-auc", math.nan),
        "train_loss": weighted_mean(train_losses, train_n) if train_n else math.nan,
        "eval_loss": pooled.get("eval-loss", math.nan),
        "sensitivity": pooled.get("sensitivity", math.nan),
        "specificity": pooled.get("specificity", math.nan),
        "threshold": pooled.get("threshold", 0.5),
        "epsilon": epsilon,
        "sites": sites,
        "rejected": dict(entry.rejected) if entry else {},
        "failures": list(entry.failures) if entry else [],
        "seconds": seconds,
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
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
    rounds_left = run.num_server_rounds - start_round

    if rounds_left > 0:
        wait_for_sites(grid, run.min_sites, run.wait_timeout)
        strategy = make_strategy(run, round_offset=start_round)
        load_strategy_state(strategy, state)
        t_round = [time.monotonic()]
        best = [max((h.get("pooled_auc") or -1.0 for h in history), default=-1.0)]
        since_best = [0]
        previous_best = load_best(run_dir)
        best_saved = [previous_best[2] if previous_best else -1.0]

        def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:
                return None
            r = server_round + start_round
            rec = round_record(strategy, r, time.monotonic() - t_round[0])
            t_round[0] = time.monotonic()
            history.append(rec)
            current = {k: v.numpy() for k, v in arrays.items()}
            save_checkpoint(run_dir, Checkpoint(r, current, strategy_state(strategy), history, config_map))
            if rec["pooled_auc"] == rec["pooled_auc"] and rec["pooled_auc"] > best_saved[0]:
                save_best(run_dir, r, current, rec["pooled_auc"])
                best_saved[0] = rec["pooled_auc"]
            write_metrics(run_dir, run_name, config_map, history)
            eps = ", ".join(f"{k} {v:.2f}" for k, v in sorted(rec["epsilon"].items()))
            log.info("round %d/%d: pooled AUC %.3f, train loss %.4f, epsilon [%s]%s", r, run.num_server_rounds,
                     rec["pooled_auc"], rec["train_loss"], eps,
                     f", rejected {sorted(rec['rejected'])}" if rec["rejected"] else "")
            auc = rec["pooled_auc"]
            if run.early_stop_patience and auc == auc:
                if auc > best[0] + 1e-4:
                    best[0], since_best[0] = auc, 0
                else:
                    since_best[0] += 1
                    if since_best[0] >= run.early_stop_patience:
                        log.info("early stop: no pooled AUC gain for %d round(s)", since_best[0])
                        raise EarlyStop
            return MetricRecord({"pooled-auc": float(auc) if auc == auc else 0.0})

        train_config = ConfigRecord({"run-name": run_name, "run-id": run_id})
        eval_config = ConfigRecord({"run-name": run_name, "run-id": run_id})
        try:
            strategy.start(grid=grid, initial_arrays=ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v))
                                                                  for k, v in weights.items()}),
                           num_rounds=rounds_left, timeout=run.round_timeout, train_config=train_config,
                           evaluate_config=eval_config, evaluate_fn=after_round)
        except EarlyStop:
            pass

    finish(run_dir, run_name, run)


def finish(run_dir: Path, run_name: str, run: RunConfig) -> None:
    """Export the last checkpoint's model to ONNX and write the model card, metrics and plots."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        log.error("no round completed: nothing to export in %s", run_dir)
        return
    # The exported model is the round with the best pooled validation AUC (post-processing: the sites
    # already released every round's histograms); the card says which round and that the choice was
    # made on the validation data it reports.
    best = load_best(run_dir)
    export_round, weights = (best[0], best[1]) if best is not None else (ckpt.round, ckpt.weights)
    model = build_model(run.model, dp=True, **run.model_kwargs())
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})
    chosen = next((h for h in ckpt.history if h.get("round") == export_round), ckpt.history[-1] if ckpt.history else {})
    last = ckpt.history[-1] if ckpt.history else {}
    threshold = chosen.get("threshold")
    threshold = 0.5 if threshold is None else float(threshold)
    # Privacy is spent by every round trained, not only up to the exported one: report the total.
    epsilon = last.get("epsilon", {})
    sample = None
    if run.parity_data:
        sample = reference_batch(run.parity_data, (run.image_size, run.image_size))
        log.info("ONNX parity: %d reference radiographs from %s plus random images", len(sample), run.parity_data)
    report = export_onnx(
        model, run_dir / "model.onnx", sample_batch=sample, task=run.task, labels=list(run.labels),
        input_size=(run.image_size, run.image_size), threshold=threshold,
        metadata={"fedxray.model": run.model, "fedxray.rounds": str(ckpt.round), "fedxray.export_round": str(export_round),
                  "fedxray.sites": json.dumps(sorted({s for h in ckpt.history for s in h.get("sites", {})})),
                  "fedxray.epsilon": json.dumps(epsilon)},
    )
    export = {"max_abs_diff": report.max_abs_diff, "size_bytes": report.size_bytes,
              "parity_images": 0 if sample is None else len(sample), "round": export_round,
              "pooled_auc": chosen.get("pooled_auc")}
    write_metrics(run_dir, run_name, ckpt.run_config, ckpt.history, {"export": export, "threshold": threshold})
    write_plots(run_dir, ckpt.history)
    kwargs = run.model_kwargs()
    info = describe(run.model, num_outputs=kwargs.pop("num_outputs"), **kwargs)
    write_model_card(run_dir, run_name=run_name, run_config=ckpt.run_config, rounds=ckpt.history,
                     model_info=info, threshold=threshold, export=export)
    log.info("run %s finished: %s", run_name, run_dir)
