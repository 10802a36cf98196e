"""What one DICOM peer may cost ``fl-predict serve``: image size, bytes, associations, idle time.

Every limit is checked before the expensive step it protects (docs/clinic.md lists them):

* an image's declared size (Rows x Columns x Number of Frames x Samples per Pixel, and those times
  the bytes of Bits Allocated) before it is decoded; for JPEG, JPEG-LS and JPEG 2000 also the size
  the first frame's codestream declares, since their decoders allocate that and not the header's;
* the bytes of one C-STORE data set while it arrives (the association is aborted past the cap, so
  memory never holds more), and each PDU's declared length before it is read (a PDU of 4 GB is
  one length field away);
* associations open at once, from all peers and from one IP address (refused, "transient: local
  limit exceeded", so the sender retries later);
* idle time: an association (or a connection that has not asked for one) silent this long is closed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clinic.log_values import loggable

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pynetdicom import evt

# pydicom and pynetdicom load only when the listener runs: `fl-predict serve --help` reads the
# defaults below and must answer at once.

logger = logging.getLogger(__name__)

MAX_PDU_BYTES = 1 << 20  # the largest PDU this node announces (1 MiB) and reads; honest senders fragment to it
HEADER_BYTES = 16 << 20  # what a data set may hold besides its pixels (header, overlays, icon)
UNENCAPSULATED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")  # implicit / explicit LE, explicit BE
RLE_LOSSLESS = "1.2.840.10008.1.2.5"  # its decoder writes into Rows x Columns
_REJECT_TRANSIENT, _SOURCE_PRESENTATION, _LOCAL_LIMIT = 0x02, 0x03, 0x02


@dataclass(frozen=True)
class Limits:
    """The listener's resource limits (flags of ``fl-predict serve``; defaults fit a 2-core, 3 GB host)."""

    max_pixels: int = 25_000_000  # --max-pixels: Rows x Columns x frames x samples of one image (5000 x 5000)
    max_associations: int = 8  # --max-associations: open at once, all peers together
    max_per_peer: int = 2  # --max-associations-per-peer: open at once from one IP address
    idle_timeout: float = 60.0  # --idle-timeout: seconds without a PDU before an association is closed

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.max_associations < 1 or self.max_per_peer < 1 or self.idle_timeout <= 0:
            raise ValueError("--max-pixels, --max-associations, --max-associations-per-peer and --idle-timeout must be positive")

    @property
    def max_decoded_bytes(self) -> int:
        """Decoded pixel bytes of one image: max_pixels at 16 bits."""
        return 2 * self.max_pixels

    @property
    def max_queued_pixels(self) -> int:
        """Decoded pixel values waiting to be scored, all images together (float32: 4 bytes each)."""
        return 4 * self.max_pixels

    @property
    def max_dataset_bytes(self) -> int:
        """Bytes of one received data set: an uncompressed image of max_decoded_bytes plus its header."""
        return self.max_decoded_bytes + HEADER_BYTES


