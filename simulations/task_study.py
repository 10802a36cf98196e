"""Study arms for the multiclass and multilabel tasks (issue 14): per-class AUC with 95% CIs on held-out patients.

One command reproduces the task tables of docs/results.md::

    python -m simulations.task_study --out runs/task-study

Arms (each a real ``fl-sim run``, the product's settings for the default ScatterNet model):

* Kermany three-class (labels.csv column ``subtype``: normal / bacteria / virus), task multiclass:
  pooled (one site holding every hospital's training patients) and FedAvg over the hospitals,
  each without DP and with DP (target epsilon per site, default 3);
* NIH ChestX-ray14 sample, task multilabel (Effusion, Infiltration, Atelectasis): FedAvg without
  DP and with DP, each also with ``pos-weight = 4`` (rare findings weighted in the loss).

Hospitals are made once per image set (stratified patient hold-out, Dirichlet label-and-quantity
skew, simulations/image_hospitals.py); the pooled arm's single site is a copy of the same
hospitals' folders, so pooled and FedAvg see the same training patients and are scored on the
same held-out images. Each exported ONNX model is scored on the held-out patients: AUC per class /
finding (one-vs-rest) and macro AUC, each with a 95% percentile CI from a patient-level bootstrap
(patients resampled with replacement, all their images with them). Finished arms
(``arms/<arm>/result.json``) are reused on the next call; ``results.json`` and ``results.md`` hold
the tables.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.cache import atomic_write_bytes

KERMANY_LABELS = ("normal", "bacteria", "virus")
NIH_LABELS = ("Effusion", "Infiltration", "Atelectasis")
#: MedMNIST v2 (Yang et al., Sci Data 2023), ChestMNIST test macro AUC over 14 findings: the anchors.
ANCHORS = {"ResNet-18 (28 px)": 0.768, "ResNet-50 (224 px)": 0.773}


@dataclass(frozen=True)
class TaskArm:
    """One training run of the study: which image set, how many sites, DP or not."""

    name: str
    dataset: str  # kermany | nih
    pooled: bool  # one site with every hospital's training patients
    dp: bool
    pos_weight: str = "none"  # run config pos-weight (fixed by the coordinator, docs/tasks.md)

    @property
    def task(self) -> str:
        return "multiclass" if self.dataset == "kermany" else "multilabel"

    @property
    def labels(self) -> tuple[str, ...]:
        return KERMANY_LABELS if self.dataset == "kermany" else NIH_LABELS


ARMS = (
    TaskArm("kermany-pooled", "kermany", True, False),
    TaskArm("kermany-fedavg", "kermany", False, False),
    TaskArm("kermany-pooled-dp", "kermany", True, True),
    TaskArm("kermany-fedavg-dp", "kermany", False, True),
    TaskArm("nih-fedavg", "nih", False, False),
    TaskArm("nih-fedavg-dp", "nih", False, True),
    # pos-weight 4: about negatives / positives of the three findings in the public NIH sample (12-17% positive).
    TaskArm("nih-fedavg-posw4", "nih", False, False, "4"),
    TaskArm("nih-fedavg-dp-posw4", "nih", False, True, "4"),
)


def make_hospitals(source: Path, out: Path, *, sites: int, holdout: float, seed: int, max_images: int | None,
                   image_size: int) -> Path:
    """``out/federated`` (the hospitals + holdout) and ``out/pooled`` (one site: their copy + the same holdout)."""
    from simulations.hospitals import make_hospitals_from_images

    federated, pooled = out / "federated", out / "pooled"
    if not (federated / "holdout").is_dir():
        shutil.rmtree(federated, ignore_errors=True)
        make_hospitals_from_images(source, federated, sites, partition="label-and-quantity", alpha=0.5,
                                   holdout_fraction=holdout, seed=seed, max_images=max_images,
                                   image_size=image_size)
    if not (pooled / "holdout").is_dir():
        shutil.rmtree(pooled, ignore_errors=True)
        merge_sites(sorted(p for p in federated.iterdir() if p.is_dir() and p.name != "holdout"), pooled / "pooled")
        shutil.copytree(federated / "holdout", pooled / "holdout")
    return out


def merge_sites(site_dirs: list[Path], dest: Path) -> None:
    """One site folder holding every given site's images (under its name) and one labels.csv over them all."""
    header: list[str] = []
    rows: list[dict[str, str]] = []
    for site in site_dirs:
        shutil.copytree(site, dest / site.name, ignore=shutil.ignore_patterns("labels.csv"))
        with open(site / "labels.csv", newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header += [c for c in reader.fieldnames or [] if c not in header]
            rows += [{**r, "file": f"{site.name}/{r['file']}"} for r in reader]
    with open(dest / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def fl_sim_command(arm: TaskArm, data: Path, out: Path, *, rounds: int, epsilon: float, seed: int,
                   image_size: int, extra: tuple[str, ...] = ()) -> list[str]:
    """The `fl-sim run` call of an arm (what a user would type)."""
    cmd = [sys.executable, "-m", "simulations.cli", "run", "--data", str(data), "--out", str(out), "--name", arm.name,
           "--rounds", str(rounds), "--seed", str(seed), "--image-size", str(image_size), "--max-epsilon", "10",
           "--set", f"task={arm.task}", "--set", f"labels={','.join(arm.labels)}"]
    if arm.dataset == "kermany":
        cmd += ["--set", "label-column=subtype"]
    if arm.pos_weight != "none":
        cmd += ["--set", f"pos-weight={arm.pos_weight}"]
    cmd += ["--target-epsilon", f"{epsilon:g}"] if arm.dp else ["--no-dp"]
    return cmd + list(extra)


def score_holdout(model: Path, holdout: Path, salt_dir: Path, *, bootstrap: int, seed: int = 0) -> dict[str, Any]:
    """AUC per label and macro AUC of ``model`` on the held-out patients, each with a patient-level bootstrap 95% CI."""
    from common.dataset import encode_targets, scan_site, site_salt
    from common.onnx_export import load_onnx_model

    onnx = load_onnx_model(model)
    size = onnx.input_size[0]
    index = scan_site(holdout, salt=site_salt(salt_dir), image_size=size)
    labels = tuple(onnx.labels)
    task = str(onnx.meta.get("task"))
    targets = encode_targets(index, task, labels)
    keep = [int(i) for i in targets.keep]
    images = np.stack([index.records[i].pixels for i in keep]).astype(np.float32)[:, None] / 255.0
    probs = np.concatenate([onnx.predict(images[k:k + 256]) for k in range(0, len(images), 256)])
    y = np.eye(len(labels))[targets.y] if task == "multiclass" else np.asarray(targets.y, dtype=np.float64)
    patients = [index.records[i].patient for i in keep]
    out = auc_table(y, probs, patients, labels, bootstrap=bootstrap, seed=seed)
    thresholds = json.loads(onnx.meta.get("thresholds") or "{}")  # multilabel: each finding's own (fedxray.thresholds)
    for c, name in enumerate(labels):
        if name in thresholds:
            known = ~np.isnan(y[:, c])
            called, truth = probs[known, c] >= thresholds[name], y[known, c] == 1
            out["labels"][name].update(threshold=float(thresholds[name]), sensitivity=float(called[truth].mean()),
                                       specificity=float((~called[~truth]).mean()))
    return out


def auc_table(y: np.ndarray, probs: np.ndarray, patients: list[str], labels: tuple[str, ...], *, bootstrap: int,
              seed: int = 0) -> dict[str, Any]:
    """{labels: {name: {auc, ci, positives, negatives}}, macro_auc, macro_ci, images, patients}.

    ``y`` is [N, C] (one-hot or multi-hot, NaN masked). The CI resamples patients with replacement
    (every image of a drawn patient comes along), ``bootstrap`` times; a resample where a label
    lacks a class is left out of that label's interval.
    """
    from common.metrics import per_label_auc

    groups: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        groups.setdefault(p, []).append(i)
    members = list(groups.values())
    point = per_label_auc(y, probs)
    rng = np.random.default_rng(seed)
    draws = np.full((bootstrap, len(labels)), np.nan)
    for b in range(bootstrap):
        rows = np.concatenate([members[j] for j in rng.integers(0, len(members), len(members))])
        yb = y[rows]
        ok = [(np.nansum(yb[:, c]) > 0) and (np.nansum(1 - yb[:, c]) > 0) for c in range(len(labels))]
        if all(ok):
            draws[b] = per_label_auc(yb, probs[rows])

    def ci(values: np.ndarray) -> list[float]:
        values = values[np.isfinite(values)]
        return [float(v) for v in np.quantile(values, [0.025, 0.975])] if values.size else [math.nan, math.nan]

    out: dict[str, Any] = {"images": int(len(y)), "patients": len(members), "bootstrap": bootstrap, "labels": {}}
    for c, name in enumerate(labels):
        known = ~np.isnan(y[:, c])
        out["labels"][name] = {"auc": float(point[c]), "ci": ci(draws[:, c]),
                               "positives": int(np.nansum(y[known, c])), "negatives": int(np.sum(known) - np.nansum(y[known, c]))}
    out["macro_auc"] = float(np.nanmean(point))
    out["macro_ci"] = ci(np.nanmean(draws, axis=1)) if bootstrap else [math.nan, math.nan]
    return out


def run_arm(arm: TaskArm, hospitals: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train (fl-sim run) and score one arm; reuses ``out/arms/<arm>/result.json`` when present."""
    arm_root = out / "arms"
    done = arm_root / arm.name / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    data = hospitals / ("pooled" if arm.pooled else "federated")
    shutil.rmtree(arm_root / arm.name, ignore_errors=True)  # an arm cut short: start it again
    arm_root.mkdir(parents=True, exist_ok=True)
    cmd = fl_sim_command(arm, data, arm_root, rounds=args.rounds, epsilon=args.epsilon, seed=args.seed,
                         image_size=args.image_size)
    started = time.monotonic()
    log = arm_root / f"{arm.name}.log"
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}).returncode
    if rc != 0:
        raise RuntimeError(f"arm {arm.name}: fl-sim exited {rc}; see {log}")
    run_dir = arm_root / arm.name / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = {
        "arm": arm.name, "dataset": arm.dataset, "task": arm.task, "pooled": arm.pooled, "dp": arm.dp,
        "sites": 1 if arm.pooled else args.sites, "rounds": args.rounds, "command": " ".join(cmd[2:]),
        "epsilon": metrics["rounds"][-1].get("epsilon", {}) if arm.dp else {},
        "validation": {"pooled_auc": metrics["rounds"][-1].get("pooled_auc"),
                       "labels": metrics.get("labels") or metrics["rounds"][-1].get("labels", {})},
        "test": score_holdout(run_dir / "model.onnx", data / "holdout", arm_root / arm.name / "state" / "holdout",
                              bootstrap=args.bootstrap, seed=args.seed),
        "seconds": round(time.monotonic() - started, 1),
    }
    atomic_write_bytes(done, json.dumps(result, indent=2, default=float).encode())
    return result


def _fmt(v: float | None) -> str:
    return "-" if v is None or v != v else f"{v:.3f}"


def render(results: list[dict[str, Any]]) -> str:
    """Two markdown tables: Kermany three-class and NIH multilabel, AUC (95% CI) per label and macro."""
    parts: list[str] = []
    for dataset, labels, title in (("kermany", KERMANY_LABELS, "Kermany three-class (held-out patients)"),
                                   ("nih", NIH_LABELS, "NIH ChestX-ray14 sample, multilabel (held-out patients)")):
        rows = [r for r in results if r["dataset"] == dataset]
        if not rows:
            continue
        head = "| arm | DP (epsilon per site) | " + " | ".join(labels) + " | macro AUC | held-out images / patients | minutes |"
        lines = [f"**{title}**", "", head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            t = r["test"]
            eps = max(r["epsilon"].values()) if r["epsilon"] else None
            cells = [f"{_fmt(t['labels'][lab]['auc'])} ({_fmt(t['labels'][lab]['ci'][0])}-{_fmt(t['labels'][lab]['ci'][1])})"
                     for lab in labels]
            lines.append(f"| {r['arm']} | {'no' if not r['dp'] else f'yes ({eps:.2f})'} | " + " | ".join(cells)
                         + f" | {_fmt(t['macro_auc'])} ({_fmt(t['macro_ci'][0])}-{_fmt(t['macro_ci'][1])})"
                         + f" | {t['images']} / {t['patients']} | {r['seconds'] / 60:.1f} |")
        pos = rows[0]["test"]["labels"]
        lines += ["", "held-out positives: " + ", ".join(f"{lab} {pos[lab]['positives']}" for lab in labels), ""]
        if dataset == "nih":
            lines += ["Each finding's exported threshold (its rule, docs/tasks.md) and, at it, sensitivity / specificity "
                      "on the held-out patients:", "", "| arm | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
            for r in rows:
                cells = []
                for lab in labels:
                    f, v = r["test"]["labels"][lab], r["validation"]["labels"].get(lab, {})
                    cells.append(f"{f['threshold']:.3g} ({v.get('threshold_rule', '-')}): {_fmt(f['sensitivity'])} / "
                                 f"{_fmt(f['specificity'])}" if "threshold" in f else "-")
                lines.append(f"| {r['arm']} | " + " | ".join(cells) + " |")
            lines.append("")
        parts.append("\n".join(lines))
    return "\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    data = Path(os.environ.get("FEDXRAY_DATA", "../shared/data"))
    p = argparse.ArgumentParser(prog="python -m simulations.task_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/task-study", help="study folder; finished arms there are reused")
    p.add_argument("--kermany", default=str(data / "kermany-pneumonia"), help="Kermany image set (labels.csv with subtype)")
    p.add_argument("--nih", default=str(data / "nih-cxr14-1000"), help="NIH ChestX-ray14 sample (labels.csv with finding_labels)")
    p.add_argument("--arms", help=f"comma-separated subset of: {', '.join(a.name for a in ARMS)}")
    p.add_argument("--max-images", type=int, default=2000, help="Kermany: class-proportional subset of whole patients")
    p.add_argument("--sites", type=int, default=3, help="hospitals of the FedAvg arms")
    p.add_argument("--rounds", type=int, default=8, help="federated rounds (the pooled arms too: one site, same steps)")
    p.add_argument("--epsilon", type=float, default=3.0, help="DP arms: target epsilon per site")
    p.add_argument("--holdout", type=float, default=0.2, help="share of patients held out for the test tables")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--bootstrap", type=int, default=1000, help="patient-level bootstrap resamples for the CIs")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out).resolve()
    wanted = set(args.arms.split(",")) if args.arms else {a.name for a in ARMS}
    unknown = wanted - {a.name for a in ARMS}
    if unknown:
        print(f"task_study: unknown arm(s) {sorted(unknown)}; choose from {', '.join(a.name for a in ARMS)}", file=sys.stderr)
        return 2
    results = []
    for arm in (a for a in ARMS if a.name in wanted):
        source = Path(args.kermany if arm.dataset == "kermany" else args.nih)
        hospitals = make_hospitals(source, out / "hospitals" / arm.dataset, sites=args.sites, holdout=args.holdout,
                                   seed=args.seed, max_images=args.max_images if arm.dataset == "kermany" else None,
                                   image_size=args.image_size)
        print(f"{arm.name}: training ...", flush=True)
        r = run_arm(arm, hospitals, out, args)
        print(f"{arm.name}: held-out macro AUC {r['test']['macro_auc']:.3f} "
              f"[{r['test']['macro_ci'][0]:.3f}, {r['test']['macro_ci'][1]:.3f}] ({r['seconds']:.0f} s)", flush=True)
        results.append(r)
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=2, default=float).encode())
    text = render(results)
    atomic_write_bytes(out / "results.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
