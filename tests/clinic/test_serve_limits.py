"""What one DICOM peer may cost ``fl-predict serve`` (clinic/serve_limits.py, issue item 3).

Before: a 12000 x 12000 image took the listener to 2.8 GB, a 2.3 MB RLE image to +1.4 GB, and
any peer could hold every association. Each limit is tried here with small numbers through a
real association on loopback; the listener runs in this process.
"""

from __future__ import annotations

import socket
import struct
import time

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid
from serve_peer import associate, echo, running, store

from clinic.model import Scorer

# clinic.serve_limits is imported inside the tests: those that need no setting of it also run (and
# fail) on the code before it.

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def scorer(scatter_model) -> Scorer:
    return Scorer(scatter_model, threads=1)


def _cr(rows: int, cols: int, *, bits: int = 16) -> Dataset:
    """A CR data set in memory (uniform pixels: they compress to almost nothing)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "CR", "LIMITS"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = np.full((rows, cols), 100, np.uint16 if bits == 16 else np.uint8).tobytes()
    return ds


def _lying(syntax: str, coded: int, declared: int) -> Dataset:
    """A frame compressed at ``coded`` x ``coded`` whose header says ``declared`` x ``declared``."""
    ds = _cr(coded, coded)
    ds.compress(syntax)
    ds.Rows = ds.Columns = declared
    return ds


class TestSizeProblem:
    def test_declared_pixels_frames_and_bits(self) -> None:
        from clinic.serve_limits import Limits, size_problem

        limits = Limits(max_pixels=10_000)
        assert size_problem(_cr(100, 100), ExplicitVRLittleEndian, limits) is None
        assert "over --max-pixels 10000" in size_problem(_cr(101, 100), ExplicitVRLittleEndian, limits)
        frames = _cr(50, 50)
        frames.NumberOfFrames = 5
        assert "5 frame(s)" in size_problem(frames, ExplicitVRLittleEndian, limits)
        wide = _cr(100, 100, bits=8)
        wide.BitsAllocated = 32
        assert "decoded bytes" in size_problem(wide, ExplicitVRLittleEndian, limits)

    def test_a_codestream_is_read_for_its_own_size(self) -> None:
        from clinic.serve_limits import Limits, size_problem

        limits = Limits(max_pixels=10_000)
        honest = _lying(JPEG2000Lossless, 64, 64)
        assert size_problem(honest, JPEG2000Lossless, limits) is None
        lying = _lying(JPEG2000Lossless, 512, 16)
        assert "codestream is 512 x 512 x 1, the header says 16 x 16 x 1" in size_problem(lying, JPEG2000Lossless, limits)
        garbage = _cr(16, 16)
        garbage.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
        assert "cannot be read" in size_problem(garbage, JPEG2000Lossless, limits)


def test_too_large_or_lying_images_are_refused_before_decoding(scorer, tmp_path) -> None:
    from clinic.serve_limits import Limits

    with running(scorer, tmp_path / "out", limits=Limits(max_pixels=96 * 96)) as node:
        big = store(node.port, _cr(128, 128))
        assert int(big.Status) == 0xC000 and big.ErrorComment.startswith("too large: 128 x 128")
        j2k = store(node.port, _lying(JPEG2000Lossless, 2048, 16))  # 850 bytes that decode to 8 MB
        assert int(j2k.Status) == 0xC000 and "codestream is 2048" in j2k.ErrorComment
        assert int(store(node.port, _cr(96, 96)).Status) == 0x0000


def test_an_rle_frame_that_overruns_its_header_is_answered(scorer, tmp_path) -> None:
    """pylibjpeg-rle panics (a BaseException) on segments longer than Rows x Columns: the sender still gets 0xC000."""
    with running(scorer, tmp_path / "out") as node:
        status = store(node.port, _lying(RLELossless, 512, 16))
        assert int(status.Status) == 0xC000
        assert echo(node.port) == 0x0000


def test_a_data_set_over_the_byte_cap_aborts_its_association(scorer, tmp_path, caplog) -> None:
    from clinic.serve_limits import HEADER_BYTES, Limits

    limits = Limits(max_pixels=64 * 64)
    ds = _cr(64, 64)
    ds.add_new(0x00091010, "OB", b"\x00" * (limits.max_dataset_bytes + (4 << 20)))  # a private element, 4 MiB past the cap
    assert limits.max_dataset_bytes == 2 * 64 * 64 + HEADER_BYTES
    with running(scorer, tmp_path / "out", limits=limits) as node:
        assoc = associate(node.port, [ds])
        status = assoc.send_c_store(ds)
        assert not status  # no response: aborted while the data arrived, and the rest was never read
        assert any("a data set over" in r.getMessage() and "aborted" in r.getMessage() for r in caplog.records)
        assert not list((tmp_path / "out" / ".incoming").iterdir()) and node.scored == 0  # never handled
        assert echo(node.port) == 0x0000 and int(store(node.port, _cr(64, 64)).Status) == 0x0000


def test_a_pdu_longer_than_announced_closes_the_connection_at_once(scorer, tmp_path) -> None:
    """A PDU length field of 3 GB: the listener hangs up instead of reading (and holding) 3 GB."""
    with running(scorer, tmp_path / "out") as node:
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
            sock.sendall(struct.pack(">BBL", 0x01, 0, 3_000_000_000) + b"\x00" * 64)  # an A-ASSOCIATE-RQ header
            started = time.monotonic()
            try:
                closed = sock.recv(1024) == b""
            except ConnectionResetError:
                closed = True
            assert closed and time.monotonic() - started < 5
        assert echo(node.port) == 0x0000


def test_one_peer_cannot_hold_every_association(scorer, tmp_path) -> None:
    from clinic.serve_limits import Limits

    with running(scorer, tmp_path / "out", limits=Limits(max_per_peer=1)) as node:
        first = associate(node.port)
        assert first.is_established
        second = associate(node.port)
        assert second.is_rejected and second.acceptor.primitive.result_str == "Rejected Transient"
        first.release()
        deadline = time.monotonic() + 10  # the listener's side of a released association ends a moment later
        while (status := echo(node.port)) != 0x0000 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status == 0x0000  # the slot is free again


def test_all_peers_together_are_bounded(scorer, tmp_path) -> None:
    from clinic.serve_limits import Limits

    with running(scorer, tmp_path / "out", limits=Limits(max_associations=1, max_per_peer=5)) as node:
        first = associate(node.port)
        assert first.is_established and associate(node.port).is_rejected
        first.release()


def test_an_idle_association_is_closed(scorer, tmp_path) -> None:
    from clinic.serve_limits import Limits

    with running(scorer, tmp_path / "out", limits=Limits(idle_timeout=1.0)) as node:
        assoc = associate(node.port)
        assert assoc.is_established
        deadline = time.monotonic() + 10
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not assoc.is_established and assoc.is_aborted


def test_limits_must_be_positive() -> None:
    from clinic.serve_limits import Limits

    with pytest.raises(ValueError, match="must be positive"):
        Limits(max_per_peer=0)
