"""The hospital's side of provisioning: make the site's keys, the request for the coordinator, and load them back.

``fl-client init`` makes two key pairs in the site folder, and neither private half ever leaves it:

- ``tls.key`` (EC P-256, PEM PKCS8): the key of the site's TLS *client certificate*, which the
  coordinator's fleet proxy requires (Flower itself has no mutual TLS);
- ``auth.key`` (EC P-384, OpenSSH private format) and ``auth.pub``: Flower's SuperNode
  authentication (``flower-supernode --auth-supernode-private-key``; the coordinator registers
  ``auth.pub`` with ``flwr supernode register``). Flower loads it with ``load_ssh_private_key`` and
  accepts only EC keys on NIST curves.

``<site>.request.json`` is the one file sent to the coordinator: a CSR signed by ``tls.key``
(CN = site), the auth public key, and ``auth_signature`` (the auth key's signature over the other
fields, so a key swapped in transit is detected). Both ends print the same check code to compare
out of band. The coordinator answers with a kit: ``ca.pem``, ``client.pem`` and
``coordinator.json``, copied into the same folder; :func:`load_site_identity` checks that
everything is there and fits together before ``fl-client start`` dials anyone.

Private keys are written with mode 0600 from creation on (``os.open`` with the mode, temp file,
``os.replace``). The request format and site-name rule are mirrored in server/pki.py, which
reads the request (client and server share only common/; tests check they agree).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.cache import atomic_write_durable as _write_atomic
from common.site_request import (  # noqa: F401 - ProvisionError and the name rule are part of this module's API
    REQUEST_VERSION,
    SITE_NAME_RE,
    SITE_NAME_RULE,
    ProvisionError,
    check_site_name,
    request_check_code,
    signed_payload,
)

logger = logging.getLogger(__name__)

DEFAULT_SITE_DIR = "fedxray-site"
TLS_KEY_FILE = "tls.key"
AUTH_KEY_FILE = "auth.key"
AUTH_PUB_FILE = "auth.pub"
REQUEST_SUFFIX = ".request.json"
# The kit from the coordinator (names as server/pki.py writes them).
CLIENT_CERT_FILE = "client.pem"
CA_CERT_FILE = "ca.pem"
COORDINATOR_FILE = "coordinator.json"
KIT_FILES = (CA_CERT_FILE, CLIENT_CERT_FILE, COORDINATOR_FILE)



@dataclass(frozen=True)
class SiteIdentity:
    """What a provisioned site needs to join: its keys, its certificate, the CA and where to dial."""

    site: str
    root: Path
    tls_key: Path
    auth_key: Path
    client_cert: Path
    ca_cert: Path
    coordinator: dict[str, Any]  # coordinator.json: federation, address, site

    @property
    def address(self) -> str:
        """HOST:PORT of the coordinator's fleet proxy."""
        return self.coordinator["address"]


def init_site(root: str | os.PathLike[str], site: str, force: bool = False) -> Path:
    """Create the site's keys and ``<site>.request.json`` in ``root``; returns the request's path.

    Existing keys are never overwritten unless ``force`` (new keys need a new admission).
    """
    check_site_name(site)
    root = Path(root).expanduser().resolve()
    existing = [p.name for p in (root / TLS_KEY_FILE, root / AUTH_KEY_FILE) if p.exists()]
    if existing and not force:
        raise ProvisionError(f"{root} already holds {' and '.join(existing)}: keys are never overwritten; use --force "
                             "to make new ones (the coordinator must then admit the new request)")
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise ProvisionError(f"cannot create {root}: {err.strerror}") from err

    tls_key = ec.generate_private_key(ec.SECP256R1())
    auth_key = ec.generate_private_key(ec.SECP384R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]))
           .sign(tls_key, hashes.SHA256()))
    auth_line = auth_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    request: dict[str, Any] = {
        "fedxray_request": REQUEST_VERSION,
        "site": site,
        "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
        "auth_public_key": auth_line,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    signature = auth_key.sign(signed_payload(request), ec.ECDSA(hashes.SHA384()))
    request["auth_signature"] = base64.b64encode(signature).decode()

    _write_atomic(root / TLS_KEY_FILE, tls_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()), 0o600)
    _write_atomic(root / AUTH_KEY_FILE, auth_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                               serialization.NoEncryption()), 0o600)
    _write_atomic(root / AUTH_PUB_FILE, f"{auth_line} fedxray:{site}\n".encode())
    for stale in root.glob(f"*{REQUEST_SUFFIX}"):  # requests for keys that no longer exist
        stale.unlink()
    request_path = root / f"{site}{REQUEST_SUFFIX}"
    _write_atomic(request_path, (json.dumps(request, indent=2) + "\n").encode())
    logger.debug("site %s: keys and request written to %s (check code %s)", site, root, request_check_code(request))
    return request_path


