"""`fl-client`: the hospital's command line.

Subcommands: ``check`` (what the site folder holds, before joining), ``init`` (the site's keys and
request), ``approve`` (app bundles this site runs), ``start`` (join the federation), ``evaluate`` (a
model on the site's own labelled data), ``accept`` (the acceptance test before go-live, and a site
copy of the model with the site's own operating point), ``status`` (the privacy budget) and
``audit`` (the site's audit log). All of them work in one site home (client/site_home.py:
``--site-home``, ``FEDXRAY_SITE_HOME`` or ``~/fedxray-site``) and say on stderr which folder they use.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from client.accept_cli import add_accept_parser
from client.site_home import add_site_home_argument, announce, apply_site_home, resolve_site_home
from common.cli import fedxray_version
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
        data_dir = args.data or args.data_dir
        if not data_dir:
            print("fl-client check: give the site's data folder (fl-client check --data DIR)", file=sys.stderr)
            return 2
        index = scan_site(data_dir, salt=salt, cache=cache, progress=sys.stderr.isatty(), require_labels=False)
    except DatasetError as err:
        print(f"fl-client check: {err}", file=sys.stderr)
        return 2
    task, labels = args.task, tuple(args.labels.split(",")) if args.labels else None
    if not (task and labels):
        guess = _infer_task(index.class_names, index.label_kind)
        if guess is not None:
            task, labels = task or guess[0], labels or guess[1]
    from common.labels import LabelError, LabelPolicy, parse_label_map

    try:
        policy = LabelPolicy(label_column=args.label_column or "", uncertain=args.uncertain, blank=args.blank,
                             label_map=parse_label_map(args.label_map or ""))
    except LabelError as err:
        print(f"fl-client check: {err}", file=sys.stderr)
        return 2
    report = summarize(index, task=task, labels=labels, val_fraction=args.val_fraction, policy=policy)
    if args.json:
        print(json.dumps(report.summary, indent=2, sort_keys=True))
    else:
        print(f"fl-client check: {data_dir}")
        print(report.render(list_skipped=args.list_skipped))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from client.evaluate import evaluate_model, json_safe, render_report
    from common.dataset import site_salt
    from common.dicom import DEFAULT_SALT
    from common.onnx_export import OnnxModelError

    salt = site_salt(Path(args.state_dir)) if args.state_dir else DEFAULT_SALT
    try:
        report = evaluate_model(args.model, args.data, salt=salt, out_dir=args.out, bootstrap=args.bootstrap,
                                progress=sys.stderr.isatty(), positive=args.positive, gate=not args.no_gate)
    except (DatasetError, OnnxModelError, FileNotFoundError, ValueError) as err:
        print(f"fl-client evaluate: {err}", file=sys.stderr)
        return 2
    print(json.dumps(json_safe(report), indent=2) if args.json else render_report(report))
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


def _approve_policy(args: argparse.Namespace, state: Path) -> int:
    """``fl-client approve --policy FILE`` / ``--clear-policy``: the run settings this site accepts (client/run_policy.py)."""
    from client.run_policy import PolicyError, approve_policy_file, clear_policy, describe

    if args.clear_policy:
        done = clear_policy(state)
        print("run policy withdrawn (the node config's ranges still hold)" if done else f"no run policy in {state}")
        return 0
    try:
        rules = approve_policy_file(state, Path(args.policy), note=args.note)
    except PolicyError as err:
        print(f"fl-client approve: {err}", file=sys.stderr)
        return 2
    print(f"run policy approved in {state}: runs outside it are refused before anything is read or spent")
    for key, rule in rules.items():
        print(f"  {describe(key, rule)}")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    from client.approval import ApprovalError, approve, installed_bundle, load_approvals, revoke

    state = Path(args.state_dir)
    if args.policy or args.clear_policy:
        return _approve_policy(args, state)
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


def cmd_audit(args: argparse.Namespace) -> int:
    """Print or verify the site's audit log: exit 0 when the chain holds, 1 when it does not, 2 on bad input."""
    from common.audit import AuditError, audit_path, read_entries, render_entry, verify
    from common.audit_anchor import anchor_hint

    path = audit_path(Path(args.state_dir).resolve())
    try:
        report = verify(path, anchor=args.anchor)
    except AuditError as err:
        print(f"fl-client audit: {err}", file=sys.stderr)
        return 2
    code = 0 if report.ok else 1
    if args.verify:
        print(json.dumps(report.to_json()) if args.json else report.summary())
        return code
    entries = read_entries(path)
    if args.json:
        print(json.dumps({"entries": entries, "verify": report.to_json()}, indent=2))
        return code
    for entry in entries:
        print(render_entry(entry))
    print(report.summary())
    print(anchor_hint(report, "fl-client audit"))
    return code


