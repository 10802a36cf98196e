"""Start-up time of the command-line tools: how long `--help` and a bad input take to answer.

    python benchmarks/startup.py [--repeat 5]

Runs each command ``--repeat`` times in a fresh process (the console scripts next to this
Python) and prints one JSON object: per command the best and median wall seconds, its exit
status and which heavy libraries (torch, flwr, opacus, onnxruntime, pydicom) its CLI module
imports on its own. The goal (issue 15): every command here answers in under 1 s; the heavy
libraries load only on the code paths that need them.

Also timed (``clientapp_import``): importing ``client.app`` in a fresh process, which a deployed
site pays on every Flower message (Flower 1.41 starts a ClientApp process per message); it needs
torch, flwr and opacus, so it is not under 1 s, but it should not load more (torchvision: CNNs only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
HEAVY = ("torch", "flwr", "opacus", "onnxruntime", "pydicom")
COMMANDS = [
    ["fl-client", "--help"],
    ["fl-sim", "--help"],
    ["fl-server", "--help"],
    ["fl-predict", "--help"],
    ["fl-client", "check", "--data", "/nonexistent"],
    ["fl-client", "status", "--state-dir", "/nonexistent"],
    ["fl-sim", "run", "--data", "/nonexistent"],
    ["fl-predict", "--model", "/nonexistent.onnx", "x.dcm"],
]
CLI_MODULES = {"fl-client": "client.cli", "fl-sim": "simulations.cli", "fl-server": "server.cli", "fl-predict": "clinic.cli"}


def heavy_imports(module: str) -> list[str]:
    """The heavy libraries that importing ``module`` alone pulls in (in a fresh interpreter)."""
    code = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return out.stdout.split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_WAIT_POLICY": "PASSIVE"}
    results = []
    for cmd in COMMANDS:
        times, rc = [], 0
        for _ in range(args.repeat):
            start = time.perf_counter()
            rc = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], capture_output=True, env=env).returncode
            times.append(time.perf_counter() - start)
        results.append({"command": " ".join(cmd), "exit": rc, "best_s": round(min(times), 3),
                        "median_s": round(statistics.median(times), 3)})
    root = Path(__file__).resolve().parents[1]
    probe = "import sys, time; t = time.perf_counter(); import client.app; print(time.perf_counter() - t, 'torchvision' in sys.modules)"
    app_times, loads_torchvision = [], None
    for _ in range(args.repeat):
        seconds, tv = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                                     cwd=root, env=env).stdout.split()
        app_times.append(float(seconds))
        loads_torchvision = tv == "True"
    doc = {
        "repeat": args.repeat, "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "commands": results,
        "cli_module_heavy_imports": {m: heavy_imports(m) for m in CLI_MODULES.values()},
        "all_under_1s": all(r["median_s"] < 1.0 for r in results),
        "clientapp_import": {"best_s": round(min(app_times), 3), "median_s": round(statistics.median(app_times), 3),
                             "loads_torchvision": loads_torchvision},
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
