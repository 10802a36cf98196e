"""Admission and removal of sites, and the site table: what ``fl-server admit / remove / sites`` do.

A site's request (common/site_request.py) is checked, its client certificate signed by the
federation CA (server/pki.py), its record and kit written; removal revokes the certificate in the
CRL. Every change runs under the federation's lock. See server/pki.py for the folder layout and
the binding of a site's two keys.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.cache import atomic_write_durable as _write_atomic
from common.site_request import (
    REQUEST_VERSION,
    SITE_NAME_RE,
    SITE_NAME_RULE,
    ProvisionError,
    check_site_name,
    request_check_code,
    signed_payload,
)
from server.federation_files import (  # the federation folder: its files, lock and readers
    CA_CERT_FILE,
    KIT_COORDINATOR_FILE,
    SITE_AUTH_PUB_FILE,
    SITE_CERT_FILE,
    SITE_RECORD_FILE,
    FederationPaths,
    _cert_pem,
    _iso,
    _load_ca,
    _load_crl,
    _locked,
    _now,
    _read_record,
    _write_json,
    federation_paths,
    load_federation,
)
from server.pki import (  # the CA: certificates, binding and the CRL
    _BINDING_DOMAIN,
    _BINDING_FIELDS,
    CLIENT_DAYS,
    _leaf_builder,
    _renew_crl_locked,
    _write_crl,
    site_uri,
    ssh_fingerprint,
)

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class SiteRequest:
    """A request from ``fl-client init`` that passed every check."""

    site: str
    csr: x509.CertificateSigningRequest
    auth_public_key: str  # the OpenSSH line, without comment
    created: str
    check_code: str


def read_request(path: str | os.PathLike[str]) -> SiteRequest:
    """Parse and check a site request; all problems are listed in one ProvisionError, one line each."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise ProvisionError(f"cannot read request {path}: {err.strerror}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProvisionError(f"{path} is not a fedxray request (not JSON: {err}): ask the site for the "
                             "<site>.request.json that fl-client init wrote, unchanged") from err
    if not isinstance(data, dict) or data.get("fedxray_request") != REQUEST_VERSION:
        version = data.get("fedxray_request") if isinstance(data, dict) else None
        raise ProvisionError(f"{path} is not a fedxray request version {REQUEST_VERSION} (fedxray_request={version!r}): "
                             "ask the site for the <site>.request.json that fl-client init wrote")
    problems: list[str] = []
    for field in ("site", "csr", "auth_public_key", "created", "auth_signature"):
        if not isinstance(data.get(field), str) or not data[field]:
            problems.append(f"missing field `{field}`")
    site = data.get("site")
    if isinstance(site, str) and not SITE_NAME_RE.fullmatch(site):
        problems.append(f"site name {site!r} is invalid: use {SITE_NAME_RULE}")
    csr = None
    if isinstance(data.get("csr"), str):
        try:
            csr = x509.load_pem_x509_csr(data["csr"].encode())
        except ValueError:
            problems.append("`csr` is not a PEM certificate signing request")
    if csr is not None:
        if not csr.is_signature_valid:
            problems.append("the CSR's signature does not verify: it was altered, or not signed by its own key")
        key = csr.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            problems.append("the CSR key must be EC P-256 or P-384 (fl-client init makes P-256)")
        cns = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if cns != [site]:
            problems.append(f"the CSR names CN={','.join(map(str, cns)) or '(none)'} but the request is for site {site!r}")
    auth_key = None
    if isinstance(data.get("auth_public_key"), str):
        try:
            auth_key = serialization.load_ssh_public_key(data["auth_public_key"].encode())
        except (ValueError, UnsupportedAlgorithm):
            problems.append("`auth_public_key` is not an OpenSSH public key")
    if auth_key is not None:
        if not isinstance(auth_key, ec.EllipticCurvePublicKey):
            problems.append(f"`auth_public_key` is a {type(auth_key).__name__}: Flower SuperNode authentication needs an "
                            "EC key on a NIST curve (ecdsa-sha2-nistp384, as fl-client init makes)")
            auth_key = None
        elif not isinstance(auth_key.curve, ec.SECP256R1 | ec.SECP384R1 | ec.SECP521R1):
            problems.append(f"`auth_public_key` uses curve {auth_key.curve.name}: Flower needs a NIST curve (P-256/384/521)")
            auth_key = None
    if auth_key is not None and isinstance(data.get("auth_signature"), str):
        try:
            auth_key.verify(base64.b64decode(data["auth_signature"], validate=True), signed_payload(data),
                            ec.ECDSA(hashes.SHA384()))
        except (InvalidSignature, ValueError):
            problems.append("`auth_signature` does not verify with `auth_public_key`: the request was altered after "
                            "fl-client init wrote it")
    if problems:
        raise ProvisionError(f"{path} is refused:\n" + "\n".join(f"  - {p}" for p in problems))
    line = " ".join(data["auth_public_key"].split()[:2])
    return SiteRequest(site=site, csr=csr, auth_public_key=line, created=data["created"],  # type: ignore[arg-type]
                       check_code=request_check_code(data))


