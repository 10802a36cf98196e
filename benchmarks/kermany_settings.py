"""Which optimiser settings let the DP-ready MobileNetV2 (GroupNorm, from scratch) learn Kermany?

    python benchmarks/kermany_settings.py --data $FEDXRAY_DATA/kermany-pneumonia [--size 64] \\
        [--configs '{"name": "adam", "epochs": 3}' ...]  [--threads 2]

A quick subset of the Kermany set (patient-level: 300 patients for validation, the next 1,000
patients for training; about 1,850 training and 560 validation images at 64 px) read from the JPEGs
with the project's resize, and one short training run per configuration with the project's model and
DP-SGD step (common.models, common.dp). Prints one JSON line per configuration with the training
loss and validation AUC after each epoch, plus the per-sample gradient norm of the freshly built
model (total and classifier part) and the norm of its pooled features, which explain why a
clipped SGD step with a large learning rate throws the logits around.

Configuration keys: name, dp_model (True: GroupNorm form; False: BatchNorm), opt (adam | sgd, momentum
0.9), lr, bs, epochs, dp (DP-SGD via Opacus), sigma (noise multiplier; 0 = clipping only), clip.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from common.dp import dp_step, make_private  # noqa: E402
from common.images import read_image, resize_image, to_uint8  # noqa: E402
from common.metrics import roc_auc  # noqa: E402
from common.models import build_model  # noqa: E402

DEFAULT_CONFIGS = [
    {"name": "groupnorm adam 1e-3 b32", "epochs": 3},
    {"name": "batchnorm adam 1e-3 b32", "dp_model": False, "epochs": 3},
    {"name": "groupnorm sgd 0.05 b32", "opt": "sgd", "lr": 0.05, "epochs": 3},
    {"name": "dp adam 1e-3 b64 sigma 1", "dp": True, "bs": 64, "epochs": 3},
    {"name": "dp sgd 0.05 b64 sigma 0 (clip only)", "dp": True, "opt": "sgd", "lr": 0.05, "bs": 64, "epochs": 1, "sigma": 0.0},
]


def load_subset(root: Path, size: int, seed: int, n_val: int = 300, n_train: int = 1000):
    rows = list(csv.DictReader(open(root / "labels.csv", newline="")))
    patients = sorted({r["patient_id_coarse"] for r in rows})
    order = np.random.default_rng(seed).permutation(len(patients))
    val_p = {patients[i] for i in order[:n_val]}
    train_p = {patients[i] for i in order[n_val : n_val + n_train]}
    out = {}
    for part, chosen in (("train", train_p), ("val", val_p)):
        sel = [r for r in rows if r["patient_id_coarse"] in chosen]
        x = np.stack([to_uint8(resize_image(read_image(root / r["path"]), size)) for r in sel])
        y = np.array([float(r["label"]) for r in sel], dtype=np.float32)
        out[part] = (torch.from_numpy(x).float().div(255)[:, None], torch.from_numpy(y)[:, None])
    return out


def gradient_norms(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", num_outputs=1, dp=True).train()
    total, head = [], []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(x[i : i + 1]), y[i : i + 1]).backward()
        sq = {n: float(p.grad.norm()) ** 2 for n, p in model.named_parameters()}
        total.append(sum(sq.values()) ** 0.5)
        head.append(sum(v for n, v in sq.items() if n.startswith("classifier")) ** 0.5)
    model.eval()
    with torch.no_grad():
        feats = nn.functional.adaptive_avg_pool2d(model.features((x - model.mean) / model.std), 1).flatten(1)
    return {"per_sample_grad_norm_median": round(float(np.median(total)), 2),
            "classifier_grad_norm_median": round(float(np.median(head)), 2),
            "pooled_feature_norm_mean": round(float(feats.norm(dim=1).mean()), 2), "features": int(feats.shape[1])}


def run(data, size: int, name: str, dp_model: bool = True, opt: str = "adam", lr: float = 1e-3, bs: int = 32, epochs: int = 3,
        dp: bool = False, sigma: float = 1.0, clip: float = 1.0) -> dict:
    (xt, yt), (xv, yv) = data["train"], data["val"]
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", num_outputs=1, dp=dp_model)
    optimizer = (torch.optim.Adam(model.parameters(), lr=lr) if opt == "adam"
                 else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    crit = nn.BCEWithLogitsLoss()
    loader = DataLoader(TensorDataset(xt, yt), batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(0))
    pt = make_private(model, optimizer, loader, noise_multiplier=sigma, max_grad_norm=clip, mode="hooks", criterion=crit) if dp else None
    per_epoch, start = [], time.perf_counter()
    for _ in range(epochs):
        model.train()
        losses = []
        for x, y in (pt.data_loader if pt else loader):
            if len(x) == 0:
                continue
            if pt:
                losses.append(dp_step(pt, x, y))
            else:
                optimizer.zero_grad()
                loss = crit(model(x), y)
                loss.backward()
                optimizer.step()
                losses.append(float(loss))
        net = pt.model._module if pt else model
        net.eval()
        with torch.no_grad():
            scores = torch.cat([torch.sigmoid(net(xv[i : i + 256])) for i in range(0, len(xv), 256)])[:, 0].numpy()
        per_epoch.append({"train_loss": round(float(np.nanmean(losses)), 4), "val_auc": round(roc_auc(yv[:, 0].numpy(), scores), 4)})
    seconds = time.perf_counter() - start
    return {"name": name, "per_epoch": per_epoch, "seconds": round(seconds, 1),
            "images_per_second": round(epochs * len(xt) / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the kermany-pneumonia folder (labels.csv with patient_id_coarse)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", nargs="*", help="JSON objects (see the module docstring); default: the five of docs/results.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_subset(Path(args.data), args.size, args.seed)
    print(json.dumps({"size": args.size, "train_images": len(data["train"][1]), "val_images": len(data["val"][1]),
                      "train_positive_share": round(float(data["train"][1].mean()), 3),
                      **gradient_norms(data["train"][0][:16], data["train"][1][:16])}), flush=True)
    for spec in [json.loads(c) for c in args.configs] if args.configs else DEFAULT_CONFIGS:
        print(json.dumps(run(data, args.size, **spec)), flush=True)


if __name__ == "__main__":
    main()
