"""The federation folder: where each file lives, its lock, and reading what is in it.

Layout of a federation folder (the names are the ``*_FILE``/``*_DIR`` constants here)::

    federation.json              {"federation", "address" (what sites dial: the proxy), "sans", "created"}
    pki/ca.key      (0600)       EC P-384 CA key: never copied anywhere
    pki/ca.pem                   self-signed CA, path length 0, 10 years
    pki/server.key  (0600)       the proxy's and the SuperLink's TLS key (EC P-256)
    pki/server.pem               serverAuth, SANs = address host + --san + localhost + 127.0.0.1, 2 years
    pki/crl.pem                  revoked client certificates (nginx ``ssl_crl``; reload nginx after a change),
                                 valid 1 year: re-signed when due (see "The CRL's life" below)
    sites/<site>/client.pem      the certificate issued to the site (1 year)
    sites/<site>/auth.pub        its SuperNode public key (OpenSSH), for ``flwr supernode register``
    sites/<site>/site.json       {site, serial (hex), auth_key_sha256 ("SHA256:..." as ssh-keygen -l prints it),
                                  cert_sha256, binding, admitted, expires, revoked (time or null),
                                  node_id (null: not registered), ...}
    sites/<site>/previous/<serial>/   an earlier, removed admission of the same name (audit)
    kits/<site>/                 ca.pem, client.pem, coordinator.json: what the site receives

Private keys are created with mode 0600 (``os.open`` with the mode, then ``os.replace``), every
write is atomic, and admit/remove/record_node_id run under an exclusive lock on ``.lock``, since
``fl-server start`` may record node ids while an operator admits a site.

Private keys are created with mode 0600, every write is atomic (common/cache.py), and every
read-modify-write holds an exclusive lock on ``.lock`` (:func:`locked`). server/pki.py makes the CA,
the certificates and the CRL; server/sites.py admits and removes sites.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from common.cache import atomic_write_durable as _write_atomic
from common.site_request import ProvisionError

FEDERATION_FILE = "federation.json"
PKI_DIR = "pki"
CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.pem"
SERVER_KEY_FILE = "server.key"
SERVER_CERT_FILE = "server.pem"
CRL_FILE = "crl.pem"
SITES_DIR = "sites"
KITS_DIR = "kits"
SITE_CERT_FILE = "client.pem"
SITE_AUTH_PUB_FILE = "auth.pub"
SITE_RECORD_FILE = "site.json"
KIT_COORDINATOR_FILE = "coordinator.json"
LOCK_FILE = ".lock"


@dataclass(frozen=True)
class FederationPaths:
    """Where a federation folder keeps each file (see the module docstring); from :func:`federation_paths`."""

    root: Path
    federation: Path
    ca_key: Path
    ca_cert: Path
    server_key: Path
    server_cert: Path
    crl: Path
    sites: Path
    kits: Path

    def site(self, site: str) -> Path:
        return self.sites / site

    def kit(self, site: str) -> Path:
        return self.kits / site


def federation_paths(root: str | os.PathLike[str]) -> FederationPaths:
    """The paths of the federation folder ``root`` (resolved; nothing is created)."""
    root = Path(root).expanduser().resolve()
    pki = root / PKI_DIR
    return FederationPaths(root=root, federation=root / FEDERATION_FILE, ca_key=pki / CA_KEY_FILE, ca_cert=pki / CA_CERT_FILE,
                           server_key=pki / SERVER_KEY_FILE, server_cert=pki / SERVER_CERT_FILE, crl=pki / CRL_FILE,
                           sites=root / SITES_DIR, kits=root / KITS_DIR)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _iso(when: dt.datetime) -> str:
    return when.isoformat(timespec="seconds")


def _write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    with open(root / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------- loading


def load_federation(root: str | os.PathLike[str]) -> dict[str, Any]:
    """federation.json of ``root``, or a ProvisionError saying to run ``fl-server init``."""
    paths = federation_paths(root)
    if not paths.federation.is_file():
        raise ProvisionError(f"{paths.root} is not a fedxray federation (no {FEDERATION_FILE}): "
                             f"run fl-server init --dir {paths.root} --address HOST:PORT first")
    try:
        data = json.loads(paths.federation.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ProvisionError(f"{paths.federation} is unreadable ({err}): restore it from a backup") from err
    missing = [k for k in ("federation", "address") if not isinstance(data.get(k), str)]
    if missing:
        raise ProvisionError(f"{paths.federation} lacks {', '.join(missing)}: restore it from a backup")
    return data


def _load_ca(paths: FederationPaths) -> tuple[x509.Certificate, Any]:
    for p in (paths.ca_cert, paths.ca_key, paths.crl):
        if not p.is_file():
            raise ProvisionError(f"{p} is missing: restore {PKI_DIR}/ from a backup (or start over with fl-server init --force)")
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    return ca, ca_key


def _load_crl(paths: FederationPaths, ca: x509.Certificate) -> x509.CertificateRevocationList:
    crl = x509.load_pem_x509_crl(paths.crl.read_bytes())
    if not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise ProvisionError(f"{paths.crl} is not signed by {paths.ca_cert}: restore it from a backup")
    return crl


def _read_record(paths: FederationPaths, site: str) -> dict[str, Any] | None:
    record = paths.site(site) / SITE_RECORD_FILE
    return json.loads(record.read_text()) if record.is_file() else None
