"""The `fl-client accept` subcommand: its arguments and what it prints (the work is in client/accept.py).

Kept apart from client/cli.py so that `fl-client --help` imports nothing heavy: numpy, onnxruntime
and matplotlib load only when the subcommand runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def cmd_accept(args: argparse.Namespace) -> int:
    """Exit 0 with the report, 2 with one line on stderr (too few images, one class, not binary, bad input)."""
    from client.accept import accept_model, render_acceptance
    from client.evaluate import EvaluationError, json_safe
    from common.dataset import DatasetError, site_salt
    from common.dicom import DEFAULT_SALT
    from common.onnx_export import OnnxModelError
    from common.operating_point import parse_operating_point

    try:
        point = parse_operating_point(args.operating_point)
        report = accept_model(args.model, args.data, salt=site_salt(Path(args.state_dir)) if args.state_dir else DEFAULT_SALT,
                              point=point, site=args.site, out_dir=args.out, site_model=args.site_model,
                              bootstrap=args.bootstrap, positive=args.positive, progress=sys.stderr.isatty(),
                              gate=not args.no_gate)
    except (EvaluationError, DatasetError, OnnxModelError, FileNotFoundError, ValueError) as err:
        print(f"fl-client accept: {err}", file=sys.stderr)
        return 2
    print(json.dumps(json_safe(report), indent=2) if args.json else render_acceptance(report))
    if args.out:
        print(f"report, ROC and calibration plots in {args.out}")
    return 0


def add_accept_parser(sub: Any) -> None:
    """``fl-client accept`` under the subcommands ``sub``."""
    p = sub.add_parser("accept", help="acceptance test before go-live: the model on this site's labelled images, "
                       "and a site copy of it with this site's own operating point (nothing leaves the site)")
    p.add_argument("--model", required=True, help="model.onnx from a fedxray run (binary)")
    p.add_argument("--data", required=True, help="labelled site folder (labels.csv or class subfolders)")
    p.add_argument("--operating-point", default="youden", metavar="RULE",
                   help="youden | sensitivity:X | specificity:X (e.g. sensitivity:0.95 for screening); default youden")
    p.add_argument("--site", default="site", help="this site's name, recorded in the site copy and named in the SR")
    p.add_argument("--site-model", help="where the site copy goes (default: MODEL's folder, <stem>.site.onnx)")
    p.add_argument("--out", help="folder for acceptance.json, roc.png and calibration.png")
    p.add_argument("--state-dir", help="the site's state dir (for its salt)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUC interval")
    p.add_argument("--positive", metavar="CLASS", help="the site's class that is the model's positive finding, when "
                   "named otherwise here")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-gate", action="store_true", help="research only: measure every image, also those outside the "
                   "model's intended use (the report says the gate was off)")
    p.set_defaults(func=cmd_accept)
