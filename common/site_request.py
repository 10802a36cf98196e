"""The site request both sides read: the site-name rule, the signed payload and its check code.

``fl-client init`` (client/provision.py) writes a request; ``fl-server admit`` (server/sites.py)
checks it. One definition here, so the two cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

REQUEST_VERSION = 1
SITE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
SITE_NAME_RULE = "1-40 lowercase letters, digits and '-', starting with a letter or digit (e.g. st-marys-2)"
_SIGNED_DOMAIN = b"fedxray-request-v1\n"


class ProvisionError(ValueError):
    """Provisioning input or files that do not fit together; the message says the fix."""


def check_site_name(site: object) -> str:
    if not isinstance(site, str) or not SITE_NAME_RE.fullmatch(site):
        raise ProvisionError(f"site name {site!r} is invalid: use {SITE_NAME_RULE}")
    return site


def signed_payload(request: dict[str, Any]) -> bytes:
    """The bytes ``auth_signature`` covers (ECDSA P-384, SHA-384): every field but the signature, canonical JSON."""
    body = {k: request.get(k) for k in ("fedxray_request", "site", "csr", "auth_public_key", "created")}
    return _SIGNED_DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def request_check_code(request: dict[str, Any]) -> str:
    """Short code the site reads to its coordinator; ``fl-server admit`` prints the same one."""
    digest = hashlib.sha256(signed_payload(request)).hexdigest()[:20]
    return "-".join(digest[i : i + 4] for i in range(0, 20, 4))
