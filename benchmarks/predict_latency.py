"""fl-predict's speed: fp32 vs int8 ONNX vs TorchScript latency per image, the AUC change, and the whole pipeline; prints JSON.

The issue's goal for the int8 model: at least 2x faster than fp32 on CPU with an AUC change of at
most 0.005 on held-out data. Measured here the way a hospital runs it: onnxruntime on CPU, batch
1 (one image as it arrives) and batch 16 (a folder), ``--threads`` intra-op threads; fp32 and
int8 calls interleaved so load from other processes hits both alike; the median of ``--runs``
calls after a warm-up. The AUC change uses ``--holdout DIR`` (labels.csv with file,label, or
class subfolders) or, when FEDXRAY_DATA is set, up to ``--max-images`` Kermany images (these may
include the model's own training images: then the change measures quantisation fidelity, not
generalisation, which is what int8 must preserve). ``pipeline`` times one real DICOM through
the whole of fl-predict: decode, resize, score + attribution, overlay, SR and Secondary Capture.

TorchScript (``--torchscript``, default ``model.pt`` beside ``--model`` when it exists): the
twin that fl-server writes, run by torch on CPU with the same thread count (torch's intra-op
threads), in the same interleaved loop; ``vs_fp32`` is fp32 ms / TorchScript ms (above 1:
TorchScript is faster), ``throughput`` images/s at batch 16; the AUC and the largest probability
change against fp32 ONNX are reported like int8's, and ``pipeline`` also times the ``.pt`` (its
heatmap is occlusion: 64 passes).

    PYTHONPATH=. .venv/bin/python benchmarks/predict_latency.py --model runs/kermany/model.onnx \\
        --holdout runs/kermany/hospitals/holdout --threads 1 2 [--torchscript runs/kermany/model.pt]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _util import machine_info, print_json, progress

from clinic.model import Scorer
from clinic.outputs import build_outputs
from clinic.predict import iter_inputs, read_source
from clinic.quantize import quantize_model
from common.metrics import roc_auc
from common.onnx_export import load_onnx_model
from common.preprocess import load_pixels, to_model_input
from common.torchscript_export import load_torchscript_model

GOAL_SPEEDUP = 2.0
GOAL_AUC_CHANGE = 0.005


def _labelled_images(folder: Path, positive: str, limit: int, seed: int) -> list[tuple[Path, int]]:
    """(path, 0/1) from labels.csv (file|path, label) or class subfolders; ``positive`` is the model's label."""
    rows: list[tuple[Path, int]] = []
    csv_path = folder / "labels.csv"
    if csv_path.is_file():
        with csv_path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                rel = row.get("file") or row.get("path") or ""
                value = (row.get("label") or "").strip()
                if rel and value:
                    rows.append((folder / rel, int(value == "1" or value.lower() == positive.lower())))
    else:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rows.append((path, int(path.parent.name.lower() == positive.lower())))
    rng = np.random.default_rng(seed)
    if len(rows) > limit:
        rows = [rows[i] for i in sorted(rng.choice(len(rows), size=limit, replace=False))]
    return rows


def _inputs(rows: list[tuple[Path, int]], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path, label in rows:
        try:
            images.append(to_model_input(load_pixels(path), size)[0])
        except ValueError as err:
            progress(f"skipped {err}")
            continue
        labels.append(label)
    return np.stack(images).astype(np.float32), np.asarray(labels)


def _latency(models: dict[str, Any], batch: np.ndarray, runs: int) -> dict[str, float]:
    """Median ms per image of each model's predict on ``batch``, calls interleaved."""
    for model in models.values():
        model.predict(batch)  # warm-up (memory arenas, kernels)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(runs):
        for name, model in models.items():
            start = time.perf_counter()
            model.predict(batch)
            times[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(t) * 1000 / len(batch), 3) for name, t in times.items()}


