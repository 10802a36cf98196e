"""DP recipes for the ScatterNet head on Kermany, their robustness to acquisition shift, and their cost, as JSON.

    .venv/bin/python benchmarks/dp_recipes.py [--data $FEDXRAY_DATA/kermany-pneumonia] [--epochs 40] [--views 5]
    .venv/bin/python benchmarks/dp_recipes.py --quick          # a smoke run: 600 images, 4 epochs, 2 views

What it measures (one process, 2 torch threads by default; progress on stderr, one JSON document on stdout):

1. **Data**: the Kermany train split through the one image path (common.preprocess: JPEG -> [0, 1] ->
   interface-3 resize to 64 px), split by patient (``patient_id_coarse``) into train / validation /
   test (70 / 15 / 15%, stratified, seeded). Decisions are made on validation; test is reported.
2. **Privacy vs utility** of the pooled ScatterNet linear head with the product's DP recipe
   (common.config: Poisson rate 0.2, SGD lr 1.0 momentum 0.9, clip 0.1; sigma from the RDP accountant
   for the epochs asked, delta 1e-5) at epsilon 1 / 3 / 8, and without DP (Adam; the learning rate of
   1e-2 / 1e-3 / 1e-4 that does best on validation: SGD at lr 1.0 without clipping diverges).
3. **Augmentation before the fixed transform** (common.augment.train_transform: rotation, resized
   crop, brightness/contrast), at epsilon 3, all through ``client.train.train_one_round``:
   ``none``; ``random-view``: K augmented views of each training image cached as features, one drawn
   at random each time the image is sampled; ``multiplicity``: the per-sample gradient is the mean of
   the gradients of its K views, clipped once (augmentation multiplicity, De et al. 2022; Opacus'
   per-sample gradient of a linear layer sums over the extra view axis, and the mean loss makes it
   the mean).
4. **Robustness**: every trained head scored on validation and test images under synthetic shifts of
   acquisition: gamma 0.6 and 1.6, contrast 0.7 about each image's mean, Gaussian noise std 0.03.
5. **Decision**: an augmentation is adopted only if it beats ``none`` on validation by more than
   ``--margin`` AUC both on clean images and on the mean over the shifts; otherwise ``none`` (it is
   also the cheapest). ``decision`` in the JSON says which and why.
6. **Cost**: scattering per image (wall and CPU); images/s of the DP head against the same head and
   optimiser without DP on cached features (issue 15: DP >= 0.9x); and what computing the scattering
   on the fly would add per step (the features of one expected batch) against a cached-feature step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall shared cores

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _util import machine_info, print_json, progress, set_threads, time_call  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import Dataset, TensorDataset  # noqa: E402

SHIFTS: dict[str, tuple[str, float]] = {"gamma0.6": ("gamma", 0.6), "gamma1.6": ("gamma", 1.6),
                                        "contrast0.7": ("contrast", 0.7), "noise0.03": ("noise", 0.03)}
NO_DP_LEARNING_RATES = (1e-2, 1e-3, 1e-4)


# --------------------------------------------------------------------------- data


def load_kermany(data: Path, size: int, max_images: int | None, seed: int) -> dict[str, Any]:
    """Images [N, 1, S, S] in [0, 1], labels and a patient-disjoint train / val / test split."""
    from common.preprocess import load_pixels, to_model_input
    from simulations.hospitals import load_image_set
    from simulations.partition import holdout_split

    images, _ = load_image_set(data)
    images = sorted(images, key=lambda i: i.path.as_posix())
    if max_images and max_images < len(images):
        keep = np.random.default_rng(seed).choice(len(images), max_images, replace=False)
        images = [images[i] for i in sorted(keep)]
    x = np.stack([to_model_input(load_pixels(i.path), size)[0] for i in images]).astype(np.float32)
    y = np.array([i.label for i in images], dtype=np.int64)
    patients = [str(i.patient) for i in images]
    per_patient: dict[str, int] = {}
    for p, label in zip(patients, y.tolist(), strict=True):
        per_patient[p] = max(per_patient.get(p, 0), int(label))
    test, rest = holdout_split(per_patient, 0.15, seed=seed)
    val, _ = holdout_split({p: per_patient[p] for p in rest}, 0.15 / 0.85, seed=seed + 1)
    part = {p: "test" for p in test} | {p: "val" for p in val}
    which = np.array([part.get(p, "train") for p in patients])
    return {"x": x, "y": y, **{k: np.flatnonzero(which == k) for k in ("train", "val", "test")}}


def shift(x: np.ndarray, kind: str, amount: float, seed: int) -> np.ndarray:
    """A synthetic acquisition change of float images in [0, 1]."""
    if kind == "gamma":
        return np.power(x, amount)
    if kind == "contrast":
        mean = x.mean(axis=(-2, -1), keepdims=True)
        return np.clip(mean + amount * (x - mean), 0.0, 1.0)
    rng = np.random.default_rng(seed)
    return np.clip(x + rng.normal(0.0, amount, x.shape).astype(np.float32), 0.0, 1.0)


def features(frontend: nn.Module, x: np.ndarray, batch: int = 64) -> np.ndarray:
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            out.append(frontend(torch.from_numpy(np.ascontiguousarray(x[start:start + batch]))).numpy())
    return np.concatenate(out)


def augmented_views(frontend: nn.Module, x: np.ndarray, views: int, size: int, seed: int) -> np.ndarray:
    """[N, K, C, h, w]: the features of K augmented copies of each image (augmentation before the transform)."""
    from common.augment import train_transform

    torch.manual_seed(seed)
    t = train_transform(size)
    out = None
    for k in range(views):
        aug = np.stack([t(torch.from_numpy(img)).numpy() for img in x])
        f = features(frontend, aug)
        if out is None:
            out = np.empty((len(x), views, *f.shape[1:]), np.float32)
        out[:, k] = f
        progress(f"  augmented view {k + 1}/{views}")
    assert out is not None
    return out


def cached(cache: Path | None, name: str, make) -> np.ndarray:
    if cache is None:
        return make()
    path = cache / f"{name}.npy"
    if path.is_file():
        return np.load(path)
    arr = make()
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)
    return arr


# --------------------------------------------------------------------------- training


class RandomView(Dataset):
    """Each access draws one of the K cached views of the image."""

    def __init__(self, views: np.ndarray, y: np.ndarray, seed: int) -> None:
        self.views = torch.from_numpy(views)
        self.y = torch.from_numpy(y.astype(np.float32)[:, None])
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        k = int(torch.randint(self.views.shape[1], (1,), generator=self.gen))
        return self.views[i, k], self.y[i]


class MultiView(nn.Module):
    """The head applied to K views at once: [B, K, C, h, w] -> logits [B, K] (one per view)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, k = x.shape[:2]
        z = self.head.norm(x.flatten(0, 1)).flatten(1).view(b, k, -1)
        return self.head.classifier(z)[..., 0]


