"""What `fl-sim run` and `resume` print after a run: the rounds, the warnings, and the figures only a simulation has.

A deployment's coordinator sees noised histograms; a simulation also knows every site's exact
validation scores and holds patients back that no site trained or validated on. Those figures are
printed here, written beside the run (exact-validation.json, holdout.json) and added to the run's
metrics.json, plots and model card, labelled simulation-only.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from common.cache import atomic_write_bytes
from common.dataset import site_salt
from server.tracking import tracking_hint
from simulations.progress import MAX_SITES_LISTED


def report(sim_root: Path, run_dir: Path, holdout: Path, started: float) -> int:
    """After a run (or a resume) ended: the rounds, the warnings, the exact pooled AUC, the held-out score."""
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        print(f"fl-sim: the run finished without metrics; see {sim_root / 'run.log'}", file=sys.stderr)
        return 1
    doc = json.loads(metrics_path.read_text())
    rounds = doc["rounds"]
    print(render_rounds(rounds))
    for warning in doc.get("warnings", []):
        print(f"WARNING: {warning}")
    print(exact_summary(sim_root, run_dir))
    if holdout.is_dir() and (run_dir / "model.onnx").is_file():
        print(score_holdout(run_dir / "model.onnx", holdout, sim_root))
    add_simulation_figures(sim_root, run_dir)
    print(f"\nrun directory: {run_dir}  ({time.monotonic() - started:.0f} s)")
    print("  model.onnx, model_card.md, metrics.json, rounds.png, roc.png, checkpoints/")
    print_tracking(run_dir)
    return 0


def print_tracking(run_dir: Path) -> None:
    hint = tracking_hint(run_dir)
    if hint:
        print(hint)


def exact_summary(sim_root: Path, run_dir: Path) -> str:
    """The exact pooled validation AUC (simulation only), beside the coordinator's noised estimate."""
    from simulations.evaluation import exact_validation_auc  # deferred: imports torch

    exact = exact_validation_auc(sim_root, run_dir)
    if not exact:
        return ""
    atomic_write_bytes(sim_root / "exact-validation.json", json.dumps(exact, indent=2).encode())
    parts = [f"last round ({exact['last']['round']}) {exact['last']['auc']:.3f}"]
    if "exported" in exact:
        parts.append(f"exported round ({exact['exported']['round']}) {exact['exported']['auc']:.3f}")
    return ("\nexact pooled validation AUC over the sites' " + f"{exact['images']} validation images (a simulation can "
            "measure it; the coordinator above saw noised histograms): " + ", ".join(parts))


def add_simulation_figures(sim_root: Path, run_dir: Path) -> None:
    """The exact figures only a simulation has (exact-validation.json, holdout.json) into the run's metrics.json,
    plots and model card, labelled as simulation-only (server/report.py)."""
    from server.report import add_simulation_figures as add_figures

    figures: dict[str, Any] = {}
    for key, name in (("exact_validation", "exact-validation.json"), ("holdout", "holdout.json")):
        try:
            figures[key] = json.loads((sim_root / name).read_text())
        except (OSError, ValueError):
            continue
    exact = figures.get("exact_validation") or {}
    if exact:  # the exported round's model: "exported" with export-round = best, else the last round's
        chosen = exact.get("exported") or exact.get("last") or {}
        figures["exact_validation"] = {"round": chosen.get("round"), "auc": chosen.get("auc"), "images": exact.get("images")}
    held = figures.get("holdout") or {}
    if held:
        figures["holdout"] = {k: held.get(k) for k in ("images", "auc", "auc_ci", "threshold", "sensitivity", "specificity")}
    if figures and (run_dir / "metrics.json").is_file():
        add_figures(run_dir, figures)


def score_holdout(model: Path, holdout: Path, sim_root: Path) -> str:
    """Score the exported model on the held-out patients (never seen in training or validation)."""
    from client.evaluate import evaluate_model  # deferred: imports torch and onnxruntime

    report = evaluate_model(model, holdout, salt=site_salt(sim_root / "state" / "holdout"), bootstrap=1000)
    atomic_write_bytes(sim_root / "holdout.json", json.dumps(report, indent=2, default=float).encode())
    if "auc" not in report:
        return f"\nheld-out patients: {report['images']} images scored; see {sim_root / 'holdout.json'}"
    lo, hi = report.get("auc_ci") or (float("nan"), float("nan"))
    return (f"\nheld-out patients ({report['images']} images the federation never saw): AUC {report['auc']:.3f} "
            f"(95% CI {lo:.3f}-{hi:.3f}); at the model's threshold {report['threshold']:.3f} sensitivity "
            f"{report['sensitivity']:.3f}, specificity {report['specificity']:.3f}  [{sim_root / 'holdout.json'}]")


def render_rounds(rounds: list[dict]) -> str:
    """Per round: pooled validation AUC and loss (from the sites' noised histograms) and each site's epsilon."""
    sites = sorted({s for r in rounds for s in r.get("epsilon", {})})
    many = len(sites) > MAX_SITES_LISTED  # then the range over the sites, not a column per site
    columns = [f"{'eps min':>8}", f"{'eps max':>8}", f"{'sites':>6}"] if many else [f"{'eps ' + s:>16}" for s in sites]
    head = f"{'round':>5}  {'pooled AUC (95% CI)':>22}  {'val loss':>8}  " + "  ".join(columns)
    lines = ["", head, "-" * len(head)]
    for r in rounds:
        auc, loss, ci = r.get("pooled_auc"), r.get("eval_loss"), r.get("pooled_auc_ci") or (None, None)
        auc_s = "-" if auc is None or auc != auc else f"{auc:.3f}"
        auc_s += f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci[0] is not None and auc_s != "-" else ""  # an estimate: its 95% CI
        loss_s = "-" if loss is None or loss != loss else f"{loss:.4f}"
        spent = r.get("epsilon", {})
        if many:
            values = list(spent.values()) or [float("nan")]
            eps = f"{min(values):>8.2f}  {max(values):>8.2f}  {len(spent):>6}"
        else:
            eps = "  ".join(f"{spent.get(s, float('nan')):>16.2f}" for s in sites)
        note = f"  refused/failed: {len(r['failures'])}" if r.get("failures") else ""
        note += "  final evaluation" if r.get("eval_final") else ""
        lines.append(f"{r['round']:>5}  {auc_s:>22}  {loss_s:>8}  {eps}{note}")
    lines.append("(pooled AUC and validation loss as the coordinator sees them: estimates from the sites' noised histograms)")
    return "\n".join(lines)
