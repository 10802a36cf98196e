"""How a study arm trains: centralised in this process with the sites' loop, or federated through `fl-sim run`.

Every arm uses the product's own settings for its model: the run config a federated run would use
(``common.config.RunConfig`` defaults + ``recommended_settings(model)``: for the ScatterNet, Poisson
sampling at rate 0.2, SGD lr 1.0 momentum 0.9, clip 0.1, local epochs planned for >= 150 DP steps).
Nothing here is tuned on the test set; the only choice an arm makes (which round to keep) is made
on its own validation data, as the coordinator does (server/app.py exports the best round by pooled
validation AUC).

* Centralised arms (pooled, one hospital alone, pooled DP) run ``client.train.train_one_round``
  once per "round" with the round's local epochs (``client.round.train_settings``), on the sites'
  cached features (ScatterNet) or images (CNNs), so they see the same passes over the data, the
  same steps and, under DP, the same plan (``client.privacy.plan_dp``) as a site of a federated arm.
* Federated arms (FedAvg with and without DP, leave-one-hospital-out, the warm start) are real
  ``fl-sim run`` processes (Flower's Simulation Engine, the deployment ServerApp and ClientApp, the
  sites' privacy ledgers) on the hospital folders.
* The warm start pretrains the same model on the NIH images without DP (the same recipe, best round
  by NIH validation AUC) and hands the weights to the federated run as ``init-weights``.

The federated arms are in simulations/study_federated.py. torch, and everything that imports it
(client.train, client.round, common.models, common.privacy, common.onnx_export, server.checkpoint),
is imported inside the functions that train: importing the study for ``fl-sim --help`` stays quick.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunConfig, recommended_settings
from common.metrics import MetricsError, choose_threshold, roc_auc
from simulations.study_data import Say, StudyData, StudyError, as_input

PRETRAIN_DIR = "pretrain"
NIH_LABEL = "ABNORMAL"
#: Run-config keys that make up a training recipe (reported with every arm).
RECIPE_KEYS = ("optimizer", "learning-rate", "momentum", "max-grad-norm", "sample-rate", "batch-size", "local-epochs",
               "num-server-rounds", "train-part", "augment")


@dataclass(frozen=True)
class Arm:
    """One row of the study: what trains, where, with which privacy."""

    name: str
    kind: str  # pooled | alone | federated
    model: str = "scatternet"
    dp: bool = False
    epsilon: float | None = None  # target epsilon (per site for federated arms, record-level over the pool for pooled DP)
    site: str | None = None  # alone: the hospital
    left_out: str | None = None  # leave-one-hospital-out: the hospital the federation never sees
    init: str | None = None  # "nih": start from weights pretrained on the NIH images (no DP)
    train_part: str = "all"  # CNNs: what trains (the warm start trains the head only)


@dataclass
class Trained:
    """What an arm's training leaves: the exported model, the same weights in torch, and how it got there."""

    model: Any  # torch module (whole model: front end + head), eval mode, the exported weights
    onnx: Path
    val_names: list[str]  # sites whose validation splits chose the round and the threshold
    epsilon: dict[str, float] = field(default_factory=dict)
    curve: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def arm_run_config(s: Any, arm: Arm, positive: str, *, dp: bool | None = None, recipe: dict[str, Any] | None = None) -> Any:
    """The RunConfig a federated run of this arm would use (defaults + the model's recommended settings + ``recipe``)."""
    raw = {**recommended_settings(arm.model), "model": arm.model, "image-size": s.image_size, "task": "binary",
           "labels": positive, "num-server-rounds": s.rounds, "seed": s.seed, "delta": s.delta,
           "dp": arm.dp if dp is None else dp, "train-part": arm.train_part, **(recipe or {})}
    if raw["dp"]:
        raw["target-epsilon"] = arm.epsilon
    return RunConfig.from_mapping(raw)


def no_dp_candidates(s: Any, model: str) -> list[dict[str, Any]]:
    """Training recipes a non-DP arm chooses from, on validation data.

    A ScatterNet's default recipe is DP-SGD's (SGD at lr 1.0, made safe by clipping at 0.1). Without
    DP nothing clips, so lr 1.0 diverges (and the coordinator rejects such updates as beyond its
    clipping/optimiser bound): the non-DP arms use Adam at the learning rate of ``s.no_dp_learning_rates``
    that scores best on the pooled validation splits. A CNN uses its recommended (Adam) settings.
    """
    if model != "scatternet":
        return [{}]
    return [{"optimizer": "adam", "learning-rate": lr} for lr in s.no_dp_learning_rates]


