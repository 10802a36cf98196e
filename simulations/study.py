"""`fl-sim study`: does federated DP keep the model useful, and how far does it travel? (issues 5, 9, 15)

One command reproduces every number of docs/results.md from the Kermany image set::

    fl-sim study --data $FEDXRAY_DATA/kermany-pneumonia --out runs/study-v2

What it does, in order (each step is cached under ``--out``, so a second call resumes):

1. ``hospitals/``: a stratified, patient-level hold-out (the common test set) and N hospitals with
   Dirichlet label and quantity skew, each written as DICOM through its own acquisition profile
   (study_data.prepare_hospitals); every site read through the site path (common.loaders.load_site)
   into ``state/<site>``, and a ScatterNet's fixed features computed once per image into each
   site's cache, where the simulated sites of the federated arms find them again.
2. Arms (study_arms), for each model of ``--models`` (default: the DP-first ``scatternet``):
   pooled (no DP), each hospital alone, FedAvg (no DP), FedAvg DP at each epsilon, pooled DP at each
   epsilon, leave-one-hospital-out (FedAvg DP on all hospitals but one) and the public warm start
   (pretrained on the NIH images without DP, then FedAvg DP). Centralised arms run the sites' own
   training loop here; federated arms are real ``fl-sim run`` calls. Every arm uses the product's
   settings for its model (the run config defaults, e.g. ``fl-sim --data ...`` with no options).
3. Every arm's exported model is scored (study_eval) on the held-out patients, on all 1,000 NIH
   images (another population; the label there is "any finding", not pneumonia) and, for a
   leave-one-out arm, on every image of the hospital it never saw. ``arms/<arm>/result.json`` is
   written atomically when an arm is done; finished arms are skipped on the next call.
4. ``results.json``, ``results.md`` (tables, goals, timings), ``roc.png``, ``rounds.png``, ``privacy.png``
   (study_report).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from common.cache import atomic_write_bytes
from common.config import RunConfig
from server.report import json_safe
from simulations.study_arms import Arm, load_trained, pretrain_info, pretrain_on_nih, train_centralised
from simulations.study_data import (
    Say,
    StudyData,
    StudyError,
    cache_features,
    default_nih_dir,
    prepare_hospitals,
    read_nih,
    read_sites,
)
from simulations.study_eval import EVAL_VERSION, evaluate_arm, validation_summary
from simulations.study_federated import train_federated
from simulations.study_report import (
    goals,
    loho_summary,
    machine,
    plot_privacy,
    plot_roc,
    plot_rounds,
    render_goals,
    render_markdown,
    render_table,
    warm_summary,
)

__all__ = ["Arm", "StudyError", "StudySettings", "plan_arms", "render_goals", "render_table", "run_order", "run_study",
           "settings_from_args"]

RESULT_FILE = "result.json"
SETTINGS_FILE = "study.json"
TIMINGS_FILE = "timings.json"
MODEL_PREFIX = {"scatternet": "", "mobilenet_v2": "mnv2-", "densenet121": "densenet121-"}


@dataclass(frozen=True)
class StudySettings:
    """Everything that decides the study's numbers (saved as out/study.json; a resume must match).

    The training recipe is not here: every arm uses the product's run config for its model
    (common.config: RunConfig defaults and recommended_settings), as `fl-sim run` does.
    """

    image_size: int = 64  # px
    sites: int = 5  # hospitals
    alpha: float = 0.5  # Dirichlet concentration of label and quantity skew
    holdout: float = 0.15  # share of patients held out as the common test set
    val_fraction: float = 0.2  # each site's validation share: the simulated sites' own default (node config)
    seed: int = 0  # hospitals, the NIH pretraining split, initial weights, non-DP data order
    models: tuple[str, ...] = ("scatternet",)  # arm sets to run; mobilenet_v2 adds the CNN arms (about 2 hours)
    max_images: int | None = None  # use at most this many Kermany images (whole patients); None: all
    rounds: int = 8  # federated rounds (fl-sim run's default); centralised arms train as many rounds of the same epochs
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)  # per-site target epsilon of the FedAvg DP arms
    pooled_epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)  # pooled DP arms (record-level over the pool)
    loho_epsilon: float = 3.0  # leave-one-hospital-out arms: FedAvg DP at this epsilon (0: none)
    warm_epsilon: float = 3.0  # public warm start: FedAvg DP at this epsilon from NIH-pretrained weights (0: none)
    nih_max_images: int | None = None  # NIH images to use (None: all 1,000)
    no_dp_learning_rates: tuple[float, ...] = (1e-2, 1e-3, 1e-4)  # scatternet without DP: Adam, best on pooled validation
    delta: float = 1e-5
    bootstrap: int = 1000  # resamples for the AUC intervals
    threads: int = 2  # torch threads in this process (federated sites: 1 each, two at a time)

    @classmethod
    def quick(cls) -> StudySettings:
        """A smoke version: a few dozen images, 2 sites, 1 round, 32 px (the test uses it)."""
        return cls(image_size=32, sites=2, max_images=72, rounds=1, epsilons=(8.0,), pooled_epsilons=(8.0,),
                   loho_epsilon=8.0, warm_epsilon=8.0, holdout=0.25, bootstrap=50, nih_max_images=120)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _tag(e: float) -> str:
    return f"{e:g}"


def plan_arms(s: StudySettings, site_names: Sequence[str]) -> list[Arm]:
    """Every arm, in the order of the results table."""
    arms: list[Arm] = []
    for model in s.models:
        p = MODEL_PREFIX.get(model, f"{model}-")
        arms.append(Arm(f"{p}pooled", "pooled", model=model))
        if model == "scatternet":
            arms += [Arm(f"alone-{n.removeprefix('hospital-')}", "alone", model=model, site=n) for n in site_names]
        arms.append(Arm(f"{p}fedavg", "federated", model=model))
        arms += [Arm(f"{p}fedavg-dp-eps{_tag(e)}", "federated", model=model, dp=True, epsilon=e) for e in s.epsilons]
        if model == "scatternet":
            arms += [Arm(f"pooled-dp-eps{_tag(e)}", "pooled", model=model, dp=True, epsilon=e) for e in s.pooled_epsilons]
            if s.loho_epsilon > 0:
                arms += [Arm(f"loho-{n.removeprefix('hospital-')}", "federated", model=model, dp=True, epsilon=s.loho_epsilon,
                             left_out=n) for n in site_names]
        if s.warm_epsilon > 0:
            # A CNN fine-tunes only its head from the NIH weights, so DP noise touches few parameters.
            arms.append(Arm(f"{p}warm-dp-eps{_tag(s.warm_epsilon)}", "federated", model=model, dp=True,
                            epsilon=s.warm_epsilon, init="nih", train_part="all" if model == "scatternet" else "head"))
    return arms


def run_order(arms: Sequence[Arm]) -> list[Arm]:
    """Training order: the goals' arms first (cheap centralised ones before them), so a study cut short has answered most."""
    models = list(dict.fromkeys(a.model for a in arms))

    def rank(a: Arm) -> tuple[int, int, float]:
        eps = float(a.epsilon or 0.0)
        if a.kind == "pooled":
            r = 1 if a.dp else 0
        elif a.kind == "alone":
            r = 5
        elif a.left_out:
            r = 6
        elif a.init:
            r = 7
        elif not a.dp:
            r = 3
        else:
            r = 2 if eps in (1.0, 3.0) else 4
        return (models.index(a.model), r, -eps)

    return sorted(arms, key=rank)


