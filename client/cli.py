"""`fl-client`: the hospital's command line.

Subcommands: ``check`` (what the site folder holds, before joining). Later issues add ``init``,
``start``, ``approve``, ``evaluate`` and ``status``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from common.dataset import NEGATIVE_NAMES, DatasetError, scan_site

log = logging.getLogger("fedxray.client")


def _infer_task(class_names: tuple[str, ...], label_kind: str) -> tuple[str, tuple[str, ...]] | None:
    """Guess the task for a summary when the operator named none (two classes, one of them normal)."""
    if label_kind == "multi":
        return ("multilabel", class_names) if len(class_names) > 1 else ("binary", class_names)
    negatives = [c for c in class_names if c.lower() in NEGATIVE_NAMES]
    positives = [c for c in class_names if c.lower() not in NEGATIVE_NAMES]
    if len(class_names) == 2 and len(negatives) == 1:
        return "binary", (positives[0],)
    if len(class_names) >= 2:
        return "multiclass", class_names
    return None


def cmd_check(args: argparse.Namespace) -> int:
    from client.check import summarize
    from common.cache import SiteCache
    from common.dataset import site_salt
    from common.dicom import DEFAULT_SALT

    state = Path(args.state_dir) if args.state_dir else None
    salt = site_salt(state) if state else DEFAULT_SALT
    cache = SiteCache(state / "cache") if state else None
    try:
        index = scan_site(args.data_dir, salt=salt, cache=cache, progress=sys.stderr.isatty())
    except DatasetError as err:
        print(f"fl-client check: {err}", file=sys.stderr)
        return 2
    task, labels = args.task, tuple(args.labels.split(",")) if args.labels else None
    if not (task and labels):
        guess = _infer_task(index.class_names, index.label_kind)
        if guess is not None:
            task, labels = task or guess[0], labels or guess[1]
    report = summarize(index, task=task, labels=labels, val_fraction=args.val_fraction, seed=args.seed)
    if args.json:
        print(json.dumps(report.summary, indent=2, sort_keys=True))
    else:
        print(f"fl-client check: {args.data_dir}")
        print(report.render(list_skipped=args.list_skipped))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from client.evaluate import evaluate_model, render_report
    from common.dataset import site_salt
    from common.dicom import DEFAULT_SALT
    from common.onnx_export import OnnxModelError

    salt = site_salt(Path(args.state_dir)) if args.state_dir else DEFAULT_SALT
    try:
        report = evaluate_model(args.model, args.data, salt=salt, out_dir=args.out, bootstrap=args.bootstrap,
                                progress=sys.stderr.isatty())
    except (DatasetError, OnnxModelError, FileNotFoundError, ValueError) as err:
        print(f"fl-client evaluate: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=float) if args.json else render_report(report))
    if args.out:
        print(f"report and ROC plot in {args.out}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from client.provision import AUTH_KEY_FILE, AUTH_PUB_FILE, TLS_KEY_FILE, ProvisionError, init_site, request_check_code

    try:
        request_path = init_site(args.dir, args.site, force=args.force)
    except ProvisionError as err:
        print(f"fl-client init: {err}", file=sys.stderr)
        return 2
    root = request_path.parent
    code = request_check_code(json.loads(request_path.read_text()))
    print(f"site {args.site}: created in {root}")
    print(f"  {TLS_KEY_FILE}   private: TLS client key (stays here)")
    print(f"  {AUTH_KEY_FILE}  private: SuperNode authentication key (stays here)")
    print(f"  {AUTH_PUB_FILE}  public half of {AUTH_KEY_FILE}")
    print(f"  {request_path.name}  the request for your coordinator (no private keys)")
    print(f"check code {code}: tell it to your coordinator by phone; fl-server admit shows the same")
    print(f"next: send {request_path.name} to your coordinator; keep {TLS_KEY_FILE} and {AUTH_KEY_FILE} here. "
          f"Copy the kit you get back (ca.pem, client.pem, coordinator.json) into {root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-client", description="fedxray hospital client")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="summarise a site data folder before joining (reads only)")
    p.add_argument("data_dir", help="the site's DICOM folder (labels.csv or class subfolders)")
    p.add_argument("--state-dir", help="use (and fill) the site cache and salt in this folder")
    p.add_argument("--task", choices=("binary", "multiclass", "multilabel"), help="task to preview the split for")
    p.add_argument("--labels", help="comma-separated run labels (binary: the positive finding)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of patients for validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--list-skipped", action="store_true", help="also list skipped files (local paths)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("init", help="make this site's keys and the request to send to the coordinator")
    p.add_argument("--site", required=True, help="site name: lowercase letters, digits and '-' (1-40)")
    p.add_argument("--dir", default="fedxray-site", help="folder for the keys and request (default ./fedxray-site)")
    p.add_argument("--force", action="store_true", help="replace existing keys (the coordinator must admit the new request)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("evaluate", help="score an ONNX model on this site's labelled data")
    p.add_argument("--model", required=True, help="model.onnx from a fedxray run")
    p.add_argument("--data", required=True, help="labelled site folder (labels.csv or class subfolders)")
    p.add_argument("--out", help="folder for evaluation.json and roc.png")
    p.add_argument("--state-dir", help="the site's state dir (for its salt)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUC interval")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall shared cores
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
