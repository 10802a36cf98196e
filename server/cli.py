"""`fl-server`: the coordinator's command line.

One subparser and one ``cmd_*`` function per subcommand, each importing what it needs inside, so
``fl-server --help`` and the provisioning commands start without importing Flower or torch.
Provisioning (server/pki.py): ``init`` (CA, server certificate, CRL), ``admit`` (a site's request
-> its certificate and kit), ``remove`` (revoke), ``sites`` (the table). Errors are one line on
stderr, ``fl-server <cmd>: <message>``, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

DEFAULT_DIR = "fedxray-coordinator"


def _fail(command: str, err: Exception) -> int:
    print(f"fl-server {command}: {err}", file=sys.stderr)
    return 2


def cmd_init(args: argparse.Namespace) -> int:
    from server.pki import ProvisionError, federation_paths, init_federation, load_federation

    try:
        root = init_federation(args.dir, args.address, sans=args.san, name=args.name, force=args.force)
    except ProvisionError as err:
        return _fail("init", err)
    paths, federation = federation_paths(root), load_federation(root)
    print(f"federation {federation['federation']} created in {root}")
    print(f"  CA certificate      {paths.ca_cert}   (give to sites in every kit)")
    print(f"  CA key              {paths.ca_key}   (private: never copy it; back it up offline)")
    print(f"  server certificate  {paths.server_cert}   SANs: {', '.join(federation['sans'])}")
    print(f"  CRL                 {paths.crl}")
    print(f"sites dial {federation['address']}. Next: fl-server admit SITE.request.json --dir {root} for each hospital.")
    return 0


def cmd_admit(args: argparse.Namespace) -> int:
    from server.pki import ProvisionError, admit, federation_paths, read_request

    try:
        request = read_request(args.request)
        kit = admit(args.dir, args.request, out=args.out)
    except ProvisionError as err:
        return _fail("admit", err)
    site_dir = federation_paths(args.dir).site(request.site)
    print(f"admitted site {request.site}: certificate and SuperNode key in {site_dir}")
    print(f"check code {request.check_code}: it must equal the one fl-client init showed the site")
    print(f"kit: {kit} (ca.pem, client.pem, coordinator.json; no private keys)")
    print(f"next: send the kit to {request.site}; they copy the three files into their fedxray-site folder")
    print("the SuperNode key is recorded, not yet registered with the SuperLink (node_id pending)")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from server.pki import ProvisionError, list_sites, revoke

    try:
        before = {row["site"]: row for row in list_sites(args.dir)}
        node_id = revoke(args.dir, args.site)
    except ProvisionError as err:
        return _fail("remove", err)
    if before[args.site].get("revoked"):
        print(f"site {args.site} was already removed on {before[args.site]['revoked']} (CRL checked)")
    else:
        print(f"site {args.site} removed: certificate revoked in the CRL (files kept for audit)")
    print("reload the fleet proxy (nginx -s reload) so that it reads the new CRL")
    if node_id is not None:
        print(f"unregister its SuperNode from the SuperLink: flwr supernode unregister {node_id}")
    return 0


def cmd_sites(args: argparse.Namespace) -> int:
    from server.pki import ProvisionError, list_sites

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

    p = sub.add_parser("sites", help="list the sites: admitted, removed, registered, certificate expiry")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"federation folder (default ./{DEFAULT_DIR})")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_sites)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
