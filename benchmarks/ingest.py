"""Ingest speed: read_radiograph + resize (files/s), and epoch 2 (cache) against epoch 1.

    python benchmarks/ingest.py [--data $FEDXRAY_DATA] [--size 64] [--synthetic-patients 40]

Prints one JSON object. Epoch 1 decodes every file (DICOM chain + resize + cache write); epoch 2
loads the site through the cache and iterates a training DataLoader with augmentation while a
stand-in step (MobileNetV2 DP-ready forward/backward at the same size, no DP) does the work, and
reports the share of epoch time spent waiting for data (goal: < 5%).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from common.dicom import read_radiograph  # noqa: E402
from common.images import resize_image  # noqa: E402
from common.loaders import load_site  # noqa: E402

RG1 = ("pydicomdata_RG1_UNCR.dcm", "pydicomdata_RG1_J2KR.dcm", "pydicomdata_RG1_J2KI.dcm")


def files_per_second(paths: list[Path], size: int, repeats: int) -> dict[str, float]:
    start = time.perf_counter()
    for _ in range(repeats):
        for p in paths:
            resize_image(read_radiograph(p).pixels, size)
    secs = time.perf_counter() - start
    n = len(paths) * repeats
    return {"files": n, "seconds": round(secs, 3), "files_per_s": round(n / secs, 2)}


def epoch_times(site: Path, state: Path, size: int, batch: int) -> dict[str, float]:
    from common.models import build_model

    t0 = time.perf_counter()
    data = load_site(site, state, image_size=size, task="binary", labels=("opacity",), val_fraction=0.2)
    epoch1_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = load_site(site, state, image_size=size, task="binary", labels=("opacity",), val_fraction=0.2)
    epoch2_load = time.perf_counter() - t0
    model = build_model("mobilenet_v2", num_outputs=1, dp=True)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    loader = DataLoader(data.train_dataset(augment=True), batch_size=batch, shuffle=True)
    wait = compute = 0.0
    t_last = time.perf_counter()
    for x, y in loader:
        t_data = time.perf_counter()
        wait += t_data - t_last
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        t_last = time.perf_counter()
        compute += t_last - t_data
    total = epoch2_load + wait + compute
    return {
        "images": data.n_train + data.n_val,
        "epoch1_decode_s": round(epoch1_load, 3),
        "epoch2_cache_load_s": round(epoch2_load, 3),
        "epoch2_batches_wait_s": round(wait, 3),
        "epoch2_compute_s": round(compute, 3),
        "epoch2_data_share": round((epoch2_load + wait) / total, 4),
        "cache_speedup": round(epoch1_load / max(epoch2_load, 1e-9), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("FEDXRAY_DATA", ""), help="shared data root (for the RG1 trio)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--synthetic-patients", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out: dict[str, object] = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                                          "cpus": os.cpu_count(), "threads": args.threads}, "size": args.size}
    from simulations.hospitals import make_synthetic_hospitals

    with tempfile.TemporaryDirectory() as tmp:
        hospitals = Path(tmp) / "h"
        make_synthetic_hospitals(hospitals, 1, patients_per_site=args.synthetic_patients, seed=0)
        site = next(p for p in hospitals.iterdir() if p.is_dir())
        synth = sorted(p for p in site.rglob("*.dcm"))
        readable = []
        for p in synth:
            try:
                read_radiograph(p)
                readable.append(p)
            except ValueError:
                pass
        out["synthetic_read_resize"] = files_per_second(readable, args.size, args.repeats)
        if args.data and (Path(args.data) / "dicom").is_dir():
            rg1 = [Path(args.data) / "dicom" / f for f in RG1]
            out["rg1_trio_read_resize"] = files_per_second(rg1, args.size, 1)
            for f in rg1:
                out[f"rg1_{f.stem.split('_')[-1]}"] = files_per_second([f], args.size, 1)
        out["epochs"] = epoch_times(site, Path(tmp) / "state", args.size, 16)
    out["goal_epoch2_data_share_below_5pct"] = out["epochs"]["epoch2_data_share"] < 0.05  # type: ignore[index]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
