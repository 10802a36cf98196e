"""Is the synthetic task learnable? A small CNN on three default synthetic hospitals, no DP.

    python benchmarks/learnability.py [--seed 0] [--epochs 12] [--size 64]

Builds the default synthetic hospitals, reads them through the same path a site uses
(common.loaders.load_site: DICOM chain, cache, patient-level split per site), pools the sites'
training and validation splits and trains a 4-layer CNN (BatchNorm, Adam 2e-3, batch 32).
Prints one JSON object with the validation AUC after each epoch: the reference for what the
federated MobileNetV2 runs should reach on the same data.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from common.loaders import load_site  # noqa: E402
from common.metrics import roc_auc  # noqa: E402
from simulations.hospitals import make_synthetic_hospitals  # noqa: E402


def small_cnn() -> nn.Module:
    layers: list[nn.Module] = []
    channels = [1, 16, 32, 64, 64]
    for i in range(4):
        layers += [nn.Conv2d(channels[i], channels[i + 1], 3, padding=1), nn.BatchNorm2d(channels[i + 1]), nn.ReLU()]
        layers.append(nn.MaxPool2d(2) if i < 3 else nn.AdaptiveAvgPool2d(1))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--patients", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_synthetic_hospitals(root / "h", 3, patients_per_site=args.patients, seed=args.seed)
        xs = {"train": [], "val": []}
        ys = {"train": [], "val": []}
        for site in sorted(p for p in (root / "h").iterdir() if p.is_dir()):
            data = load_site(site, root / "state" / site.name, image_size=args.size, task="binary",
                             labels=("opacity",), val_fraction=0.3)
            for part, idx in (("train", data.split.train), ("val", data.split.val)):
                xs[part].append(data.images[idx])
                ys[part].append(data.targets.y[idx, 0])
    x_tr = torch.from_numpy(np.concatenate(xs["train"])).float().div(255)[:, None]
    y_tr = torch.from_numpy(np.concatenate(ys["train"]))
    x_va = torch.from_numpy(np.concatenate(xs["val"])).float().div(255)[:, None]
    y_va = np.concatenate(ys["val"])
    net = small_cnn()
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    aucs = []
    for _ in range(args.epochs):
        net.train()
        perm = torch.randperm(len(y_tr))
        for i in range(0, len(perm), 32):
            b = perm[i : i + 32]
            loss = nn.functional.binary_cross_entropy_with_logits(net(x_tr[b])[:, 0], y_tr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            aucs.append(round(roc_auc(y_va, net(x_va)[:, 0].numpy()), 3))
    print(json.dumps({"seed": args.seed, "size": args.size, "train_images": len(y_tr), "val_images": len(y_va),
                      "val_auc_per_epoch": aucs, "best_val_auc": max(aucs),
                      "seconds": round(time.perf_counter() - t0, 1)}, indent=2))


if __name__ == "__main__":
    main()