def _check_settings(out: Path, s: StudySettings) -> None:
    path = out / SETTINGS_FILE
    current = s.to_dict()
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k) and k not in ("models", "threads"))
        if diff:
            raise StudyError(f"{out} holds a study with other settings ({', '.join(diff)}); "
                             "pass a new --out, or the same settings to resume")
        return
    path.write_text(json.dumps(current, indent=2) + "\n")


class _Timings:
    """Setup steps' wall times, kept in out/timings.json from the call that did the work (a resume reuses them)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.steps: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def record(self, step: str, seconds: float, *, did_work: bool) -> None:
        if did_work or step not in self.steps:
            self.steps[step] = seconds
            self.path.write_text(json.dumps(self.steps, indent=2) + "\n")


# --------------------------------------------------------------------------- the study


def run_study(data_dir: str | Path, out: str | Path, settings: StudySettings, *, arms: Sequence[str] | None = None,
              nih_dir: str | Path | None = None, say: Say | None = None) -> dict[str, Any]:
    """Run (or resume) the study; returns the results document (also written to out/results.json)."""
    import torch  # deferred, with common.models below: torch takes seconds to import (fl-sim --help imports this module)

    from common.models import build_model, split_features

    say = say or (lambda m: print(m, flush=True))
    data_dir, out = Path(data_dir).resolve(), Path(out).resolve()
    if not data_dir.is_dir():
        raise StudyError(f"--data {data_dir} is not a folder; give an image set with labels.csv (e.g. kermany-pneumonia)")
    unknown_models = sorted(set(settings.models) - set(MODEL_PREFIX))
    if unknown_models:
        raise StudyError(f"unknown model(s) {', '.join(unknown_models)}; --models takes {', '.join(MODEL_PREFIX)}")
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, settings)
    torch.set_num_threads(settings.threads)
    timings = _Timings(out / TIMINGS_FILE)

    t0 = time.monotonic()
    fresh = not (out / "hospitals" / "manifest.json").is_file()
    manifest = prepare_hospitals(data_dir, out, settings, say)
    timings.record("hospitals", time.monotonic() - t0, did_work=fresh)
    t0 = time.monotonic()
    data = read_sites(out, settings, manifest, say)
    nih = Path(nih_dir).resolve() if nih_dir else default_nih_dir(data_dir)
    if nih is not None:
        if not (nih / "labels.csv").is_file():
            raise StudyError(f"--nih {nih} has no labels.csv; point it at nih-cxr14-1000")
        data.nih = read_nih(nih, out, settings, say)
    else:
        say(f"NIH images not found next to {data_dir}: no transfer figure and no warm start (pass --nih DIR)")
    timings.record("read", time.monotonic() - t0, did_work=fresh)

    plan = plan_arms(settings, list(data.sites))
    if data.nih is None:
        plan = [a for a in plan if a.init is None]
    if arms:
        unknown = sorted(set(arms) - {a.name for a in plan})
        if unknown:
            raise StudyError(f"unknown arm(s) {', '.join(unknown)}; arms of this study: {', '.join(a.name for a in plan)}")
        wanted = set(arms)
        for a in plan:  # the non-DP arms train with the recipe the pooled arm chose on validation
            if a.name in arms and not a.dp and a.kind != "pooled":
                wanted.add(next(p.name for p in plan if p.model == a.model and p.kind == "pooled" and not p.dp))
        plan = [a for a in plan if a.name in wanted]
    if any(a.model == "scatternet" for a in plan):
        t0 = time.monotonic()
        frontend, _, _ = split_features(build_model("scatternet", num_outputs=1, image_size=settings.image_size))
        cache_features(data, frontend, say, views=RunConfig().feature_views)
        timings.record("features", time.monotonic() - t0, did_work=fresh)

    results: dict[str, dict[str, Any]] = {}
    for i, arm in enumerate(run_order(plan), 1):
        arm_dir = out / "arms" / arm.name
        done = arm_dir / RESULT_FILE
        if done.is_file():
            results[arm.name] = _cached(arm, done, settings, data)
            say(f"[{i}/{len(plan)}] {arm.name}: cached (AUC {results[arm.name]['test']['auc']:.4f})")
            continue
        arm_dir.mkdir(parents=True, exist_ok=True)
        say(f"[{i}/{len(plan)}] {arm.name}: {_describe(arm, settings)}")
        results[arm.name] = r = _train_and_score(arm, settings, data, out, arm_dir, results, timings, say)
        atomic_write_bytes(done, json.dumps(json_safe(r), indent=2).encode())
        extra = f", on {arm.left_out} {r['left_out']['auc']:.4f}" if arm.left_out else ""
        extra += f", NIH {r['nih']['auc']:.3f}" if "nih" in r else ""
        say(f"[{i}/{len(plan)}] {arm.name}: held-out AUC {r['test']['auc']:.4f} [{r['test']['auc_ci'][0]:.4f}, "
            f"{r['test']['auc_ci'][1]:.4f}]{extra}; {r['wall_seconds']:.0f} s")
    results = {a.name: results[a.name] for a in plan}  # table order
    doc = summarise(results, settings, data, out, timings.steps)
    atomic_write_bytes(out / "results.json", json.dumps(json_safe(doc), indent=2).encode())
    (out / "results.md").write_text(render_markdown(doc))
    plot_roc(out / "roc.png", doc, data.test.targets.y[:, 0], out)
    plot_rounds(out / "rounds.png", doc)
    plot_privacy(out / "privacy.png", doc)
    return doc


def _cached(arm: Arm, done: Path, s: StudySettings, data: StudyData) -> dict[str, Any]:
    """A finished arm's result; scored again (not retrained) if an earlier version of the study scored it."""
    r = json.loads(done.read_text())
    if r.get("eval_version") != EVAL_VERSION:
        t0 = time.monotonic()
        r.update(evaluate_arm(arm, load_trained(r, s, data.positive), data, s, done.parent), eval_seconds=time.monotonic() - t0)
        r["validation"] = validation_summary(r, data, s)
        atomic_write_bytes(done, json.dumps(json_safe(r), indent=2).encode())
    return r


