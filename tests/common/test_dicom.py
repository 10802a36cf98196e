"""Tests for common.dicom: what a radiologist would check on the displayed pixels.

Real files (via the ``dicom_dir`` fixture, skipped without FEDXRAY_DATA) check encodings,
LUT test objects and chest anatomy; tiny generated datasets written to tmp_path check each
step of the display chain and every kind of broken file.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.processing import convert_color_space
from pydicom.uid import (
    BasicTextSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

import common.dicom as dicom
import common.dicom_decode as dicom_decode
from common.dicom import DEFAULT_SALT, DicomError, Radiograph, read_radiograph, salted_hash

SIIM = "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
FAKE_MONO1 = "txv_Fake_MONOHR1.dcm"
RG1 = {"UNCR": "pydicomdata_RG1_UNCR.dcm", "J2KR": "pydicomdata_RG1_J2KR.dcm", "J2KI": "pydicomdata_RG1_J2KI.dcm"}
CR_RESCALE = "pydicom_dicomdirtests_CR1_6154.dcm"
VOI_LUT_OBJECT = "pydicomdata_vlut_04.dcm"
MODALITY_LUT_OBJECT = "pydicomdata_mlut_18.dcm"
META_KEYS = {
    "modality",
    "view",
    "photometric",
    "rows",
    "cols",
    "bits_stored",
    "transfer_syntax",
    "transfer_syntax_name",
    "frames",
    "frame_used",
    "window_source",
    "patient_hash",
    "study_hash",
}

# A 12-bit ramp: every test below can compute the expected display value by hand.
RAMP = (np.arange(64, dtype=np.uint16) * 64).reshape(8, 8)  # 0 .. 4032


@pytest.fixture(scope="session")
def real(dicom_dir: Path) -> dict[str, Radiograph]:
    """Every real file read once (J2K decoding is the slow part of this module's tests)."""
    return {path.name: read_radiograph(path) for path in sorted(dicom_dir.glob("*.dcm"))}


def _dataset(
    arr: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None, **attrs: Any
) -> Dataset:
    """A minimal secondary-capture image dataset around ``arr`` (Explicit VR Little Endian)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "OT"
    ds.PatientID = "PAT-0001"
    ds.PatientName = "Test^Patient"
    ds.StudyInstanceUID = generate_uid()
    ds.set_pixel_data(arr, photometric, bits_stored or arr.dtype.itemsize * 8)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _write(ds: Dataset, path: Path, *, file_meta: bool = True, implicit_vr: bool = True) -> Path:
    """Write ``ds`` as a Part 10 file, or as a bare dataset (no preamble, no File Meta)."""
    if file_meta:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.file_meta = FileMetaDataset()
        ds.preamble = None
        pydicom.dcmwrite(path, ds, enforce_file_format=False, implicit_vr=implicit_vr, little_endian=True)
    return path


def _read(
    tmp_path: Path, arr: np.ndarray = RAMP, photometric: str = "MONOCHROME2", bits_stored: int = 12, **attrs: Any
) -> Radiograph:
    return read_radiograph(_write(_dataset(arr, photometric, bits_stored, **attrs), tmp_path / "x.dcm"))


def _linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 with y_min=0, y_max=1, written out independently."""
    x = x.astype(np.float64)
    y = (x - (center - 0.5)) / (width - 1) + 0.5
    y[x <= center - 0.5 - (width - 1) / 2] = 0.0
    y[x > center - 0.5 + (width - 1) / 2] = 1.0
    return y


def _patch_mean(pixels: np.ndarray, rows: tuple[float, float], cols: tuple[float, float]) -> float:
    h, w = pixels.shape
    return float(pixels[int(rows[0] * h) : int(rows[1] * h), int(cols[0] * w) : int(cols[1] * w)].mean())


class TestRealFiles:
    """Every shared file decodes to float32 [H, W] in [0, 1] at native size with the safe meta."""

    def test_every_file_is_display_ready(self, real: dict[str, Radiograph], dicom_dir: Path) -> None:
        assert len(real) >= 9
        for name, rad in real.items():
            ds = pydicom.dcmread(dicom_dir / name, stop_before_pixels=True)
            assert rad.pixels.dtype == np.float32, name
            assert rad.pixels.shape == (ds.Rows, ds.Columns), name
            assert 0.0 <= rad.pixels.min() and rad.pixels.max() <= 1.0, name
            assert rad.pixels.std() > 0.01, f"{name} displays blank"
            assert set(rad.meta) == META_KEYS, name
            assert rad.meta["transfer_syntax"] == ds.file_meta.TransferSyntaxUID, name
            assert rad.meta["photometric"] == ds.PhotometricInterpretation, name
            assert (rad.meta["frames"], rad.meta["frame_used"]) == (1, 0), name

    def test_window_source_follows_the_header(self, real: dict[str, Radiograph]) -> None:
        assert real[VOI_LUT_OBJECT].meta["window_source"] == "voi_lut"
        assert real[RG1["UNCR"]].meta["window_source"] == "window"
        assert real[SIIM].meta["window_source"] == "none"


class TestCompressedEncodings:
    """One chest radiograph in three encodings: lossless must be identical, lossy close."""

    def test_jpeg2000_lossless_is_identical_to_uncompressed(self, real: dict[str, Radiograph]) -> None:
        np.testing.assert_array_equal(real[RG1["J2KR"]].pixels, real[RG1["UNCR"]].pixels)

    def test_jpeg2000_lossy_is_close(self, real: dict[str, Radiograph]) -> None:
        # Measured: mean |diff| 0.0017, max 0.0134, correlation 0.99990.
        reference, lossy = real[RG1["UNCR"]].pixels, real[RG1["J2KI"]].pixels
        diff = np.abs(reference - lossy)
        assert diff.mean() < 0.005
        assert diff.max() < 0.05
        assert np.corrcoef(reference.ravel(), lossy.ravel())[0, 1] > 0.999
        assert not np.array_equal(reference, lossy)  # it really is the lossy stream


class TestMonochrome1:
    def test_fake_monochrome1_is_the_inverse_of_the_same_image(self, real: dict[str, Radiograph]) -> None:
        np.testing.assert_allclose(real[FAKE_MONO1].pixels, 1.0 - real[SIIM].pixels, atol=1e-6)


class TestModalityRescale:
    def test_rescale_then_window_by_hand(self, real: dict[str, Radiograph], dicom_dir: Path) -> None:
        ds = pydicom.dcmread(dicom_dir / CR_RESCALE)
        stored = ds.pixel_array.astype(np.float64)
        modality = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        expected = 1.0 - _linear_window(modality, float(ds.WindowCenter), float(ds.WindowWidth))  # MONOCHROME1
        np.testing.assert_allclose(real[CR_RESCALE].pixels, expected, atol=1e-5)
        without_rescale = 1.0 - _linear_window(stored, float(ds.WindowCenter), float(ds.WindowWidth))
        assert np.abs(without_rescale - expected).max() > 0.05  # the check can tell

    def test_float_rescale_on_generated_image(self, tmp_path: Path) -> None:
        rad = _read(tmp_path, RescaleSlope="0.5", RescaleIntercept="-100", WindowCenter="400", WindowWidth="801")
        np.testing.assert_allclose(rad.pixels, _linear_window(RAMP * 0.5 - 100, 400, 801), atol=1e-5)


class TestLutObjects:
    """The OFFIS LUT test objects follow the LUT tables read from their own datasets."""

    def test_voi_lut_object(self, real: dict[str, Radiograph], dicom_dir: Path) -> None:
        ds = pydicom.dcmread(dicom_dir / VOI_LUT_OBJECT)
        entries, first, bits = ds.VOILUTSequence[0].LUTDescriptor
        lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
        stored = ds.pixel_array.astype(np.int64)
        expected = lut[np.clip(stored - first, 0, (entries or 65536) - 1)] / (2**bits - 1)
        pixels = real[VOI_LUT_OBJECT].pixels
        for row, col in [(0, 0), (100, 300), (256, 256), (400, 50), (511, 511)]:
            assert pixels[row, col] == pytest.approx(expected[row, col], abs=1e-6)
        np.testing.assert_allclose(pixels, expected, atol=1e-6)

    def test_modality_lut_object(self, real: dict[str, Radiograph], dicom_dir: Path) -> None:
        ds = pydicom.dcmread(dicom_dir / MODALITY_LUT_OBJECT)
        entries, first, _bits = ds.ModalityLUTSequence[0].LUTDescriptor
        lut = np.asarray(ds.ModalityLUTSequence[0].LUTData, dtype=np.float64)
        stored = ds.pixel_array.astype(np.int64)  # signed: first value mapped is negative
        assert first < 0 and stored.min() < 0
        modality = lut[np.clip(stored - first, 0, entries - 1)]
        expected = (modality - modality.min()) / (modality.max() - modality.min())  # no VOI: min-max
        pixels = real[MODALITY_LUT_OBJECT].pixels
        assert real[MODALITY_LUT_OBJECT].meta["window_source"] == "none"
        low, high = np.unravel_index(stored.argmin(), stored.shape), np.unravel_index(stored.argmax(), stored.shape)
        assert (pixels[low], pixels[high]) == (0.0, 1.0)
        np.testing.assert_allclose(pixels, expected, atol=1e-6)

    def test_nonlinear_modality_lut(self, tmp_path: Path) -> None:
        lut_item = Dataset()
        lut_item.add_new("LUTDescriptor", "US", [64, 0, 16])
        lut_item.add_new("LUTData", "US", [int(v) for v in np.arange(64) ** 2])  # square, not min-max
        lut_item.ModalityLUTType = "US"
        stored = np.arange(64, dtype=np.uint16).reshape(8, 8)
        rad = _read(tmp_path, stored, bits_stored=6, ModalityLUTSequence=[lut_item])
        np.testing.assert_allclose(rad.pixels, (stored.astype(float) ** 2) / 63**2, atol=1e-6)

    def test_nonlinear_voi_lut_wins_over_window(self, tmp_path: Path) -> None:
        lut_item = Dataset()
        lut_item.add_new("LUTDescriptor", "US", [64, 0, 8])
        table = (255 - 4 * np.arange(64)).astype("<u2")  # decreasing: a reversed display
        lut_item.add_new("LUTData", "OW", table.tobytes())  # OW: the bytes path
        stored = np.arange(64, dtype=np.uint16).reshape(8, 8)
        rad = _read(tmp_path, stored, bits_stored=6, VOILUTSequence=[lut_item], WindowCenter="32", WindowWidth="64")
        assert rad.meta["window_source"] == "voi_lut"
        np.testing.assert_allclose(rad.pixels, (255 - 4 * stored.astype(float)) / 255, atol=1e-6)


class TestChestAnatomy:
    """Air-filled lungs display darker than the spine: the polarity a radiologist expects."""

    LUNGS = (((0.35, 0.55), (0.18, 0.33)), ((0.35, 0.55), (0.67, 0.82)))  # mid-thorax, both sides
    SPINE = ((0.30, 0.60), (0.46, 0.54))  # central vertical strip

    @pytest.mark.parametrize("name", [SIIM, *RG1.values()])
    def test_lungs_darker_than_spine(self, real: dict[str, Radiograph], name: str) -> None:
        # Measured lungs/spine: SIIM 0.52/0.47 vs 0.81; RG1 0.63/0.59 vs 0.88.
        pixels = real[name].pixels
        spine = _patch_mean(pixels, *self.SPINE)
        for rows, cols in self.LUNGS:
            assert _patch_mean(pixels, rows, cols) < spine - 0.15, name


class TestMetaPrivacy:
    IDENTIFYING = (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "AccessionNumber",
        "StudyID",
        "InstitutionName",
        "ReferringPhysicianName",
    )

    def test_no_identifier_in_clear(self, real: dict[str, Radiograph], dicom_dir: Path) -> None:
        for name, rad in real.items():
            ds = pydicom.dcmread(dicom_dir / name, stop_before_pixels=True)
            shown = " ".join(str(v) for v in rad.meta.values())
            for keyword in self.IDENTIFYING:
                value = str(ds.get(keyword, "") or "")
                if len(value) >= 4:
                    assert value not in shown, f"{keyword} of {name} leaks into meta"
            assert name not in shown

    def test_hashes_are_salted_and_stable(self, real: dict[str, Radiograph], dicom_dir: Path) -> None:
        ds = pydicom.dcmread(dicom_dir / SIIM, stop_before_pixels=True)
        meta = real[SIIM].meta
        assert meta["patient_hash"] == salted_hash(ds.PatientID, DEFAULT_SALT)
        assert len(meta["patient_hash"]) == 64 and len(meta["study_hash"]) == 64
        assert meta["patient_hash"] == real[FAKE_MONO1].meta["patient_hash"]  # same patient
        assert real[RG1["UNCR"]].meta["patient_hash"] == real[RG1["J2KI"]].meta["patient_hash"]
        assert real[RG1["UNCR"]].meta["patient_hash"] != meta["patient_hash"]
        other_site = read_radiograph(dicom_dir / CR_RESCALE, salt="another-site-secret")
        assert other_site.meta["patient_hash"] != real[CR_RESCALE].meta["patient_hash"]

    def test_absent_ids_hash_to_empty(self, tmp_path: Path) -> None:
        ds = _dataset(RAMP, bits_stored=12)
        del ds.PatientID, ds.StudyInstanceUID
        meta = read_radiograph(_write(ds, tmp_path / "anon.dcm")).meta
        assert (meta["patient_hash"], meta["study_hash"]) == ("", "")

    def test_empty_salt_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="salt"):
            salted_hash("PAT-0001", b"")

    def test_debug_log_names_no_file(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        path = _write(_dataset(RAMP, bits_stored=12), tmp_path / "MRN0012345_DOE_JANE.dcm")
        with caplog.at_level(logging.DEBUG):
            read_radiograph(path)
        assert "read a radiograph" in caplog.text
        assert "MRN0012345" not in caplog.text and "DOE" not in caplog.text

    def test_import_leaves_pydicom_logging_as_configured(self) -> None:
        # pydicom sets WARNING for itself on import; fedxray only filters while it reads a file.
        assert logging.getLogger("pydicom").level == logging.WARNING
        assert dicom._PYDICOM_QUIET not in logging.getLogger("pydicom").filters


class TestPresentation:
    """MONOCHROME1 and Presentation LUT Shape: one inversion at most, 1 = brightest."""

    def test_monochrome2_plain(self, tmp_path: Path) -> None:
        np.testing.assert_allclose(_read(tmp_path).pixels, RAMP / RAMP.max(), atol=1e-6)

    def test_monochrome1_inverted(self, tmp_path: Path) -> None:
        np.testing.assert_allclose(_read(tmp_path, photometric="MONOCHROME1").pixels, 1 - RAMP / RAMP.max(), atol=1e-6)

    def test_monochrome1_with_inverse_is_inverted_once(self, tmp_path: Path) -> None:
        rad = _read(tmp_path, photometric="MONOCHROME1", PresentationLUTShape="INVERSE")
        np.testing.assert_allclose(rad.pixels, 1 - RAMP / RAMP.max(), atol=1e-6)

    def test_monochrome2_with_inverse_is_inverted(self, tmp_path: Path) -> None:
        rad = _read(tmp_path, PresentationLUTShape="INVERSE")
        np.testing.assert_allclose(rad.pixels, 1 - RAMP / RAMP.max(), atol=1e-6)

    def test_monochrome1_with_identity_follows_photometric(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.WARNING, logger="common.dicom"):
            rad = _read(tmp_path, photometric="MONOCHROME1", PresentationLUTShape="IDENTITY")
        np.testing.assert_allclose(rad.pixels, 1 - RAMP / RAMP.max(), atol=1e-6)
        assert "IDENTITY" in caplog.text

    def test_window_then_inversion(self, tmp_path: Path) -> None:
        rad = _read(tmp_path, photometric="MONOCHROME1", WindowCenter="2000", WindowWidth="1000")
        np.testing.assert_allclose(rad.pixels, 1 - _linear_window(RAMP, 2000, 1000), atol=1e-6)


class TestWindow:
    def test_first_of_several_windows_is_used(self, tmp_path: Path) -> None:
        rad = _read(tmp_path, WindowCenter=["1000", "3000"], WindowWidth=["500", "2000"])
        assert rad.meta["window_source"] == "window"
        np.testing.assert_allclose(rad.pixels, _linear_window(RAMP, 1000, 500), atol=1e-6)
        assert np.abs(rad.pixels - _linear_window(RAMP, 3000, 2000)).max() > 0.3

    def test_sigmoid(self, tmp_path: Path) -> None:
        rad = _read(tmp_path, WindowCenter="2000", WindowWidth="1000", VOILUTFunction="SIGMOID")
        expected = 1.0 / (1.0 + np.exp(-4.0 * (RAMP - 2000.0) / 1000.0))  # PS3.3 C.11.2.1.3.1
        np.testing.assert_allclose(rad.pixels, expected, atol=1e-6)

    def test_linear_exact(self, tmp_path: Path) -> None:
        rad = _read(tmp_path, WindowCenter="2000", WindowWidth="1000", VOILUTFunction="LINEAR_EXACT")
        np.testing.assert_allclose(rad.pixels, np.clip((RAMP - 2000.0) / 1000.0 + 0.5, 0, 1), atol=1e-6)

    def test_invalid_width_falls_back_to_min_max(self, tmp_path: Path) -> None:
        rad = _read(tmp_path, WindowCenter="2000", WindowWidth="0")
        assert rad.meta["window_source"] == "none"
        np.testing.assert_allclose(rad.pixels, RAMP / RAMP.max(), atol=1e-6)

    def test_enhanced_functional_group_window(self, tmp_path: Path) -> None:
        voi, group = Dataset(), Dataset()
        voi.WindowCenter, voi.WindowWidth = "1000", "500"
        group.FrameVOILUTSequence = [voi]
        rad = _read(tmp_path, SharedFunctionalGroupsSequence=[group])
        assert rad.meta["window_source"] == "window"
        np.testing.assert_allclose(rad.pixels, _linear_window(RAMP, 1000, 500), atol=1e-6)


class TestColour:
    PATCHES = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], dtype=np.uint8)

    def test_rgb_secondary_capture_to_luminance(self, tmp_path: Path) -> None:
        rad = _read(tmp_path, self.PATCHES, photometric="RGB", bits_stored=8)
        np.testing.assert_allclose(rad.pixels, [[0.299, 0.587], [0.114, 1.0]], atol=1e-5)
        assert rad.pixels.ndim == 2 and rad.meta["window_source"] == "none"

    def test_ybr_full_matches_rgb(self, tmp_path: Path) -> None:
        rgb = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
        rad = _read(tmp_path, ybr, photometric="YBR_FULL", bits_stored=8)
        expected = rgb.astype(float) @ [0.299, 0.587, 0.114] / 255
        np.testing.assert_allclose(rad.pixels, expected, atol=2 / 255)

    def test_palette_colour(self, tmp_path: Path) -> None:
        ramp = np.array([[0, 1], [2, 3]], dtype=np.uint8)
        lut = (np.arange(4, dtype="<u2") * 85 * 257).tobytes()  # grey palette, 16-bit entries
        attrs = {f"{c}PaletteColorLookupTableDescriptor": [4, 0, 16] for c in ("Red", "Green", "Blue")}
        attrs |= {f"{c}PaletteColorLookupTableData": lut for c in ("Red", "Green", "Blue")}
        rad = _read(tmp_path, ramp, photometric="PALETTE COLOR", bits_stored=8, **attrs)
        np.testing.assert_allclose(rad.pixels, ramp / 3, atol=1e-5)