def admit(root: str | os.PathLike[str], request_path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Check a site's request, sign its client certificate and write its record and kit; returns the kit folder.

    Refused: a site name already admitted and not removed, or a key (TLS or auth) that an admitted
    site already uses. A removed site may be admitted again; its earlier files move to
    ``sites/<site>/previous/<serial>/``. The auth key is recorded with ``node_id: null``: the
    SuperLink registration is done by whoever calls :func:`pending_registrations`.
    """
    paths = federation_paths(root)
    federation = load_federation(paths.root)
    request = read_request(request_path)
    site = request.site
    with _locked(paths.root):
        ca, ca_key = _load_ca(paths)
        auth_fp = ssh_fingerprint(request.auth_public_key)
        csr_key = request.csr.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        for other in _records(paths):
            if other.get("revoked"):
                continue
            if other["site"] == site:
                raise ProvisionError(f"site {site!r} is already admitted (serial {other['serial']}, {other['admitted']}): "
                                     f"run fl-server remove {site} first to replace it")
            if other.get("auth_key_sha256") == auth_fp:
                raise ProvisionError(f"the request's SuperNode key is already used by site {other['site']!r}: "
                                     "each site needs its own keys (fl-client init in a fresh folder)")
            if _cert_key_der(paths.site(other["site"]) / SITE_CERT_FILE) == csr_key:
                raise ProvisionError(f"the request's TLS key is already used by site {other['site']!r}: "
                                     "each site needs its own keys (fl-client init in a fresh folder)")
        now = _now()
        cert = (_leaf_builder(ca, request.csr.public_key(), site, now, CLIENT_DAYS, ExtendedKeyUsageOID.CLIENT_AUTH)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(site_uri(site))]), critical=False)
                .sign(ca_key, hashes.SHA384()))
        site_dir = paths.site(site)
        previous = _read_record(paths, site)
        if previous is not None:  # removed earlier: keep its files for audit
            archive = site_dir / "previous" / previous["serial"]
            archive.mkdir(parents=True, exist_ok=True)
            for name in (SITE_CERT_FILE, SITE_AUTH_PUB_FILE, SITE_RECORD_FILE):
                if (site_dir / name).exists():
                    (site_dir / name).rename(archive / name)
        site_dir.mkdir(parents=True, exist_ok=True)
        record = {"site": site, "serial": format(cert.serial_number, "x"), "auth_key_sha256": auth_fp,
                  "cert_sha256": cert.fingerprint(hashes.SHA256()).hex(),
                  "admitted": _iso(now), "expires": _iso(cert.not_valid_after_utc), "revoked": None, "node_id": None,
                  "request_created": request.created, "check_code": request.check_code}
        record["binding"] = base64.b64encode(ca_key.sign(_binding_payload(record), ec.ECDSA(hashes.SHA384()))).decode()
        _write_atomic(site_dir / SITE_CERT_FILE, _cert_pem(cert))
        _write_atomic(site_dir / SITE_AUTH_PUB_FILE, f"{request.auth_public_key} fedxray:{site}\n".encode())
        _write_json(site_dir / SITE_RECORD_FILE, record)

        kit = Path(out).expanduser().resolve() if out is not None else paths.kit(site)
        kit.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths.ca_cert, kit / CA_CERT_FILE)
        _write_atomic(kit / SITE_CERT_FILE, _cert_pem(cert))
        _write_json(kit / KIT_COORDINATOR_FILE, {"federation": federation["federation"], "address": federation["address"],
                                                 "site": site})
        _renew_crl_locked(paths, ca, ca_key)  # the CA key is at hand: keep the CRL fresh
    logger.debug("admitted site %s (serial %s, SuperNode key %s)", site, record["serial"], auth_fp)
    return kit


def _cert_key_der(path: Path) -> bytes | None:
    if not path.is_file():
        return None
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# ---------------------------------------------------------------- removal and the site table


def revoke(root: str | os.PathLike[str], site: str) -> int | None:
    """Revoke a site's certificate (CRL re-signed), mark it removed; returns its node_id to unregister.

    Files stay for audit. Removing a site twice changes nothing and returns the same node_id, so a
    caller whose SuperLink unregistration failed can simply run it again. nginx reads the CRL when
    it (re)loads: reload the proxy for the removal to take effect at the door.
    """
    paths = federation_paths(root)
    load_federation(paths.root)
    check_site_name(site)
    with _locked(paths.root):
        record = _read_record(paths, site)
        if record is None:
            raise ProvisionError(f"no site {site!r} in {paths.sites}: see fl-server sites")
        ca, ca_key = _load_ca(paths)
        crl = _load_crl(paths, ca)
        serial = int(record["serial"], 16)
        if crl.get_revoked_certificate_by_serial_number(serial) is None:
            now = _now()
            entry = (x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
                     .add_extension(x509.CRLReason(x509.ReasonFlags.cessation_of_operation), critical=False).build())
            try:
                number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
            except x509.ExtensionNotFound:
                number = 1
            _write_crl(paths, ca, ca_key, revoked=[*crl, entry], number=number)
            logger.debug("revoked site %s (serial %s); CRL number %d", site, record["serial"], number)
        else:
            _renew_crl_locked(paths, ca, ca_key)
        if not record.get("revoked"):  # also completes a removal interrupted between the two writes
            record["revoked"] = _iso(_now())
            _write_json(paths.site(site) / SITE_RECORD_FILE, record)
    return record.get("node_id")


def list_sites(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every site's record (site.json) plus ``cert_expires`` and the paths of its public files, by name."""
    paths = federation_paths(root)
    load_federation(paths.root)
    rows = []
    for record in _records(paths):
        cert_path = paths.site(record["site"]) / SITE_CERT_FILE
        expires = None
        if cert_path.is_file():
            expires = _iso(x509.load_pem_x509_certificate(cert_path.read_bytes()).not_valid_after_utc)
        rows.append({**record, "cert_expires": expires, "client_cert": str(cert_path),
                     "auth_pub": str(paths.site(record["site"]) / SITE_AUTH_PUB_FILE)})
    return rows


def _records(paths: FederationPaths) -> list[dict[str, Any]]:
    if not paths.sites.is_dir():
        return []
    records = []
    for path in sorted(paths.sites.glob(f"*/{SITE_RECORD_FILE}")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ProvisionError(f"{path} is unreadable ({err}): restore it from a backup") from err
    return records


def pending_registrations(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Admitted, not removed sites whose SuperNode key is not registered yet (node_id null).

    Each item is a :func:`list_sites` row; ``auth_pub`` is the file for ``flwr supernode register``.
    """
    return [row for row in list_sites(root) if not row.get("revoked") and row.get("node_id") is None]


def record_node_id(root: str | os.PathLike[str], site: str, node_id: int) -> None:
    """Remember the node id the SuperLink gave the site's key (``flwr supernode register`` output)."""
    paths = federation_paths(root)
    load_federation(paths.root)
    check_site_name(site)
    if isinstance(node_id, bool) or not isinstance(node_id, int) or node_id < 0:
        raise ProvisionError(f"node_id must be a non-negative integer, got {node_id!r}")
    with _locked(paths.root):
        record = _read_record(paths, site)
        if record is None:
            raise ProvisionError(f"no site {site!r} in {paths.sites}: see fl-server sites")
        if record.get("revoked"):
            raise ProvisionError(f"site {site!r} was removed on {record['revoked']}: its key must not be registered")
        record["node_id"] = node_id
        _write_json(paths.site(site) / SITE_RECORD_FILE, record)


def revoked_registrations(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Removed admissions that had a node id: their keys must not stay registered in the SuperLink.

    Current records marked revoked and every earlier admission archived under ``previous/`` (a site
    removed while the coordinator was stopped, then admitted again, leaves its old key behind).
    Each item: {site, serial, node_id}.
    """
    paths = federation_paths(root)
    load_federation(paths.root)
    found = []
    if paths.sites.is_dir():
        for path in sorted([*paths.sites.glob(f"*/{SITE_RECORD_FILE}"), *paths.sites.glob(f"*/previous/*/{SITE_RECORD_FILE}")]):
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ProvisionError(f"{path} is unreadable ({err}): restore it from a backup") from err
            if record.get("revoked") and record.get("node_id") is not None:
                found.append({"site": record["site"], "serial": record["serial"], "node_id": int(record["node_id"])})
    return found


# ---------------------------------------------------------------- binding of certificate and SuperNode key


def _binding_payload(record: dict[str, Any]) -> bytes:
    """The bytes the CA signs at admission: site, certificate serial and digest, auth key fingerprint."""
    return _BINDING_DOMAIN + json.dumps({k: record.get(k) for k in _BINDING_FIELDS}, sort_keys=True,
                                        separators=(",", ":")).encode()


def check_binding(root: str | os.PathLike[str], site: str) -> None:
    """Check that ``sites/<site>/`` holds the certificate and SuperNode key admitted together for ``site``.

    Called before the key is registered with the SuperLink. Needs only ``ca.pem``. Every problem is
    listed in one ProvisionError (one line each), with the fix.
    """
    paths = federation_paths(root)
    check_site_name(site)
    record = _read_record(paths, site)
    if record is None:
        raise ProvisionError(f"no site {site!r} in {paths.sites}: see fl-server sites")
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    fix = f"restore {paths.site(site)} from a backup, or fl-server remove {site} and admit a new request"
    problems = []
    if not record.get("binding"):
        problems.append("its record has no CA-signed binding of certificate and SuperNode key (admitted by an older "
                        "fedxray)")
    else:
        try:
            ca.public_key().verify(base64.b64decode(record["binding"]), _binding_payload(record),  # type: ignore[call-arg]
                                   ec.ECDSA(hashes.SHA384()))
        except (InvalidSignature, ValueError):
            problems.append(f"{SITE_RECORD_FILE} was altered after admission (its CA signature does not verify)")
    pub = paths.site(site) / SITE_AUTH_PUB_FILE
    try:
        if ssh_fingerprint(pub.read_text()) != record.get("auth_key_sha256"):
            problems.append(f"{SITE_AUTH_PUB_FILE} is not the SuperNode key admitted for {site} "
                            f"({ssh_fingerprint(pub.read_text())}, admitted {record.get('auth_key_sha256')})")
    except (OSError, IndexError, ValueError):
        problems.append(f"{pub} is missing or not an OpenSSH public key")
    cert_path = paths.site(site) / SITE_CERT_FILE
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if format(cert.serial_number, "x") != record.get("serial") or cert.fingerprint(hashes.SHA256()).hex() != record.get(
                "cert_sha256"):
            problems.append(f"{SITE_CERT_FILE} is not the certificate issued to {site} (serial {record.get('serial')})")
        cert.verify_directly_issued_by(ca)
    except (OSError, ValueError, TypeError, InvalidSignature):
        problems.append(f"{cert_path} is missing or not issued by this federation's CA")
    if problems:
        raise ProvisionError(f"site {site}'s SuperNode key is not registered: " + "; ".join(problems) + f": {fix}")