def _train_and_score(arm: Arm, s: StudySettings, data: StudyData, out: Path, arm_dir: Path,
                     results: dict[str, dict[str, Any]], timings: _Timings, say: Say) -> dict[str, Any]:
    """Train one arm (pretraining first for a warm start), export it, score it; its result document."""
    init = None
    if arm.init:
        t0 = time.monotonic()
        had = pretrain_info(out, arm.model) is not None
        init = pretrain_on_nih(arm.model, s, data, out, say)
        timings.record(f"pretrain-{arm.model}", time.monotonic() - t0, did_work=not had)
    recipe = None
    if not arm.dp and arm.kind != "pooled":  # the recipe the pooled arm chose on validation
        recipe = next(r["no_dp_recipe"] for r in results.values() if r["model"] == arm.model and r["kind"] == "pooled"
                      and not r["dp"])
    t0 = time.monotonic()
    if arm.kind == "federated":
        trained = train_federated(arm, s, data, out, arm_dir, say, init_weights=init, recipe=recipe)
    else:
        trained = train_centralised(arm, s, data, arm_dir, say, recipe=recipe)
    wall = time.monotonic() - t0
    t0 = time.monotonic()
    scored = evaluate_arm(arm, trained, data, s, arm_dir)
    result = {"arm": arm.name, "kind": arm.kind, "model": arm.model, "dp": arm.dp, "target_epsilon": arm.epsilon,
              "site": arm.site, "init": arm.init, "train_part": arm.train_part, "wall_seconds": wall,
              "eval_seconds": time.monotonic() - t0, "epsilon": trained.epsilon, "curve": trained.curve,
              "onnx": str(trained.onnx), "val_names": trained.val_names, **trained.extra, **scored}
    result["validation"] = validation_summary(result, data, s)
    return result