def _dataset(x: np.ndarray, y: np.ndarray, run: Any, *, features: bool, train: bool):
    import torch  # deferred: see the module docstring
    from torch.utils.data import TensorDataset

    from common.augment import identity, train_transform
    from common.loaders import XrayDataset

    target = y.astype(np.float32)[:, None]
    if features:
        return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(target))
    images = np.clip(np.rint(x[:, 0] * 255.0), 0, 255).astype(np.uint8)
    return XrayDataset(images, target, train_transform(run.image_size) if train and run.augment else identity)


def train_rounds(run: Any, template: Any, train_set: Any, val_set: Any, val_y: np.ndarray, *, dp_plan: Any,
                 say: Say, label: str) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """Rounds of the sites' training loop on one data set; (best weights by validation AUC, curve, best round).

    Each round is one ``train_one_round`` call with the round's settings from the run config (a new
    optimiser per round, as at a site); under DP every round takes the plan's steps at its noise.
    """
    import torch  # deferred: see the module docstring

    from client.round import train_settings
    from client.train import predict, train_one_round

    n = len(train_set)
    state = {k: v.detach().clone() for k, v in template.state_dict().items()}
    best: tuple[float, dict[str, Any], int] = (-math.inf, state, 0)
    curve = []
    for r in range(1, run.num_server_rounds + 1):
        settings = train_settings(run, n, r, 0.0)
        if dp_plan is not None:
            settings = replace(settings, noise_multiplier=dp_plan.noise_multiplier, steps=dp_plan.steps_per_round)
        module = copy.deepcopy(template)
        module.load_state_dict(state)
        state, stats = train_one_round(module, train_set, settings, device=torch.device("cpu"))
        module.load_state_dict(state)
        probs, _ = predict(module, val_set, device=torch.device("cpu"), batch_size=256)
        auc = roc_auc(val_y, probs[:, 0]) if len(np.unique(val_y)) == 2 else math.nan
        curve.append({"round": r, "train_loss": stats.loss, "val_auc": auc, "steps": stats.steps,
                      "images_per_second": stats.images_per_second, "seconds": stats.seconds})
        say(f"  {label}: round {r}/{run.num_server_rounds} ({settings.local_epochs} epochs, {stats.steps} steps) "
            f"loss {stats.loss:.4f}, val AUC {auc:.4f}, {stats.images_per_second:.0f} img/s")
        if auc == auc and auc > best[0]:
            best = (auc, state, r)
    if best[2] == 0:  # no validation AUC (one class): keep the last round
        best = (math.nan, state, run.num_server_rounds)
    return best[1], curve, best[2]


