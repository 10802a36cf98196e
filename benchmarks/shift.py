"""The shift benchmark: does the DP model hold up on images acquired differently from every site's? JSON out.

    nice -n 10 .venv/bin/python benchmarks/shift.py --study runs/shift > shift.json
    nice -n 10 .venv/bin/python benchmarks/shift.py --study runs/shift --recipes v3,default --arms fedavg --epsilons 3

It stands in for the hospitals we do not have. On the study's hospitals (``fl-sim study``'s
partition of Kermany: 5 hospitals with label and quantity skew, each its own acquisition profile,
15% of the patients held out; made here with the study's settings when ``--study`` has none):

1. **Conditions** (simulations/shift_conditions.py): the held-out patients' images, read from the
   source set at its own resolution, rendered through acquisition changes no site trained on
   (display curves, a VOI window, 6-bit storage, MONOCHROME1, blur, sharpening, noise, low
   resolution, rotation, collimation), then resized to the model's input (common.preprocess.to_model_input).
   The same conditions are rendered onto the sites' own validation images (their 64-px copies):
   choices between recipes are made on those, never on the held-out patients.
2. **Arms**, each trained in this process with the sites' own loop (``client.train.train_one_round``
   at each site's DP plan, ``common.privacy.plan_dp``, as the ClientApp plans it; FedAvg weighted by
   training images; the coordinator's weight average, server/ema.py, when the recipe sets one):
   ``fedavg`` at each ``--epsilons`` (DP per site), ``pooled`` (no DP, all hospitals' training
   images in one place: the recipe of the study's non-DP arms, Adam 1e-3), ``loho`` (FedAvg DP at
   epsilon 3 on four hospitals, scored on every image of the fifth) and ``multiclass`` (normal /
   bacterial / viral pneumonia, FedAvg DP at epsilon 3, macro AUC). Flower, the evaluation noise
   and the ledger are left out (``fl-sim``, the study and the tests cover them): this isolates
   the model and its training recipe.
3. **Recipes**: run-config settings on top of today's defaults, e.g. ``v3`` (no equalisation, one
   view: the model of study v3) and ``default`` (today's RunConfig). ``--recipes`` picks them.
4. **Scores**: AUC of the logits (binary) or macro one-vs-rest AUC (multiclass) per condition,
   with a 95% stratified bootstrap interval, and the change against the clean images with a paired
   bootstrap interval (the same resampled images under both). Every arm is trained ``--repeats``
   times (DP noise and sampling come from the OS, so repeats differ); the JSON has every repeat and
   the means.

Fixed features of every rendered image are computed once per front end and kept under
``<study>/shift/``; trained heads are kept there too (``--retrain`` ignores them).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _util import machine_info, progress  # noqa: E402
from shift_data import ShiftData, load_shift_data, rendered_features  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from client.round import train_settings  # noqa: E402
from client.train import train_one_round  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.metrics import bootstrap_auc_ci, macro_auc, roc_auc  # noqa: E402
from common.models import build_model, split_features  # noqa: E402
from common.privacy import plan_dp  # noqa: E402
from common.views import FeatureViews  # noqa: E402
from server.ema import WeightAverage  # noqa: E402
from simulations.shift_conditions import CONDITIONS  # noqa: E402

#: Named recipes: run-config settings on top of RunConfig's defaults (``weight-average``: the coordinator's running
#: average of the global weights, server/ema.py, which this benchmark applies to its own FedAvg rounds).
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},  # today's RunConfig defaults
    "v3": {"intensity": "none", "views": 1, "pool": 1, "border": 0.0, "weight-average": 0.0},  # study v3's model
    "equalise": {"intensity": "equalise", "views": 1, "pool": 1, "border": 0.0, "weight-average": 0.0},
    "views4": {"intensity": "none", "views": 4, "pool": 1, "border": 0.0, "weight-average": 0.0},
    "equalise-views4": {"intensity": "equalise", "views": 4, "pool": 1, "border": 0.0, "weight-average": 0.0},
    "equalise-views4-ema": {"intensity": "equalise", "views": 4, "pool": 1, "border": 0.0, "weight-average": 0.5},
    "views4-pool2": {"intensity": "none", "views": 4, "pool": 2, "border": 0.0, "weight-average": 0.0},
    "equalise-views4-pool2": {"intensity": "equalise", "views": 4, "pool": 2, "border": 0.0, "weight-average": 0.0},
    "equalise-views4-pool2-ema": {"intensity": "equalise", "views": 4, "pool": 2, "border": 0.0, "weight-average": 0.5},
    "equalise-views4-border": {"intensity": "equalise", "views": 4, "pool": 1, "border": 0.125, "weight-average": 0.0},
    "equalise-views4-pool2-border": {"intensity": "equalise", "views": 4, "pool": 2, "border": 0.125,
                                     "weight-average": 0.0},
}
NO_DP = {"optimizer": "adam", "learning-rate": 1e-3}  # the study's non-DP recipe (chosen on pooled validation)
LOHO_EPSILON = 3.0
MULTICLASS = ("normal", "bacteria", "virus")


def run_config(recipe: dict[str, Any], *, dp: bool, epsilon: float | None, task: str, labels: tuple[str, ...],
               rounds: int) -> RunConfig:
    raw = dict(recipe)
    raw.update({"task": task, "labels": ",".join(labels), "num-server-rounds": rounds, "dp": dp})
    if dp:
        raw["target-epsilon"] = epsilon
    else:
        raw.update(NO_DP)
    return RunConfig.from_mapping(raw)


def site_sets(sites: dict[str, Any], run: RunConfig, frontend: torch.nn.Module) -> dict[str, tuple[Any, int]]:
    """Each site's training data as the ClientApp gives it to train_one_round: views or plain features."""
    out = {}
    for name, d in sites.items():
        if run.feature_views > 1:
            data = d.feature_views(frontend, run.feature_views)
        else:
            feats = d.features(frontend)
            y = d.targets.y[d.split.train]
            data = TensorDataset(torch.from_numpy(np.ascontiguousarray(feats[d.split.train])), torch.from_numpy(y))
        out[name] = (data, d.n_train)
    return out


