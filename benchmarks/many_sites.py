"""Many simulated hospitals: wall time, time to make them, per-round times and peak memory of `fl-sim`.

    python benchmarks/many_sites.py [--sites 100] [--rounds 3] [--image-size 32] [--ray-address ADDR] [-- fl-sim args]

Runs `fl-sim run` (synthetic hospitals, DP on, the default model) as a subprocess and prints one
JSON object: wall time, seconds spent making the hospitals, the time of each round as it is
announced on fl-sim's output (and the ServerApp's own round time from metrics.json), the pooled
AUC (the coordinator's, from noised histograms, and the exact one a simulation can measure) and
the peak memory of the whole process tree (fl-sim, the SuperLink, `flwr run`, the simulation
process, Ray's GCS, raylet and worker actors). Memory is sampled from /proc every 0.5 s over every
process that carries this run's marker in its environment (all of them inherit it, also the
ones Ray starts in their own session): ``peak_rss_mb`` sums resident sets (shared library pages
counted once per process: an upper bound), ``peak_pss_mb`` sums proportional set sizes (shared
pages split between the processes that share them: what the tree really holds), sampled every 3 s.
``cpu_s`` is the CPU time the tree used (user + system, as last sampled per process): on a shared
machine a steadier measure of the work than wall time.
With ``--ray-address`` the cluster's processes are not fl-sim's and are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MARK = "FEDXRAY_BENCH_TREE"
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")


def _tree(token: str) -> list[int]:
    """Pids of every live process whose environment carries ``MARK=token``."""
    want = f"{MARK}={token}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if want in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _rss(pid: int) -> int:
    try:
        return int((Path("/proc") / str(pid) / "statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _cpu(pid: int) -> tuple[int, float]:
    """(start time in ticks, CPU seconds used so far) of a process; (0, 0.0) when it is gone."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19]), (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0, 0.0


def _name(pid: int) -> str:
    """A short name for a process: Ray's title (ray::...), else the program and its first argument."""
    try:
        argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return str(pid)
    if argv[0].startswith("ray::"):
        return argv[0].split()[0]
    words = [Path(a).name for a in argv[:3] if a and not a.startswith("-")]
    return " ".join(w for w in words if w != "python")[:60]


def _pss(pid: int) -> int:
    try:
        for line in (Path("/proc") / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


class TreeMemory(threading.Thread):
    """Samples the marked process tree's memory until stopped; keeps the peaks."""

    def __init__(self, token: str) -> None:
        super().__init__(daemon=True)
        self.token, self.peak_rss, self.peak_pss, self.peak_procs = token, 0, 0, 0
        self.cpu: dict[tuple[int, int], float] = {}  # (pid, start) -> CPU seconds last seen
        self.at_peak: list[tuple[str, int]] = []  # (process, RSS MB) when the RSS sum peaked
        self._stop_event = threading.Event()

    def run(self) -> None:
        tick = 0
        while not self._stop_event.wait(0.5):
            pids = _tree(self.token)
            self.peak_procs = max(self.peak_procs, len(pids))
            sizes = {p: _rss(p) for p in pids}
            if sum(sizes.values()) > self.peak_rss:
                self.peak_rss = sum(sizes.values())
                self.at_peak = sorted(((_name(p), round(b / 2**20)) for p, b in sizes.items()), key=lambda x: -x[1])
            for pid in pids:
                started, seconds = _cpu(pid)
                if started:
                    self.cpu[(pid, started)] = seconds
            if tick % 6 == 0:
                self.peak_pss = max(self.peak_pss, sum(_pss(p) for p in pids))
            tick += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


_ROUND = re.compile(r"round (\d+)/(\d+): pooled AUC ([0-9.]+|nan|-)")
_EXACT = re.compile(r"last round \((\d+)\) ([0-9.]+)")


def run_fl_sim(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    token = secrets.token_hex(8)
    env = {**os.environ, MARK: token, "OMP_WAIT_POLICY": "PASSIVE", "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "simulations.cli", "run", "--sites", str(args.sites), "--rounds", str(args.rounds),
           "--image-size", str(args.image_size), "--out", str(out), "--name", "bench", *args.fl_sim_args]
    if args.ray_address:
        cmd += ["--ray-address", args.ray_address]
    memory = TreeMemory(token)
    memory.start()
    started = time.monotonic()
    marks: dict[str, float] = {}
    rounds: list[dict[str, Any]] = []
    tail: list[str] = []
    exact = None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.monotonic() - started
        tail = (tail + [line.rstrip()])[-30:]
        print(f"[{now:7.1f} s] {line.rstrip()}", file=sys.stderr, flush=True)
        if line.startswith("making ") and "hospitals_start" not in marks:
            marks["hospitals_start"] = now
        elif line.startswith("federated run:"):
            marks["hospitals_done"] = now
        elif (m := _ROUND.search(line)) and all(r["round"] != int(m.group(1)) for r in rounds):
            previous = rounds[-1]["at_s"] if rounds else marks.get("hospitals_done", 0.0)
            auc = m.group(3)
            rounds.append({"round": int(m.group(1)), "at_s": round(now, 1), "seconds": round(now - previous, 1),
                           "pooled_auc": None if auc in ("nan", "-") else float(auc)})
        elif (m := _EXACT.search(line)):
            exact = float(m.group(2))
    proc.wait()
    wall = time.monotonic() - started
    memory.stop()
    doc: dict[str, Any] = {
        "command": " ".join(cmd[2:]), "returncode": proc.returncode, "wall_s": round(wall, 1),
        "make_hospitals_s": round(marks["hospitals_done"] - marks.get("hospitals_start", 0.0), 1)
        if "hospitals_done" in marks else None,
        "rounds": rounds, "peak_rss_mb": round(memory.peak_rss / 2**20), "peak_pss_mb": round(memory.peak_pss / 2**20),
        "peak_processes": memory.peak_procs, "rss_mb_at_peak": memory.at_peak,
        "cpu_s": round(sum(memory.cpu.values()), 1), "exact_pooled_auc": exact,
    }
    metrics = out / "bench" / "run" / "metrics.json"
    if metrics.is_file():
        recorded = json.loads(metrics.read_text())["rounds"]
        doc["server_round_s"] = [round(float(r.get("seconds", float("nan"))), 1) for r in recorded]
        doc["pooled_auc"] = recorded[-1].get("pooled_auc") if recorded else None
    if proc.returncode != 0:
        doc["output_tail"] = tail
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--ray-address", help="run on this existing Ray cluster (fl-sim --ray-address)")
    ap.add_argument("--keep", metavar="DIR", help="write the simulation folder here and keep it (default: a temp dir)")
    ap.add_argument("fl_sim_args", nargs="*", help="more fl-sim run arguments (after --)")
    args = ap.parse_args()
    doc: dict[str, Any] = {"sites": args.sites, "rounds_asked": args.rounds, "image_size": args.image_size,
                           "cpus": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        doc.update(run_fl_sim(args, Path(args.keep).resolve()))
    else:
        with tempfile.TemporaryDirectory(prefix="many-sites-") as tmp:
            doc.update(run_fl_sim(args, Path(tmp)))
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
