"""File names from UIDs (clinic/uids.py): never a path from a received value, never one image's results over another's."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pydicom
import pytest
from conftest import chest
from PIL import Image

from clinic.cli import main
from clinic.model import Scorer
from clinic.outputs import build_outputs, write_outputs
from clinic.predict import read_source

# clinic.uids is imported inside the tests, so that the tests of behaviour also run (and fail) on code without it.


class TestUidRules:
    @pytest.mark.parametrize("uid", ["1.2.3", "0.0", "1.2.840.10008.5.1.4.1.1.1", "1." + "2" * 62])
    def test_valid(self, uid: str) -> None:
        from clinic.uids import is_safe_key, is_valid_uid

        assert is_valid_uid(uid) and is_safe_key(uid)

    @pytest.mark.parametrize("uid", ["", "../escaped", "/abs/path", "1.2.3/../../x", "1.2.03", "1..2", ".1", "1.2.", "1.2.3\n",
                                     "1.2.3\nERROR x", "1.2a", "1." + "2" * 63, "1.2.3-2-2", " 1.2"])
    def test_invalid(self, uid: str) -> None:
        from clinic.uids import is_safe_key, is_valid_uid

        assert not is_valid_uid(uid) and not is_safe_key(uid)

    def test_keys_made_here_are_safe_and_nothing_else(self, tmp_path) -> None:
        from clinic.uids import file_key, is_safe_key

        path = tmp_path / "x.png"
        path.write_bytes(b"pixels")
        hashed = file_key("../escaped", path)
        assert hashed.startswith("sha256-") and len(hashed) == 31 and is_safe_key(hashed) and is_safe_key(f"{hashed}-2")
        assert file_key(None, path) == hashed  # the file's bytes, whatever the invalid UID was
        assert file_key("1.2.3", path) == "1.2.3" and is_safe_key("1.2.3-12")
        assert not is_safe_key("sha256-../../x") and not is_safe_key(hashed + "/..")

    def test_a_key_used_again_gets_a_suffix(self, tmp_path) -> None:
        from clinic.uids import OutputNames

        names = OutputNames()
        assert names.claim("1.2.3", tmp_path / "a") == ("1.2.3", None)
        assert names.claim("1.2.3", tmp_path / "b") == ("1.2.3-2", tmp_path / "a")
        assert names.claim("1.2.3", tmp_path / "c") == ("1.2.3-3", tmp_path / "a")
        assert names.claim("1.2.4", tmp_path / "d") == ("1.2.4", None)


def test_write_outputs_refuses_a_key_that_is_a_path(scatter_model, patient_dicom, tmp_path) -> None:
    """Issue item 2 (file mode): a header's SOP Instance UID ``../escaped`` wrote results beside --out."""
    scorer = Scorer(scatter_model, threads=1)
    ds = pydicom.dcmread(patient_dicom)
    ds.SOPInstanceUID = "../escaped"
    ds.save_as(patient_dicom, enforce_file_format=True)
    source = read_source(patient_dicom)
    outputs = build_outputs(source, scorer.score(source.pixels), scorer)
    out = tmp_path / "deep" / "out"
    written = write_outputs(outputs, out)
    assert source.key.startswith("sha256-") and all(p.startswith(str(out / source.key)) for p in written.values() if isinstance(p, str))
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["out"]
    with pytest.raises(ValueError, match="not a valid UID or a file hash"):
        write_outputs(outputs, out, key="../escaped")


def test_two_files_with_one_uid_keep_both_results(scatter_model, patient_dicom, tmp_path, capsys) -> None:
    """Issue 24 item 9: the second file with a SOP Instance UID overwrote the first one's SR and heatmaps."""
    twin = patient_dicom.parent / "twin.dcm"
    ds = pydicom.dcmread(patient_dicom)
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[::-1]).tobytes()  # another image, the same UID
    ds.save_as(twin, enforce_file_format=True)
    out = tmp_path / "out"
    assert main(["--model", str(scatter_model), str(patient_dicom), str(twin), "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    first, second = (json.loads(line) for line in captured.out.splitlines())
    uid = ds.SOPInstanceUID
    assert first["sr"] == str(out / f"{uid}.sr.dcm") and second["sr"] == str(out / f"{uid}-2.sr.dcm")
    assert first["heatmap_png"] != second["heatmap_png"] and len(list(out.glob("*.heatmap.*"))) == 4
    for line in (first, second):  # each SR file holds its own image's probability
        sr = pydicom.dcmread(line["sr"])
        values = [float(m.MeasuredValueSequence[0].NumericValue) for item in sr.ContentSequence if "ContentSequence" in item
                  for group in item.ContentSequence if "ContentSequence" in group for m in group.ContentSequence
                  if "MeasuredValueSequence" in m]
        assert round(line["probabilities"]["opacity"], 6) in values
    assert "twin.dcm: same SOP Instance UID (or same file) as" in captured.err and f"kept as {uid}-2.*" in captured.err


def test_png_results_are_named_by_the_file_hash(scatter_model, tmp_path, capsys) -> None:
    Image.fromarray(np.rint(chest() * 255).astype(np.uint8)).save(tmp_path / "research.png")
    assert main(["--model", str(scatter_model), str(tmp_path / "research.png"), "--out", str(tmp_path / "out"), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    digest = hashlib.sha256((tmp_path / "research.png").read_bytes()).hexdigest()[:24]
    assert rec["heatmap_png"] == str(tmp_path / "out" / f"sha256-{digest}.heatmap.png")