def pooled_set(sets: dict[str, tuple[Any, int]]) -> dict[str, tuple[Any, int]]:
    """All sites' training data as one site (the non-DP pooled arm)."""
    parts = [d for d, _ in sets.values()]
    if isinstance(parts[0], FeatureViews):
        data: Any = FeatureViews(np.concatenate([p.plain for p in parts]), np.concatenate([p.extra for p in parts]),
                                 np.concatenate([p.y.numpy() for p in parts]))
    else:
        data = TensorDataset(torch.cat([p.tensors[0] for p in parts]), torch.cat([p.tensors[1] for p in parts]))
    return {"pooled": (data, sum(n for _, n in sets.values()))}


def federated(run: RunConfig, sets: dict[str, tuple[Any, int]], head: torch.nn.Module, decay: float) -> dict[str, torch.Tensor]:
    """FedAvg over ``sets`` with every site's own DP plan; the final global weights (or their running average)."""
    state = {k: v.clone() for k, v in head.state_dict().items()}
    average = WeightAverage(decay)
    for r in range(1, run.num_server_rounds + 1):
        total, acc = 0, None
        for data, n in sets.values():
            settings = train_settings(run, n, r, 0.0)
            if run.dp:
                plan = plan_dp(n_train=n, batch_size=settings.batch_size, local_epochs=settings.local_epochs,
                               rounds=run.num_server_rounds, delta=run.delta, max_grad_norm=run.max_grad_norm,
                               target_epsilon=run.target_epsilon)
                settings = replace(settings, noise_multiplier=plan.noise_multiplier, steps=plan.steps_per_round)
            model = copy.deepcopy(head)
            model.load_state_dict(state)
            weights, _ = train_one_round(model, data, settings, device=torch.device("cpu"))
            acc = {k: v * n for k, v in weights.items()} if acc is None else {k: acc[k] + weights[k] * n for k in acc}
            total += n
        state = {k: v / total for k, v in acc.items()}  # type: ignore[union-attr]
        averaged = average.update({k: v.numpy() for k, v in state.items()})
    if average.active:
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in averaged.items()}
    return state


