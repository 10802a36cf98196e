"""`fl-sim study`: does federation pay off? Pooled vs each hospital alone vs federated, with and without DP.

One command reproduces every number of docs/results.md from an image set (Kermany by default)::

    fl-sim study --data $FEDXRAY_DATA/kermany-pneumonia --out runs/study

What it does, in order (each step is cached under ``--out``, so a second call resumes):

1. ``hospitals/``: a stratified, patient-level hold-out (the common test set) and N hospitals with
   Dirichlet label skew and quantity skew, each written as DICOM through its own acquisition profile
   (simulations.hospitals.make_hospitals_from_images).
2. Every site (and the hold-out) is read through the site read path (common.loaders.load_site:
   DICOM chain, cache, patient-level train/validation split), once, into ``state/<site>``.
3. Arms. Centralised arms (pooled, each hospital alone, pooled DP) run in this process with the same
   model, image size, seeds and training loop (client.train.train_one_round) as the sites. Federated
   arms (FedAvg, FedProx, FedAdam, FedAvg DP at several epsilons) run through ``fl-sim run`` itself
   (simulations.cli.cmd_run: Flower's Simulation Engine, the deployment ServerApp/ClientApp) with
   ``--data`` on the hospital folders. Each arm gets fresh per-site state dirs (own privacy ledger)
   that share the sites' salt and image cache, so every arm sees the same splits.
4. Every arm's model is exported to ONNX and scored on the common test set: AUC with a 95% bootstrap
   CI, sensitivity/specificity at the Youden threshold of the arm's own validation data, ECE (15
   bins). ``arms/<arm>/result.json`` is written atomically when an arm is done; finished arms are
   skipped on the next call.
5. ``results.json``, ``results.md`` (the table), ``roc.png`` and ``rounds.png``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
SETTINGS_FILE = "study.json"
MAIN_ARMS = ("pooled", "fedavg", "fed-alt", "fedavg-dp-eps8", "pooled-dp-eps8", "alone-best")


class StudyError(RuntimeError):
    """The study cannot go on; the message says what to change."""


@dataclass(frozen=True)
class StudySettings:
    """Everything that decides the study's numbers (saved as out/study.json; a resume must match)."""

    image_size: int = 64  # px; MobileNetV2 at 64 px is what 2 CPU cores train in about an hour
    sites: int = 5  # hospitals
    alpha: float = 0.5  # Dirichlet concentration of label and quantity skew
    holdout: float = 0.15  # share of patients held out as the common test set
    val_fraction: float = 0.2  # share of each site's patients for validation (threshold, curves)
    seed: int = 0  # hospitals, splits, sampling, initial weights of the centralised arms
    model: str = "mobilenet_v2"  # the DP-ready (GroupNorm) form in every arm
    max_images: int | None = None  # use at most this many images (whole patients), None: all
    # No DP (pooled, alone, FedAvg, FedProx, FedAdam): Adam, as the project's default run config.
    epochs: int = 6  # centralised arms: passes over the training data
    rounds: int = 6  # federated arms: rounds of local_epochs each (same passes as the centralised arms)
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    # DP-SGD arms (docs/results.md, "Settings"): Adam at a third of the no-DP rate, so the noise that
    # Adam normalises per weight does not random-walk the small 1x1 conv weights away; large expected
    # batches, since the noise on the mean gradient is sigma * clip / batch.
    dp_epochs: int = 3  # pooled DP: passes; federated DP: rounds of dp_local_epochs
    dp_local_epochs: int = 1
    dp_batch_size: int = 256
    dp_learning_rate: float = 3e-4
    dp_optimizer: str = "adam"
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)  # per-site target epsilon of the FedAvg DP arms
    pooled_dp_epsilon: float = 8.0
    alt_strategies: tuple[str, ...] = ("fedprox", "fedadam")  # the better one is the study's "fed-alt"
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01
    bootstrap: int = 1000  # resamples for the AUC CI
    threads: int = 2  # torch threads in this process (federated sites: 1 each, two at a time)

    @classmethod
    def quick(cls) -> StudySettings:
        """A smoke version: a few dozen images, 2 sites, 1 round, 32 px (the test uses it)."""
        return cls(image_size=32, sites=2, max_images=72, epochs=1, rounds=1, dp_epochs=1, batch_size=8, dp_batch_size=8,
                   epsilons=(8.0,), alt_strategies=(), bootstrap=50, holdout=0.25, val_fraction=0.3)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # pooled | alone | federated
    dp: bool = False
    epsilon: float | None = None  # target (per site for federated arms)
    strategy: str = "fedavg"
    site: str | None = None  # alone arms


