"""The coordinator's provisioning: the federation CA, the proxy's server certificate, site admission and removal.

Why a private CA and two keys per site. Open-source Flower checks no client certificate, so the
fleet proxy (server/proxy.py) does: a hospital gets through only with a certificate signed by the
federation CA and absent from the CRL. Flower itself then authenticates every SuperNode message
with the site's *auth key* (``--enable-supernode-auth``; the coordinator registers the public half
with ``flwr supernode register``). The TLS key proves "this is an admitted hospital" at the door;
the auth key is what the SuperLink knows the node by.

Keys stay with their owner. The CA key is made here and never leaves ``pki/``; a hospital makes
its own keys (``fl-client init``) and sends only a request: a CSR (proof that it holds the TLS key,
CN = site) and its SuperNode public key, signed with the auth key (proof that it holds that one
too, and that nothing was swapped on the way). ``admit`` signs a client certificate and writes a
kit of public files to send back. Both ends print the same *check code* so the two people can
compare it over the phone: a request replaced in transit would show a different code.

Binding. A site's two keys are bound at admission: ``binding`` in site.json is the CA's signature
over (site, certificate serial, certificate sha256, auth key fingerprint). Before a key is
registered with the SuperLink, :func:`check_binding` verifies it against ``ca.pem`` and the files
in ``sites/<site>/``, so an ``auth.pub`` or ``client.pem`` swapped on disk (by anyone without the CA
key) is never registered for that site.

The CRL's life. nginx refuses *every* client once the CRL's next-update has passed, so the CRL is
re-signed (same entries, CRL number + 1, a fresh year) by every command that holds the CA key when
it is due (older than ``CRL_RENEW_AFTER_DAYS`` or within ``CRL_WARN_DAYS`` of expiry): ``admit``,
``remove``, ``renew-crl`` and ``start`` (when ``ca.key`` is in place). ``status`` warns a month ahead.

This module holds the CA, the certificates and the CRL; admission, removal and the site table are
in server/sites.py; the request format both sides read is common/site_request.py.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.cache import atomic_write_durable as _write_atomic
from common.site_request import SITE_NAME_RE, SITE_NAME_RULE, ProvisionError, check_site_name  # noqa: F401 - ProvisionError re-exported
from server.federation_files import (  # noqa: F401 - the file names are re-exported: callers read them as pki.*
    CA_CERT_FILE,
    CA_KEY_FILE,
    KIT_COORDINATOR_FILE,
    PKI_DIR,
    SITE_CERT_FILE,
    FederationPaths,
    _cert_pem,
    _iso,
    _load_ca,
    _load_crl,
    _locked,
    _now,
    _write_json,
    federation_paths,
    load_federation,
)

logger = logging.getLogger(__name__)

#: Site names: what goes into certificates, folder names and Flower node names.
#: Always in the server certificate: the proxy reaches the SuperLink on loopback with it.
LOOPBACK_SANS = ("localhost", "127.0.0.1")
CA_DAYS, SERVER_DAYS, CLIENT_DAYS, CRL_DAYS = 3650, 730, 365, 365
#: A CRL is re-signed, when the CA key is at hand, once it is this old ...
CRL_RENEW_AFTER_DAYS = 30
#: ... or this close to its next-update (then ``fl-server status`` warns, too).
CRL_WARN_DAYS = 30
#: Certificates start this long before "now", so a site whose clock is a little behind accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)
_BINDING_DOMAIN = b"fedxray-site-binding-v1\n"
_BINDING_FIELDS = ("site", "serial", "cert_sha256", "auth_key_sha256")
_DNS_RE = re.compile(r"(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


# ---------------------------------------------------------------- small helpers


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:9443``) -> (host, port), or a ProvisionError."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", address.strip())
    port = int(match.group(2) or match.group(4)) if match else 0
    if not match or not 0 < port < 65536:
        raise ProvisionError(f"--address {address!r} is not HOST:PORT (e.g. fl.example.org:9443 or [2001:db8::1]:9443)")
    return (match.group(1) or match.group(3)).lower(), port


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not _DNS_RE.fullmatch(name.lower()) or len(name) > 253:
        raise ProvisionError(f"SAN {name!r} is neither an IP address nor a DNS name")
    return x509.DNSName(name.lower())


def site_uri(site: str) -> str:
    """The site's identity in its certificate's SAN (RFC 5280 verifiers want a SAN; the CN says the same)."""
    return f"urn:fedxray:site:{site}"


def ssh_fingerprint(public_line: str) -> str:
    """``SHA256:...`` of an OpenSSH public key, as ``ssh-keygen -l`` prints it."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