def train_head(run: Any, train_set: Dataset, n: int, *, epochs: int, epsilon: float | None, multiview: bool = False,
               learning_rate: float | None = None, optimizer: str | None = None, seed: int = 0,
               grad_sample_mode: str | None = None) -> tuple[nn.Module, dict]:
    """One train_one_round call of ``epochs`` passes (one optimiser, as a pooled run); (head, stats)."""
    from client.train import TrainSettings, train_one_round
    from common.models import build_model, split_features
    from common.models import grad_sample_mode as grad_sample_mode_for
    from common.privacy import plan_dp

    _, head, _ = split_features(build_model("scatternet", num_outputs=1, image_size=run.image_size))
    rate, batch = run.sampling(n)
    plan = None
    if epsilon is not None:
        plan = plan_dp(n_train=n, batch_size=batch, local_epochs=epochs, rounds=1, delta=run.delta,
                       max_grad_norm=run.max_grad_norm, target_epsilon=epsilon)
    settings = TrainSettings(task="binary", local_epochs=epochs, batch_size=batch, learning_rate=learning_rate or run.learning_rate,
                             optimizer=optimizer or run.optimizer, momentum=run.momentum, dp=plan is not None,
                             noise_multiplier=plan.noise_multiplier if plan else 0.0, max_grad_norm=run.max_grad_norm,
                             steps=plan.steps_per_round if plan else None, seed=seed,
                             grad_sample_mode=grad_sample_mode or grad_sample_mode_for("scatternet"))
    module = MultiView(head) if multiview else head
    weights, stats = train_one_round(module, train_set, settings, device=torch.device("cpu"))
    module.load_state_dict(weights)
    info = {"steps": stats.steps, "seconds": round(stats.seconds, 2), "images_per_second": round(stats.images_per_second, 1),
            "train_loss": round(stats.loss, 4), "batch": batch, "sample_rate": round(rate, 4)}
    if plan:
        info.update(noise_multiplier=round(plan.noise_multiplier, 4), epsilon=round(plan.epsilon_planned, 4))
    return head.eval(), info