class TestFramesAndSyntaxes:
    def test_multiframe_uses_first_frame(self, tmp_path: Path) -> None:
        frames = np.zeros((3, 8, 8), dtype=np.uint16)
        frames[0, :2, :2] = 4000  # frame 0: bright top-left corner
        frames[1:, -2:, -2:] = 4000  # other frames: bright bottom-right
        rad = _read(tmp_path, frames, bits_stored=12)
        assert (rad.meta["frames"], rad.meta["frame_used"]) == (3, 0)
        np.testing.assert_array_equal(rad.pixels, frames[0] / 4000)

    def test_file_without_file_meta(self, tmp_path: Path) -> None:
        with_meta = read_radiograph(_write(_dataset(RAMP, "MONOCHROME1", 12), tmp_path / "meta.dcm"))
        path = _write(_dataset(RAMP, "MONOCHROME1", 12), tmp_path / "raw.dcm", file_meta=False)
        assert path.read_bytes()[128:132] != b"DICM"
        rad = read_radiograph(path)
        assert rad.meta["transfer_syntax"] == ImplicitVRLittleEndian
        np.testing.assert_array_equal(rad.pixels, with_meta.pixels)

    def test_rle_with_and_without_file_meta(self, tmp_path: Path) -> None:
        plain = _read(tmp_path, RAMP, bits_stored=12, WindowCenter="2000", WindowWidth="3000")
        ds = _dataset(RAMP, bits_stored=12, WindowCenter="2000", WindowWidth="3000")
        ds.compress(RLELossless)
        rle = read_radiograph(_write(ds, tmp_path / "rle.dcm"))
        assert rle.meta["transfer_syntax"] == RLELossless
        np.testing.assert_array_equal(rle.pixels, plain.pixels)
        guessed = read_radiograph(_write(ds, tmp_path / "rle_raw.dcm", file_meta=False, implicit_vr=False))
        assert guessed.meta["transfer_syntax"] == RLELossless
        np.testing.assert_array_equal(guessed.pixels, plain.pixels)

    def test_jpeg_without_file_meta(self, real: dict[str, Radiograph], dicom_dir: Path, tmp_path: Path) -> None:
        ds = pydicom.dcmread(dicom_dir / SIIM)
        rad = read_radiograph(_write(ds, tmp_path / "siim_raw.dcm", file_meta=False, implicit_vr=False))
        assert rad.meta["transfer_syntax"] == JPEGBaseline8Bit
        np.testing.assert_array_equal(rad.pixels, real[SIIM].pixels)

    def test_missing_decoder_names_the_package(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        class NoPlugin:
            is_available = False
            missing_dependencies = ["pylibjpeg - requires pylibjpeg and pylibjpeg-openjpeg"]

        monkeypatch.setattr(dicom_decode, "get_decoder", lambda uid: NoPlugin())
        path = _write(_dataset(RAMP, bits_stored=12), tmp_path / "x.dcm")
        with pytest.raises(DicomError, match="pylibjpeg-openjpeg") as info:
            read_radiograph(path)
        assert str(path) in str(info.value)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the corrupt input itself
class TestBrokenFiles:
    """Every unusable file raises DicomError naming the file and the reason, never another type."""

    @staticmethod
    def _raises(path: Path, reason: str) -> DicomError:
        with pytest.raises(DicomError) as info:
            read_radiograph(path)
        message = str(info.value)
        assert str(path) in message and reason in message, message
        assert isinstance(info.value, ValueError) and reason in info.value.reason
        assert str(path) not in info.value.reason
        return info.value

    def test_truncated_uncompressed(self, dicom_dir: Path, tmp_path: Path) -> None:
        data = (dicom_dir / RG1["UNCR"]).read_bytes()
        (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
        self._raises(tmp_path / "cut.dcm", "truncated")

    def test_truncated_compressed(self, dicom_dir: Path, tmp_path: Path) -> None:
        data = (dicom_dir / SIIM).read_bytes()
        (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
        self._raises(tmp_path / "cut.dcm", "truncated")

    def test_zero_length(self, tmp_path: Path) -> None:
        (tmp_path / "empty.dcm").write_bytes(b"")
        self._raises(tmp_path / "empty.dcm", "empty")

    def test_garbage(self, tmp_path: Path) -> None:
        (tmp_path / "noise.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
        self._raises(tmp_path / "noise.dcm", "not DICOM")

    def test_wrong_magic(self, tmp_path: Path) -> None:
        data = bytearray(_write(_dataset(RAMP, bits_stored=12), tmp_path / "ok.dcm").read_bytes())
        data[128:132] = b"DICX"
        (tmp_path / "dicx.dcm").write_bytes(bytes(data))
        self._raises(tmp_path / "dicx.dcm", "not DICOM")

    def test_a_decoder_panic_is_a_dicom_error(self, tmp_path: Path) -> None:
        """pylibjpeg-rle panics (a BaseException, not an Exception) on a frame longer than its header says."""
        ds = _dataset(np.full((512, 512), 100, np.uint16), bits_stored=16)
        ds.compress(RLELossless)
        ds.Rows = ds.Columns = 16
        self._raises(_write(ds, tmp_path / "overrun.dcm"), "could not be decoded")

    def test_structured_report_without_pixels(self, tmp_path: Path) -> None:
        ds = _dataset(RAMP, bits_stored=12, SOPClassUID=BasicTextSRStorage, Modality="SR")
        for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "PhotometricInterpretation"):
            delattr(ds, keyword)
        self._raises(_write(ds, tmp_path / "report.dcm"), "no Pixel Data")

    def test_png_renamed_dcm(self, tmp_path: Path) -> None:
        image = pytest.importorskip("PIL.Image")
        image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "photo.dcm", format="PNG")
        self._raises(tmp_path / "photo.dcm", "PNG")

    def test_missing_path(self, tmp_path: Path) -> None:
        self._raises(tmp_path / "nowhere.dcm", "does not exist")

    def test_directory(self, tmp_path: Path) -> None:
        self._raises(tmp_path, "directory")

    def test_unsupported_photometric(self, tmp_path: Path) -> None:
        ds = _dataset(RAMP, bits_stored=12)
        ds.PhotometricInterpretation = "HSV"
        self._raises(_write(ds, tmp_path / "hsv.dcm"), "Photometric Interpretation")

    def test_error_survives_pickling(self, tmp_path: Path) -> None:
        """Scans may run in worker processes: the error and its path-free reason must cross."""
        err = self._raises(tmp_path / "nowhere.dcm", "does not exist")
        copy = pickle.loads(pickle.dumps(err))
        assert isinstance(copy, DicomError) and (str(copy), copy.reason, copy.path) == (str(err), err.reason, err.path)

    def test_mutated_files_raise_only_dicom_error(self, tmp_path: Path) -> None:
        """A small deterministic fuzz: byte flips and cuts give a valid image or DicomError."""
        data = _write(
            _dataset(
                RAMP, "MONOCHROME1", 12, WindowCenter="2000", WindowWidth="3000", RescaleSlope="1", RescaleIntercept="0"
            ),
            tmp_path / "ok.dcm",
        ).read_bytes()
        rng = np.random.default_rng(7)
        outcomes = {"read": 0, "refused": 0}
        for k in range(60):
            mutated = bytearray(data)
            if k % 2:
                mutated = mutated[: int(rng.integers(0, len(mutated)))]
            else:
                for pos in rng.integers(0, len(mutated), size=int(rng.integers(1, 12))):
                    mutated[pos] = int(rng.integers(0, 256))
            path = tmp_path / f"m{k}.dcm"
            path.write_bytes(bytes(mutated))
            try:
                rad = read_radiograph(path)
            except DicomError:
                outcomes["refused"] += 1
            else:
                assert rad.pixels.dtype == np.float32 and 0 <= rad.pixels.min() <= rad.pixels.max() <= 1
                outcomes["read"] += 1
            os.remove(path)
        assert outcomes["refused"] > 0
