"""The coordinator's hold on its local SuperLink: local auth, the `flwr` CLI, the registered site keys.

``fl-server start`` gives the SuperLink's Control API a fresh token and its Runtime API a fresh
SuperExec secret (0600, in 0700 folders), and points the stock `flwr` CLI at loopback with that
token (:func:`prepare_local_auth`). Everything else here talks to the running SuperLink through
that CLI: listing nodes, registering the keys of admitted sites (each checked first, see
:func:`server.sites.check_binding`), unregistering removed ones and naming keys nobody admitted.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from typing import Any

from common.cache import atomic_write_durable
from common.processes import offline_env, write_local_secret
from server import pki
from server import sites as site_table
from server.layout import CoordinatorError, Layout, make_private

CONNECTION = "fedxray"
#: Node statuses of `flwr supernode list` for a key that is no longer registered.
UNREGISTERED = ("unregistered", "deleted")


def write_flwr_config(layout: Layout, superlink_port: int) -> None:
    """The `flwr` CLI's connection to the local SuperLink, and its login: the Control token.

    The connection goes to loopback with TLS verified against the federation CA. The token is
    stored where Flower's CLI keeps account tokens (``credentials.yaml``, as an ``oidc`` login), so
    the stock CLI sends it as ``Authorization: Bearer``; no other local user can read it (0600 in
    a 0700 folder).
    """
    layout.flwr_home.mkdir(mode=0o700, parents=True, exist_ok=True)
    (layout.flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{superlink_port}"\nroot-certificates = "{layout.pki / "ca.pem"}"\n'
    )
    host = f"127.0.0.1:{superlink_port}"
    token = layout.control_token.read_bytes().strip()
    entries = {"authn-type": b"oidc", "oidc-access-token": token, "oidc-refresh-token": b"none"}
    credentials = {f"flower.account-auth.{host}.{key}": base64.b64encode(value).decode() for key, value in entries.items()}
    atomic_write_durable(layout.flwr_home / "credentials.yaml", json.dumps(credentials).encode(), 0o600)  # JSON is YAML


def superlink_command(layout: Layout, superlink_port: int) -> list[str]:
    """The SuperLink as ``fl-server start`` runs it (server/superlink.py adds the local-API protection)."""
    return [sys.executable, "-m", "server.superlink",
            "--control-token-file", str(layout.control_token), "--superexec-secret-file", str(layout.superexec_secret),
            "--ssl-certfile", str(layout.pki / "server.pem"), "--ssl-keyfile", str(layout.pki / "server.key"),
            "--ssl-ca-certfile", str(layout.pki / "ca.pem"),
            "--enable-supernode-auth", "--database", str(layout.state_db),
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(superlink_port)]


def prepare_local_auth(layout: Layout, superlink_port: int) -> None:
    """Private folders, a new Control token and SuperExec secret, and the `flwr` CLI's connection."""
    make_private(layout)
    write_local_secret(layout.control_token)
    write_local_secret(layout.superexec_secret)
    write_flwr_config(layout, superlink_port)


def flwr(layout: Layout, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run a `flwr` CLI command against the local SuperLink's Control API."""
    env = offline_env(layout.flwr_home)
    return subprocess.run(["flwr", *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=layout.root)


def json_out(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    """The JSON a `flwr ... --format json` command printed (after any banner), or CoordinatorError."""
    text = proc.stdout.strip()
    start = text.find("{")
    if start < 0:
        raise CoordinatorError(f"`flwr` gave no JSON (exit {proc.returncode}): {one_line(proc.stderr or text)[-300:]}")
    return json.loads(text[start:])


def one_line(text: object) -> str:
    """Flower's CLI messages span lines; fedxray's errors are one line."""
    return " ".join(str(text).split())


def list_nodes(layout: Layout) -> dict[int, dict[str, Any]]:
    """The SuperLink's nodes by node id (``flwr supernode list``), unregistered ones included."""
    out = json_out(flwr(layout, "supernode", "list", CONNECTION, "--format", "json"))
    if not out.get("success", True):
        raise CoordinatorError(f"could not list the SuperLink's nodes: {one_line(out.get('error-message', out))} "
                               "(run fl-server as the coordinator's service user)")
    return {int(node["node-id"]): node for node in out.get("nodes", [])}


def register_pending(layout: Layout, *, refused: list[str] | None = None) -> list[str]:
    """Register every admitted, not yet registered site key with the running SuperLink.

    Each key is checked first (:func:`server.site_table.check_binding`). A key that fails raises
    CoordinatorError, or, when a ``refused`` list is given (``fl-server start``), is skipped and its
    one-line reason appended there, so one tampered site does not keep the others out.
    """
    done = []
    for site in site_table.pending_registrations(layout.root):
        try:
            site_table.check_binding(layout.root, site["site"])
        except pki.ProvisionError as err:
            if refused is None:
                raise CoordinatorError(str(err)) from None
            refused.append(str(err))
            continue
        pub = layout.root / "sites" / site["site"] / "auth.pub"
        out = json_out(flwr(layout, "supernode", "register", str(pub), CONNECTION, "--name", site["site"],
                             "--format", "json"))
        if not out.get("success"):
            raise CoordinatorError(f"could not register site {site['site']}: {one_line(out.get('error-message', out))}")
        site_table.record_node_id(layout.root, site["site"], int(out["node-id"]))
        done.append(site["site"])
    return done


def unregister(layout: Layout, node_id: int) -> None:
    """Unregister ``node_id``'s key from the running SuperLink (``flwr supernode unregister``)."""
    out = json_out(flwr(layout, "supernode", "unregister", str(node_id), CONNECTION, "--format", "json"))
    if not out.get("success"):
        raise CoordinatorError(f"could not unregister node {node_id}: {one_line(out.get('error-message', out))}")


def unregister_revoked(layout: Layout, nodes: dict[int, dict[str, Any]] | None = None) -> list[str]:
    """Unregister the keys of removed sites that the SuperLink still has (e.g. removed while stopped)."""
    nodes = list_nodes(layout) if nodes is None else nodes
    done = []
    for gone in site_table.revoked_registrations(layout.root):
        node = nodes.get(gone["node_id"])
        if node is not None and node.get("status") not in UNREGISTERED:
            unregister(layout, gone["node_id"])
            done.append(f"{gone['site']} (node {gone['node_id']})")
    return done


def unadmitted_nodes(layout: Layout, nodes: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Nodes registered in the SuperLink that no admitted site owns: registered behind fedxray's back.

    Each item: {node_id, status, removed_site (the removed site whose key it was, or null)}.
    """
    admitted = {int(r["node_id"]) for r in site_table.list_sites(layout.root) if not r.get("revoked") and r.get("node_id") is not None}
    removed = {r["node_id"]: r["site"] for r in site_table.revoked_registrations(layout.root)}
    return [{"node_id": node_id, "status": node.get("status"), "removed_site": removed.get(node_id)}
            for node_id, node in sorted(nodes.items())
            if node_id not in admitted and node.get("status") not in UNREGISTERED]


def unadmitted_warning(layout: Layout, node: dict[str, Any]) -> str:
    """One line for a node that fedxray did not admit, with the command that removes it."""
    whose = (f"the key of removed site {node['removed_site']}" if node["removed_site"]
             else "a key no admitted site owns")
    return (f"node {node['node_id']} ({node['status']}) is registered in the SuperLink with {whose}: remove it with "
            f"FLWR_HOME={layout.flwr_home} flwr supernode unregister {node['node_id']} {CONNECTION}, "
            "and find out who registered it")