def _describe(arm: Arm, s: StudySettings) -> str:
    dp = f"DP-SGD, target epsilon {arm.epsilon:g}" if arm.dp else "no DP"
    if arm.kind == "federated":
        who = f"all hospitals but {arm.left_out}" if arm.left_out else f"{s.sites} hospitals"
        init = f", from weights pretrained on NIH (trains: {arm.train_part})" if arm.init else ""
        return f"{arm.model}, FedAvg over {who}, {s.rounds} rounds, {dp} per site{init}"
    where = f"{arm.site} alone" if arm.site else "all hospitals pooled"
    return f"{arm.model}, {where}, {s.rounds} rounds of the sites' loop, {dp}"


def summarise(results: dict[str, dict[str, Any]], s: StudySettings, data: StudyData, out: Path,
              steps: dict[str, float]) -> dict[str, Any]:
    """results.json: settings, data, one entry per arm, LOHO, NIH, warm start, goals and timings."""
    arms_s = sum(r["wall_seconds"] for r in results.values())
    eval_s = sum(r.get("eval_seconds", 0.0) for r in results.values())
    total = sum(steps.values()) + arms_s + eval_s
    default_set = {a.name for a in plan_arms(StudySettings(), list(data.sites))}
    complete_default = s.models == StudySettings().models and default_set <= set(results)
    nih = data.nih
    doc = {
        "settings": s.to_dict(), "positive_class": data.positive, "test_images": int(len(data.test.targets.y)),
        "test_positive": int(data.test.targets.y.sum()),
        "sites": {n: {"train": d.n_train, "val": d.n_val, "train_positive": int(d.targets.y[d.split.train].sum()),
                      "images": int(len(d.targets.y)), "positive": int(d.targets.y.sum())} for n, d in data.sites.items()},
        "nih": None if nih is None else {"images": int(len(nih.y)), "abnormal": int(nih.y.sum()),
                                         "label": "normal vs any of the 14 NIH findings (not pneumonia)"},
        "arms": results, "out": str(out), "machine": machine(s.threads),
        "loho": loho_summary(results),
        "warm": warm_summary(results, pretrain_info(out, "scatternet")),
        "timings": {"steps": steps, "arms_seconds": arms_s, "eval_seconds": eval_s, "total_seconds": total,
                    "complete_default_set": complete_default},
    }
    doc["goals"] = goals(results, len(data.sites), total / 60 if complete_default else None)
    return doc


def settings_from_args(args: Any) -> StudySettings:
    """--quick, then any explicit option on top (comma-separated lists for the tuple settings)."""
    base = StudySettings.quick() if args.quick else StudySettings()
    names = {f.name for f in fields(StudySettings)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    for key in ("epsilons", "pooled_epsilons", "no_dp_learning_rates"):
        if key in overrides:
            overrides[key] = tuple(float(e) for e in str(overrides[key]).split(",") if e.strip())
    if "models" in overrides:
        overrides["models"] = tuple(m.strip() for m in str(overrides["models"]).split(",") if m.strip())
    return replace(base, **overrides)

