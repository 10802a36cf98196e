"""`fl-server`: the coordinator's command line.

One subparser and one ``cmd_*`` function per subcommand, each importing what it needs inside, so
``fl-server --help`` and the provisioning commands start without importing Flower or torch.
Provisioning (server/pki.py): ``init`` (CA, server certificate, CRL), ``admit`` (a site's request
-> its certificate and kit; its key registered when the coordinator runs), ``remove`` (revoke,
proxy reload, unregister), ``renew-crl`` (a fresh year for the CRL), ``sites`` (the table).
Operation (server/coordinator.py): ``start``/``stop`` (SuperLink behind the mutual-TLS fleet
proxy), ``status``; runs (server/runs.py): ``run``, ``resume``, ``stop-run``. Records: ``audit`` (the federation's
hash-chained audit log, server/audit.py; ``--verify`` checks it). Errors are one line on stderr,
``fl-server <cmd>: <message>``, and exit code 2; warnings are one line each, ``warning: ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from common.cli import fedxray_version

DEFAULT_DIR = "fedxray-coordinator"


def _fail(command: str, err: Exception) -> int:
    print(f"fl-server {command}: {err}", file=sys.stderr)
    return 2


def cmd_init(args: argparse.Namespace) -> int:
    from server.audit import record_coordinator
    from server.pki import ProvisionError, federation_paths, init_federation, load_federation

    try:
        root = init_federation(args.dir, args.address, sans=args.san, name=args.name, force=args.force)
    except ProvisionError as err:
        return _fail("init", err)
    paths, federation = federation_paths(root), load_federation(root)
    problem = record_coordinator(root, "federation-created", federation=federation["federation"],
                                 address=federation["address"], sans=federation["sans"], replaced=bool(args.force))
    if problem:
        print(f"fl-server init: warning: audit log: {problem}", file=sys.stderr)
    print(f"federation {federation['federation']} created in {root}")
    print(f"  CA certificate      {paths.ca_cert}   (give to sites in every kit)")
    print(f"  CA key              {paths.ca_key}   (private: never copy it; back it up offline)")
    print(f"  server certificate  {paths.server_cert}   SANs: {', '.join(federation['sans'])}")
    print(f"  CRL                 {paths.crl}")
    print(f"sites dial {federation['address']}. Next: fl-server admit SITE.request.json --dir {root} for each hospital.")
    return 0


def cmd_admit(args: argparse.Namespace) -> int:
    from server.coordinator import CoordinatorError, admit_site
    from server.pki import ProvisionError, federation_paths
    from server.sites import read_request

    try:
        request = read_request(args.request)
        kit, registered = admit_site(args.dir, args.request, out=args.out)
    except (ProvisionError, CoordinatorError) as err:
        return _fail("admit", err)
    site_dir = federation_paths(args.dir).site(request.site)
    print(f"admitted site {request.site}: certificate and SuperNode key in {site_dir}")
    print(f"check code {request.check_code}: it must equal the one fl-client init showed the site")
    print(f"kit: {kit} (ca.pem, client.pem, coordinator.json; no private keys)")
    print(f"next: send the kit to {request.site}; they copy the three files into their fedxray-site folder")
    if registered:
        print("its SuperNode key is registered with the running SuperLink: the site can join now")
    else:
        print("its SuperNode key is recorded and will be registered when the coordinator starts (fl-server start)")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from pathlib import Path

    from server.coordinator import CoordinatorError, Layout, remove_site, running_state
    from server.pki import ProvisionError
    from server.sites import list_sites

    try:
        before = {row["site"]: row for row in list_sites(args.dir)}
        if args.site not in before:
            raise ProvisionError(f"no site {args.site} in {args.dir}; admitted: {', '.join(sorted(before)) or 'none'}")
        running = running_state(Layout(Path(args.dir).resolve())) is not None
        remove_site(args.dir, args.site)
    except (ProvisionError, CoordinatorError) as err:
        return _fail("remove", err)
    if before[args.site].get("revoked"):
        print(f"site {args.site} was already removed on {before[args.site]['revoked']} (CRL checked)")
    else:
        print(f"site {args.site} removed: certificate revoked in the CRL (files kept for audit)")
    if running:
        print("the fleet proxy reloaded the CRL (the certificate is refused), then its SuperNode key was unregistered: "
              "the site is out now")
    else:
        print("the coordinator is not running: the next fl-server start serves the new CRL")
        node_id = before[args.site].get("node_id")
        if node_id is not None:
            print(f"its SuperNode key stays registered until then: once started, run flwr supernode unregister {node_id} "
                  f"(FLWR_HOME={Path(args.dir).resolve() / 'flwr-home'}) or fl-server remove {args.site} again")
    return 0


def cmd_renew_crl(args: argparse.Namespace) -> int:
    from pathlib import Path

    from server.coordinator import CoordinatorError, renew_crl
    from server.pki import ProvisionError, crl_state

    try:
        reloaded = renew_crl(Path(args.dir))
        state = crl_state(args.dir)
    except (ProvisionError, CoordinatorError) as err:
        return _fail("renew-crl", err)
    print(f"CRL re-signed: {state.revoked} revoked certificate(s), valid until {state.next_update.isoformat()}")
    print("the running fleet proxy loaded it" if reloaded else "the next fl-server start serves it")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from pathlib import Path

    from server.coordinator import CoordinatorError, start
    from server.pki import ProvisionError
    from server.proxy import ProxyError

    try:
        return start(Path(args.dir), listen_host=args.listen_host, listen_port=args.listen_port,
                     superlink_port=args.superlink_port)
    except (CoordinatorError, ProvisionError, ProxyError) as err:
        return _fail("start", err)


def cmd_stop(args: argparse.Namespace) -> int:
    from pathlib import Path

    from server.coordinator import stop

    if not stop(Path(args.dir)):
        print(f"fl-server stop: no coordinator is running for {args.dir}")
        return 1
    print("coordinator stopped")
    return 0


def _print_launch(record: dict) -> None:
    from server.audit import audit_head_line

    print(f"run {record['run_name']} started (Flower run id {record['run_id']})")
    print(f"app bundle sha256 {record['bundle']}: each site must have approved it (fl-client approve HASH)")
    print(f"results in {record['run_dir']}; follow with fl-server status", flush=True)
    print(audit_head_line(record["run_dir"]))


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from common.cli import parse_settings
    from server.coordinator import CoordinatorError
    from server.runs import launch

    try:  # with --follow the launch is printed before the run's log, not after the run
        record = launch(Path(args.dir), config_file=Path(args.config) if args.config else None,
                        overrides=parse_settings(args.set, "-c"), follow=args.follow, on_launched=_print_launch)
    except (CoordinatorError, ValueError) as err:
        return _fail("run", err)
    if not args.follow:
        _print_launch(record)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from pathlib import Path

    from server.coordinator import CoordinatorError
    from server.runs import resume

    try:
        record = resume(Path(args.dir), args.run, follow=args.follow, on_launched=_print_launch)
    except CoordinatorError as err:
        return _fail("resume", err)
    if not args.follow:
        _print_launch(record)
    return 0


def cmd_stop_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from server.coordinator import CoordinatorError
    from server.runs import stop_run

    try:
        record = stop_run(Path(args.dir), args.run)
    except CoordinatorError as err:
        return _fail("stop-run", err)
    print(f"run {args.run} stopped (Flower run id {record['run_id']}); its checkpoints stay: continue it with "
          f"fl-server resume {args.run}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Print or verify the federation's audit log: exit 0 when the chain holds, 1 when it does not, 2 on bad input."""
    from pathlib import Path

    from common.audit import AuditError, read_entries, render_entry, verify
    from common.audit_anchor import anchor_hint
    from server.audit import coordinator_log
    from server.pki import ProvisionError, load_federation

    try:
        load_federation(args.dir)
        path = coordinator_log(Path(args.dir).resolve())
        report = verify(path, anchor=args.anchor)
    except (ProvisionError, AuditError) as err:
        return _fail("audit", err)
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
    print(anchor_hint(report, "fl-server audit"))
    return code


