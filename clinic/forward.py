"""Sending the results to the PACS: ``--forward HOST:PORT:AET``, one association per image, three tries.

fedxray is the C-STORE SCU here: the SR and the heatmap Secondary Capture of one image go in one
association (Explicit or Implicit VR Little Endian, which every PACS takes), optionally over TLS
(``--forward-tls-*``). A try that is refused, aborted or answered with a failure status is
repeated after 1 s and then 2 s; warnings (0xBxxx) count as stored.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE

FORWARD_TRIES = 3
_SUCCESS = 0x0000


@dataclass(frozen=True)
class Destination:
    """Where the SR and heatmap go: ``HOST:PORT:AET`` (an IPv6 host in brackets)."""

    host: str
    port: int
    ae_title: str

    @classmethod
    def parse(cls, text: str) -> Destination:
        try:
            host, port, aet = text.rsplit(":", 2)
            host = host.strip("[]")
            if not host or not aet or len(aet) > 16:
                raise ValueError
            return cls(host, int(port), aet)
        except ValueError as err:
            raise ValueError(
                f"--forward {text!r} is not HOST:PORT:AET (e.g. pacs.local:104:PACS; AE titles have at most 16 characters)"
            ) from err

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def send_results(datasets: list[Dataset], dest: Destination, *, calling_aet: str, tls: ssl.SSLContext | None) -> str | None:
    """C-STORE ``datasets`` to ``dest``; None when all were stored, else what went wrong on the last try."""
    problem = "not tried"
    for attempt in range(1, FORWARD_TRIES + 1):
        ae = AE(ae_title=calling_aet)
        for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=(tls, dest.host) if tls is not None else None)
        if assoc.is_established:
            try:
                statuses = [assoc.send_c_store(ds) for ds in datasets]
            finally:
                assoc.release()
            codes = [int(s.Status) if s else -1 for s in statuses]
            if all(c == _SUCCESS or 0xB000 <= c <= 0xBFFF for c in codes):
                return None
            problem = "statuses " + ", ".join(f"0x{c:04X}" if c >= 0 else "none" for c in codes)
        else:
            problem = "association rejected or aborted" if assoc.is_rejected or assoc.is_aborted else "no connection"
        if attempt < FORWARD_TRIES:
            time.sleep(2 ** (attempt - 1))
    return problem