# ---------------------------------------------------------------- init


def init_federation(root: str | os.PathLike[str], address: str, sans: Iterable[str] = (), name: str = "fedxray", *,
                    force: bool = False) -> Path:
    """Create the federation folder: CA, server certificate, empty CRL, ``sites/``. Returns the folder.

    ``address`` is what hospitals dial (the fleet proxy); its host and every entry of ``sans`` go into
    the server certificate, with ``localhost`` and ``127.0.0.1``. An existing federation is refused
    unless ``force``; then it is moved, CA key included, to ``replaced-<time>/`` rather than deleted.
    """
    paths = federation_paths(root)
    host, _ = parse_address(address)
    if not SITE_NAME_RE.fullmatch(name):
        raise ProvisionError(f"federation name {name!r} is invalid: use {SITE_NAME_RULE}")
    san_names = list(dict.fromkeys([host, *(s.strip().lower() for s in sans if s.strip()), *LOOPBACK_SANS]))
    general_names = [_general_name(s) for s in san_names]
    existing = [p for p in (paths.federation, paths.ca_cert.parent, paths.sites, paths.kits) if p.exists()]
    if existing and not force:
        raise ProvisionError(f"{paths.root} already holds a federation ({existing[0].name}): a new CA would lock out "
                             "every admitted site; use --force to replace it (the old one is kept in replaced-<time>/)")
    try:
        paths.root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ProvisionError(f"cannot create {paths.root}: {err.strerror}") from err
    with _locked(paths.root):
        if existing:
            archive = paths.root / f"replaced-{_now().strftime('%Y%m%dT%H%M%SZ')}"
            archive.mkdir(mode=0o700)
            for p in existing:
                p.rename(archive / p.name)
            logger.warning("previous federation moved to %s", archive)
        paths.ca_cert.parent.mkdir(mode=0o700)
        paths.sites.mkdir(mode=0o700)

        now = _now()
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedxray"),
                             x509.NameAttribute(NameOID.COMMON_NAME, f"{name} federation CA")])
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=CA_DAYS))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(_key_usage(cert_sign=True), critical=True)
              .add_extension(ca_ski, critical=False)
              .sign(ca_key, hashes.SHA384()))
        server_key = ec.generate_private_key(ec.SECP256R1())
        server = (_leaf_builder(ca, server_key.public_key(), host, now, SERVER_DAYS, ExtendedKeyUsageOID.SERVER_AUTH)
                  .add_extension(x509.SubjectAlternativeName(general_names), critical=False)
                  .sign(ca_key, hashes.SHA384()))
        _write_atomic(paths.ca_key, _key_pem(ca_key), 0o600)
        _write_atomic(paths.ca_cert, _cert_pem(ca))
        _write_atomic(paths.server_key, _key_pem(server_key), 0o600)
        _write_atomic(paths.server_cert, _cert_pem(server))
        _write_crl(paths, ca, ca_key, revoked=[], number=1)
        _write_json(paths.federation, {"federation": name, "address": address.strip(), "sans": san_names, "created": _iso(now)})
    logger.debug("federation %s created in %s (server certificate for %s)", name, paths.root, ", ".join(san_names))
    return paths.root


def _key_usage(*, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)


def _leaf_builder(ca: x509.Certificate, public_key: Any, common_name: str, now: dt.datetime, days: int,
                  usage: x509.ObjectIdentifier) -> x509.CertificateBuilder:
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca.subject).public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False))