def logits(head: torch.nn.Module, feats: np.ndarray, batch: int = 256) -> np.ndarray:
    head = copy.deepcopy(head).eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(feats), batch):
            out.append(head(torch.from_numpy(np.asarray(feats[s:s + batch], dtype=np.float32))).double().numpy())
    return np.concatenate(out)


def score(y: np.ndarray, z: np.ndarray, task: str) -> float:
    if task == "multiclass":
        p = np.exp(z - z.max(axis=1, keepdims=True))
        return float(macro_auc(np.eye(z.shape[1])[y], p / p.sum(axis=1, keepdims=True)))
    return float(roc_auc(y, z[:, 0]))


def paired_delta_ci(y: np.ndarray, clean: np.ndarray, shifted: np.ndarray, task: str, *, n: int, seed: int) -> list[float]:
    """95% percentile interval of score(shifted) - score(clean), resampling images within each class."""
    rng = np.random.default_rng(seed)
    classes = [np.flatnonzero(y == c) for c in np.unique(y)]
    deltas = []
    for _ in range(n):
        idx = np.concatenate([rng.choice(c, len(c)) for c in classes])
        deltas.append(score(y[idx], shifted[idx], task) - score(y[idx], clean[idx], task))
    return [float(v) for v in np.quantile(deltas, [0.025, 0.975])]


