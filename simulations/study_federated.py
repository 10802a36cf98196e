"""How a federated study arm trains: a real ``fl-sim run`` process on the hospital folders.

FedAvg with and without DP, leave-one-hospital-out and the warm start run through Flower's
Simulation Engine with the deployment ServerApp and ClientApp and the sites' privacy ledgers, as a
user would run them; an interrupted arm is resumed from its checkpoints. The exported weights come
back as a torch model (simulations/study_arms.py ``exported_weights``) for the study's own scoring.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from simulations.study_arms import RECIPE_KEYS, Arm, Trained, exported_weights
from simulations.study_data import Say, StudyData, StudyError, arm_state, federation_folder


def train_federated(arm: Arm, s: Any, data: StudyData, out: Path, arm_dir: Path, say: Say, *,
                    init_weights: Path | None = None, recipe: dict[str, Any] | None = None) -> Trained:
    """The arm through `fl-sim run` itself (resumed from its checkpoints if it was interrupted).

    ``recipe``: run-config keys on top of the model's defaults (the non-DP arms' chosen optimiser).
    """
    folder = federation_folder(out, arm.left_out)
    names = [n for n in data.sites if n != arm.left_out]
    sim_root = arm_dir / "fl"
    run_dir = sim_root / "run"
    checkpoints = run_dir / "checkpoints"
    resume = checkpoints.is_dir() and any(checkpoints.iterdir()) and not (run_dir / "model.onnx").is_file()
    if not resume:
        for stale in (sim_root, arm_dir / "state"):
            if stale.exists():
                shutil.rmtree(stale)
    state_root = arm_state(out, arm_dir, names)
    if resume:
        say(f"  {arm.name}: resuming the interrupted federated run {sim_root}")
        code = _fl_sim(["resume", str(sim_root)])
    else:
        argv = ["run", "--data", str(folder), "--out", str(arm_dir), "--name", "fl", "--state-dir", str(state_root),
                "--sites", str(len(names)), "--rounds", str(s.rounds), "--model", arm.model,
                "--image-size", str(s.image_size), "--seed", str(s.seed), "--set", f"labels={data.positive}",
                "--set", f"delta={s.delta}"]
        if arm.dp:
            argv += ["--target-epsilon", f"{arm.epsilon:g}", "--max-epsilon", f"{max(10.0, 1.05 * float(arm.epsilon or 0)):g}"]
        else:
            argv += ["--no-dp"]
        if init_weights is not None:
            argv += ["--set", f"init-weights={init_weights}"]
        if arm.train_part != "all":
            argv += ["--set", f"train-part={arm.train_part}"]
        for key, value in (recipe or {}).items():
            argv += ["--set", f"{key}={value}"]
        say(f"  {arm.name}: fl-sim {' '.join(argv)}")
        code = _fl_sim(argv)
    if code != 0 or not (run_dir / "model.onnx").is_file():
        raise StudyError(f"arm {arm.name}: the federated run failed (exit {code}); see {sim_root / 'run.log'}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    failed = [f"round {r['round']}: {f[:160]}" for r in metrics["rounds"] for f in r.get("failures", [])]
    if failed:  # e.g. a simulated site killed for memory: not the arm as designed, so it is not cached
        raise StudyError(f"arm {arm.name}: {len(failed)} site repl(ies) failed ({failed[0]} ...); see {sim_root / 'run.log'}. "
                         "Run the study again to retrain this arm (with fewer other jobs on the machine)")
    rounds = metrics["rounds"]
    curve = [{"round": r["round"], "val_auc": r.get("pooled_auc"), "train_loss": r.get("train_loss"),
              "seconds": r.get("seconds")} for r in rounds]
    export_info = metrics.get("export") or {}
    holdout_path = sim_root / "holdout.json"
    rejected = [f"round {r['round']}: {site}: {why}" for r in rounds for site, why in (r.get("rejected") or {}).items()]
    config = metrics.get("config") or {}
    extra = {"run_dir": str(run_dir), "run_threshold": metrics.get("threshold"), "export_round": export_info.get("round"),
             "sites": names, "fl_sim_holdout": _holdout_auc(holdout_path), "rejected_updates": rejected,
             "recipe": {k: v for k, v in config.items() if k in RECIPE_KEYS}}
    if rejected:
        say(f"  {arm.name}: the coordinator rejected {len(rejected)} update(s), e.g. {rejected[0]}")
    return Trained(exported_weights(run_dir, arm, s, data.positive), run_dir / "model.onnx", names,
                   dict(rounds[-1].get("epsilon", {})) if rounds else {}, curve, extra)


def _fl_sim(argv: list[str]) -> int:
    """`fl-sim ARGV` in its own process, as a user runs it; its output goes to this process' output."""
    sys.stdout.flush()
    return subprocess.run([sys.executable, "-m", "simulations.cli", *argv], check=False).returncode


def _holdout_auc(path: Path) -> float | None:
    """The AUC `fl-sim run` printed for the hold-out (a cross-check of the study's own scoring)."""
    try:
        return float(json.loads(path.read_text())["auc"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
