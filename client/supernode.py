"""Flower's SuperNode, with the site's TLS client certificate (mutual TLS at the fleet proxy).

Flower's SuperNode verifies the coordinator's certificate but cannot present one of its own: the
Fleet client builds its ``ssl.SSLContext`` from the root certificates only. The federation's proxy
requires a client certificate signed by the federation CA, so this launcher runs the unchanged
``flower-supernode`` entry point in-process after replacing one constructor,
``FleetHttpClient.from_server_address``, with one whose context also loads the site's certificate
and key. Nothing else in Flower is touched; the Runtime API client (loopback) is unaffected.

With ``--parent-pid PID`` the SuperNode stops itself (gracefully: Flower's SIGTERM handling) as
soon as that process is gone. ``fl-client start`` passes its own pid: a ``kill -9`` of the
supervisor must not leave a SuperNode holding the site's identity (it kept training for the
coordinator, and a restarted ``fl-client start`` was refused as a second session of the same key).

    python -m client.supernode --client-cert client.pem --client-key tls.key [--parent-pid PID] -- <flower-supernode args>

``fl-client start`` builds this command; hospitals do not call it by hand.
"""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import sys
import time

from common.processes import watch_parent

#: After SIGTERM to itself, how long Flower's graceful exit may take before the process is ended hard.
GRACEFUL_EXIT_S = 10.0


def client_context(ca_cert: str, client_cert: str, client_key: str) -> ssl.SSLContext:
    """TLS context that verifies the coordinator against the federation CA and presents the site's cert."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=ca_cert)
    ctx.load_cert_chain(certfile=client_cert, keyfile=client_key)
    return ctx


def install_client_certificate(client_cert: str, client_key: str) -> None:
    """Make Flower's Fleet client present ``client_cert`` when it dials the coordinator over TLS."""
    from flwr.supernode.fleet_http_client import FleetHttpClient

    original = FleetHttpClient.from_server_address.__func__  # type: ignore[attr-defined]

    def from_server_address(cls, server_address, insecure, root_certificates, interceptors, *, retry_invoker=None):
        if insecure or root_certificates is None:
            return original(cls, server_address, insecure, root_certificates, interceptors, retry_invoker=retry_invoker)
        ca = root_certificates if isinstance(root_certificates, str) else None
        if ca is None:  # bytes: PEM content
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_verify_locations(cadata=root_certificates.decode("ascii"))
            ctx.load_cert_chain(certfile=client_cert, keyfile=client_key)
        else:
            ctx = client_context(ca, client_cert, client_key)
        return cls(f"https://{server_address}", interceptors=interceptors, verify=ctx, retry_invoker=retry_invoker)

    FleetHttpClient.from_server_address = classmethod(from_server_address)  # type: ignore[method-assign]


def _stop_self() -> None:
    """The supervisor is gone: leave like a stopped SuperNode (deactivate at the SuperLink), or hard."""
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACEFUL_EXIT_S)
    os._exit(1)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m client.supernode", description=__doc__.splitlines()[0])
    ap.add_argument("--client-cert", required=True)
    ap.add_argument("--client-key", required=True)
    ap.add_argument("--parent-pid", type=int, help="stop when this process (fl-client start) is gone")
    split = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:split])
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    install_client_certificate(args.client_cert, args.client_key)
    if args.parent_pid is not None:
        watch_parent(args.parent_pid, _stop_self)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *argv[split + 1:]]
    flower_supernode()


if __name__ == "__main__":
    main()
