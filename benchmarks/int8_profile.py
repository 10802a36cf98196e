"""Why int8 does or does not pay off: fp32 vs int8 latency and onnxruntime's time per op type; prints JSON.

Issue 12 asks for an int8 model at least 2x faster than fp32 on CPU. benchmarks/predict_latency.py
measures the speed and AUC of a trained model; this script explains the figure. It profiles each
model with onnxruntime's profiler (batch 1, ``--threads`` intra-op threads, median of ``--runs``
interleaved calls) and reports the share of fp32 time spent in ops the quantiser turns into
integer kernels (Conv, MatMul, Gemm). Amdahl's law then bounds what int8 can give:
``1 / (1 - share)`` even if those ops cost nothing, so a graph that spends half its time in
normalisation, reductions and element-wise ops cannot reach 2x.

Models: ``--model PATH`` (a fedxray model.onnx, quantised with ``fl-predict quantize``'s default
method for it) and, with ``--cnn NAME@PX`` (repeatable), an untrained torchvision model built
as fedxray exports it (DP form: GroupNorm) and, with ``--plain``, also in the plain BatchNorm
form fedxray does not export (to show what the normalisation costs). Static int8 uses the shared
DICOMs as calibration images.

    PYTHONPATH=. .venv/bin/python benchmarks/int8_profile.py --model runs/study-v2-ts/run/model.onnx \\
        --cnn densenet121@224 --cnn mobilenet_v2@224 --plain --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from _util import machine_info, print_json, progress

from clinic.quantize import quantize_model
from common.onnx_export import INPUT_NAME, export_onnx, load_onnx_model, reference_batch

#: ops whose fp32 kernels the quantiser replaces by integer ones (directly or as QDQ pairs it fuses)
QUANTISABLE = ("Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm")


def _session(path: Path, threads: int, profile: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = profile
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _op_shares(path: Path, x: np.ndarray, threads: int, runs: int) -> dict[str, float]:
    """Share of kernel time per op type, from onnxruntime's profiler over ``runs`` calls."""
    session = _session(path, threads, profile=True)
    for _ in range(runs):
        session.run(None, {INPUT_NAME: x})
    trace = Path(session.end_profiling())
    totals: Counter[str] = Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    trace.unlink(missing_ok=True)
    whole = sum(totals.values()) or 1
    return {op: round(us / whole, 4) for op, us in totals.most_common()}


def _latency(fp32: Path, int8: Path, x: np.ndarray, threads: int, runs: int) -> tuple[float, float]:
    """Median ms of fp32 and int8 at batch 1, calls interleaved so machine load hits both alike."""
    a, b = _session(fp32, threads), _session(int8, threads)
    for _ in range(3):
        a.run(None, {INPUT_NAME: x})
        b.run(None, {INPUT_NAME: x})
    ta, tb = [], []
    for _ in range(runs):
        start = time.perf_counter()
        a.run(None, {INPUT_NAME: x})
        ta.append(time.perf_counter() - start)
        start = time.perf_counter()
        b.run(None, {INPUT_NAME: x})
        tb.append(time.perf_counter() - start)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


def profile_pair(name: str, fp32: Path, int8: Path, x: np.ndarray, threads: int, runs: int) -> dict[str, Any]:
    progress(f"profiling {name}")
    ms32, ms8 = _latency(fp32, int8, x, threads, runs)
    shares = _op_shares(fp32, x, threads, runs)
    quantisable = sum(v for op, v in shares.items() if op in QUANTISABLE)
    return {
        "model": name,
        "fp32_ms": round(ms32, 3),
        "int8_ms": round(ms8, 3),
        "speedup": round(ms32 / ms8, 3),
        "fp32_quantisable_share": round(quantisable, 4),
        "amdahl_bound": round(1.0 / max(1e-6, 1.0 - quantisable), 2),
        "fp32_top_ops": dict(list(shares.items())[:8]),
        "int8_top_ops": dict(list(_op_shares(int8, x, threads, runs).items())[:8]),
    }


def _cnn(name: str, px: int, dp: bool, folder: Path, dicoms: Path) -> tuple[Path, Path, np.ndarray]:
    import torch

    from common.models import build_model

    torch.manual_seed(0)
    model = build_model(name, num_outputs=1, dp=dp).eval()
    batch = reference_batch(dicoms, (px, px))
    fp32, int8 = folder / "model.onnx", folder / "model.int8.onnx"
    export_onnx(model, fp32, task="binary", labels=["PNEUMONIA"], input_size=(px, px), threshold=0.5, sample_batch=batch,
                metadata={"model": name, "rounds": "0", "sites": "[]", "epsilon": "{}"})
    calibration = [batch[i:i + 1].numpy() for i in range(len(batch))]
    quantize_model(fp32, int8, method="static", calibration=calibration)
    return fp32, int8, batch[:1].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a fedxray model.onnx (ScatterNet: dynamic int8)")
    parser.add_argument("--cnn", action="append", default=[], metavar="NAME@PX", help="e.g. densenet121@224")
    parser.add_argument("--plain", action="store_true", help="also the plain BatchNorm form of each --cnn")
    parser.add_argument("--dicoms", type=Path, default=Path(os.environ.get("FEDXRAY_DATA", "../shared/data")) / "dicom")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="int8-profile-") as tmp:
        if args.model:
            meta = load_onnx_model(args.model)
            size = tuple(meta.input_size)
            int8 = Path(tmp) / "model.int8.onnx"
            quantize_model(args.model, int8, method="dynamic")
            x = reference_batch(args.dicoms, size)[:1].numpy()
            results.append(profile_pair(f"{args.model} (dynamic int8)", args.model, int8, x, args.threads, args.runs))
        for spec in args.cnn:
            name, _, px = spec.partition("@")
            for dp in (True, False) if args.plain else (True,):
                form = "DP form (GroupNorm)" if dp else "plain (BatchNorm)"
                folder = Path(tmp) / f"{name}-{px}-{'dp' if dp else 'plain'}"
                folder.mkdir()
                progress(f"exporting and quantising {name} {px} px, {form}")
                fp32, int8, x = _cnn(name, int(px), dp, folder, args.dicoms)
                results.append(profile_pair(f"{name} {px} px, {form}, static int8", fp32, int8, x, args.threads, args.runs))
    print_json({"machine": machine_info(), "threads": args.threads, "runs": args.runs, "goal_speedup": 2.0,
                "quantisable_ops": list(QUANTISABLE), "results": results})


if __name__ == "__main__":
    main()
