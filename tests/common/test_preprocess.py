"""Tests for common.preprocess: the one image path (file -> display pixels -> model input)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from common.dicom import DicomError, read_radiograph
from common.images import ImageError, read_image, resize_image
from common.preprocess import load_pixels, to_model_input


def _gradient(rows: int = 48, cols: int = 40) -> np.ndarray:
    """Display image with a vertical ramp and a bright square: orientation and inversion show."""
    img = np.tile(np.linspace(0.0, 1.0, rows, dtype=np.float32)[:, None], (1, cols))
    img[5:15, 5:15] = 1.0
    return img


class TestLoadPixels:
    def test_dicom_goes_through_read_radiograph(self, tmp_path, dicom_writer) -> None:
        path = dicom_writer(tmp_path / "a.dcm", _gradient(), bits=12)
        np.testing.assert_array_equal(load_pixels(path), read_radiograph(path).pixels)

    def test_monochrome1_is_displayed_like_monochrome2(self, tmp_path, dicom_writer) -> None:
        """A correctly decoded MONOCHROME1 file is the same picture: bone bright in both."""
        mono2 = load_pixels(dicom_writer(tmp_path / "m2.dcm", _gradient(), bits=12))
        mono1 = load_pixels(dicom_writer(tmp_path / "m1.dcm", _gradient(), bits=12, photometric="MONOCHROME1"))
        np.testing.assert_allclose(mono1, mono2, atol=1e-3)
        assert mono1[10, 10] > 0.99  # the bright square stays bright

    def test_png_and_jpeg_go_through_read_image(self, tmp_path) -> None:
        grey = np.rint(_gradient() * 255).astype(np.uint8)
        for name in ("a.png", "b.JPEG"):
            Image.fromarray(grey).save(tmp_path / name)
            pixels = load_pixels(tmp_path / name)
            np.testing.assert_array_equal(pixels, read_image(tmp_path / name))
            assert pixels.dtype == np.float32 and pixels.shape == grey.shape

    def test_16_bit_png_keeps_its_depth(self, tmp_path) -> None:
        values = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
        Image.fromarray(values).save(tmp_path / "deep.png")
        np.testing.assert_allclose(load_pixels(tmp_path / "deep.png"), values / 65535.0, atol=1e-6)

    def test_errors_name_the_file(self, tmp_path) -> None:
        (tmp_path / "renamed.png").write_bytes(b"not a png at all")
        with pytest.raises(ImageError, match="renamed.png"):
            load_pixels(tmp_path / "renamed.png")
        (tmp_path / "garbage.dcm").write_bytes(b"\x00" * 16)
        with pytest.raises(DicomError, match=r"garbage\.dcm: "):
            load_pixels(tmp_path / "garbage.dcm")
        with pytest.raises(DicomError, match="does not exist"):
            load_pixels(tmp_path / "missing.dcm")

    def test_lossless_encodings_give_the_same_model_input(self, dicom_dir) -> None:
        """One chest in two encodings (uncompressed, JPEG 2000 lossless): the model sees the same image."""
        a = to_model_input(load_pixels(dicom_dir / "pydicomdata_RG1_UNCR.dcm"), 64)
        b = to_model_input(load_pixels(dicom_dir / "pydicomdata_RG1_J2KR.dcm"), 64)
        np.testing.assert_array_equal(a, b)


class TestToModelInput:
    def test_shape_dtype_and_range(self) -> None:
        x = to_model_input(_gradient(), 32)
        assert x.shape == (1, 1, 32, 32) and x.dtype == np.float32 and x.flags.c_contiguous
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0

    def test_it_is_the_contract_resize(self) -> None:
        """Whole image, bilinear with antialiasing, aspect not kept (interface 3, docs/interfaces.md): resize_image itself."""
        img = _gradient(100, 60)
        np.testing.assert_array_equal(to_model_input(img, 32)[0, 0], resize_image(img, 32))
        np.testing.assert_array_equal(to_model_input(img, (20, 30))[0, 0], resize_image(img, (20, 30)))
        top, bottom = to_model_input(img, 16)[0, 0, 0].mean(), to_model_input(img, 16)[0, 0, -1].mean()
        assert bottom > top  # rows keep their order (no flip, no transpose)

    def test_rejects_anything_but_one_grey_image(self) -> None:
        with pytest.raises(ValueError, match=r"one grey image \[H, W\]"):
            to_model_input(np.zeros((2, 8, 8), np.float32), 8)
        with pytest.raises(ValueError, match="positive"):
            to_model_input(np.zeros((8, 8), np.float32), 0)