def _pipeline(model: Path, dicom: Path, runs: int) -> dict[str, Any]:
    """ms for one DICOM through fl-predict: read, score with attribution, overlay + SR + SC."""
    torch.set_num_threads(1)  # as Scorer(threads=1) does for onnxruntime
    scorer = Scorer(model, heatmaps=True, threads=1)
    read, score, outputs = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        source = read_source(dicom)
        t1 = time.perf_counter()
        scored = scorer.score(source.pixels)
        t2 = time.perf_counter()
        build_outputs(source, scored, scorer)
        t3 = time.perf_counter()
        read.append(t1 - t0)
        score.append(t2 - t1)
        outputs.append(t3 - t2)
    ms = lambda values: round(statistics.median(values) * 1000, 1)  # noqa: E731
    return {"file": dicom.name, "model": model.name, "pixels": list(source.pixels.shape), "heatmap_method": scorer.heatmap_method,
            "read_ms": ms(read), "score_and_attribution_ms": ms(score), "overlay_sr_sc_ms": ms(outputs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="fp32 fedxray ONNX model")
    parser.add_argument("--int8", help="int8 model (default: quantised here with --method)")
    parser.add_argument("--torchscript", help="TorchScript twin model.pt (default: model.pt beside --model, if there)")
    parser.add_argument("--method", choices=("dynamic", "static"), default="dynamic")
    parser.add_argument("--calibration", help="folder of images for static quantisation (default: the first held-out images)")
    parser.add_argument("--holdout", help="labelled held-out folder (labels.csv or class subfolders)")
    parser.add_argument("--max-images", type=int, default=5000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    fp32 = load_onnx_model(args.model)
    label = fp32.labels[0]
    size = fp32.input_size
    ts_path = Path(args.torchscript) if args.torchscript else Path(args.model).with_name("model.pt")
    if not ts_path.is_file():
        if args.torchscript:
            parser.error(f"--torchscript {ts_path} not found")
        progress(f"no {ts_path}: TorchScript not measured")
        ts_path = None
    data_root = Path(os.environ["FEDXRAY_DATA"]) if os.environ.get("FEDXRAY_DATA") else None
    holdout = Path(args.holdout) if args.holdout else (data_root / "kermany-pneumonia" if data_root else None)
    images = labels = None
    if holdout is not None:
        progress(f"reading held-out images from {holdout} ...")
        images, labels = _inputs(_labelled_images(holdout, label, args.max_images, args.seed), size)

    with tempfile.TemporaryDirectory() as tmp:
        int8_path = Path(args.int8) if args.int8 else Path(tmp) / "model.int8.onnx"
        if not args.int8:
            calibration = []
            if args.method == "static":
                if args.calibration:
                    calibration = [to_model_input(load_pixels(p), size) for p in list(iter_inputs([args.calibration]))[:64]
                                   if isinstance(p, Path)]
                elif images is not None:
                    calibration = [images[i : i + 1] for i in range(min(64, len(images)))]
            progress(f"quantising ({args.method}) ...")
            quantize_model(args.model, int8_path, method=args.method, calibration=calibration)
        doc: dict[str, Any] = {
            "model": fp32.meta["model"], "input_size": list(size), "int8_method": args.method,
            "size_mb": {"fp32": round(Path(args.model).stat().st_size / 1e6, 2), "int8": round(int8_path.stat().st_size / 1e6, 2),
                        **({"torchscript": round(ts_path.stat().st_size / 1e6, 2)} if ts_path else {})},
            "latency_ms_per_image": {},
        }
        rng = np.random.default_rng(args.seed)
        batch = images[:16] if images is not None and len(images) >= 16 else rng.random((16, 1, *size), dtype=np.float32)
        for threads in args.threads:
            models = {"fp32": load_onnx_model(args.model, threads=threads), "int8": load_onnx_model(int8_path, threads=threads)}
            if ts_path:
                torch.set_num_threads(threads)
                models["torchscript"] = load_torchscript_model(ts_path)
            entry = {}
            for n in (1, 16):
                lat = _latency(models, batch[:n], args.runs)
                entry[f"batch{n}"] = {**lat, "speedup": round(lat["fp32"] / lat["int8"], 2)}
                if ts_path:
                    entry[f"batch{n}"]["torchscript_vs_fp32"] = round(lat["fp32"] / lat["torchscript"], 2)
            entry["throughput_images_per_s_batch16"] = {k: round(1000 / v, 1) for k, v in entry["batch16"].items() if k in models}
            doc["latency_ms_per_image"][f"threads{threads}"] = entry
            progress(f"threads {threads}: {entry}")
        if images is not None:
            p32 = load_onnx_model(args.model, threads=max(args.threads)).predict(images)[:, 0]
            p8 = load_onnx_model(int8_path, threads=max(args.threads)).predict(images)[:, 0]
            auc32, auc8 = roc_auc(labels, p32), roc_auc(labels, p8)
            doc["accuracy"] = {"holdout": str(holdout), "images": int(len(labels)), "positives": int(labels.sum()),
                               "auc_fp32": round(auc32, 4), "auc_int8": round(auc8, 4), "auc_change": round(auc8 - auc32, 4),
                               "max_abs_probability_change": round(float(np.max(np.abs(p8 - p32))), 4)}
            if ts_path:
                pts = load_torchscript_model(ts_path).predict(images)[:, 0]
                doc["accuracy"].update({"auc_torchscript": round(roc_auc(labels, pts), 4),
                                        "torchscript_max_abs_probability_change": float(f"{np.max(np.abs(pts - p32)):.3g}")})
        speedups = [e[f"batch{n}"]["speedup"] for e in doc["latency_ms_per_image"].values() for n in (1, 16)]
        doc["goal"] = {"speedup_at_least": GOAL_SPEEDUP, "best_speedup": max(speedups), "speedup_met": max(speedups) >= GOAL_SPEEDUP,
                       "auc_change_at_most": GOAL_AUC_CHANGE,
                       "auc_met": None if images is None else abs(doc["accuracy"]["auc_change"]) <= GOAL_AUC_CHANGE}
    if data_root is not None and (data_root / "dicom").is_dir():
        doc["pipeline"] = [_pipeline(model, data_root / "dicom" / name, max(3, args.runs // 10))
                           for model in (Path(args.model), *([ts_path] if ts_path else []))
                           for name in ("pydicomdata_RG1_J2KR.dcm", "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
                           if (data_root / "dicom" / name).is_file()]
    doc["machine"] = machine_info()
    print_json(doc)


if __name__ == "__main__":
    sys.exit(main())
