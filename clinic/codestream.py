"""The size a compressed image says it has, read from its codestream header without decoding it.

A JPEG, JPEG-LS or JPEG 2000 decoder allocates what the codestream asks for, not what the DICOM
header's Rows and Columns say: an 850-byte JPEG 2000 frame in a "16 x 16" data set decodes to
6000 x 6000 before pydicom notices the mismatch. So the listener compares the two before it
decodes (clinic/serve_limits.py). RLE needs no check: its decoder writes into Rows x Columns.
Only the first frame's header is read: fedxray decodes only the first frame.
"""

from __future__ import annotations

import struct

from pydicom.encaps import generate_fragments

# JPEG start-of-frame markers (ISO/IEC 10918-1 B.1.1.3: C0-CF except DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55.
_JPEG_SOF = {0xFFC0 + n for n in range(16)} - {0xFFC4, 0xFFC8, 0xFFCC} | {0xFFF7}
_SOC, _SIZ, _SOI = b"\xff\x4f", b"\xff\x51", b"\xff\xd8"


def first_fragment(pixel_data: bytes) -> bytes:
    """The first fragment of encapsulated Pixel Data (after the Basic Offset Table item); b"" if none."""
    items = generate_fragments(pixel_data)
    try:
        next(items)  # the Basic Offset Table (often empty)
        return next(items)
    except (StopIteration, ValueError, struct.error):
        return b""


def coded_size(fragment: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) a JPEG / JPEG-LS / JPEG 2000 (or HTJ2K) codestream declares; None if unreadable."""
    try:
        if fragment.startswith(_SOC) and fragment[2:4] == _SIZ:
            # ISO/IEC 15444-1 A.5.1 (offsets from SOC): Xsiz, Ysiz, XOsiz, YOsiz (4 bytes each) from byte 8, Csiz at 40
            xsiz, ysiz, xosiz, yosiz = struct.unpack(">4I", fragment[8:24])
            (components,) = struct.unpack(">H", fragment[40:42])
            return ysiz - yosiz, xsiz - xosiz, components
        if fragment.startswith(_SOI):
            offset = 2
            while offset + 4 <= len(fragment):
                marker, length = struct.unpack(">HH", fragment[offset : offset + 4])
                if marker in _JPEG_SOF:  # length, precision (1), height (2), width (2), components (1)
                    height, width, components = struct.unpack(">HHB", fragment[offset + 5 : offset + 10])
                    return height, width, components
                offset += 2 + length
    except struct.error:
        return None
    return None