def conditions_report(y: np.ndarray, z: dict[str, np.ndarray], task: str, bootstrap: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, zc in z.items():
        entry: dict[str, Any] = {"auc": score(y, zc, task)}
        if task != "multiclass" and bootstrap:
            entry["ci"] = list(bootstrap_auc_ci(y, zc[:, 0], n=bootstrap, seed=0))
        if name != "clean":
            entry["delta"] = entry["auc"] - score(y, z["clean"], task)
            if bootstrap:
                entry["delta_ci"] = paired_delta_ci(y, z["clean"], zc, task, n=max(100, bootstrap // 2), seed=1)
        out[name] = entry
    return out


def train_arm(args: argparse.Namespace, data: ShiftData, recipe_name: str, arm: str, repeat: int) -> dict[str, Any]:
    """Train (or load) one arm of one recipe; its scores on validation and test conditions (or the left-out site)."""
    recipe = {**RECIPES.get(recipe_name, {}), **args.overrides.get(recipe_name, {})}
    task, labels, sites = "binary", (data.positive,), data.sites
    if arm == "multiclass":
        task, labels, sites = "multiclass", MULTICLASS, data.multiclass_sites()
    dp = arm != "pooled"
    epsilon = LOHO_EPSILON if arm.startswith(("loho", "multiclass")) else (float(arm.split("eps")[1]) if dp else None)
    run = run_config(recipe, dp=dp, epsilon=epsilon, task=task, labels=labels, rounds=args.rounds)
    model = build_model(run.model, dp=True, **run.model_kwargs())
    frontend, head, _ = split_features(model)
    left_out = arm.removeprefix("loho-") if arm.startswith("loho-") else None
    path = data.work / "models" / recipe_name / f"{arm}-{repeat}.pt"
    t0 = time.perf_counter()
    if path.is_file() and not args.retrain:
        head.load_state_dict(torch.load(path, weights_only=True))
        seconds = None
    else:
        sets = site_sets({n: d for n, d in sites.items() if n != left_out}, run, frontend)
        if arm == "pooled":
            sets = pooled_set(sets)
        head.load_state_dict(federated(run, sets, head, run.weight_average if run.dp else 0.0))
        seconds = time.perf_counter() - t0
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(head.state_dict(), path)
    result: dict[str, Any] = {"seconds": seconds, "recipe": recipe}
    if left_out is not None:
        d = data.sites[left_out]
        z = logits(head, d.features(frontend))
        y = d.targets.y[:, 0]
        result["left_out"] = {"site": left_out, "images": int(len(y)), "auc": score(y, z, "binary"),
                              "ci": list(bootstrap_auc_ci(y, z[:, 0], n=args.bootstrap, seed=0))}
        return result
    for split in ("val", "test"):
        feats = rendered_features(data, frontend, split, task=task)
        y = feats.pop("__y__")
        z = {name: logits(head, f) for name, f in feats.items()}
        result[split] = conditions_report(y, z, task, args.bootstrap if split == "test" else 0)
    return result


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over repeats of every AUC and change."""
    if "left_out" in runs[0]:
        return {"auc": float(np.mean([r["left_out"]["auc"] for r in runs]))}
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        names = list(runs[0][split])
        out[split] = {n: {"auc": float(np.mean([r[split][n]["auc"] for r in runs])),
                          **({"delta": float(np.mean([r[split][n]["delta"] for r in runs]))} if n != "clean" else {})}
                      for n in names}
        deltas = [out[split][n]["delta"] for n in names if n != "clean"]
        out[split]["worst_delta"] = float(min(deltas)) if deltas else 0.0
        out[split]["mean_delta"] = float(np.mean(deltas)) if deltas else 0.0
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", default="runs/shift", help="study folder (hospitals/, state/); made here if absent")
    p.add_argument("--data", default=os.path.join(os.environ.get("FEDXRAY_DATA", "../shared/data"), "kermany-pneumonia"))
    p.add_argument("--recipes", default="v3,default", help=f"comma-separated, of {', '.join(RECIPES)}")
    p.add_argument("--set", action="append", default=[], metavar="RECIPE:KEY=VALUE",
                   help="override or add a recipe setting, e.g. default:weight-average=0.5 (a new name makes a new recipe)")
    p.add_argument("--arms", default="fedavg,pooled,loho,multiclass")
    p.add_argument("--epsilons", default="1,3,8")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--retrain", action="store_true", help="train again even where a trained head is kept")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.overrides = {}
    for item in args.set:
        name, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        args.overrides.setdefault(name, {})[key] = json.loads(value) if value[:1] in "0123456789-[{" else value
    data = load_shift_data(Path(args.study), Path(args.data), say=progress)
    arms: list[str] = []
    for a in args.arms.split(","):
        if a == "fedavg":
            arms += [f"fedavg-eps{float(e):g}" for e in args.epsilons.split(",")]
        elif a == "loho":
            arms += [f"loho-{n}" for n in data.sites]
        elif a:
            arms.append(a)
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    for recipe in [r for r in args.recipes.split(",") if r]:
        for arm in arms:
            runs = []
            for i in range(1 if arm == "pooled" else args.repeats):  # without DP a run is seeded: repeats are equal
                progress(f"{recipe} / {arm} / repeat {i + 1}/{args.repeats} ...")
                runs.append(train_arm(args, data, recipe, arm, i))
                took = runs[-1]["seconds"]
                progress(f"  {recipe} / {arm}: " + (f"trained in {took:.0f} s" if took else "kept head") + "; "
                         + json.dumps(summarise(runs[-1:]))[:300])
            results.setdefault(recipe, {})[arm] = {"runs": runs, "mean": summarise(runs)}
    doc = {"benchmark": "shift", "study": str(Path(args.study).resolve()), "rounds": args.rounds, "repeats": args.repeats,
           "conditions": [c.__dict__ for c in CONDITIONS], "data": data.describe(), "recipes": results,
           "seconds": time.perf_counter() - t_start, "machine": machine_info()}
    print(json.dumps(doc, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