def read_request(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The site's own ``<site>.request.json`` in ``root``, or None when there is none."""
    found = sorted(Path(root).glob(f"*{REQUEST_SUFFIX}"))
    return json.loads(found[0].read_text()) if found else None


def load_site_identity(root: str | os.PathLike[str]) -> SiteIdentity:
    """Check the site folder and return its identity; a ProvisionError names the first missing piece and the fix.

    Checked: both keys exist and load, the kit (ca.pem, client.pem, coordinator.json) is there,
    client.pem was issued by ca.pem for this site's tls.key and has not expired.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ProvisionError(f"{root} does not exist: run fl-client init --site NAME --dir {root} first")
    keys_missing = [name for name in (TLS_KEY_FILE, AUTH_KEY_FILE) if not (root / name).is_file()]
    if keys_missing:
        raise ProvisionError(f"{root} has no {' or '.join(keys_missing)}: run fl-client init --site NAME --dir {root} first "
                             "(or point --dir at the folder where you ran it)")
    kit_missing = [name for name in KIT_FILES if not (root / name).is_file()]
    if kit_missing:
        names = ", ".join(kit_missing)
        raise ProvisionError(f"{root} has no {names}: copy {names} from the kit your coordinator sent into {root}")
    for name in (TLS_KEY_FILE, AUTH_KEY_FILE):
        if (root / name).stat().st_mode & 0o077:
            logger.warning("%s is readable by other users: chmod 600 %s", root / name, root / name)

    try:
        coordinator = json.loads((root / COORDINATOR_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ProvisionError(f"{root / COORDINATOR_FILE} is not JSON ({err}): copy it again from the kit") from err
    if not isinstance(coordinator, dict) or not all(isinstance(coordinator.get(k), str) for k in ("address", "site")):
        raise ProvisionError(f"{root / COORDINATOR_FILE} lacks `address` or `site`: copy it again from the kit")
    site = check_site_name(coordinator["site"])
    request = read_request(root)
    if request is not None and request.get("site") != site:
        raise ProvisionError(f"the kit in {root} is for site {site!r} but this folder's keys are for "
                             f"{request.get('site')!r}: copy the kit made for {request.get('site')!r}")

    try:
        ca = x509.load_pem_x509_certificate((root / CA_CERT_FILE).read_bytes())
        cert = x509.load_pem_x509_certificate((root / CLIENT_CERT_FILE).read_bytes())
    except ValueError as err:
        raise ProvisionError(f"{root}: ca.pem or client.pem is not a PEM certificate: copy both again from the kit") from err
    try:
        tls_key = serialization.load_pem_private_key((root / TLS_KEY_FILE).read_bytes(), password=None)
        auth_key = serialization.load_ssh_private_key((root / AUTH_KEY_FILE).read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ProvisionError(f"{root}: tls.key or auth.key does not load ({err}): restore them, or run fl-client init "
                             "--force and ask for a new admission") from err
    if not isinstance(auth_key, ec.EllipticCurvePrivateKey):
        raise ProvisionError(f"{root / AUTH_KEY_FILE} is not an EC key: Flower needs one; run fl-client init --force")
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*der) != tls_key.public_key().public_bytes(*der):
        raise ProvisionError(f"{root / CLIENT_CERT_FILE} was not issued for this folder's tls.key (new keys since the "
                             "request?): send the current request to your coordinator and copy the kit it sends back")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise ProvisionError(f"{root / CLIENT_CERT_FILE} was not signed by {CA_CERT_FILE}: copy both from the same kit") from err
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [site]:
        raise ProvisionError(f"{root / CLIENT_CERT_FILE} is for {cns} but coordinator.json says {site!r}: copy the whole kit again")
    if cert.not_valid_after_utc < dt.datetime.now(dt.UTC):
        raise ProvisionError(f"{root / CLIENT_CERT_FILE} expired on {cert.not_valid_after_utc:%Y-%m-%d}: ask your coordinator "
                             "to remove and re-admit this site (fl-client init --force makes a new request)")
    return SiteIdentity(site=site, root=root, tls_key=root / TLS_KEY_FILE, auth_key=root / AUTH_KEY_FILE,
                        client_cert=root / CLIENT_CERT_FILE, ca_cert=root / CA_CERT_FILE, coordinator=coordinator)
