"""``fl-sim run`` and ``fl-sim resume``: simulated hospitals -> sites.json -> a Flower simulation -> a run folder.

``cmd_run`` checks every setting before minutes are spent making hospitals, makes them (or takes
the given folders), writes one sites.json entry per hospital, runs the fedxray app through Flower's
Simulation Engine (simulations/federation.py) and prints what a simulation can measure beyond a
deployment: the exact pooled validation AUC and the score on held-out patients.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.cli import parse_settings
from common.config import RunConfig, recommended_settings
from common.config_fields import ConfigError
from common.supervisor import StopSignal
from simulations.hospital_layout import hospital_folders_problem
from simulations.hospitals import MANIFEST_FILE, SimulationError, make_hospitals_from_images, make_synthetic_hospitals
from simulations.run_folder import point_latest, tidy_after_run
from simulations.run_guard import RunLock, SimulationBusyError, describe, finished, last_checkpoint, run_processes
from simulations.run_report import report

# The phantom's opacity is faint against the anatomy's variation; a linear head on its scattering
# features needs about 500 DP steps to find it (docs/models.md, "the synthetic demo"), more than the
# 150 full-batch steps that suit real pneumonia. fl-sim uses this many local epochs at this sample
# rate (480 steps) for hospitals it synthesises itself.
SYNTHETIC_LOCAL_EPOCHS = 12
SYNTHETIC_SAMPLE_RATE = 0.2
# Synthetic hospitals made by `fl-sim run`: 500 patients each by default, but at most this many in
# all (at least SYNTHETIC_PATIENTS_MIN each), so 100 or 1,000 hospitals stay a run of minutes on a
# laptop rather than 100,000 DICOM files to write, decode and train on; --patients overrides it.
SYNTHETIC_PATIENTS = 500
SYNTHETIC_PATIENTS_TOTAL = 5000
SYNTHETIC_PATIENTS_MIN = 12
# Synthetic phantoms are stored at most this many times the run's image size: drawing, encoding and
# decoding a 352 px matrix for a 32 px model costs about 4 times the CPU and adds nothing the model sees.
# Runs at 64 px or more keep the archetypes' native 256-400 px matrices (and the demo its figures).
SYNTHETIC_MATRIX_FACTOR = 4
NATIVE_MATRIX_MIN = 256


def synthetic_matrix_cap(image_size: int) -> int | None:
    """Largest stored matrix side for synthetic hospitals of a run at ``image_size`` px (None: native)."""
    cap = SYNTHETIC_MATRIX_FACTOR * image_size
    return max(64, cap) if cap < NATIVE_MATRIX_MIN else None


def synthetic_patients(n_sites: int, patients: int | None) -> int:
    """Mean patients per synthetic hospital: the user's, else 500 capped by the federation-wide total."""
    if patients is not None:
        return patients
    return max(SYNTHETIC_PATIENTS_MIN, min(SYNTHETIC_PATIENTS, SYNTHETIC_PATIENTS_TOTAL // max(1, n_sites)))


def _image_files(folder: Path) -> int:
    """The image files a simulated hospital holds (its declared size; at least 1)."""
    return max(1, sum(1 for p in folder.rglob("*") if p.is_file() and p.suffix.lower() not in (".csv", ".json", ".txt")))


def cmd_run(args: argparse.Namespace) -> int:
    """Simulated hospitals (made or given) -> sites.json -> Flower simulation -> run directory."""
    out = Path(args.out).resolve()
    name = args.name or time.strftime("sim-%Y%m%d-%H%M%S")
    sim_root = out / name
    if sim_root.exists():
        print(f"fl-sim: {sim_root} already exists; pass another --name (or `fl-sim resume {sim_root}`)",
              file=sys.stderr)
        return 2
    data = Path(args.data).resolve() if args.data else None
    if data is not None and not data.is_dir():
        print(f"fl-sim: --data {args.data} is not a folder; give hospital folders or an image set with labels.csv",
              file=sys.stderr)
        return 2
    image_set = data is not None and (data / "labels.csv").is_file() and not any(data.glob("*/labels.csv"))
    problem = hospital_folders_problem(data) if data is not None and not image_set else None
    if problem:
        print(f"fl-sim: {problem}", file=sys.stderr)
        return 2
    partition = args.partition or ("label-and-quantity" if image_set else "quantity-skew")
    try:
        sets = parse_settings(args.set)
    except ValueError as err:
        print(f"fl-sim: {err}", file=sys.stderr)
        return 2
    local_epochs = args.local_epochs
    synthetic: dict[str, Any] = {}
    if data is None and local_epochs == 0 and "local-epochs" not in sets:
        local_epochs = SYNTHETIC_LOCAL_EPOCHS
        if sets.get("model", args.model) == "scatternet" and not args.no_dp:
            synthetic["sample-rate"] = SYNTHETIC_SAMPLE_RATE
    raw = {
        **recommended_settings(str(sets.get("model", args.model)), dp=not args.no_dp), **synthetic,
        "num-server-rounds": args.rounds, "model": args.model, "image-size": args.image_size, "dp": not args.no_dp,
        "target-epsilon": args.target_epsilon, "strategy": args.strategy, "seed": args.seed,
        "local-epochs": local_epochs, "min-sites": max(1, args.sites), "run-name": "run",
        "runs-dir": str(sim_root), "sim-root": str(sim_root), **sets,
    }
    if args.init:
        init = Path(args.init).expanduser().resolve()
        if not init.is_file():
            print(f"fl-sim: --init {args.init} is not a file: give a local weights file (nothing is downloaded)",
                  file=sys.stderr)
            return 2
        raw["init-weights"] = str(init)
    try:  # every setting checked before minutes are spent making hospitals
        RunConfig.from_mapping(raw)
    except ConfigError as err:
        print(f"fl-sim: {err}", file=sys.stderr)
        return 2
    return _guarded(sim_root, "fl-sim", int(raw["num-server-rounds"]),
                    lambda: _make_and_run(args, sim_root, raw, sets, data, image_set, partition))


def _guarded(sim_root: Path, command: str, rounds: int, work: Callable[[], int]) -> int:
    """``work()`` holding the folder's lock (simulations/run_guard.py); a SIGINT or SIGTERM stops the run's every
    process and says how to go on (the lock's exit stops them; the checkpoints stay)."""
    try:
        with RunLock(sim_root):
            return work()
    except SimulationBusyError as err:
        print(f"{command}: {err}", file=sys.stderr)
        return 2
    except StopSignal as stop:
        print(stopped_message(sim_root, stop.name, rounds), file=sys.stderr, flush=True)
        return stop.exit_code


def stopped_message(sim_root: Path, signal_name: str, rounds: int) -> str:
    """What fl-sim says when a signal stopped it: how far the run got, that nothing of it runs on, how to go on."""
    how = "Ctrl-C (SIGINT)" if signal_name == "SIGINT" else signal_name
    left = run_processes(sim_root)
    stopped = (f"{len(left)} of its processes did not stop ({describe(left)}): `fl-sim stop {sim_root}`" if left
               else "every process it started has stopped")
    done = last_checkpoint(sim_root / "run")
    if done is None:
        return (f"fl-sim: stopped by {how} before any round was checkpointed; {stopped}. Nothing to resume: "
                f"start again with `fl-sim run` (remove {sim_root} first, or pass another --name)")
    return (f"fl-sim: stopped by {how} after round {done} of {rounds} (checkpointed); {stopped}.\n"
            f"resume with: fl-sim resume {sim_root}")


def _make_and_run(args: argparse.Namespace, sim_root: Path, raw: dict[str, Any], sets: dict[str, Any],
                  data: Path | None, image_set: bool, partition: str) -> int:
    """Make (or take) the hospitals, write sites.json, run the federation and report: ``fl-sim run``'s work."""
    # Deferred past the checks, so --help and bad input answer in well under a second (fl-sim's own
    # process never imports torch before the run: see _cuda_available).
    from simulations.federation import SimulationRunError, run_app, usable_cpus, write_sites

    latest = point_latest(sim_root)  # `runs/latest/...` in the docs: a glob over runs/sim-* breaks at the second run
    if latest is not None:
        print(f"simulation folder {sim_root} ({latest} points to it)", flush=True)
    hospitals = sim_root / "hospitals"
    try:
        if image_set:
            print(f"partitioning the image set {data} into {args.sites} hospitals ({partition}), "
                  f"{args.holdout:.0%} of patients held out for testing ...", flush=True)
            make_hospitals_from_images(data, hospitals, args.sites, partition=partition, alpha=args.alpha,
                                       holdout_fraction=args.holdout, seed=args.seed, max_images=args.max_images,
                                       image_size=max(args.image_size, 64), progress=sys.stderr.isatty())
            site_dirs = sorted(p for p in hospitals.iterdir() if p.is_dir() and p.name != "holdout")
        elif data is not None:
            site_dirs = sorted(p for p in data.iterdir() if p.is_dir() and p.name != "holdout")
        else:
            patients = synthetic_patients(args.sites, args.patients)
            matrix = synthetic_matrix_cap(args.image_size)
            stored = f", stored at most {matrix} px" if matrix else ""
            print(f"making {args.sites} synthetic hospitals ({partition}, about {patients} patients each{stored}) ...",
                  flush=True)
            t0 = time.monotonic()
            make_synthetic_hospitals(hospitals, args.sites, patients_per_site=patients, partition=partition,
                                     alpha=args.alpha, seed=args.seed, progress=sys.stderr.isatty(),
                                     max_matrix=matrix, workers=usable_cpus())
            print(f"made {args.sites} hospitals in {time.monotonic() - t0:.0f} s", flush=True)
            site_dirs = sorted(p for p in hospitals.iterdir() if p.is_dir())
    except (SimulationError, FileExistsError) as err:
        print(f"fl-sim: {err}", file=sys.stderr)
        return 2
    if not site_dirs:
        print(f"fl-sim: no hospital folders found in {args.data}", file=sys.stderr)
        return 2
    state_root = Path(args.state_dir).resolve() if args.state_dir else sim_root / "state"
    # Each simulated hospital declares its size (its weight in the average, and its batch-size sampling rate under
    # DP), as a hospital does in its node config; the run's cap is the largest, so sizes weigh as they are.
    sites = [{"data-dir": str(d), "state-dir": str(state_root / d.name), "site-name": d.name,
              "max-epsilon": args.max_epsilon, "allow-no-dp": True, "declared-images": _image_files(d)}
             for d in site_dirs]
    write_sites(sim_root, sites)
    if "max-site-examples" not in sets:
        raw["max-site-examples"] = max(site["declared-images"] for site in sites)
    # The ONNX parity check runs on real-looking radiographs: in a simulation the coordinator may read the
    # (synthetic or public) hold-out set, or else the first simulated hospital's folder.
    holdout = site_dirs[0].parent / "holdout"
    raw["parity-data"] = str(holdout if holdout.is_dir() else site_dirs[0])
    raw["min-sites"] = len(site_dirs)
    if "labels" not in sets and raw.get("task", "binary") == "binary":
        positive = _positive_class(site_dirs[0].parent)
        if positive:
            raw["labels"] = positive
    try:
        RunConfig.from_mapping(raw)
    except ConfigError as err:
        print(f"fl-sim: {err}", file=sys.stderr)
        return 2
    print(f"federated run: {len(site_dirs)} hospitals, {raw['model']} at {raw['image-size']} px, {raw['num-server-rounds']} rounds, "
          f"DP {'off' if args.no_dp else f'on (target epsilon {args.target_epsilon} per site)'}, "
          f"strategy {args.strategy}; before round 1 each site reads its images and caches their features",
          flush=True)
    gpus = args.gpus_per_site
    if gpus is None:
        gpus = round(1.0 / len(site_dirs), 3) if _cuda_available() else 0.0
    started = time.monotonic()
    try:
        run_app(sim_root, raw, num_supernodes=len(site_dirs), cpus_per_site=args.cpus_per_site,
                gpus_per_site=gpus, progress=sys.stderr.isatty() or args.progress, ray_address=args.ray_address)
    except SimulationRunError as err:
        print(f"fl-sim: {err}", file=sys.stderr)
        return 1
    code = report(sim_root, sim_root / "run", holdout, started)
    if code == 0:
        _say(tidy_after_run(sim_root, state_root, keep_cache=args.keep_cache, say=_say))
    return code


def _say(line: str) -> None:
    if line:
        print(line, flush=True)


def _cuda_available() -> bool:
    """torch's answer, asked in a child process: fl-sim itself does not hold torch while the sites train."""
    probe = [sys.executable, "-c", "import torch; print(int(torch.cuda.is_available()))"]
    try:
        out = subprocess.run(probe, capture_output=True, text=True, timeout=120, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.stdout.strip().endswith("1")


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue a simulated run from its last checkpoint (same sites, same state dirs, same ledgers).

    Refused, in one line, while the run (or an orphan of it) still runs, when it has finished, and when no
    round was checkpointed: a round is never trained twice, and a finished run is not registered again.
    """
    from simulations.federation import SITES_FILE  # deferred, as in cmd_run

    sim_root = Path(args.sim_dir).resolve()
    cfg_path = sim_root / "run-config.toml"
    sites_path = sim_root / SITES_FILE
    if not cfg_path.is_file() or not sites_path.is_file():
        print(f"fl-sim resume: {sim_root} is not an fl-sim folder (no run-config.toml / sites.json)", file=sys.stderr)
        return 2
    raw = tomllib.loads(cfg_path.read_text())
    raw["resume-from"] = str(sim_root / raw.get("run-name", "run"))
    return _guarded(sim_root, "fl-sim resume", int(raw.get("num-server-rounds", 0)),
                    lambda: _resume(args, sim_root, raw))


def _resume(args: argparse.Namespace, sim_root: Path, raw: dict[str, Any]) -> int:
    from simulations.federation import SITES_FILE, SimulationRunError, run_app  # deferred, as in cmd_run

    run_dir = Path(raw["resume-from"])
    if finished(run_dir):
        print(f"fl-sim resume: the run in {run_dir} has finished (its model is exported): nothing to resume; "
              "start a new one with `fl-sim run`", file=sys.stderr)
        return 2
    done = last_checkpoint(run_dir)
    if done is None:
        print(f"fl-sim resume: nothing to resume in {run_dir}: no round was checkpointed; start a new run with "
              "`fl-sim run`", file=sys.stderr)
        return 2
    sites = json.loads((sim_root / SITES_FILE).read_text())
    print(f"resuming {run_dir} after round {done} of {raw.get('num-server-rounds')} ({len(sites)} hospitals)", flush=True)
    started = time.monotonic()
    try:
        run_app(sim_root, raw, num_supernodes=len(sites), cpus_per_site=args.cpus_per_site,
                progress=sys.stderr.isatty(), ray_address=args.ray_address)
    except SimulationRunError as err:
        print(f"fl-sim: {err}", file=sys.stderr)
        return 1
    holdout = Path(sites[0]["data-dir"]).parent / "holdout" if sites else sim_root / "holdout"
    code = report(sim_root, run_dir, holdout, started)
    if code == 0 and sites:
        _say(tidy_after_run(sim_root, Path(sites[0]["state-dir"]).parent, keep_cache=args.keep_cache, say=_say))
    return code


def _positive_class(hospitals: Path) -> str | None:
    """The positive finding of simulated hospitals (their manifest's non-normal class), if known."""
    try:
        classes = json.loads((hospitals / MANIFEST_FILE).read_text())["classes"]
    except (OSError, ValueError, KeyError):
        return None
    return str(classes[-1]) if len(classes) == 2 else None
