"""From a file on disk to the stored values of its first frame: checks, transfer syntax, decoding.

Before pydicom parses anything the file must exist, be a regular non-empty file and look like
DICOM (a renamed PNG, JPEG, PDF or archive is named as such). A file without File Meta gets its
transfer syntax guessed from the data (the codec of encapsulated pixel data is sniffed from its
first fragment). Only frame 0 is decoded; a missing decoder plugin is named. Every problem raises
``UnusableImageError`` (common/dicom_display.py) with the fix; common/dicom.py adds the path.
"""

from __future__ import annotations

import os
import stat
import struct

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import UID

from common.dicom_display import COLOUR, MONOCHROME, UnusableImageError, logger, photometric_interpretation

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_NOT_DICOM_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
)


def open_dataset(path: str) -> Dataset:
    """Check the file is there and looks like DICOM, then parse it (force=True for no-meta)."""
    try:
        info = os.stat(path)
    except FileNotFoundError as err:
        raise UnusableImageError("file does not exist", "check the path and that the volume is mounted") from err
    except OSError as err:
        raise UnusableImageError(f"file cannot be accessed ({err.strerror})") from err
    if stat.S_ISDIR(info.st_mode):
        raise UnusableImageError("is a directory, not a file", "pass one DICOM file, or walk the folder")
    if not stat.S_ISREG(info.st_mode):
        raise UnusableImageError("is not a regular file")
    if info.st_size == 0:
        raise UnusableImageError("file is empty (0 bytes)", "copy or export it again")
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as err:
        raise UnusableImageError(f"file cannot be read ({err.strerror})", "give this process read access") from err
    if head[128:132] != b"DICM":
        for magic, what in _NOT_DICOM_MAGIC:
            if head.startswith(magic):
                raise UnusableImageError(f"is {what}, not DICOM (a renamed file?)", "remove it from the DICOM folder")
        if not _looks_like_dataset(head):
            raise UnusableImageError("not DICOM: no 'DICM' marker at byte 128 and no DICOM data element at the start")
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as err:
        raise UnusableImageError(f"cannot be parsed as DICOM ({type(err).__name__}: {err})") from err
    if len(ds) == 0:  # pydicom drops every element when the file ends inside one
        raise UnusableImageError("no data element could be read: the file is truncated or corrupt", "copy or export it again")
    return ds


def _looks_like_dataset(head: bytes) -> bool:
    """True when the file starts with a plausible tag (group 0002..0028), as raw datasets do."""
    if len(head) < 8:
        return False
    groups = struct.unpack_from("<H", head)[0], struct.unpack_from(">H", head)[0]
    return any(g % 2 == 0 and 0x0002 <= g <= 0x0028 for g in groups)


def check_image(ds: Dataset) -> None:
    """Refuse objects that are not single- or three-sample images we can display."""
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        sop = ds.get("SOPClassUID")
        what = UID(str(sop)).name if sop else "object"
        hint = " (an image object without pixel data: the file is probably truncated)" if "Image" in what else ""
        modality = ds.get("Modality", "") or "?"
        raise UnusableImageError(
            f"no Pixel Data (7FE0,0010): a {what} with Modality {modality} is not an image{hint}",
            "keep only radiograph images in the data folder",
        )
    for keyword, tag in (
        ("Rows", "(0028,0010)"),
        ("Columns", "(0028,0011)"),
        ("BitsAllocated", "(0028,0100)"),
        ("PhotometricInterpretation", "(0028,0004)"),
    ):
        if not ds.get(keyword):
            raise UnusableImageError(f"required {tag} {keyword} is missing or empty")
    photometric = photometric_interpretation(ds)
    if photometric not in MONOCHROME + COLOUR:
        raise UnusableImageError(
            f"(0028,0004) Photometric Interpretation '{photometric}' is not supported",
            f"export as one of {', '.join(MONOCHROME + COLOUR)}",
        )
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples not in (1, 3):
        raise UnusableImageError(f"(0028,0002) Samples per Pixel {samples} is not supported (1 or 3 expected)")


