"""Inference latency of the exported ONNX model (onnxruntime) against torch eager; prints JSON.

What a hospital runs is the ONNX file, one image at a time, on a CPU. This measures exactly that:
batch 1, ``--threads`` threads for both engines, each model in the form federation trains
(``build_model(name, num_outputs=1, dp=True)``: GroupNorm, out-of-place ReLU), exported with
``common.onnx_export.export_onnx`` (so the sigmoid is in both measurements). Torch and onnxruntime
calls are interleaved, so load from other processes on a shared machine hits both alike; the
median of ``--runs`` calls after ``--warmup`` is reported. Goal: onnxruntime >= 3x faster.

    PYTHONPATH=. .venv/bin/python benchmarks/onnx_latency.py --sizes 64 224 --runs 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from common.models import MODEL_NAMES, build_model
from common.onnx_export import export_onnx, load_onnx_model

GOAL_SPEEDUP = 3.0


def _machine(threads: int) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "loadavg_1min_start": round(os.getloadavg()[0], 2),
    }


def _bench_one(name: str, size: int, *, runs: int, warmup: int, threads: int, workdir: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(name, num_outputs=1, dp=True).eval()
    t0 = time.perf_counter()
    report = export_onnx(
        model,
        workdir / f"{name}_{size}.onnx",
        task="binary",
        labels=["finding"],
        input_size=(size, size),
        threshold=0.5,
        metadata={"model": name, "rounds": "0", "sites": "[]", "epsilon": "{}"},
    )
    export_s = time.perf_counter() - t0
    clf = load_onnx_model(report.path, threads=threads)
    image = torch.rand((1, 1, size, size), generator=torch.Generator().manual_seed(1))
    image_np = image.numpy()

    def run_torch() -> None:
        with torch.inference_mode():
            torch.sigmoid(model(image))

    def run_ort() -> None:
        clf.predict(image_np)

    for _ in range(warmup):
        run_torch()
        run_ort()
    times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
    for _ in range(runs):  # interleaved: both engines see the same background load
        for engine, fn in (("torch", run_torch), ("onnxruntime", run_ort)):
            t = time.perf_counter()
            fn()
            times[engine].append((time.perf_counter() - t) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    speedup = med["torch"] / med["onnxruntime"]
    return {
        "model": name,
        "image_size": size,
        "batch": 1,
        "n_params": report.n_params,
        "onnx_mb": round(report.size_bytes / 1e6, 2),
        "export_s": round(export_s, 2),
        "max_abs_diff": report.max_abs_diff,
        "torch_ms_median": round(med["torch"], 2),
        "onnxruntime_ms_median": round(med["onnxruntime"], 2),
        "torch_ms_p90": round(float(np.percentile(times["torch"], 90)), 2),
        "onnxruntime_ms_p90": round(float(np.percentile(times["onnxruntime"], 90)), 2),
        "speedup": round(speedup, 2),
        "goal_met": speedup >= GOAL_SPEEDUP,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 224])
    parser.add_argument("--runs", type=int, default=30, help="timed calls per engine")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per engine first")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads, both engines")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {
        "benchmark": "onnx_latency",
        "goal": f"onnxruntime >= {GOAL_SPEEDUP:g}x faster than torch eager, batch 1",
        "runs": args.runs,
        "warmup": args.warmup,
        "machine": _machine(args.threads),
        "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="onnx_latency_") as tmp:
        for name in args.models:
            for size in args.sizes:
                result = _bench_one(name, size, runs=args.runs, warmup=args.warmup, threads=args.threads, workdir=Path(tmp))
                out["results"].append(result)
                print(
                    f"{name} {size}px: torch {result['torch_ms_median']} ms, onnxruntime "
                    f"{result['onnxruntime_ms_median']} ms, x{result['speedup']}",
                    file=sys.stderr,
                )
    out["machine"]["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    out["goal_met_all"] = all(r["goal_met"] for r in out["results"])
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