def plan_arms(s: StudySettings, site_names: Sequence[str]) -> list[Arm]:
    """Every arm, in the order of the results table."""
    arms = [Arm("pooled", "pooled")]
    arms += [Arm(f"alone-{n.removeprefix('hospital-')}", "alone", site=n) for n in site_names]
    arms.append(Arm("fedavg", "federated"))
    arms += [Arm(st, "federated", strategy=st) for st in s.alt_strategies]
    arms += [Arm(f"fedavg-dp-eps{_eps_tag(e)}", "federated", dp=True, epsilon=e) for e in s.epsilons]
    arms.append(Arm(f"pooled-dp-eps{_eps_tag(s.pooled_dp_epsilon)}", "pooled", dp=True, epsilon=s.pooled_dp_epsilon))
    return arms


def run_order(arms: Sequence[Arm]) -> list[Arm]:
    """The order arms are trained in: the goals' arms first, so a study cut short has answered most."""
    top_eps = max((float(a.epsilon) for a in arms if a.dp), default=0.0)

    def rank(a: Arm) -> tuple[int, float]:
        if not a.dp:
            return (0 if a.kind != "federated" else 1 if a.strategy == "fedavg" else 4, 0.0)
        return (2 if a.kind == "pooled" or a.epsilon == top_eps else 3, -float(a.epsilon or 0.0))

    return sorted(arms, key=rank)


def _eps_tag(e: float) -> str:
    return f"{e:g}"


# --------------------------------------------------------------------------- data


