"""`fl-sim`: simulated hospitals on one machine.

Subcommands:
  run (default)   the README's main job: a federated run over simulated hospitals through
                  Flower's Simulation Engine (same ServerApp/ClientApp as a deployment)
  make-hospitals  write N hospital DICOM folders (synthetic phantoms, or a real labelled image
                  set partitioned by patient into hospitals)
  demo            three synthetic non-IID hospitals and the `fl-client check` summary each
                  hospital would see before joining
  resume, stop    continue a stopped run from its last checkpoint; stop a run (and any orphan of it)

``run`` and ``resume`` are in simulations/cli_run.py; the study in simulations/study.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from client.check import summarize
from common.cli import fedxray_version
from common.dataset import scan_site
from common.dicom import DEFAULT_SALT
from common.supervisor import StopSignal, stop_signals_raise
from simulations.cli_run import (
    SYNTHETIC_LOCAL_EPOCHS,
    SYNTHETIC_PATIENTS_MIN,
    SYNTHETIC_PATIENTS_TOTAL,
    cmd_resume,
    cmd_run,
)
from simulations.hospitals import SimulationError, make_hospitals_from_images, make_synthetic_hospitals
from simulations.study import StudyError, render_goals, render_table, run_study, settings_from_args

PARTITIONS = ("iid", "label-skew", "quantity-skew", "label-and-quantity")


def cmd_make_hospitals(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        if args.from_images:
            manifest = make_hospitals_from_images(
                Path(args.from_images), out, args.sites, partition=args.partition, alpha=args.alpha,
                holdout_fraction=args.holdout, seed=args.seed, max_images=args.max_images,
                image_size=args.image_size, progress=sys.stderr.isatty(),
            )
        else:
            from simulations.federation import usable_cpus

            manifest = make_synthetic_hospitals(
                out, args.sites, patients_per_site=args.patients, partition=args.partition, alpha=args.alpha,
                seed=args.seed, progress=sys.stderr.isatty(), workers=usable_cpus(),
            )
    except (SimulationError, FileExistsError) as err:
        print(f"fl-sim make-hospitals: {err}", file=sys.stderr)
        return 2
    print(f"{len(manifest.sites)} hospital(s) in {out} ({manifest.source}, partition {manifest.partition}):")
    for site in manifest.sites:
        per_class = ", ".join(f"{k} {v}" for k, v in sorted(site.images_per_class.items()))
        print(f"  {site.name:<12} {site.n_patients:>5} patients {site.n_images:>6} images ({per_class})")
    if manifest.holdout is not None:
        print(f"  {'holdout':<12} {manifest.holdout.n_patients:>5} patients {manifest.holdout.n_images:>6} images")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Three synthetic hospitals and the ``fl-client check`` summary each one would see before joining."""
    out = Path(args.out)
    manifest = make_synthetic_hospitals(out, 3, partition="label-and-quantity", seed=args.seed,
                                        progress=sys.stderr.isatty())
    for site in manifest.sites:
        index = scan_site(out / site.name, salt=DEFAULT_SALT)
        report = summarize(index, task="binary", labels=("opacity",))
        print(f"\n===== fl-client check {out / site.name}")
        print(report.render())
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop the run in a simulation folder: its fl-sim (which then says how to resume) and any orphan of it."""
    from simulations.run_guard import describe, finished, last_checkpoint, stop_simulation

    sim_root = Path(args.sim_dir).resolve()
    if not sim_root.is_dir():
        print(f"fl-sim stop: {sim_root} is not a folder; give the simulation folder (runs/sim-...)", file=sys.stderr)
        return 2
    holder, orphans, left = stop_simulation(sim_root)
    if left:
        print(f"fl-sim stop: {len(left)} process(es) of the run did not stop: {describe(left)}", file=sys.stderr)
        return 1
    if holder:
        print(f"stopped the fl-sim working in {sim_root} (pid {holder}) and every process of its run")
    elif orphans:
        print(f"stopped {orphans} process(es) left running by an earlier fl-sim in {sim_root}")
    else:
        print(f"nothing was running in {sim_root}")
    if last_checkpoint(sim_root / "run") is not None and not finished(sim_root / "run"):
        print(f"resume with: fl-sim resume {sim_root}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """Pooled vs alone vs federated, with and without DP, leave-one-hospital-out, NIH transfer (simulations/study.py)."""
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    try:
        doc = run_study(args.data, args.out, settings_from_args(args), arms=arms, nih_dir=args.nih)
    except StudyError as err:
        print(f"fl-sim study: {err}", file=sys.stderr)
        return 2
    print("\n" + render_table(doc) + "\n\n" + render_goals(doc))
    print(f"\nresults: {Path(args.out) / 'results.json'} (results.md, roc.png, rounds.png, privacy.png); "
          f"{doc['timings']['total_seconds'] / 60:.0f} min of work")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-sim", description="fedxray simulated federation: `fl-sim [run options]` runs a federated DP training "
        "over simulated hospitals (the run options are listed below)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (anywhere on the command line)")
    parser.add_argument("--version", action="version", version=f"fl-sim (fedxray) {fedxray_version()}")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("run", help="federated run over simulated hospitals (the default)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sites", type=int, default=3, help="number of simulated hospitals (when made here)")
    p.add_argument("--rounds", type=int, default=8, help="federated rounds")
    p.add_argument("--model", choices=("scatternet", "mobilenet_v2", "densenet121"), default="scatternet",
                   help="scatternet (the DP-first default: fixed scattering features + a small head) or a CNN")
    p.add_argument("--image-size", type=int, default=64, help="images are resized to this square size (pixels)")
    p.add_argument("--partition", choices=PARTITIONS, default=None,
                   help="how patients are split into hospitals (default: quantity-skew for synthetic hospitals, "
                        "label-and-quantity for an image set)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the skews (smaller: more skew)")
    p.add_argument("--holdout", type=float, default=0.15,
                   help="image set: share of patients held out as a test set the federation never sees")
    p.add_argument("--data", help="hospital folders (one per site), or an image set with labels.csv to partition")
    p.add_argument("--max-images", type=int, help="image set: use at most this many images")
    p.add_argument("--patients", type=int, default=None,
                   help="synthetic: mean patients per hospital (default: 500, or fewer when there are many hospitals: "
                   f"{SYNTHETIC_PATIENTS_TOTAL:,} patients in all, at least {SYNTHETIC_PATIENTS_MIN} per hospital)")
    p.add_argument("--init", metavar="PATH", help="start from local weights (a state_dict, or torchvision weights from your "
                   "own cache; with --set train-part=head for DP fine-tuning of a CNN)")
    p.add_argument("--no-dp", action="store_true", help="train without DP (the simulated sites allow it)")
    p.add_argument("--target-epsilon", type=float, default=8.0, help="per-site epsilon for the planned rounds")
    p.add_argument("--max-epsilon", type=float, default=10.0, help="each simulated site's budget")
    p.add_argument("--state-dir", help="root of the simulated sites' state dirs (ledgers, caches); reuse it to "
                   "run again on the same sites (default: inside the simulation folder)")
    p.add_argument("--local-epochs", type=int, default=0,
                   help="local epochs per round; 0 (default): enough for about 150 DP steps per site over the run "
                   f"({SYNTHETIC_LOCAL_EPOCHS} for synthetic hospitals made here)")
    p.add_argument("--strategy", choices=("fedavg", "fedprox", "fedadam", "trimmed-mean", "median"), default="fedavg",
                   help="how the coordinator combines the sites' updates")
    p.add_argument("--seed", type=int, default=0, help="hospitals, the initial model and non-DP data order (never the DP noise)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other run-config key")
    p.add_argument("--out", default="runs", help="where the simulation folder goes")
    p.add_argument("--name", help="simulation folder name (default: sim-<timestamp>)")
    p.add_argument("--cpus-per-site", type=float, default=1.0, help="CPU cores each simulated site gets (Ray)")
    p.add_argument("--gpus-per-site", type=float, default=None,
                   help="GPU share per simulated site (default: the GPU split between the sites when there is one)")
    p.add_argument("--ray-address", metavar="HOST:PORT",
                   help="run the simulated sites on this existing Ray cluster (the head's address, as `ray start --head` "
                   "prints it) instead of a private Ray on this machine; every node needs fedxray and the simulation "
                   "folder at the same paths (docs/operations.md)")
    p.add_argument("--progress", action="store_true", help="progress bar even when not on a terminal")
    p.add_argument("--keep-cache", action="store_true", help="keep the sites' image and feature caches after the run "
                   "(by default a finished run removes them from its folder: about 0.55 GB for the demo)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", help="continue a simulated run from its last checkpoint")
    p.add_argument("sim_dir", help="the fl-sim folder (runs/sim-...)")
    p.add_argument("--cpus-per-site", type=float, default=1.0, help="CPU cores each simulated site gets (Ray)")
    p.add_argument("--ray-address", metavar="HOST:PORT", help="run on this existing Ray cluster (see `fl-sim run --help`)")
    p.add_argument("--keep-cache", action="store_true", help="keep the sites' caches after the run (see `fl-sim run`)")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("stop", help="stop a simulated run (its fl-sim and every process of it); resume continues it")
    p.add_argument("sim_dir", help="the fl-sim folder (runs/sim-...)")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("study", help="pooled vs alone vs federated, DP, leave-one-hospital-out, NIH transfer (docs/results.md)")
    p.add_argument("--data", required=True, help="labelled image set (labels.csv with patient_id), e.g. kermany-pneumonia")
    p.add_argument("--out", default="runs/study", help="study folder; finished arms there are reused")
    p.add_argument("--nih", help="the NIH ChestX-ray14 sample for the transfer figure and the warm start "
                   "(default: nih-cxr14-1000 next to --data, if there)")
    p.add_argument("--quick", action="store_true", help="tiny smoke version: a few dozen images, 2 sites, 1 round, 32 px")
    p.add_argument("--models", help="comma-separated arm sets: scatternet (default), mobilenet_v2 (about 2 hours more)")
    p.add_argument("--arms", help="comma-separated subset of arms to run (default: all of --models)")
    for opt, typ in (("image-size", int), ("sites", int), ("rounds", int), ("max-images", int), ("seed", int),
                     ("bootstrap", int), ("epsilons", str), ("pooled-epsilons", str), ("loho-epsilon", float),
                     ("warm-epsilon", float), ("nih-max-images", int), ("threads", int)):
        p.add_argument(f"--{opt}", type=typ, default=None, help="override the study default (see simulations/study.py)")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("make-hospitals", help="write N simulated hospital DICOM folders")
    p.add_argument("--out", required=True, help="output folder (one subfolder per hospital)")
    p.add_argument("--sites", type=int, default=3, help="number of hospitals")
    p.add_argument("--from-images", metavar="DIR", help="labelled image set to partition (labels.csv or class folders)")
    p.add_argument("--partition", choices=PARTITIONS, default="label-skew")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration for the skews (smaller = more skew)")
    p.add_argument("--holdout", type=float, default=0.0, help="share of patients held out as a common test set")
    p.add_argument("--patients", type=int, default=40, help="synthetic: mean patients per hospital")
    p.add_argument("--image-size", type=int, help="real images: shrink to this size before writing DICOM")
    p.add_argument("--max-images", type=int, help="real images: use at most this many (quick trials)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_hospitals)

    p = sub.add_parser("demo", help="three synthetic hospitals and their fl-client check")
    p.add_argument("--out", default="runs/demo-hospitals")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall shared cores
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in argv)
    argv = [a for a in argv if a not in ("-v", "--verbose")]  # a global flag, wherever it stands
    if argv in (["-h"], ["--help"]):
        parser.print_help()
        print("\nrun options (`fl-sim [run options]` is `fl-sim run [run options]`):\n")
        sub_run = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
        print(sub_run.format_help())
        return 0
    if not any(a in ("run", "resume", "stop", "make-hospitals", "demo", "study", "--version") for a in argv[:1]):
        argv = ["run", *argv]  # `fl-sim [options]` is `fl-sim run [options]`
    args = parser.parse_args(argv)
    args.verbose = verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("openjpeg", "pylibjpeg", "pydicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Ctrl-C and SIGTERM unwind (common/supervisor.py): what was started is stopped on the way out, and `run` and
    # `resume` say how far the run got and how to go on; no traceback.
    with stop_signals_raise():
        try:
            return int(args.func(args) or 0)
        except StopSignal as stop:
            print(f"fl-sim: stopped by {stop.name}", file=sys.stderr)
            return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
