"""Small helpers shared by the benchmark scripts: timing, summaries, machine facts, JSON out.

Benchmarks print one JSON document on stdout (progress goes to stderr), so their output can be
piped into files and compared between runs. Every document should carry :func:`machine_info`,
because figures mean little without the machine, the library versions and the load they were
measured under.

Import it from a script in this folder as ``from _util import ...`` (the script's folder is on
``sys.path``): ``benchmarks._util`` does not resolve, because opacus installs a top-level
package named ``benchmarks`` into site-packages.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from typing import Any

import torch


def set_threads(threads: int) -> None:
    """Fix torch's intra-op threads (benchmarks only; library code never sets this)."""
    torch.set_num_threads(max(1, threads))


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of ``fn``, GPU work included.

    CPU time is what the call itself burnt on all its threads; on a machine shared with other
    work it is much steadier than wall time, which also counts the time others held the cores.
    """
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """``with stopwatch() as t: ...`` then ``t["seconds"]`` (wall clock)."""
    result = {"seconds": float("nan")}
    start = time.perf_counter()
    try:
        yield result
    finally:
        result["seconds"] = time.perf_counter() - start


def throughput(seconds: Sequence[float], items_per_call: int) -> dict[str, float]:
    """Items/s from per-call times: median (typical) and best (least disturbed by other load).

    On a shared machine the best call is the closest to the code's own speed; the median says
    what a user would see under the same load.
    """
    if not seconds:
        return {"median_per_s": float("nan"), "best_per_s": float("nan"), "calls": 0}
    median = statistics.median(seconds)
    return {
        "median_per_s": round(items_per_call / median, 2),
        "best_per_s": round(items_per_call / min(seconds), 2),
        "calls": len(seconds),
    }


def per_cpu_second(cpu_seconds: Sequence[float], items_per_call: int) -> float:
    """Items per CPU-second (median call): the load-independent speed measure.

    Multiply by the thread count for the wall-clock speed an idle machine would give (an upper
    bound: threads rarely scale perfectly).
    """
    if not cpu_seconds:
        return float("nan")
    return round(items_per_call / statistics.median(cpu_seconds), 2)


def package_versions(*names: str) -> dict[str, str | None]:
    """Installed versions of distributions (None when absent)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where the figures were taken: CPU, threads, load, GPU, Python and package versions."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "device": str(device),
        "env": {
            k: os.environ.get(k)
            for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")
        },
        "packages": package_versions("torch", "torchvision", "opacus", "onnxruntime"),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def progress(message: str) -> None:
    """One progress line on stderr (stdout is reserved for the JSON result)."""
    print(message, file=sys.stderr, flush=True)


def print_json(document: Any) -> None:
    """The benchmark's result on stdout, indented, non-JSON values as strings."""
    json.dump(document, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()
