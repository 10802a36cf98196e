"""`fl-sim`: simulated hospitals on one machine.

Subcommands:
  run (default)   the README's main job: a federated run over simulated hospitals through
                  Flower's Simulation Engine (same ServerApp/ClientApp as a deployment)
  make-hospitals  write N hospital DICOM folders (synthetic phantoms, or a real labelled image
                  set partitioned by patient into hospitals)
  demo            three synthetic non-IID hospitals and the `fl-client check` summary each
                  hospital would see before joining
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

PARTITIONS = ("iid", "label-skew", "quantity-skew", "label-and-quantity")
# The phantom's opacity is faint against the anatomy's variation; a linear head on its scattering
# features needs about 500 DP steps to find it (docs/models.md, "the synthetic demo"), more than the
# 150 that suit real pneumonia. fl-sim uses this many local epochs for hospitals it synthesises itself.
SYNTHETIC_LOCAL_EPOCHS = 12


def cmd_make_hospitals(args: argparse.Namespace) -> int:
    from simulations.hospitals import SimulationError, make_hospitals_from_images, make_synthetic_hospitals

    out = Path(args.out)
    try:
        if args.from_images:
            manifest = make_hospitals_from_images(
                Path(args.from_images), out, args.sites, partition=args.partition, alpha=args.alpha,
                holdout_fraction=args.holdout, seed=args.seed, max_images=args.max_images,
                image_size=args.image_size, progress=sys.stderr.isatty(),
            )
        else:
            manifest = make_synthetic_hospitals(
                out, args.sites, patients_per_site=args.patients, partition=args.partition, alpha=args.alpha,
                seed=args.seed, progress=sys.stderr.isatty(),
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
    """Until the federated simulation lands: build three hospitals and show each one's check."""
    from client.check import summarize
    from common.dataset import scan_site
    from common.dicom import DEFAULT_SALT
    from simulations.hospitals import make_synthetic_hospitals

    out = Path(args.out)
    manifest = make_synthetic_hospitals(out, 3, partition="label-and-quantity", seed=args.seed,
                                        progress=sys.stderr.isatty())
    for site in manifest.sites:
        index = scan_site(out / site.name, salt=DEFAULT_SALT)
        report = summarize(index, task="binary", labels=("opacity",))
        print(f"\n===== fl-client check {out / site.name}")
        print(report.render())
    return 0