def _write_crl(paths: FederationPaths, ca: x509.Certificate, ca_key: Any, revoked: list[x509.RevokedCertificate],
               number: int) -> None:
    now = _now()
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
               .last_update(now - CLOCK_SKEW).next_update(now + dt.timedelta(days=CRL_DAYS))
               .add_extension(x509.CRLNumber(number), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False))
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    _write_atomic(paths.crl, builder.sign(ca_key, hashes.SHA384()).public_bytes(serialization.Encoding.PEM))


# ---------------------------------------------------------------- the CRL's life


@dataclass(frozen=True)
class CrlState:
    """What ``pki/crl.pem`` says about itself (read with ``ca.pem`` only: no CA key needed)."""

    last_update: dt.datetime
    next_update: dt.datetime
    number: int
    revoked: int

    def days_left(self, now: dt.datetime | None = None) -> float:
        return (self.next_update - (now or _now())).total_seconds() / 86400

    def due(self, now: dt.datetime | None = None) -> bool:
        """Old enough, or close enough to its next-update, to be re-signed."""
        now = now or _now()
        return (now - self.last_update).days >= CRL_RENEW_AFTER_DAYS or self.days_left(now) <= CRL_WARN_DAYS


def crl_state(root: str | os.PathLike[str]) -> CrlState:
    paths = federation_paths(root)
    if not paths.crl.is_file() or not paths.ca_cert.is_file():
        raise ProvisionError(f"{paths.crl} or {paths.ca_cert} is missing: restore {PKI_DIR}/ from a backup")
    crl = _load_crl(paths, x509.load_pem_x509_certificate(paths.ca_cert.read_bytes()))
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = 0
    next_update = crl.next_update_utc or crl.last_update_utc
    return CrlState(last_update=crl.last_update_utc + CLOCK_SKEW, next_update=next_update, number=number, revoked=len(crl))


def crl_warning(root: str | os.PathLike[str], now: dt.datetime | None = None) -> str | None:
    """One line when the CRL has expired or expires within ``CRL_WARN_DAYS`` days, else None."""
    paths = federation_paths(root)
    state = crl_state(root)
    days = state.days_left(now)
    fix = (f"run fl-server renew-crl --dir {paths.root} with {PKI_DIR}/{CA_KEY_FILE} in place (fl-server start does it "
           "too), then move the CA key offline again")
    if days <= 0:
        return f"{paths.crl} expired on {_iso(state.next_update)}: the fleet proxy refuses every site; {fix}"
    if days <= CRL_WARN_DAYS:
        return (f"{paths.crl} expires on {_iso(state.next_update)} (in {int(days)} days), then the fleet proxy refuses "
                f"every site; {fix}")
    return None


def ca_key_present(root: str | os.PathLike[str]) -> bool:
    """Whether ``pki/ca.key`` is in place (it is kept offline between provisioning sessions)."""
    return federation_paths(root).ca_key.is_file()


def renew_crl(root: str | os.PathLike[str], *, force: bool = False) -> bool:
    """Re-sign the CRL with the same revoked entries and a fresh year, if due (or ``force``); needs the CA key.

    Returns True when it wrote a new CRL. nginx reads it when it (re)loads.
    """
    paths = federation_paths(root)
    load_federation(paths.root)
    with _locked(paths.root):
        ca, ca_key = _load_ca(paths)
        return _renew_crl_locked(paths, ca, ca_key, force=force)


def _renew_crl_locked(paths: FederationPaths, ca: x509.Certificate, ca_key: Any, *, force: bool = False) -> bool:
    crl = _load_crl(paths, ca)
    state = crl_state(paths.root)
    if not force and not state.due():
        return False
    _write_crl(paths, ca, ca_key, revoked=list(crl), number=state.number + 1)
    logger.info("CRL re-signed: %d revoked certificate(s), CRL number %d, valid until %s", len(crl), state.number + 1,
                _iso(_now() + dt.timedelta(days=CRL_DAYS)))
    return True