def cmd_status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from server.coordinator import CoordinatorError, status
    from server.pki import ProvisionError

    try:
        doc = status(Path(args.dir))
    except (CoordinatorError, ProvisionError) as err:
        return _fail("status", err)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    for warning in doc["warnings"]:
        print(f"warning: {warning}")
    print(f"federation {doc['federation']} at {doc['address']}: coordinator {'running' if doc['running'] else 'stopped'}")
    print("sites:")
    for site in doc["sites"]:
        state = "removed" if site["revoked"] else site["status"]
        print(f"  {site['site']:<24} {state}")
    for node in doc["unadmitted_nodes"]:
        print(f"  {'node ' + str(node['node_id']):<24} {node['status']}, NOT ADMITTED by fedxray")
    if not doc["runs"]:
        print("runs: none yet (fl-server run)")
    for run in doc["runs"]:
        eps = ", ".join(f"{k} {v:.2f}" for k, v in sorted(run["epsilon"].items()))
        auc = "-" if run["pooled_auc"] is None else f"{run['pooled_auc']:.3f}"
        print(f"  run {run['run']}: {run['rounds_done']} round(s), pooled AUC {auc}, epsilon {eps or '-'}"
              f"{' (finished)' if run['finished'] else ''}")
    return 0


def cmd_sites(args: argparse.Namespace) -> int:
    from server.pki import ProvisionError
    from server.sites import list_sites

    try:
        rows = list_sites(args.dir)
    except ProvisionError as err:
        return _fail("sites", err)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no sites admitted yet: fl-server admit SITE.request.json")
        return 0
    header = ("SITE", "ADMITTED", "REVOKED", "NODE ID", "CERT EXPIRES")
    table = [(r["site"], r["admitted"], r["revoked"] or "-", "pending" if r["node_id"] is None else str(r["node_id"]),
              r["cert_expires"] or "?") for r in rows]
    widths = [max(len(row[i]) for row in (header, *table)) for i in range(len(header))]
    for row in (header, *table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-server", description="fedxray coordinator")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"fl-server (fedxray) {fedxray_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create the federation: CA, server certificate, CRL")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"federation folder (default ./{DEFAULT_DIR})")
    p.add_argument("--address", required=True, help="HOST:PORT that hospitals dial (the fleet proxy)")
    p.add_argument("--san", action="append", default=[], help="extra DNS name or IP for the server certificate (repeatable)")
    p.add_argument("--name", default="fedxray", help="federation name")
    p.add_argument("--force", action="store_true", help="replace an existing federation (moved to replaced-<time>/)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("admit", help="admit a site: check its request, sign its certificate, write its kit")
    p.add_argument("request", help="SITE.request.json from fl-client init")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"federation folder (default ./{DEFAULT_DIR})")
    p.add_argument("--out", help="kit folder (default DIR/kits/SITE)")
    p.set_defaults(func=cmd_admit)

    p = sub.add_parser("remove", help="remove a site: revoke its certificate (files kept for audit)")
    p.add_argument("site")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"federation folder (default ./{DEFAULT_DIR})")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("renew-crl", help="re-sign the CRL for another year (needs pki/ca.key); reloads a running proxy")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"federation folder (default ./{DEFAULT_DIR})")
    p.set_defaults(func=cmd_renew_crl)

    p = sub.add_parser("sites", help="list the sites: admitted, removed, registered, certificate expiry")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"federation folder (default ./{DEFAULT_DIR})")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_sites)

    p = sub.add_parser("start", help="run the SuperLink (TLS, node auth, state database) behind the mutual-TLS fleet proxy")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"federation folder (default ./{DEFAULT_DIR})")
    p.add_argument("--listen-host", default="0.0.0.0", help="interface the fleet proxy listens on (default all)")  # noqa: S104
    p.add_argument("--listen-port", type=int, help="proxy port (default: the port of the federation address)")
    p.add_argument("--superlink-port", type=int,
                   help="the SuperLink's loopback port (default: a free one); fix it to name it in a firewall rule")
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("stop", help="stop a running coordinator (SuperLink and proxy)")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"federation folder (default ./{DEFAULT_DIR})")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("run", help="launch a run of the fedxray app on the running coordinator")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"federation folder (default ./{DEFAULT_DIR})")
    p.add_argument("--config", help="TOML file of run settings (keys as in pyproject's [tool.flwr.app.config])")
    p.add_argument("-c", "--set", action="append", default=[], metavar="KEY=VALUE", help="one run setting (repeatable)")
    p.add_argument("--follow", action="store_true", help="stream the run's log until it ends")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", help="continue a run from its last checkpoint with the rounds it has left")
    p.add_argument("run", help="run name (folder under DIR/runs)")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"federation folder (default ./{DEFAULT_DIR})")
    p.add_argument("--follow", action="store_true", help="stream the run's log until it ends")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("stop-run", help="stop a run launched here (its checkpoints stay; fl-server resume continues it)")
    p.add_argument("run", help="run name (folder under DIR/runs)")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"federation folder (default ./{DEFAULT_DIR})")
    p.set_defaults(func=cmd_stop_run)

    from common.audit_anchor import ANCHOR_HELP

    p = sub.add_parser("audit", help="the federation's audit log: who admitted, removed, launched, stopped what, when",
                       description="The federation's hash-chained audit log. " + ANCHOR_HELP)
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"federation folder (default ./{DEFAULT_DIR})")
    p.add_argument("--verify", action="store_true",
                   help="only check the hash chain: one line, exit 0 if intact, 1 naming the first bad line")
    p.add_argument("--anchor", metavar="HASH",
                   help="a head hash recorded earlier (audit prints it): also fail if lines after it were removed")
    p.add_argument("--json", action="store_true", help="print the entries and the check as JSON")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("status", help="sites online, runs, current round, epsilon per site")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"federation folder (default ./{DEFAULT_DIR})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
