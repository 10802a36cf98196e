"""`fl-sim`: simulated hospitals on one machine.

Subcommands:
  make-hospitals  write N hospital DICOM folders (synthetic phantoms, or a real labelled image
                  set partitioned by patient into hospitals)
  demo            the README's main job: three synthetic non-IID hospitals, then the
                  `fl-client check` summary each hospital would see before joining
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

PARTITIONS = ("iid", "label-skew", "quantity-skew", "label-and-quantity")


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
    except SimulationError as err:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-sim", description="fedxray simulated federation")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command")

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
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