@dataclass
class StudyData:
    """Every site read through load_site (train/val split as the sites make it) plus the test set."""

    sites: dict[str, Any]  # site name -> common.loaders.SiteData
    test_x: np.ndarray  # float32 [N, 1, S, S] in [0, 1]
    test_y: np.ndarray  # 0/1 [N]
    positive: str
    manifest: dict[str, Any] = field(default_factory=dict)

    def val(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        xs = [self.sites[n].images[self.sites[n].split.val] for n in names]
        ys = [self.sites[n].targets.y[self.sites[n].split.val, 0] for n in names]
        return _as_input(np.concatenate(xs)), np.concatenate(ys)


def _as_input(images_u8: np.ndarray) -> np.ndarray:
    return (images_u8.astype(np.float32) / 255.0)[:, None]


def prepare_hospitals(data: Path, out: Path, s: StudySettings, say: Callable[[str], None]) -> dict[str, Any]:
    from simulations.hospitals import MANIFEST_FILE, make_hospitals_from_images

    hospitals = out / "hospitals"
    manifest_path = hospitals / MANIFEST_FILE
    if manifest_path.is_file():
        say(f"hospitals: reusing {hospitals}")
        return json.loads(manifest_path.read_text())
    if hospitals.exists():
        shutil.rmtree(hospitals)  # an interrupted write: start it again
    t0 = time.monotonic()
    say(f"hospitals: {s.sites} sites + {s.holdout:.0%} patient hold-out from {data} (label-and-quantity skew, alpha {s.alpha}) ...")
    make_hospitals_from_images(data, hospitals, s.sites, partition="label-and-quantity", alpha=s.alpha,
                               holdout_fraction=s.holdout, seed=s.seed, max_images=s.max_images,
                               progress=sys.stderr.isatty())
    manifest = json.loads(manifest_path.read_text())
    for site in manifest["sites"] + ([manifest["holdout"]] if manifest.get("holdout") else []):
        per_class = ", ".join(f"{k} {v}" for k, v in sorted(site["images_per_class"].items()))
        say(f"  {site['name']:<12} {site['n_patients']:>5} patients {site['n_images']:>5} images ({per_class})")
    say(f"hospitals: written in {time.monotonic() - t0:.0f} s")
    return manifest


def read_sites(out: Path, s: StudySettings, manifest: dict[str, Any], say: Callable[[str], None]) -> StudyData:
    from common.loaders import load_site

    classes = manifest["classes"]
    positive = classes[-1]
    names = [site["name"] for site in manifest["sites"]]
    if not manifest.get("holdout"):
        raise StudyError("the hospitals have no hold-out set; rebuild them with a holdout fraction > 0")
    t0 = time.monotonic()
    sites = {}
    for name in [*names, "holdout"]:
        sites[name] = load_site(out / "hospitals" / name, out / "state" / name, image_size=s.image_size, task="binary",
                                labels=(positive,), val_fraction=s.val_fraction, seed=s.seed)
    test = sites.pop("holdout")
    say(f"sites read through load_site in {time.monotonic() - t0:.0f} s: "
        + ", ".join(f"{n} {d.n_train}+{d.n_val}" for n, d in sites.items()) + f"; test {len(test.targets.y)} images")
    return StudyData(sites, _as_input(test.images), test.targets.y[:, 0].astype(np.int64), positive, manifest)


def arm_state(out: Path, arm_dir: Path, site_names: Sequence[str]) -> Path:
    """Fresh per-arm state dirs (own ledger) sharing each site's salt (same splits) and image cache."""
    root = arm_dir / "state"
    for name in site_names:
        src, dst = out / "state" / name, root / name
        dst.mkdir(parents=True, exist_ok=True)
        if not (dst / "salt").exists():
            shutil.copy2(src / "salt", dst / "salt")
        if not (dst / "cache").exists():
            (dst / "cache").symlink_to((src / "cache").resolve(), target_is_directory=True)
    return root


# --------------------------------------------------------------------------- arms


def _settings(s: StudySettings, dp: bool, seed: int, noise: float = 0.0, steps: int | None = None, batch: int | None = None):
    from client.train import TrainSettings
    from common.models import grad_sample_mode

    return TrainSettings(
        task="binary", local_epochs=s.dp_local_epochs if dp else s.local_epochs,
        batch_size=batch or (s.dp_batch_size if dp else s.batch_size),
        learning_rate=s.dp_learning_rate if dp else s.learning_rate, optimizer=s.dp_optimizer if dp else s.optimizer,
        dp=dp, noise_multiplier=noise, max_grad_norm=s.max_grad_norm, steps=steps,
        grad_sample_mode=grad_sample_mode(s.model), seed=seed,
    )


def run_centralised(arm: Arm, s: StudySettings, data: StudyData, arm_dir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Pooled or single-hospital training in this process, with the sites' own training loop."""
    import torch

    from client.privacy import plan_dp
    from client.train import predict, train_one_round
    from common.augment import train_transform
    from common.loaders import XrayDataset
    from common.metrics import roc_auc
    from common.models import build_model

    names = [arm.site] if arm.site else list(data.sites)
    sites = [data.sites[n] for n in names]
    x_tr = np.concatenate([d.images[d.split.train] for d in sites])
    y_tr = np.concatenate([d.targets.y[d.split.train] for d in sites])
    train_ds = XrayDataset(x_tr, y_tr, train_transform(s.image_size))
    val_x, val_y = data.val(names)
    val_ds = XrayDataset((val_x[:, 0] * 255).round().astype(np.uint8), val_y[:, None].astype(np.float32))
    n = len(y_tr)
    epochs = s.dp_epochs if arm.dp else s.epochs
    torch.manual_seed(s.seed)
    model = build_model(s.model, num_outputs=1, dp=True)
    plan, batch = None, min(s.dp_batch_size if arm.dp else s.batch_size, n)
    if arm.dp:
        plan = plan_dp(n_train=n, batch_size=batch, local_epochs=s.dp_local_epochs, rounds=epochs, delta=s.delta,
                       max_grad_norm=s.max_grad_norm, target_epsilon=arm.epsilon)
    curve = []
    for epoch in range(1, epochs + 1):
        st = _settings(s, arm.dp, s.seed * 1000 + epoch, plan.noise_multiplier if plan else 0.0,
                       plan.steps_per_round if plan else None, batch)
        _, stats = train_one_round(model, train_ds, st, device=torch.device("cpu"))
        probs, _ = predict(model, val_ds, device=torch.device("cpu"))
        auc = roc_auc(val_y, probs[:, 0]) if len(np.unique(val_y)) == 2 else math.nan
        curve.append({"epoch": epoch, "train_loss": stats.loss, "val_auc": auc, "images_per_second": stats.images_per_second})
        say(f"  {arm.name}: epoch {epoch}/{epochs} train loss {stats.loss:.4f}, val AUC {auc:.3f}, "
            f"{stats.images_per_second:.0f} img/s")
    eps_label = "all sites (pooled)" if arm.kind == "pooled" else arm.site
    epsilon = {eps_label: plan.epsilon_planned} if plan else {}
    torch.save(model.state_dict(), arm_dir / "model.pt")
    threshold = _threshold(val_y, predict(model, val_ds, device=torch.device("cpu"))[0][:, 0])
    _export(model, arm_dir / "model.onnx", s, threshold, epochs, names, epsilon)
    extra = {"curve": curve, "n_train": n, "n_val": int(len(val_y)), "sites": names}
    if plan:
        extra["dp_plan"] = asdict(plan)
    return {"epsilon": epsilon, "onnx": str(arm_dir / "model.onnx"), "val_names": names, **extra}


def _export(model, path: Path, s: StudySettings, threshold: float, rounds: int, sites: Sequence[str], epsilon: dict) -> None:
    from common.onnx_export import export_onnx

    export_onnx(model, path, task="binary", labels=["PNEUMONIA"], input_size=(s.image_size, s.image_size), threshold=threshold,
                metadata={"model": s.model, "rounds": str(rounds), "sites": json.dumps(list(sites)), "epsilon": json.dumps(epsilon)})


def _threshold(y: np.ndarray, scores: np.ndarray) -> float:
    from common.metrics import MetricsError, choose_threshold

    try:
        return choose_threshold(y, scores, method="youden")
    except MetricsError:
        return 0.5  # a validation split with one class (tiny quick runs only)


def run_federated(arm: Arm, s: StudySettings, data: StudyData, out: Path, arm_dir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """The arm through `fl-sim run` itself: Flower's Simulation Engine, the deployment ServerApp/ClientApp."""
    from simulations import cli

    names = list(data.sites)
    sim_root = arm_dir / "fl"
    run_dir = sim_root / "run"
    resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()) and not (run_dir / "model.onnx").is_file()
    if not resume:  # a fresh run: fresh ledgers too, so the arm's epsilon is its own
        for stale in (sim_root, arm_dir / "state"):
            if stale.exists():
                shutil.rmtree(stale)
    state_root = arm_state(out, arm_dir, names)
    epochs = s.dp_local_epochs if arm.dp else s.local_epochs
    rounds = s.dp_epochs if arm.dp else s.rounds
    sets = {
        "task": "binary", "labels": data.positive, "val-fraction": s.val_fraction, "max-grad-norm": s.max_grad_norm,
        "delta": s.delta, "batch-size": s.dp_batch_size if arm.dp else s.batch_size,
        "learning-rate": s.dp_learning_rate if arm.dp else s.learning_rate,
        "optimizer": s.dp_optimizer if arm.dp else s.optimizer, "proximal-mu": s.proximal_mu,
        "server-learning-rate": s.server_learning_rate,
    }
    if resume:
        say(f"  {arm.name}: resuming the interrupted federated run {sim_root}")
        code = cli.main(["resume", str(sim_root)])
    else:
        argv = ["run", "--data", str(out / "hospitals"), "--out", str(arm_dir), "--name", "fl", "--state-dir", str(state_root),
                "--rounds", str(rounds), "--local-epochs", str(epochs), "--model", s.model, "--image-size", str(s.image_size),
                "--strategy", arm.strategy, "--seed", str(s.seed)]
        budget = str(max(10.0, 1.05 * float(arm.epsilon or 0.0)))
        argv += ["--target-epsilon", str(arm.epsilon), "--max-epsilon", budget] if arm.dp else ["--no-dp"]
        for k, v in sets.items():
            argv += ["--set", f"{k}={v}"]
        say(f"  {arm.name}: fl-sim {' '.join(argv)}")
        code = cli.cmd_run(cli.build_parser().parse_args(argv))
    if code != 0 or not (run_dir / "model.onnx").is_file():
        raise StudyError(f"arm {arm.name}: the federated run failed (exit {code}); see {sim_root / 'run.log'}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    failed = [f"round {r['round']}: {f[:160]}" for r in metrics["rounds"] for f in r.get("failures", [])]
    if failed:  # e.g. a simulated site killed for memory: not the arm as designed, so it is not cached
        raise StudyError(f"arm {arm.name}: {len(failed)} site repl(ies) failed ({failed[0]} ...); see {sim_root / 'run.log'}. "
                         "Run the study again to retrain this arm (with fewer other jobs on the machine)")
    last = metrics["rounds"][-1] if metrics["rounds"] else {}
    curve = [{"round": r["round"], "pooled_val_auc": r.get("pooled_auc"), "train_loss": r.get("train_loss"),
              "seconds": r.get("seconds")} for r in metrics["rounds"]]
    return {"epsilon": dict(last.get("epsilon", {})), "onnx": str(run_dir / "model.onnx"), "val_names": names, "curve": curve,
            "run_dir": str(run_dir), "run_threshold": metrics.get("threshold"),
            "failures": [f for r in metrics["rounds"] for f in r.get("failures", [])]}


def evaluate_arm(onnx_path: str, data: StudyData, val_names: Sequence[str], s: StudySettings, arm_dir: Path) -> dict[str, Any]:
    """Score the exported model: threshold on the arm's validation data, report on the common test set."""
    from common.metrics import binary_report
    from common.onnx_export import load_onnx_model

    model = load_onnx_model(onnx_path, threads=s.threads)
    val_x, val_y = data.val(val_names)
    threshold = _threshold(val_y, model.predict(val_x)[:, 0])
    scores = model.predict(data.test_x)[:, 0]
    np.save(arm_dir / "test_scores.npy", scores.astype(np.float32))
    report = binary_report(data.test_y, scores, threshold, bootstrap=s.bootstrap, seed=s.seed)
    return report.to_dict()


# --------------------------------------------------------------------------- the study


def run_study(data_dir: str | Path, out: str | Path, settings: StudySettings, *, arms: Sequence[str] | None = None,
              say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the study; returns the results document (also written to out/results.json)."""
    import torch

    from common.cache import atomic_write_bytes
    from server.report import json_safe

    say = say or (lambda m: print(m, flush=True))
    data_dir, out = Path(data_dir).resolve(), Path(out).resolve()
    if not data_dir.is_dir():
        raise StudyError(f"--data {data_dir} is not a folder; give an image set with labels.csv (e.g. kermany-pneumonia)")
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, settings)
    torch.set_num_threads(settings.threads)
    started = time.monotonic()
    manifest = prepare_hospitals(data_dir, out, settings, say)
    data = read_sites(out, settings, manifest, say)
    plan = plan_arms(settings, list(data.sites))
    if arms:
        unknown = sorted(set(arms) - {a.name for a in plan})
        if unknown:
            raise StudyError(f"unknown arm(s) {', '.join(unknown)}; arms of this study: {', '.join(a.name for a in plan)}")
        plan = [a for a in plan if a.name in arms]
    results: dict[str, dict[str, Any]] = {}
    for i, arm in enumerate(run_order(plan), 1):
        arm_dir = out / "arms" / arm.name
        done = arm_dir / RESULT_FILE
        if done.is_file():
            results[arm.name] = json.loads(done.read_text())
            say(f"[{i}/{len(plan)}] {arm.name}: cached (AUC {results[arm.name]['test']['auc']:.3f})")
            continue
        arm_dir.mkdir(parents=True, exist_ok=True)
        say(f"[{i}/{len(plan)}] {arm.name}: {_describe(arm, settings)} ({time.monotonic() - started:.0f} s into the study)")
        t0 = time.monotonic()
        if arm.kind == "federated":
            trained = run_federated(arm, settings, data, out, arm_dir, say)
        else:
            trained = run_centralised(arm, settings, data, arm_dir, say)
        wall = time.monotonic() - t0
        test = evaluate_arm(trained["onnx"], data, trained["val_names"], settings, arm_dir)
        result = {"arm": arm.name, "kind": arm.kind, "dp": arm.dp, "target_epsilon": arm.epsilon, "strategy": arm.strategy
                  if arm.kind == "federated" else None, "site": arm.site, "wall_seconds": wall, "test": test, **trained}
        atomic_write_bytes(done, json.dumps(json_safe(result), indent=2).encode())
        results[arm.name] = result
        say(f"[{i}/{len(plan)}] {arm.name}: test AUC {test['auc']:.3f} [{test['auc_ci'][0]:.3f}, {test['auc_ci'][1]:.3f}], "
            f"sens {test['sensitivity']:.3f}, spec {test['specificity']:.3f}, ECE {test['ece']:.3f}, {wall:.0f} s")
    results = {a.name: results[a.name] for a in plan}  # table order
    doc = summarise(results, settings, data, out, time.monotonic() - started)
    atomic_write_bytes(out / "results.json", json.dumps(json_safe(doc), indent=2).encode())
    table = render_table(doc)
    (out / "results.md").write_text(table + "\n\n" + render_goals(doc) + "\n")
    plot_roc(out / "roc.png", doc, data.test_y, out)
    plot_rounds(out / "rounds.png", doc)
    return doc


def _describe(arm: Arm, s: StudySettings) -> str:
    if arm.kind == "federated":
        r = s.dp_epochs if arm.dp else s.rounds
        dp = f"DP-SGD, target epsilon {arm.epsilon:g} per site" if arm.dp else "no DP"
        return f"{arm.strategy}, {len(range(s.sites))} hospitals, {r} rounds, {dp}"
    e = s.dp_epochs if arm.dp else s.epochs
    where = f"hospital {arm.site} alone" if arm.site else "all hospitals pooled"
    return f"{where}, {e} epochs, " + (f"DP-SGD epsilon {arm.epsilon:g}" if arm.dp else "no DP")


def _check_settings(out: Path, s: StudySettings) -> None:
    path = out / SETTINGS_FILE
    current = s.to_dict()
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if diff:
            raise StudyError(f"{out} holds a study with other settings ({', '.join(diff)}); "
                             "pass a new --out, or the same settings to resume")
        return
    path.write_text(json.dumps(current, indent=2) + "\n")


def summarise(results: dict[str, dict[str, Any]], s: StudySettings, data: StudyData, out: Path, seconds: float) -> dict[str, Any]:
    """results.json: settings, data, one row per arm, the chosen alternative strategy, the goals."""
    alt = [results[a] for a in s.alt_strategies if a in results]
    chosen = None
    if alt:
        # Chosen on the pooled *validation* AUC of the last round (the test set decides nothing).
        best = max(alt, key=lambda r: (r["curve"][-1].get("pooled_val_auc") or -1.0) if r.get("curve") else -1.0)
        chosen = {"arm": best["arm"], "by": "pooled validation AUC of the last round",
                  "val_auc": {r["arm"]: r["curve"][-1].get("pooled_val_auc") if r.get("curve") else None for r in alt}}
    alone = [r for r in results.values() if r["kind"] == "alone"]
    doc = {
        "settings": s.to_dict(), "positive_class": data.positive, "test_images": int(len(data.test_y)),
        "test_positive": int(data.test_y.sum()),
        "sites": {n: {"train": d.n_train, "val": d.n_val, "train_positive": int(d.targets.y[d.split.train].sum())}
                  for n, d in data.sites.items()},
        "arms": results, "alt_strategy": chosen, "study_seconds": seconds, "out": str(out),
        "machine": _machine(s),
    }
    doc["goals"] = goals(results, chosen["arm"] if chosen else None, alone)
    return doc


def _machine(s: StudySettings) -> dict[str, Any]:
    import os
    import platform

    import torch

    return {"cpu_count": os.cpu_count(), "torch_threads": s.threads, "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.is_available()}


def goals(results: dict[str, dict[str, Any]], alt: str | None, alone: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's four goals, each with the measured gap (positive margin = met)."""
    def auc(name: str) -> float | None:
        r = results.get(name)
        return r["test"]["auc"] if r else None

    out = []
    pooled, fedavg, dp8 = auc("pooled"), auc("fedavg"), auc("fedavg-dp-eps8")
    if pooled is not None:
        out.append({"goal": "pooled AUC >= 0.97", "value": pooled, "margin": pooled - 0.97})
    if pooled is not None and fedavg is not None:
        out.append({"goal": "FedAvg within 0.01 of pooled", "value": fedavg - pooled, "margin": (fedavg - pooled) + 0.01})
    if fedavg is not None and dp8 is not None:
        out.append({"goal": "FedAvg DP eps 8 within 0.03 of FedAvg", "value": dp8 - fedavg, "margin": (dp8 - fedavg) + 0.03})
    if fedavg is not None and alone:
        best = max(alone, key=lambda r: r["test"]["auc"])
        out.append({"goal": "every hospital alone below FedAvg", "value": best["test"]["auc"], "best_alone": best["arm"],
                    "margin": fedavg - best["test"]["auc"]})
    for g in out:
        g["met"] = g["margin"] >= 0
    return out


# --------------------------------------------------------------------------- output


def _eps_text(eps: dict[str, float], dp: bool) -> str:
    if not dp or not eps:
        return "-"
    vals = [float(v) for v in eps.values() if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    lo, hi = min(vals), max(vals)
    return f"{lo:.2f} (each of {len(vals)})" if hi - lo < 0.005 else f"{lo:.2f}-{hi:.2f} ({len(vals)} sites)"


def render_table(doc: dict[str, Any]) -> str:
    head = "| arm | AUC [95% CI] | sensitivity | specificity | ECE | epsilon per site | wall time |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    chosen = (doc.get("alt_strategy") or {}).get("arm")
    for name, r in doc["arms"].items():
        t = r["test"]
        ci = t.get("auc_ci") or [None, None]
        ci_s = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] is not None else "[-]"
        label = name + (" (chosen)" if name == chosen else "")
        lines.append(f"| {label} | {_f(t['auc'])} {ci_s} | {_f(t['sensitivity'])} | {_f(t['specificity'])} | {_f(t['ece'])} | "
                     f"{_eps_text(r.get('epsilon', {}), r['dp'])} | {r['wall_seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def render_goals(doc: dict[str, Any]) -> str:
    lines = []
    for g in doc.get("goals", []):
        lines.append(f"- {g['goal']}: {'met' if g['met'] else 'missed'} (value {g['value']:+.3f}, margin {g['margin']:+.3f})")
    return "\n".join(lines)


def _f(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _main_arms(doc: dict[str, Any]) -> list[str]:
    arms = doc["arms"]
    names = ["pooled", "fedavg"]
    if doc.get("alt_strategy"):
        names.append(doc["alt_strategy"]["arm"])
    names += [n for n in arms if n.startswith("fedavg-dp-eps8") or n.startswith("pooled-dp")]
    alone = [r for r in arms.values() if r["kind"] == "alone"]
    if alone:
        names.append(max(alone, key=lambda r: r["test"]["auc"])["arm"])
    return [n for n in names if n in arms]


def plot_roc(path: Path, doc: dict[str, Any], y: np.ndarray, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5, 5))
    for name in _main_arms(doc):
        scores_path = out / "arms" / name / "test_scores.npy"
        if not scores_path.is_file():
            continue
        fpr, tpr, _ = roc_curve(y, np.load(scores_path))
        ax.plot(fpr, tpr, label=f"{name} (AUC {doc['arms'][name]['test']['auc']:.3f})", lw=1.5)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC on the common test set ({len(y)} images)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_rounds(path: Path, doc: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in doc["arms"].items():
        if r["kind"] != "federated" or not r.get("curve"):
            continue
        xs = [c["round"] for c in r["curve"]]
        ys = [c["pooled_val_auc"] if c["pooled_val_auc"] is not None else np.nan for c in r["curve"]]
        ax.plot(xs, ys, "o-", label=name, ms=3)
    ax.set(xlabel="round", ylabel="pooled validation AUC (sites' validation splits)", title="Federated arms per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def settings_from_args(args: Any) -> StudySettings:
    """--quick, then any explicit option on top."""
    base = StudySettings.quick() if args.quick else StudySettings()
    names = {f.name for f in fields(StudySettings)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if "epsilons" in overrides:
        overrides["epsilons"] = tuple(float(e) for e in str(overrides["epsilons"]).split(","))
    return replace(base, **overrides)
