"""``fl-predict serve`` from its flags to a running listener: who may connect, TLS, limits, signals.

The defaults are the closed ones: the listener binds 127.0.0.1 unless ``--host`` names the
hospital-facing address, accepts only the calling AE titles of ``--calling-aet`` (or, saying so
explicitly, ``--any-calling-aet``), and logs one warning at start when DICOM runs without TLS.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import ssl
import tempfile
import threading
from pathlib import Path

from clinic.forward import Destination
from clinic.log_values import OneLineRecords
from clinic.model import Scorer
from clinic.serve import Listener
from clinic.serve_limits import Limits

logger = logging.getLogger(__name__)


def server_tls(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext | None:
    """TLS for the listener: a certificate and key; with ``ca``, client certificates are required."""
    if not cert and not key:
        if ca:
            raise ValueError("--tls-ca needs --tls-cert and --tls-key: the listener must have its own certificate")
        return None
    if not (cert and key):
        raise ValueError("--tls-cert and --tls-key go together: give both PEM files")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(ca)
    return ctx


def client_tls(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """TLS for forwarding: verify the destination against ``ca``; optionally present a client certificate."""
    if not ca:
        if cert or key:
            raise ValueError("--forward-tls-cert/--forward-tls-key need --forward-tls-ca to verify the destination")
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert or key:
        if not (cert and key):
            raise ValueError("--forward-tls-cert and --forward-tls-key go together: give both PEM files")
        ctx.load_cert_chain(cert, key)
    return ctx


def plain_dicom_warning(tls_in: ssl.SSLContext | None, tls_out: ssl.SSLContext | None, forward: Destination | None) -> str | None:
    """The one start-up warning when images or results cross the network without TLS; None when all is TLS."""
    plain = [what for what, clear in (("receiving", tls_in is None), ("forwarding", forward is not None and tls_out is None)) if clear]
    if not plain:
        return None
    return (f"DICOM {' and '.join(plain)} without TLS: patient images and results cross the network readable and unauthenticated; "
            "use --tls-cert/--tls-key/--tls-ca (and --forward-tls-ca), or keep the DICOM port on an isolated network")


def serve_main(args: argparse.Namespace) -> int:
    """Run the listener until SIGTERM / SIGINT; returns the exit status."""
    logging.getLogger("clinic").setLevel(logging.INFO)  # a service logs one line per image
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(OneLineRecords())  # no received value starts a line of its own (pynetdicom's lines too)
    try:
        forward = Destination.parse(args.forward) if args.forward else None
        tls_in = server_tls(args.tls_cert, args.tls_key, args.tls_ca)
        tls_out = client_tls(args.forward_tls_ca, args.forward_tls_cert, args.forward_tls_key)
        limits = Limits(max_pixels=args.max_pixels, max_associations=args.max_associations,
                        max_per_peer=args.max_associations_per_peer, idle_timeout=args.idle_timeout)
        calling = _calling_aets(args)
    except (ValueError, OSError, ssl.SSLError) as err:
        print(f"fl-predict serve: {err}", flush=True)
        return 2
    if len(args.ae_title) > 16:
        print(f"fl-predict serve: --ae-title {args.ae_title!r} is longer than 16 characters", flush=True)
        return 2
    temporary = None
    if args.out:
        out = Path(args.out)
    else:
        temporary = Path(tempfile.mkdtemp(prefix="fl-predict-serve-"))
        out = temporary
        logger.warning("no --out: results are only forwarded (kept in %s until exit); the drift window is not kept", out)
    state = Path(args.state) if args.state else (None if temporary else out)
    scorer = Scorer(args.model, heatmaps=not args.no_heatmap, threads=args.threads, device=args.device,
                    gate=not args.no_gate)
    listener = Listener(scorer, ae_title=args.ae_title, out=out, state=state, forward=forward, heatmaps=not args.no_heatmap,
                        calling_aets=calling, server_tls=tls_in, forward_tls=tls_out, drift_every=args.drift_every, limits=limits)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        listener.start(args.host, args.port)
    except OSError as err:
        print(f"fl-predict serve: cannot listen on {args.host}:{args.port} ({err.strerror}): choose a free port", flush=True)
        return 2
    logger.info("listening on %s:%d as %s (%s); calling AE titles %s; model %s %s; heatmap %s; forwarding to %s", args.host,
                args.port, args.ae_title, "TLS" if tls_in else "no TLS", ", ".join(calling) if calling else "any",
                scorer.identity.name, scorer.identity.version, scorer.heatmap_method or "off", forward or "nowhere (files only)")
    logger.info("limits: %d pixel values per image, %d associations (%d per peer), idle timeout %.0f s", limits.max_pixels,
                limits.max_associations, limits.max_per_peer, limits.idle_timeout)
    warning = plain_dicom_warning(tls_in, tls_out, forward)
    if warning:
        logger.warning("%s", warning)
    if listener.reference is None:
        logger.info("no drift reference (model metadata or %s): drift is not logged", "drift-reference.json")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        logger.info("stopping: finishing queued images")
        listener.stop()
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    return 0


def _calling_aets(args: argparse.Namespace) -> list[str] | None:
    """The allowed calling AE titles; None for ``--any-calling-aet``. Raises ValueError for a title over 16 characters."""
    if args.any_calling_aet:
        return None
    titles = [t.strip() for t in args.calling_aet]
    bad = [t for t in titles if not t or len(t) > 16 or not t.isprintable() or "\\" in t]
    if bad:
        raise ValueError(f"--calling-aet {bad[0]!r} is not an AE title (1 to 16 printable characters, no backslash)")
    return titles