def cmd_start(args: argparse.Namespace) -> int:
    from client.approval import approved_hashes
    from client.check import summarize
    from client.join import JoinError, probe_coordinator, run_site, write_node_config
    from client.provision import ProvisionError, load_site_identity
    from common.cache import SiteCache
    from common.config_fields import ConfigError
    from common.dataset import site_salt

    def fail(message: str) -> int:
        print(f"fl-client start: {message}", file=sys.stderr)
        return 2

    try:
        identity = load_site_identity(args.kit)
    except ProvisionError as err:
        return fail(str(err))
    state = Path(args.state_dir).resolve()  # the site home's state/ unless given (client/site_home.py)
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
        extra = dict(item.split("=", 1) for item in args.site_setting if "=" in item)
        bad = [item for item in args.site_setting if "=" not in item]
        if bad:
            return fail(f"--site-setting expects KEY=VALUE, got {bad[0]!r}")
        node_config = write_node_config(state, data, identity.site, args.max_epsilon, args.delta, args.allow_no_dp,
                                        args.device, extra)
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


def cmd_status(args: argparse.Namespace) -> int:
    from client.status import StatusError, ledger_status, render_status

    try:
        status = ledger_status(args.state_dir)
    except StatusError as err:
        print(f"fl-client status: {err}", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    return 0


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 0.9:
        raise argparse.ArgumentTypeError(f"{text}: give a share of patients in (0, 0.9], e.g. 0.2")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-client", description="fedxray hospital client")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"fl-client (fedxray) {fedxray_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="summarise a site data folder before joining (reads only)")
    p.add_argument("data_dir", nargs="?", help="the site's DICOM folder (labels.csv, class subfolders, or none yet)")
    p.add_argument("--data", help="the same folder (as `evaluate` and `start` take it)")
    p.add_argument("--state-dir", help="use (and fill) the site cache and salt in this folder (default: SITE_HOME/state "
                   "where it exists)")
    p.add_argument("--task", choices=("binary", "multiclass", "multilabel"), help="task to preview the split for")
    p.add_argument("--labels", help="comma-separated run labels (binary: the positive finding)")
    p.add_argument("--label-column", help="labels.csv column holding the classes or findings (e.g. subtype); "
                   "default: chosen from the table (docs/tasks.md)")
    p.add_argument("--uncertain", choices=("ignore", "positive", "negative"), default="ignore",
                   help="what a finding column's -1 means (the run's `uncertain` setting)")
    p.add_argument("--blank", choices=("negative", "ignore"), default="negative",
                   help="what an empty finding cell means (the run's `blank` setting)")
    p.add_argument("--label-map", help="this site's names -> the federation's: 'Pleural effusion=Effusion; ...' or a "
                   "file of such lines (node config label-map)")
    p.add_argument("--val-fraction", type=_fraction, default=0.2,
                   help="share of patients for validation (the site's node-config val-fraction; the split is keyed by "
                        "the site's salt, so give --state-dir to see the split training will use)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--list-skipped", action="store_true", help="also list skipped files (local paths)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("init", help="make this site's keys and the request to send to the coordinator")
    p.add_argument("--site", required=True, help="site name: lowercase letters, digits and '-' (1-40)")
    p.add_argument("--dir", help="folder for the keys and request (default: the site home)")
    p.add_argument("--force", action="store_true", help="replace existing keys (the coordinator must admit the new request)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("approve", help="approve an app bundle (by sha256): this site runs only approved bundles")
    p.add_argument("hash", nargs="?", help="the bundle's sha256, as fl-server run prints it")
    p.add_argument("--installed", action="store_true", help="approve the bundle of the fedxray version installed here")
    p.add_argument("--dry-run", action="store_true", help="with --installed: print the hash, approve nothing")
    p.add_argument("--revoke", action="store_true", help="withdraw the approval instead")
    p.add_argument("--list", action="store_true", help="list approved bundles")
    p.add_argument("--note", default="", help="why (e.g. release reviewed on 2026-11-20 by IT security)")
    p.add_argument("--policy", metavar="FILE", help="approve the run settings this site accepts: a TOML file of "
                   "`setting = value`, `setting = { min = .., max = .. }` or `setting = { one-of = [..] }` lines")
    p.add_argument("--clear-policy", action="store_true", help="withdraw the run policy (the node config's ranges stay)")
    p.add_argument("--state-dir", help="the site's state dir (default: SITE_HOME/state)")
    p.set_defaults(func=cmd_approve)

    from common.audit_anchor import ANCHOR_HELP

    p = sub.add_parser("audit", help="this site's audit log: approvals, rounds trained and refused, evaluations answered",
                       description="This site's hash-chained audit log. " + ANCHOR_HELP.replace(
                           "(and every `fl-server run`) ", ""))
    p.add_argument("--state-dir", help="the site's state dir (default: SITE_HOME/state)")
    p.add_argument("--verify", action="store_true",
                   help="only check the hash chain: one line, exit 0 if intact, 1 naming the first bad line")
    p.add_argument("--anchor", metavar="HASH",
                   help="a head hash recorded earlier (audit prints it): also fail if lines after it were removed")
    p.add_argument("--json", action="store_true", help="print the entries and the check as JSON")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("start", help="join the federation: check data, probe the coordinator, run the SuperNode")
    p.add_argument("--kit", help="site folder: keys from fl-client init plus the kit files (default: the site home)")
    p.add_argument("--data", required=True, help="the site's DICOM folder (labels.csv or class subfolders)")
    p.add_argument("--coordinator", help="HOST:PORT of the coordinator (default: from coordinator.json in the kit)")
    p.add_argument("--state-dir", help="ledger, salt, cache, approvals, logs (default: KIT/state, i.e. SITE_HOME/state)")
    p.add_argument("--max-epsilon", type=float, default=10.0, help="this site's privacy budget over all runs (default 10)")
    p.add_argument("--delta", type=float, default=1e-5, help="DP delta this site accepts at most (default 1e-5)")
    p.add_argument("--allow-no-dp", action="store_true", help="let runs train here without DP (off by default)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="training device (default auto)")
    p.add_argument("--site-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="another site setting: val-fraction, eval-noise, max-evaluations, max-image-size, "
                        "max-local-epochs, max-batch-size, max-rounds, max-run-epsilon (docs/privacy.md)")
    p.add_argument("--rejoin-wait", type=float, default=150.0, metavar="S",
                   help="after a crash, keep retrying a refused activation this long (default 150 s)")
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("evaluate", help="score an ONNX model on this site's labelled data")
    p.add_argument("--model", required=True, help="model.onnx from a fedxray run")
    p.add_argument("--data", required=True, help="labelled site folder (labels.csv or class subfolders)")
    p.add_argument("--out", help="folder for evaluation.json and roc.png")
    p.add_argument("--state-dir", help="the site's state dir, for its salt (default: SITE_HOME/state where it exists)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUC interval")
    p.add_argument("--positive", metavar="CLASS", help="binary models: the site's class that is the model's positive "
                   "finding, when named otherwise here (e.g. PNEUMONIA for a model of 'opacity')")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-gate", action="store_true", help="research only: score every image, also those outside the "
                   "model's intended use (the report says the gate was off)")
    p.set_defaults(func=cmd_evaluate)

    add_accept_parser(sub)

    p = sub.add_parser("status", help="this site's privacy budget: spent epsilon per patient group, every charge, refusals")
    p.add_argument("--state-dir", help="the site's state dir (default: SITE_HOME/state)")
    p.add_argument("--json", action="store_true", help="one JSON object (interface 6, docs/interfaces.md)")
    p.set_defaults(func=cmd_status)
    for p in sub.choices.values():  # one site home for every subcommand (client/site_home.py)
        add_site_home_argument(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall shared cores
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    announce(apply_site_home(args, resolve_site_home(getattr(args, "site_home", None))))
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
