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


def cmd_approve(args: argparse.Namespace) -> int:
    from client.approval import ApprovalError, approve, installed_bundle, load_approvals, revoke

    state = Path(args.state_dir)
    try:
        if args.list:
            entries = load_approvals(state)
            if not entries:
                print(f"no app bundle approved in {state}: runs are refused until you approve one")
            for e in entries:
                print(f"{e['hash']}  approved {e['approved']}{'  REVOKED ' + e['revoked'] if e.get('revoked') else ''}"
                      f"{'  ' + e['note'] if e.get('note') else ''}")
            return 0
        if args.installed:
            fab_hash, _ = installed_bundle()
            if args.dry_run:
                print(fab_hash)
                return 0
            note = args.note or "bundle of the installed fedxray version"
        elif args.hash:
            fab_hash, note = args.hash, args.note
        else:
            print("fl-client approve: give a bundle HASH, or --installed, or --list", file=sys.stderr)
            return 2
        if args.revoke:
            done = revoke(state, fab_hash)
            print(f"approval of {fab_hash} withdrawn" if done else f"{fab_hash} was not approved")
            return 0
        added = approve(state, fab_hash, note=note)
    except ApprovalError as err:
        print(f"fl-client approve: {err}", file=sys.stderr)
        return 2
    print(f"{'approved' if added else 'already approved'}: app bundle {fab_hash} (runs of any other bundle are refused here)")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from client.approval import approved_hashes
    from client.check import summarize
    from client.join import JoinError, probe_coordinator, run_site, write_node_config
    from client.provision import ProvisionError, load_site_identity
    from common.cache import SiteCache
    from common.config import ConfigError
    from common.dataset import site_salt

    def fail(message: str) -> int:
        print(f"fl-client start: {message}", file=sys.stderr)
        return 2

    try:
        identity = load_site_identity(args.kit)
    except ProvisionError as err:
        return fail(str(err))
    state = Path(args.state_dir or Path(args.kit) / "state").resolve()
    state.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve()
    address = args.coordinator or identity.address
    # 1. The data, read as training reads it: counts only, no identifiers or paths.
    try:
        index = scan_site(data, salt=site_salt(state), cache=SiteCache(state / "cache"), progress=sys.stderr.isatty())
    except DatasetError as err:
        return fail(str(err))
    if not index.records:
        return fail(f"no usable image in {data}: see fl-client check {data} --list-skipped")
    guess = _infer_task(index.class_names, index.label_kind)
    report = summarize(index, task=guess[0] if guess else None, labels=guess[1] if guess else None)
    print(f"site {identity.site}: data in {data}")
    print(report.render(list_skipped=False))
    # 2. The coordinator, with mutual TLS, before any process starts.
    try:
        probe_coordinator(address, identity.ca_cert, identity.client_cert, identity.tls_key)
        node_config = write_node_config(state, data, identity.site, args.max_epsilon, args.delta, args.allow_no_dp,
                                        args.device)
    except JoinError as err:
        return fail(str(err))
    except ConfigError as err:
        return fail(str(err))
    approved = approved_hashes(state)
    if not approved:
        print("fl-client start: warning: no app bundle approved yet; every run is refused here until you approve one "
              f"(fl-client approve HASH --state-dir {state})", file=sys.stderr)
    print(f"joining {identity.coordinator.get('federation', 'the federation')} at {address} as {identity.site} "
          f"(outbound only; {len(approved)} approved bundle(s); budget max-epsilon {args.max_epsilon}). Ctrl-C to leave.",
          flush=True)
    return run_site(identity=identity, address=address, data_dir=data, state_dir=state, node_config=node_config,
                    log=lambda m: print(m, file=sys.stderr, flush=True), rejoin_wait=args.rejoin_wait)


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

    p = sub.add_parser("approve", help="approve an app bundle (by sha256): this site runs only approved bundles")
    p.add_argument("hash", nargs="?", help="the bundle's sha256, as fl-server run prints it")
    p.add_argument("--installed", action="store_true", help="approve the bundle of the fedxray version installed here")
    p.add_argument("--dry-run", action="store_true", help="with --installed: print the hash, approve nothing")
    p.add_argument("--revoke", action="store_true", help="withdraw the approval instead")
    p.add_argument("--list", action="store_true", help="list approved bundles")
    p.add_argument("--note", default="", help="why (e.g. release reviewed on 2026-11-20 by IT security)")
    p.add_argument("--state-dir", default="fedxray-site/state", help="the site's state dir (default ./fedxray-site/state)")
    p.set_defaults(func=cmd_approve)

    p = sub.add_parser("start", help="join the federation: check data, probe the coordinator, run the SuperNode")
    p.add_argument("--kit", default="fedxray-site", help="site folder: keys from fl-client init plus the kit files")
    p.add_argument("--data", required=True, help="the site's DICOM folder (labels.csv or class subfolders)")
    p.add_argument("--coordinator", help="HOST:PORT of the coordinator (default: from coordinator.json in the kit)")
    p.add_argument("--state-dir", help="ledger, salt, cache, approvals, logs (default KIT/state)")
    p.add_argument("--max-epsilon", type=float, default=10.0, help="this site's privacy budget over all runs (default 10)")
    p.add_argument("--delta", type=float, default=1e-5, help="DP delta this site accepts at most (default 1e-5)")
    p.add_argument("--allow-no-dp", action="store_true", help="let runs train here without DP (off by default)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="training device (default auto)")
    p.add_argument("--rejoin-wait", type=float, default=150.0, metavar="S",
                   help="after a crash, keep retrying a refused activation this long (default 150 s)")
    p.set_defaults(func=cmd_start)

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