def transfer_syntax(ds: Dataset) -> UID:
    """The file's Transfer Syntax UID, or a guess (set into file_meta) when there is no meta."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return UID(str(meta.TransferSyntaxUID))
    data = ds.get("PixelData")
    if isinstance(data, bytes) and data[:4] == b"\xfe\xff\x00\xe0":  # encapsulated: sniff codec
        guess = _sniff_codec(data)
        if guess is None:
            raise UnusableImageError(
                "compressed pixel data of unknown type and no Transfer Syntax UID",
                "export the file with its File Meta header",
            )
    else:
        implicit, little = ds.original_encoding
        if little is False:
            guess = pydicom.uid.ExplicitVRBigEndian
        else:
            guess = pydicom.uid.ImplicitVRLittleEndian if implicit else pydicom.uid.ExplicitVRLittleEndian
    logger.debug("no File Meta header: Transfer Syntax guessed as %s", guess.name)
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = guess
    return guess


def _sniff_codec(data: bytes) -> UID | None:
    """Guess the transfer syntax of encapsulated pixel data from its first fragment's header."""
    bot_length = struct.unpack_from("<I", data, 4)[0]
    start = 8 + bot_length + 8  # skip the Basic Offset Table item, then the fragment's item header
    frag = data[start : start + 65536]
    if frag[:4] == b"\xff\x4f\xff\x51":  # JPEG 2000 codestream: reversible 5-3 wavelet -> lossless
        cod = frag.find(b"\xff\x52")
        reversible = cod > 0 and len(frag) > cod + 13 and frag[cod + 13] == 1
        return pydicom.uid.JPEG2000Lossless if reversible else pydicom.uid.JPEG2000
    if frag[4:8] == b"jP  ":
        return pydicom.uid.JPEG2000
    if frag[:2] == b"\xff\xd8":
        return _sniff_jpeg(frag)
    if len(frag) >= 64 and 1 <= struct.unpack_from("<I", frag)[0] <= 15 and struct.unpack_from("<I", frag, 4)[0] == 64:
        return pydicom.uid.RLELossless
    return None


def _sniff_jpeg(frag: bytes) -> UID | None:
    """Map the JPEG start-of-frame marker (and the predictor, for lossless) to a transfer syntax."""
    i, lossless = 2, False
    while i + 4 <= len(frag) and frag[i] == 0xFF:
        marker = frag[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0xC0:
            return pydicom.uid.JPEGBaseline8Bit
        if marker in (0xC1, 0xC2):
            return pydicom.uid.JPEGExtended12Bit
        if marker == 0xF7:
            return pydicom.uid.JPEGLSLossless
        lossless = lossless or marker == 0xC3
        if marker == 0xDA and lossless:  # SOS: Ss (the predictor) follows the component specs
            predictor_at = i + 5 + 2 * frag[i + 4]
            sv1 = frag[predictor_at : predictor_at + 1] == b"\x01"
            return pydicom.uid.JPEGLosslessSV1 if sv1 else pydicom.uid.JPEGLossless
        i += 2 + struct.unpack_from(">H", frag, i + 2)[0]
    return None


def decode_first_frame(ds: Dataset, syntax: UID) -> np.ndarray:
    """Decode frame 0 only (memory-sane for multi-frame); name the missing package on failure."""
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as err:
        raise UnusableImageError(
            f"transfer syntax {syntax.name} ({syntax}) is not supported",
            "export it uncompressed, JPEG, JPEG 2000 or RLE",
        ) from err
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin available"
        raise UnusableImageError(
            f"no decoder installed for {syntax.name} ({syntax}): {missing}",
            "install one of those packages (pylibjpeg-openjpeg for JPEG 2000, "
            "pylibjpeg-libjpeg for JPEG) into this environment",
        )
    try:
        arr = pixel_array(ds, index=0)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001 - Rust decoders (pylibjpeg-rle) panic with a BaseException
        if isinstance(err, GeneratorExit):
            raise
        raise UnusableImageError(
            f"pixel data could not be decoded as {syntax.name} ({type(err).__name__}: {err})",
            "the file is probably truncated or corrupt: export it again",
        ) from err
    expected = 3 if int(ds.get("SamplesPerPixel", 1) or 1) == 3 else 2
    if arr.ndim != expected or arr.size == 0:
        raise UnusableImageError(f"decoded pixel array has shape {arr.shape}, expected {expected} dimensions")
    return arr