def train_centralised(arm: Arm, s: Any, data: StudyData, arm_dir: Path, say: Say,
                      recipe: dict[str, Any] | None = None) -> Trained:
    """Pooled or single-hospital training in this process, with the sites' own loop and DP plan.

    The non-DP pooled arm tries every recipe of :func:`no_dp_candidates` and keeps the one with the
    best pooled validation AUC (``extra["no_dp_recipe"]``); the other non-DP arms get it as ``recipe``.
    """
    from common.models import build_model, split_features
    from common.privacy import plan_dp

    names = [arm.site] if arm.site else list(data.sites)
    candidates = [{}] if arm.dp else ([recipe] if recipe is not None else no_dp_candidates(s, arm.model))
    tried, best = [], None
    for cand in candidates:
        run = arm_run_config(s, arm, data.positive, recipe=cand)
        model = build_model(run.model, dp=True, **run.model_kwargs())
        frontend, trainable, _ = split_features(model)
        x_tr, y_tr = data.arrays(names, "train", frontend)
        x_va, y_va = data.arrays(names, "val", frontend)
        feats = frontend is not None
        n = len(y_tr)
        plan = None
        if arm.dp:
            rate, batch = run.sampling(n)
            plan = plan_dp(n_train=n, batch_size=batch, local_epochs=run.epochs_per_round(rate), rounds=run.num_server_rounds,
                           delta=run.delta, max_grad_norm=run.max_grad_norm, target_epsilon=run.target_epsilon)
        label = arm.name + "".join(f" {k} {v:g}" if isinstance(v, float) else f" {k} {v}" for k, v in cand.items())
        train_set = (data.train_views(names, frontend, run.feature_views) if feats and run.feature_views > 1
                     else _dataset(x_tr, y_tr, run, features=feats, train=True))  # views: as the sites train
        state, curve, best_round = train_rounds(run, trainable, train_set,
                                                _dataset(x_va, y_va, run, features=feats, train=False), y_va,
                                                dp_plan=plan, say=say, label=label)
        val_auc = curve[best_round - 1]["val_auc"]
        tried.append({"recipe": cand, "val_auc": val_auc, "round": best_round})
        if best is None or (val_auc == val_auc and not val_auc <= best[0]):
            trainable.load_state_dict(state)
            best = (val_auc, model.eval(), run, cand, curve, best_round, plan, (x_va, y_va), n)
    assert best is not None
    _, model, run, cand, curve, best_round, plan, val, n = best
    where = "all sites (pooled)" if arm.kind == "pooled" else str(arm.site)
    epsilon = {where: plan.epsilon_planned} if plan else {}
    export(model, arm_dir / "model.onnx", run, data, rounds=run.num_server_rounds, export_round=best_round,
           sites=names, epsilon=epsilon, val=val)
    _save_weights(model, arm_dir / "model.pt")
    extra: dict[str, Any] = {"n_train": n, "n_val": int(len(val[1])), "sites": names, "export_round": best_round,
                             "recipe": {k: v for k, v in run.to_mapping().items() if k in RECIPE_KEYS}}
    if not arm.dp:
        extra["no_dp_recipe"] = cand
        if len(tried) > 1:
            extra["recipe_selection"] = {"by": "pooled validation AUC of the best round", "tried": tried}
    if plan:
        extra["dp_plan"] = asdict(plan)
    return Trained(model, arm_dir / "model.onnx", names, epsilon, curve, extra)


def _save_weights(model: Any, path: Path) -> None:
    import torch  # deferred: see the module docstring

    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)


def load_trained(result: dict[str, Any], s: Any, positive: str) -> Trained:
    """A finished arm's model again, from its folder (to score it again without training it again)."""
    import torch  # deferred: see the module docstring

    from common.models import build_model

    arm = Arm(result["arm"], result["kind"], model=result["model"], dp=result["dp"], epsilon=result.get("target_epsilon"),
              train_part=result.get("train_part", "all"))
    if result["kind"] == "federated":
        model = exported_weights(Path(result["run_dir"]), arm, s, positive)
    else:
        path = Path(result["onnx"]).with_name("model.pt")
        if not path.is_file():
            raise StudyError(f"arm {arm.name}: {path} is missing, so it cannot be scored again; delete {path.parent} "
                             "and run the study again to retrain it")
        run = arm_run_config(s, arm, positive)
        model = build_model(run.model, dp=True, **run.model_kwargs())
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
    return Trained(model, Path(result["onnx"]), list(result["val_names"]), dict(result.get("epsilon") or {}),
                   list(result.get("curve") or []))


def export(model: Any, path: Path, run: Any, data: StudyData, *, rounds: int, export_round: int, sites: Sequence[str],
           epsilon: dict[str, float], val: tuple[np.ndarray, np.ndarray]) -> None:
    """The centralised arm's model as interface-3 ONNX (parity checked on real test radiographs)."""
    import torch  # deferred: see the module docstring

    from common.models import split_features
    from common.onnx_export import export_onnx

    _, head, _ = split_features(model)
    with torch.no_grad():
        scores = torch.sigmoid(head(torch.from_numpy(val[0]))).numpy()[:, 0] if len(val[1]) else np.zeros(0)
    sample = torch.from_numpy(as_input(data.test.images[:16]))
    export_onnx(model, path, task="binary", labels=[data.positive], input_size=(run.image_size, run.image_size),
                threshold=youden(val[1], scores), sample_batch=sample,
                metadata={"model": run.model, "rounds": str(rounds), "export_round": str(export_round),
                          "sites": json.dumps(list(sites)), "epsilon": json.dumps(epsilon)})