def scores(head: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(head(torch.from_numpy(x))).numpy()[:, 0]


def evaluate(head: nn.Module, sets: dict[str, dict[str, np.ndarray]], y: dict[str, np.ndarray]) -> dict[str, Any]:
    from common.metrics import roc_auc

    out: dict[str, Any] = {}
    for part in ("val", "test"):
        aucs = {name: round(roc_auc(y[part], scores(head, f)), 4) for name, f in sets[part].items()}
        shifted = [v for k, v in aucs.items() if k != "clean"]
        out[part] = {**aucs, "mean_shifted": round(float(np.mean(shifted)), 4)}
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(os.environ.get("FEDXRAY_DATA", "../shared/data"), "kermany-pneumonia"))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=40, help="passes over the training split (q 0.2: 5 steps each)")
    ap.add_argument("--views", type=int, default=5, help="augmented views per image (random-view, multiplicity)")
    ap.add_argument("--epsilons", default="1,3,8")
    ap.add_argument("--aug-epsilon", type=float, default=3.0, help="epsilon of the augmentation comparison")
    ap.add_argument("--margin", type=float, default=0.002, help="validation AUC an augmentation must gain to be adopted")
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="hooks,ghost", help="Opacus grad-sample modes timed for the DP speed (the first: per step)")
    ap.add_argument("--cache", type=Path, help="keep the computed features here (a rerun skips the scattering)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 600 images, 4 epochs, 2 views")
    args = ap.parse_args()
    if args.quick:
        args.max_images, args.epochs, args.views = args.max_images or 600, 4, 2
    set_threads(args.threads)

    from common.config import RunConfig
    from common.models import build_model, grad_sample_mode, split_features

    started = time.perf_counter()
    run = RunConfig.from_mapping({"image-size": args.size, "labels": "PNEUMONIA"})  # the product's DP recipe
    frontend, _, _ = split_features(build_model("scatternet", num_outputs=1, image_size=args.size))
    progress(f"reading {args.data} at {args.size} px ...")
    d = load_kermany(Path(args.data), args.size, args.max_images, args.seed)
    x, y_all = d["x"], d["y"]
    y = {k: y_all[d[k]] for k in ("train", "val", "test")}
    split = {k: {"images": int(len(d[k])), "positive": int(y[k].sum())} for k in ("train", "val", "test")}
    progress(f"split by patient: {split}")

    # Cost of the scattering itself.
    probe = x[d["train"][:256]]
    features(frontend, probe[:32])  # warm-up
    wall, cpu = time_call(lambda: features(frontend, probe, batch=32))
    scatter_cost = {"images": len(probe), "batch": 32, "ms_per_image_wall": round(1e3 * wall / len(probe), 2),
                    "ms_per_image_cpu": round(1e3 * cpu / len(probe), 2)}
    progress(f"scattering: {scatter_cost}")

    tag = f"{args.size}px-{args.max_images or 'all'}-s{args.seed}"
    progress("features of the clean and shifted images ...")
    f_train = cached(args.cache, f"train-{tag}", lambda: features(frontend, x[d["train"]]))
    sets: dict[str, dict[str, np.ndarray]] = {}
    for part in ("val", "test"):
        sets[part] = {"clean": cached(args.cache, f"{part}-{tag}", lambda p=part: features(frontend, x[d[p]]))}
        for name, (kind, amount) in SHIFTS.items():
            sets[part][name] = cached(args.cache, f"{part}-{name}-{tag}",
                                      lambda p=part, k=kind, a=amount: features(frontend, shift(x[d[p]], k, a, args.seed)))
    progress(f"{args.views} augmented views of each training image ...")
    views = cached(args.cache, f"views{args.views}-{tag}", lambda: augmented_views(frontend, x[d["train"]], args.views,
                                                                                     args.size, args.seed))
    n = len(y["train"])
    plain = TensorDataset(torch.from_numpy(f_train), torch.from_numpy(y["train"].astype(np.float32)[:, None]))

    recipes: dict[str, Any] = {}

    def record(name: str, head: nn.Module, info: dict) -> None:
        recipes[name] = {"training": info, **evaluate(head, sets, y)}
        progress(f"{name}: val {recipes[name]['val']['clean']}, test {recipes[name]['test']['clean']}, "
                 f"test under shift {recipes[name]['test']['mean_shifted']} ({info['seconds']} s)")

    # Privacy vs utility, no augmentation.
    for eps in [float(e) for e in args.epsilons.split(",")]:
        head, info = train_head(run, plain, n, epochs=args.epochs, epsilon=eps, seed=args.seed)
        record(f"none-eps{eps:g}", head, info)
    best = None
    for lr in NO_DP_LEARNING_RATES:
        head, info = train_head(run, plain, n, epochs=args.epochs, epsilon=None, optimizer="adam", learning_rate=lr, seed=args.seed)
        info["optimizer"], info["learning_rate"] = "adam", lr
        val_auc = evaluate(head, sets, y)["val"]["clean"]
        progress(f"no DP, Adam lr {lr:g}: val {val_auc}")
        if best is None or val_auc > best[0]:
            best = (val_auc, head, info)
    assert best is not None
    record("none-no-dp", best[1], {**best[2], "chosen_from": list(NO_DP_LEARNING_RATES), "chosen_by": "validation AUC"})

    # Augmentation at one epsilon.
    eps = args.aug_epsilon
    head, info = train_head(run, RandomView(views, y["train"], args.seed), n, epochs=args.epochs, epsilon=eps, seed=args.seed)
    record(f"random-view-eps{eps:g}", head, info)
    multi = TensorDataset(torch.from_numpy(views), torch.from_numpy(np.repeat(y["train"].astype(np.float32)[:, None], args.views, 1)))
    head, info = train_head(run, multi, n, epochs=args.epochs, epsilon=eps, multiview=True, seed=args.seed)
    record(f"multiplicity{args.views}-eps{eps:g}", head, info)

    base = recipes.get(f"none-eps{eps:g}")
    decision: dict[str, Any] = {"by": f"validation AUC, clean and mean over shifts; an augmentation must gain > {args.margin}"
                                      " on both", "choice": "none"}
    if base is not None:
        gains = {}
        for name in (f"random-view-eps{eps:g}", f"multiplicity{args.views}-eps{eps:g}"):
            r = recipes[name]
            gains[name] = {"clean": round(r["val"]["clean"] - base["val"]["clean"], 4),
                           "shifted": round(r["val"]["mean_shifted"] - base["val"]["mean_shifted"], 4)}
        adopted = [k for k, g in gains.items() if g["clean"] > args.margin and g["shifted"] > args.margin]
        if adopted:
            decision["choice"] = max(adopted, key=lambda k: gains[k]["clean"] + gains[k]["shifted"])
        decision["validation_gain_over_none"] = gains

    # Cost: DP vs non-DP on cached features (same head, optimiser and batch), and on-the-fly scattering per step.
    cost_epochs = max(2, args.epochs // 4)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    runs: dict[str, list[dict]] = {m: [] for m in ["no-dp", *modes]}
    for _ in range(3):  # alternated, so load from other processes hits all alike; medians reported
        runs["no-dp"].append(train_head(run, plain, n, epochs=cost_epochs, epsilon=None, seed=args.seed)[1])
        for mode in modes:
            runs[mode].append(train_head(run, plain, n, epochs=cost_epochs, epsilon=eps, seed=args.seed, grad_sample_mode=mode)[1])
    median = {k: sorted(v, key=lambda i: i["images_per_second"])[len(v) // 2] for k, v in runs.items()}
    plain_info = median["no-dp"]
    dp_info = median[modes[0]]
    batch = dp_info["batch"]
    per_step_cached = dp_info["seconds"] / max(1, dp_info["steps"])
    speed = {"epochs": cost_epochs, "repeats": 3, "optimizer": "the DP recipe's (SGD), with and without DP",
             "no_dp_images_per_second": plain_info["images_per_second"],
             **{f"dp_{m}_images_per_second": median[m]["images_per_second"] for m in modes},
             **{f"dp_{m}_over_no_dp": round(median[m]["images_per_second"] / max(1e-9, plain_info["images_per_second"]), 3)
                for m in modes},
             "product_mode": grad_sample_mode("scatternet"), "goal": "DP >= 0.9x non-DP (issue 15)"}
    onthefly = {"expected_batch": batch, "cached_seconds_per_step": round(per_step_cached, 4),
                "scattering_seconds_per_step": round(batch * scatter_cost["ms_per_image_wall"] / 1e3, 3)}
    onthefly["slowdown"] = round((onthefly["scattering_seconds_per_step"] + per_step_cached) / max(1e-9, per_step_cached), 1)

    print_json({
        "benchmark": "dp_recipes", "data": str(args.data), "image_size": args.size, "split": split,
        "recipe": {k: v for k, v in run.to_mapping().items() if k in ("optimizer", "learning-rate", "momentum", "max-grad-norm",
                                                                        "sample-rate", "delta")},
        "epochs": args.epochs, "views": args.views, "shifts": {k: list(v) for k, v in SHIFTS.items()},
        "recipes": recipes, "decision": decision, "scattering": scatter_cost, "dp_speed": speed, "on_the_fly": onthefly,
        "seconds": round(time.perf_counter() - started, 1), "machine": machine_info(),
    })


if __name__ == "__main__":
    main()