def _parse_sets(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"fl-sim: --set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def cmd_run(args: argparse.Namespace) -> int:
    """Simulated hospitals (made or given) -> sites.json -> Flower simulation -> run directory."""
    import json
    import time

    from common.config import ConfigError, RunConfig, recommended_settings
    from simulations.federation import SimulationRunError, run_app, write_sites
    from simulations.hospitals import SimulationError, make_hospitals_from_images, make_synthetic_hospitals

    out = Path(args.out).resolve()
    name = args.name or time.strftime("sim-%Y%m%d-%H%M%S")
    sim_root = out / name
    hospitals = sim_root / "hospitals"
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
    partition = args.partition or ("label-and-quantity" if image_set else "quantity-skew")
    sets = _parse_sets(args.set)
    local_epochs = args.local_epochs
    if data is None and local_epochs == 0 and "local-epochs" not in sets:
        local_epochs = SYNTHETIC_LOCAL_EPOCHS
    raw = {
        **recommended_settings(str(sets.get("model", args.model)), dp=not args.no_dp),
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
    try:
        if image_set:
            print(f"partitioning the image set {data} into {args.sites} hospitals ({partition}), "
                  f"{args.holdout:.0%} of patients held out for testing ...")
            make_hospitals_from_images(data, hospitals, args.sites, partition=partition, alpha=args.alpha,
                                       holdout_fraction=args.holdout, seed=args.seed, max_images=args.max_images,
                                       image_size=max(args.image_size, 64), progress=sys.stderr.isatty())
            site_dirs = sorted(p for p in hospitals.iterdir() if p.is_dir() and p.name != "holdout")
        elif data is not None:
            site_dirs = sorted(p for p in data.iterdir() if p.is_dir() and p.name != "holdout")
        else:
            print(f"making {args.sites} synthetic hospitals ({partition}, about {args.patients} patients each) ...")
            make_synthetic_hospitals(hospitals, args.sites, patients_per_site=args.patients, partition=partition,
                                     alpha=args.alpha, seed=args.seed, progress=sys.stderr.isatty())
            site_dirs = sorted(p for p in hospitals.iterdir() if p.is_dir())
    except (SimulationError, FileExistsError) as err:
        print(f"fl-sim: {err}", file=sys.stderr)
        return 2
    if not site_dirs:
        print(f"fl-sim: no hospital folders found in {args.data}", file=sys.stderr)
        return 2
    state_root = Path(args.state_dir).resolve() if args.state_dir else sim_root / "state"
    sites = [{"data-dir": str(d), "state-dir": str(state_root / d.name), "site-name": d.name,
              "max-epsilon": args.max_epsilon, "allow-no-dp": True} for d in site_dirs]
    write_sites(sim_root, sites)
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
          f"strategy {args.strategy}")
    gpus = args.gpus_per_site
    if gpus is None:
        import torch

        gpus = round(1.0 / len(site_dirs), 3) if torch.cuda.is_available() else 0.0
    started = time.monotonic()
    try:
        run_app(sim_root, raw, num_supernodes=len(site_dirs), cpus_per_site=args.cpus_per_site,
                gpus_per_site=gpus, progress=sys.stderr.isatty() or args.progress)
    except SimulationRunError as err:
        print(f"fl-sim: {err}", file=sys.stderr)
        return 1
    run_dir = sim_root / "run"
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        print(f"fl-sim: the run finished without metrics; see {sim_root / 'run.log'}", file=sys.stderr)
        return 1
    doc = json.loads(metrics_path.read_text())
    rounds = doc["rounds"]
    print(render_rounds(rounds))
    for warning in doc.get("warnings", []):
        print(f"WARNING: {warning}")
    print(exact_summary(sim_root, run_dir))
    if holdout.is_dir() and (run_dir / "model.onnx").is_file():
        print(score_holdout(run_dir / "model.onnx", holdout, sim_root))
    print(f"\nrun directory: {run_dir}  ({time.monotonic() - started:.0f} s)")
    print("  model.onnx, model_card.md, metrics.json, rounds.png, roc.png, checkpoints/")
    _print_tracking(run_dir)
    return 0


def _print_tracking(run_dir: Path) -> None:
    from server.tracking import tracking_hint

    hint = tracking_hint(run_dir)
    if hint:
        print(hint)


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue a simulated run from its last checkpoint (same sites, same state dirs, same ledgers)."""
    import json
    import tomllib

    from simulations.federation import SimulationRunError, run_app

    sim_root = Path(args.sim_dir).resolve()
    cfg_path = sim_root / "run-config.toml"
    sites_path = sim_root / "sites.json"
    if not cfg_path.is_file() or not sites_path.is_file():
        print(f"fl-sim resume: {sim_root} is not an fl-sim folder (no run-config.toml / sites.json)", file=sys.stderr)
        return 2
    raw = tomllib.loads(cfg_path.read_text())
    raw["resume-from"] = str(sim_root / raw.get("run-name", "run"))
    n_sites = len(json.loads(sites_path.read_text()))
    print(f"resuming {raw['resume-from']} ({n_sites} hospitals)")
    try:
        run_app(sim_root, raw, num_supernodes=n_sites, cpus_per_site=args.cpus_per_site,
                progress=sys.stderr.isatty())
    except SimulationRunError as err:
        print(f"fl-sim: {err}", file=sys.stderr)
        return 1
    rounds = json.loads((Path(raw["resume-from"]) / "metrics.json").read_text())["rounds"]
    print(render_rounds(rounds))
    print(f"\nrun directory: {raw['resume-from']}")
    _print_tracking(Path(raw["resume-from"]))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """Pooled vs alone vs federated, with and without DP, leave-one-hospital-out, NIH transfer (simulations/study.py)."""
    from simulations.study import StudyError, render_goals, render_table, run_study, settings_from_args

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


def exact_summary(sim_root: Path, run_dir: Path) -> str:
    """The exact pooled validation AUC (simulation only), beside the coordinator's noised estimate."""
    import json

    from common.cache import atomic_write_bytes
    from simulations.evaluation import exact_validation_auc

    exact = exact_validation_auc(sim_root, run_dir)
    if not exact:
        return ""
    atomic_write_bytes(sim_root / "exact-validation.json", json.dumps(exact, indent=2).encode())
    parts = [f"last round ({exact['last']['round']}) {exact['last']['auc']:.3f}"]
    if "exported" in exact:
        parts.append(f"exported round ({exact['exported']['round']}) {exact['exported']['auc']:.3f}")
    return ("\nexact pooled validation AUC over the sites' " + f"{exact['images']} validation images (a simulation can "
            "measure it; the coordinator above saw noised histograms): " + ", ".join(parts))


def _positive_class(hospitals: Path) -> str | None:
    """The positive finding of simulated hospitals (their manifest's non-normal class), if known."""
    import json

    from simulations.hospitals import MANIFEST_FILE

    try:
        classes = json.loads((hospitals / MANIFEST_FILE).read_text())["classes"]
    except (OSError, ValueError, KeyError):
        return None
    return str(classes[-1]) if len(classes) == 2 else None


def score_holdout(model: Path, holdout: Path, sim_root: Path) -> str:
    """Score the exported model on the held-out patients (never seen in training or validation)."""
    import json

    from client.evaluate import evaluate_model
    from common.cache import atomic_write_bytes
    from common.dataset import site_salt

    report = evaluate_model(model, holdout, salt=site_salt(sim_root / "state" / "holdout"), bootstrap=1000)
    atomic_write_bytes(sim_root / "holdout.json", json.dumps(report, indent=2, default=float).encode())
    if "auc" not in report:
        return f"\nheld-out patients: {report['images']} images scored; see {sim_root / 'holdout.json'}"
    lo, hi = report.get("auc_ci") or (float("nan"), float("nan"))
    return (f"\nheld-out patients ({report['images']} images the federation never saw): AUC {report['auc']:.3f} "
            f"(95% CI {lo:.3f}-{hi:.3f}); at the model's threshold {report['threshold']:.3f} sensitivity "
            f"{report['sensitivity']:.3f}, specificity {report['specificity']:.3f}  [{sim_root / 'holdout.json'}]")


def render_rounds(rounds: list[dict]) -> str:
    """Per round: pooled validation AUC and loss (from the sites' noised histograms) and each site's epsilon."""
    sites = sorted({s for r in rounds for s in r.get("epsilon", {})})
    head = f"{'round':>5}  {'pooled AUC':>10}  {'val loss':>8}  " + "  ".join(f"{'eps ' + s:>16}" for s in sites)
    lines = ["", head, "-" * len(head)]
    for r in rounds:
        auc, loss = r.get("pooled_auc"), r.get("eval_loss")
        auc_s = "-" if auc is None or auc != auc else f"{auc:.3f}"
        loss_s = "-" if loss is None or loss != loss else f"{loss:.4f}"
        eps = "  ".join(f"{r.get('epsilon', {}).get(s, float('nan')):>16.2f}" for s in sites)
        note = f"  refused/failed: {len(r['failures'])}" if r.get("failures") else ""
        lines.append(f"{r['round']:>5}  {auc_s:>10}  {loss_s:>8}  {eps}{note}")
    lines.append("(pooled AUC and validation loss as the coordinator sees them: from the sites' noised histograms)")
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedxray")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-sim", description="fedxray simulated federation: `fl-sim [run options]` runs a federated DP training "
        "over simulated hospitals (the run options are listed below)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (anywhere on the command line)")
    parser.add_argument("--version", action="version", version=f"fl-sim (fedxray) {_version()}")
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
    p.add_argument("--patients", type=int, default=500, help="synthetic: mean patients per hospital")
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
    p.add_argument("--progress", action="store_true", help="progress bar even when not on a terminal")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", help="continue a simulated run from its last checkpoint")
    p.add_argument("sim_dir", help="the fl-sim folder (runs/sim-...)")
    p.add_argument("--cpus-per-site", type=float, default=1.0, help="CPU cores each simulated site gets (Ray)")
    p.set_defaults(func=cmd_resume)

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
    if not any(a in ("run", "resume", "make-hospitals", "demo", "study", "--version") for a in argv[:1]):
        argv = ["run", *argv]  # `fl-sim [options]` is `fl-sim run [options]`
    args = parser.parse_args(argv)
    args.verbose = verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # A SIGTERM (Ctrl-C, a killed job) unwinds normally, so the SuperLink and `flwr run` are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for noisy in ("openjpeg", "pylibjpeg", "pydicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