def youden(y: np.ndarray, scores: np.ndarray) -> float:
    """The Youden threshold on validation scores; 0.5 when the validation data has one class only."""
    try:
        return float(choose_threshold(y, scores, method="youden"))
    except MetricsError:
        return 0.5


def exported_weights(run_dir: Path, arm: Arm, s: Any, positive: str) -> Any:
    """The torch model with the weights the coordinator exported (run setting export-round: the last round by default)."""
    import torch  # deferred: see the module docstring

    from common.models import build_model
    from server.checkpoint import latest_checkpoint, load_best
    from server.ema import exported_weights as averaged_or_last

    run = arm_run_config(s, arm, positive)
    best = load_best(run_dir) if run.export_round == "best" else None
    if best is not None:
        weights = best[1]
    else:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise StudyError(f"arm {arm.name}: no checkpoint in {run_dir}; run the study again to retrain it")
        weights = averaged_or_last(ckpt.strategy_state, ckpt.weights)  # the coordinator's weight average when on
    model = build_model(run.model, dp=True, **run.model_kwargs())
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})
    return model.eval()


# --------------------------------------------------------------------------- warm start


def pretrain_on_nih(model_name: str, s: Any, data: StudyData, out: Path, say: Say) -> Path:
    """Weights of ``model_name`` trained without DP on the NIH images (normal vs any finding), cached.

    The non-DP arms' recipes (:func:`no_dp_candidates`) on NIH's pretraining patients; the recipe and
    round kept are the best by AUC on NIH's validation patients. Nothing from Kermany is used. A
    ScatterNet's file holds only its head (all its state_dict has); a CNN's holds the whole network.
    """
    import torch  # deferred: see the module docstring

    from common.models import build_model, split_features

    if data.nih is None:
        raise StudyError("the warm start needs the NIH images: pass --nih DIR (nih-cxr14-1000) or leave out the warm-start arms")
    folder = out / PRETRAIN_DIR / model_name
    weights_path = folder / "weights.pt"
    if weights_path.is_file() and (folder / "pretrain.json").is_file():
        return weights_path
    t0 = time.monotonic()
    nih = data.nih
    best = None
    for cand in no_dp_candidates(s, model_name):
        run = arm_run_config(s, Arm("pretrain", "pooled", model=model_name), NIH_LABEL, dp=False, recipe=cand)
        model = build_model(run.model, dp=True, **run.model_kwargs())
        frontend, trainable, _ = split_features(model)
        x = nih.feature_array(frontend) if frontend is not None else nih.x
        feats = frontend is not None
        state, curve, best_round = train_rounds(
            run, trainable, _dataset(x[nih.pretrain], nih.y[nih.pretrain], run, features=feats, train=True),
            _dataset(x[nih.val], nih.y[nih.val], run, features=feats, train=False), nih.y[nih.val], dp_plan=None, say=say,
            label=f"pretrain {model_name} on NIH {cand}")
        auc = curve[best_round - 1]["val_auc"]
        if best is None or (auc == auc and not auc <= best[0]):
            best = (auc, model, trainable, state, curve, best_round, cand)
    assert best is not None
    _, model, trainable, state, curve, best_round, cand = best
    trainable.load_state_dict(state)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "weights.tmp.pt"
    torch.save(model.state_dict(), tmp)
    tmp.replace(weights_path)
    info = {"model": model_name, "recipe": cand, "n_pretrain": int(len(nih.pretrain)), "n_val": int(len(nih.val)), "best_round": best_round,
            "val_auc": curve[best_round - 1]["val_auc"] if curve else None, "curve": curve,
            "seconds": time.monotonic() - t0, "label": "NIH normal vs any of the 14 findings (not pneumonia)"}
    (folder / "pretrain.json").write_text(json.dumps(info, indent=2, default=float))
    say(f"  pretrained {model_name} on NIH: round {best_round}, NIH validation AUC {info['val_auc']:.3f}, "
        f"{info['seconds']:.0f} s -> {weights_path}")
    return weights_path


def pretrain_info(out: Path, model_name: str) -> dict[str, Any] | None:
    path = out / PRETRAIN_DIR / model_name / "pretrain.json"
    return json.loads(path.read_text()) if path.is_file() else None
