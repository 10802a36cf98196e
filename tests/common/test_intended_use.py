"""The intended-use gate's header rules, one by one (common/intended_use.py)."""

from __future__ import annotations

import json
import math

import pytest
from pydicom.dataset import Dataset

from common.intended_use import (
    OodError,
    check_header,
    check_matrix,
    check_score,
    facts_from_dataset,
    facts_from_meta,
    parse_ood_metadata,
)

CHEST = {"modality": "CR", "sop_class": "1.2.840.10008.5.1.4.1.1.1", "frames": None, "photometric": "MONOCHROME1",
         "samples": 1, "body_part": "CHEST", "view": "PA", "rows": 2048, "cols": 2048}


def verdict(**changes):
    return check_header({**CHEST, **changes}, min_side=64)


class TestModality:
    @pytest.mark.parametrize("modality", ["CR", "DX", "cr"])
    def test_radiographs_pass(self, modality):
        assert verdict(modality=modality).assessed

    @pytest.mark.parametrize("modality", ["CT", "MR", "US", "MG", "NM", "RTIMAGE", "OT"])
    def test_other_modalities_are_refused_with_the_modality_named(self, modality):
        v = verdict(modality=modality)
        assert not v.assessed and v.rule == "modality" and v.reason.startswith(f"Modality {modality}: ")

    def test_a_secondary_capture_of_a_radiograph_passes_and_of_anything_else_is_refused(self):
        sc = "1.2.840.10008.5.1.4.1.1.7"
        assert verdict(sop_class=sc, modality="CR").assessed
        v = verdict(sop_class=sc, modality="OT")
        assert v.reason == "Modality OT: a Secondary Capture, not a chest radiograph (CR or DX)"

    def test_no_modality_says_nothing(self):
        assert verdict(modality=None).assessed and verdict(modality="").assessed


class TestFrames:
    def test_one_frame_passes_and_a_series_is_refused(self):
        assert verdict(frames=1).assessed and verdict(frames="1").assessed
        v = verdict(frames=10)
        assert not v.assessed and v.rule == "frames" and v.reason.startswith("10 frames")


class TestColour:
    @pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL_422", "PALETTE COLOR"])
    def test_colour_is_refused(self, photometric):
        v = verdict(photometric=photometric)
        assert not v.assessed and v.rule == "colour" and photometric in v.reason

    def test_three_samples_per_pixel_is_colour_even_without_a_photometric(self):
        assert verdict(photometric=None, samples=3).rule == "colour"


class TestBodyPart:
    @pytest.mark.parametrize("part", ["CHEST", "THORAX", "chest", "LUNG", None, ""])
    def test_chest_or_absent_passes(self, part):
        assert verdict(body_part=part).assessed

    @pytest.mark.parametrize("part", ["EXTREMITY", "KNEE", "CSPINE", "HEAD", "ABDOMEN"])
    def test_other_parts_are_refused(self, part):
        v = verdict(body_part=part)
        assert not v.assessed and v.rule == "body-part" and v.reason.startswith(f"Body Part Examined {part}:")


class TestView:
    @pytest.mark.parametrize("view", ["PA", "AP", None, ""])
    def test_frontal_or_absent_passes(self, view):
        assert verdict(view=view).assessed

    @pytest.mark.parametrize("view", ["LL", "RL", "LATERAL"])
    def test_a_lateral_is_refused_as_a_lateral(self, view):
        v = verdict(view=view)
        assert not v.assessed and v.rule == "view" and "(lateral)" in v.reason and "frontal (PA/AP)" in v.reason

    def test_another_view_is_refused_without_calling_it_lateral(self):
        v = verdict(view="RLO")
        assert v.rule == "view" and "(lateral)" not in v.reason


class TestMatrix:
    def test_smaller_than_the_model_input_is_refused(self):
        v = verdict(rows=16, cols=16)
        assert v.rule == "matrix" and v.reason.startswith("matrix 16 x 16: smaller than the 64 x 64")
        assert not check_matrix((64, 63), min_side=64).assessed and check_matrix((64, 64), min_side=64).assessed

    def test_a_header_without_rows_passes_to_the_pixel_check(self):
        assert verdict(rows=None, cols=None).assessed


class TestFacts:
    def test_from_a_dataset_and_from_site_meta(self):
        ds = Dataset()
        ds.Modality, ds.ViewPosition, ds.BodyPartExamined, ds.Rows, ds.Columns = "DX", "LL", "CHEST", 512, 512
        assert check_header(facts_from_dataset(ds), min_side=64).rule == "view"
        meta = {"modality": "CT", "view": "", "photometric": "MONOCHROME2", "rows": 512, "cols": 512, "frames": 1}
        assert check_header(facts_from_meta(meta), min_side=64).rule == "modality"

    def test_an_empty_header_says_nothing(self):
        assert check_header(facts_from_dataset(Dataset()), min_side=64).assessed


class TestCheckScore:
    def test_above_the_cut_off_is_refused_and_nan_too(self):
        assert check_score(4.9, 5.0).assessed and not check_score(5.1, 5.0).assessed
        v = check_score(math.nan, 5.0)
        assert not v.assessed and v.rule == "image"


class TestParseOodMetadata:
    def test_absent_is_none_and_malformed_raises(self):
        assert parse_ood_metadata({}) is None
        good = json.dumps({"schema": "fedxray.ood/1", "cutoff": 7.5})
        assert parse_ood_metadata({"fedxray.ood": good})["cutoff"] == 7.5
        for bad in ("{", json.dumps({"schema": "other", "cutoff": 1}), json.dumps({"schema": "fedxray.ood/1", "cutoff": -1})):
            with pytest.raises(OodError):
                parse_ood_metadata({"fedxray.ood": bad})
