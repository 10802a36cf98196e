"""Label tables as hospitals have them (common/labels.py): class column, NIH findings list, CheXpert columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.dataset import DatasetError, encode_targets, scan_site
from common.labels import LabelError, LabelPolicy, encode, parse_label_map

SALT = b"test-salt"


def _table(text: str) -> tuple[list[dict[str, str]], list[str]]:
    lines = [line.split(",") for line in text.strip().splitlines()]
    return [dict(zip(lines[0], row, strict=True)) for row in lines[1:]], lines[0]


def _nan_equal(a: np.ndarray, b: list) -> bool:
    return bool(np.array_equal(a, np.asarray(b, dtype=np.float32), equal_nan=True))


class TestClassColumn:
    def test_label_column_today_binary(self):
        rows, cols = _table("label\nnormal\nopacity\nnormal")
        enc = encode(rows, cols, "binary", ("opacity",), LabelPolicy())
        assert enc.y[:, 0].tolist() == [0, 1, 0] and enc.source == "labels.csv column 'label'"

    def test_numeric_label_with_class_name(self):
        rows, cols = _table("label,class_name\n0,normal\n1,pneumonia")
        enc = encode(rows, cols, "binary", ("PNEUMONIA",), LabelPolicy())
        assert enc.y[:, 0].tolist() == [0, 1]

    def test_chosen_column_for_multiclass(self):
        rows, cols = _table("label,class_name,subtype\n0,normal,normal\n1,pneumonia,bacteria\n1,pneumonia,virus\n"
                            "1,pneumonia,fungus")
        enc = encode(rows, cols, "multiclass", ("normal", "bacteria", "virus"), LabelPolicy(label_column="subtype"))
        assert enc.y.dtype == np.int64 and enc.y.tolist() == [0, 1, 2] and enc.keep == [0, 1, 2]
        assert sum(enc.dropped.values()) == 1

    def test_multiclass_finds_the_column_that_knows_every_class(self):
        rows, cols = _table("label,class_name,subtype\n0,normal,normal\n1,pneumonia,bacteria\n1,pneumonia,virus")
        enc = encode(rows, cols, "multiclass", ("normal", "bacteria", "virus"), LabelPolicy())
        assert enc.y.tolist() == [0, 1, 2] and "subtype" in enc.source

    def test_unknown_label_column_names_the_columns(self):
        rows, cols = _table("label\nnormal")
        with pytest.raises(LabelError, match="not a column of labels.csv.*label"):
            encode(rows, cols, "multiclass", ("a", "b"), LabelPolicy(label_column="grade"))


class TestFindingsList:
    """NIH ChestX-ray14: finding_labels = 'Effusion|Infiltration', 'No Finding' = all absent."""

    TABLE = "label,finding_labels\n1,Effusion|Infiltration\n0,No Finding\n1,Atelectasis\n1,Pleural_Thickening"

    def test_pipe_separated_findings(self):
        rows, cols = _table(self.TABLE)
        enc = encode(rows, cols, "multilabel", ("Atelectasis", "Effusion", "Infiltration", "Nodule"), LabelPolicy())
        assert enc.y.tolist() == [[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
        assert enc.not_labelled == ()  # Nodule is an NIH finding: absent, not unknown
        assert "finding_labels" in enc.source

    def test_names_normalised_and_mapped(self):
        rows, cols = _table(self.TABLE)
        enc = encode(rows, cols, "binary", ("pleural thickening",), LabelPolicy())
        assert enc.y[:, 0].tolist() == [0, 0, 0, 1]
        mapped = encode(rows, cols, "multilabel", ("Fluid", "Opacity"), LabelPolicy(label_map=parse_label_map("Effusion=Fluid")))
        assert _nan_equal(mapped.y[:, 0], [1, 0, 0, 0]) and np.isnan(mapped.y[:, 1]).all()
        assert mapped.not_labelled == ("Opacity",)

    def test_binary_on_the_label_column_still_works(self):
        rows, cols = _table(self.TABLE)
        enc = encode(rows, cols, "binary", ("abnormal",), LabelPolicy())
        assert enc.y[:, 0].tolist() == [1, 0, 1, 1] and enc.source == "labels.csv column 'label'"


class TestFindingColumns:
    """CheXpert / MIMIC-CXR: 1, 0, -1 (uncertain), blank (not mentioned), as floats or ints."""

    TABLE = "Path,Sex,Pleural Effusion,Edema,Cardiomegaly\na,F,1.0,-1.0,\nb,M,0.0,,-1\nc,F,-1,1,0"

    @pytest.mark.parametrize("uncertain,blank,expected", [
        ("ignore", "negative", [[1, np.nan, 0], [0, 0, np.nan], [np.nan, 1, 0]]),
        ("positive", "negative", [[1, 1, 0], [0, 0, 1], [1, 1, 0]]),
        ("negative", "ignore", [[1, 0, np.nan], [0, np.nan, 0], [0, 1, 0]]),
    ])
    def test_uncertain_and_blank_policies(self, uncertain, blank, expected):
        rows, cols = _table(self.TABLE)
        policy = LabelPolicy(uncertain=uncertain, blank=blank, label_map=parse_label_map("Pleural Effusion=Effusion"))
        enc = encode(rows, cols, "multilabel", ("Effusion", "Edema", "Cardiomegaly"), policy)
        assert _nan_equal(enc.y, expected)
        assert enc.uncertain == {"Effusion": 1, "Edema": 1, "Cardiomegaly": 1}
        assert enc.blank == {"Cardiomegaly": 1, "Edema": 1}

    def test_a_finding_the_site_does_not_label_is_masked_not_negative(self):
        rows, cols = _table(self.TABLE)
        enc = encode(rows, cols, "multilabel", ("Edema", "Nodule"), LabelPolicy())
        assert enc.not_labelled == ("Nodule",) and np.isnan(enc.y[:, 1]).all()

    def test_an_image_with_nothing_known_is_left_out(self):
        rows, cols = _table("file,Edema\na,-1\nb,1")
        enc = encode(rows, cols, "binary", ("Edema",), LabelPolicy(uncertain="ignore"))
        assert enc.keep == [1] and sum(enc.dropped.values()) == 1

    def test_multiclass_refused(self):
        rows, cols = _table(self.TABLE)
        with pytest.raises(LabelError, match="multilabel or binary"):
            encode(rows, cols, "multiclass", ("Edema", "Cardiomegaly"), LabelPolicy())


class TestLabelMap:
    def test_inline_and_file(self, tmp_path):
        assert parse_label_map("Pleural effusion=Effusion; Lung Opacity = Opacity") == {
            "pleural effusion": "Effusion", "lung opacity": "Opacity"}
        path = tmp_path / "map.txt"
        path.write_text("# site = federation\nPleural effusion = Effusion\nLung_Opacity,Opacity\n")
        assert parse_label_map(str(path)) == {"pleural effusion": "Effusion", "lung opacity": "Opacity"}

    def test_bad_entry(self):
        with pytest.raises(LabelError, match="expected `site name = federation name`"):
            parse_label_map("Effusion=; a=b")


def test_site_folder_with_chexpert_columns(tmp_path: Path):
    """Through scan_site / encode_targets: identifiers stay out of the records, -1 follows the policy."""
    lines = ["file,patient_id,Effusion,Edema"]
    for i, (eff, ede) in enumerate([("1", "-1"), ("0", ""), ("-1", "1"), ("", "0")]):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,p{i},{eff},{ede}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    index = scan_site(tmp_path, salt=SALT)
    assert index.label_kind == "multi" and "patient_id" not in index.records[0].label_row
    t = encode_targets(index, "multilabel", ("Effusion", "Edema"), LabelPolicy(uncertain="positive", blank="ignore"))
    assert _nan_equal(t.y, [[1, 1], [0, np.nan], [1, 1], [np.nan, 0]])
    with pytest.raises(DatasetError, match="no column for Nodule"):
        encode_targets(index, "multilabel", ("Nodule",))