def size_problem(ds: Dataset, transfer_syntax: str, limits: Limits) -> str | None:
    """Why ``ds`` (encoded in ``transfer_syntax``) is too large to decode, in one line without patient data; or None.

    Decodes nothing: the header, and for a compressed image its first codestream's header.
    """
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsAllocated") or 16)
    except (AttributeError, TypeError, ValueError):
        return None  # the image path refuses it with its own reason, before it allocates anything
    pixels = rows * columns * max(frames, 1) * max(samples, 1)
    if pixels > limits.max_pixels:
        return f"{rows} x {columns} x {frames} frame(s) x {samples} sample(s) is over --max-pixels {limits.max_pixels}"
    if pixels * -(-bits // 8) > limits.max_decoded_bytes:
        return f"{pixels} pixel values of {bits} bits are over {limits.max_decoded_bytes} decoded bytes (2 x --max-pixels)"
    from clinic.codestream import coded_size, first_fragment

    if transfer_syntax in UNENCAPSULATED or transfer_syntax == RLE_LOSSLESS or "PixelData" not in ds:
        return None  # the decoder writes into Rows x Columns: the checks above bound it
    coded = coded_size(first_fragment(ds.PixelData))
    if coded is None:
        return "the compressed image's size cannot be read from its codestream"
    if coded[:2] != (rows, columns) or coded[2] != samples:
        return f"the codestream is {coded[0]} x {coded[1]} x {coded[2]}, the header says {rows} x {columns} x {samples}"
    return None


class ConnectionGuard:
    """pynetdicom event handlers that enforce the per-association limits; ``handlers()`` to bind them."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._received: dict[int, int] = {}  # id(association) -> bytes of the data set arriving now
        self._over: set[int] = set()  # associations past the byte cap: nothing more is read from them
        self._lock = threading.Lock()

    def configure(self, ae: Any) -> None:
        """Set the AE's own limits (all associations, PDU size, timeouts)."""
        ae.maximum_associations = self.limits.max_associations
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.limits.idle_timeout

    def handlers(self) -> list[tuple[Any, Any]]:
        from pynetdicom import evt

        return [(evt.EVT_CONN_OPEN, self._on_open), (evt.EVT_REQUESTED, self._on_requested),
                (evt.EVT_PDU_RECV, self._on_pdu), (evt.EVT_CONN_CLOSE, self._on_close)]

    def _on_open(self, event: evt.Event) -> None:
        """Read no PDU whose declared length is over what this node announced, nor anything past the byte cap."""
        sock, key = event.assoc.dul.socket, id(event.assoc)
        read, ceiling = sock.recv, MAX_PDU_BYTES + 1024  # + the A-ASSOCIATE / P-DATA item headers

        def bounded_recv(nr_bytes: int) -> bytearray:
            if key in self._over:
                raise OSError("data set over the byte cap")  # the reader sees a closed connection and stops
            if nr_bytes > ceiling:
                logger.warning("peer %s announced a PDU of %d bytes (at most %d): connection closed",
                               event.address[0], nr_bytes, MAX_PDU_BYTES)
                raise OSError("PDU over the announced maximum length")
            return read(nr_bytes)

        sock.recv = bounded_recv

    def _on_requested(self, event: evt.Event) -> None:
        """Refuse (transient) a peer that already holds ``max_per_peer`` associations."""
        assoc = event.assoc
        address = assoc.requestor.address
        held = sum(1 for other in assoc.ae.active_associations  # ended ones linger a moment: not held
                   if other is not assoc and other.is_acceptor and other.requestor.address == address
                   and not (other.is_released or other.is_aborted or other.is_rejected))
        if held >= self.limits.max_per_peer:
            logger.warning("association from %s@%s refused: it holds %d already (--max-associations-per-peer %d)",
                           loggable(assoc.requestor.primitive.calling_ae_title, 16), address, held, self.limits.max_per_peer)
            assoc.acse.send_reject(_REJECT_TRANSIENT, _SOURCE_PRESENTATION, _LOCAL_LIMIT)
            assoc.kill()

    def _on_pdu(self, event: evt.Event) -> None:
        """Count a C-STORE data set's bytes as they arrive; abort the association past the cap."""
        for item in getattr(event.pdu, "presentation_data_value_items", ()):
            value = item.presentation_data_value
            if not value or value[0] & 1:  # a command fragment
                continue
            key = id(event.assoc)
            with self._lock:
                total = self._received.get(key, 0) + len(value) - 1
                self._received[key] = 0 if value[0] & 2 else total  # bit 2: the last fragment of this data set
            if total > self.limits.max_dataset_bytes:
                logger.warning("association from %s: a data set over %d bytes (2 x --max-pixels + %d MiB for the header): aborted",
                               event.assoc.requestor.address, self.limits.max_dataset_bytes, HEADER_BYTES >> 20)
                with self._lock:
                    self._received.pop(key, None)
                    self._over.add(key)
                event.assoc.abort(block=False)  # this runs on the reader thread: do not wait for it
                return

    def _on_close(self, event: evt.Event) -> None:
        with self._lock:
            self._received.pop(id(event.assoc), None)
            self._over.discard(id(event.assoc))
