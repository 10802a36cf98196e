"""Tests for clinic.drift and common.reference: a changed acquisition is flagged, the same scanner is not.

The acquisition test writes simulated radiographs through the project's acquisition profiles
(simulations.acquisition), reads them through the one image path and scores them, exactly as
``fl-predict`` does. The reference and every window share nothing but the scanner settings under
test: the "same scanner" windows are new patients, and every changed-acquisition window shows
the same patients as the equivalent-encoding windows, so what differs is the acquisition alone.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from clinic.cli import main
from clinic.drift import (
    MIN_IMAGES,
    REFERENCE_FILE,
    REPORT_FILE,
    Observation,
    Window,
    compare,
    find_reference,
    histograms_of,
    ks,
    overall,
    psi,
    reference_from_observations,
)
from clinic.model import Scorer
from clinic.predict import read_source
from common.reference import (
    IMAGE_STATS,
    METADATA_KEY,
    ReferenceError,
    add_counts,
    bin_counts,
    parse_reference,
    reference_json,
    site_counts,
)
from simulations.acquisition import AcquisitionProfile, site_profiles, write_radiograph
from simulations.phantom import render_phantom, sample_anatomy, sample_opacity

MATRIX = (128, 128)  # small detector: the statistics are taken at the model's 64 px anyway
N_REFERENCE = 240
N_WINDOW = 120


class TestStatistics:
    def test_psi_and_ks_of_equal_and_shifted_distributions(self) -> None:
        p = np.array([0.1, 0.2, 0.4, 0.2, 0.1])
        assert psi(p, p, 200, 1000) == pytest.approx(0.0)
        assert ks(p, p, 200, 1000) == (0.0, 1.0)
        shifted = np.array([0.0, 0.1, 0.2, 0.4, 0.3])
        assert psi(shifted, p, 200, 1000) > 0.25
        d, pval = ks(shifted, p, 200, 1000)
        assert d == pytest.approx(0.4) and pval < 1e-6
        # the same shift seen in 8 images is not significant: KS knows the sample size
        assert ks(shifted, p, 8, 1000)[1] > 0.05

    def test_bins_are_fixed_and_out_of_range_values_land_in_the_end_bins(self) -> None:
        assert bin_counts("contrast", [-1.0, 0.0, 0.039, 0.041, 0.39, 5.0, float("nan")]) == [3, 1, 0, 0, 0, 0, 0, 0, 0, 2]
        assert len(bin_counts("intensity", [0.5])) == IMAGE_STATS["intensity"].bins

    def test_site_counts_add_up_to_the_pooled_counts(self) -> None:
        rng = np.random.default_rng(0)
        images = [rng.random((64, 64), dtype=np.float32) ** (1 + i % 3) for i in range(12)]
        probs = rng.random((12, 2)).astype(np.float32)
        labels = ["a", "b"]
        pooled = site_counts(images, probs, labels)
        parts = add_counts([site_counts(images[:5], probs[:5], labels), site_counts(images[5:], probs[5:], labels)])
        assert parts == pooled
        assert sum(pooled["brightness"]) == 12 and sum(pooled["intensity"]) == 12 * 64 * 64
        ref = parse_reference(reference_json(pooled, 12, (64, 64)), source="sites")
        assert ref.n_images == 12 and set(ref.statistics) == {*IMAGE_STATS, "score:a", "score:b"}

    def test_a_malformed_reference_lists_every_problem(self) -> None:
        with pytest.raises(ReferenceError) as err:
            reference_json({"intensity": [1, 2], "sizzle": [1]}, 0)
        message = str(err.value)
        for part in ("n_images", "intensity: expected 20", "unknown statistic 'sizzle'", "score:<label>", "missing statistic 'contrast'"):
            assert part in message
        with pytest.raises(ReferenceError, match="schema"):
            parse_reference(json.dumps({"schema": "other/2"}))


class TestWindow:
    def test_rolls_over_and_restarts_for_another_model(self, tmp_path) -> None:
        obs = [Observation({"brightness": 0.1 * i, "contrast": 0.1, "sharpness": 0.02, "score:x": 0.5}, [0] * 19 + [10]) for i in range(5)]
        window = Window(tmp_path, "sha-a", size=3)
        assert window.add(obs[:2]) == 2 and window.add(obs[2:]) == 3
        assert [e["values"]["brightness"] for e in window.load()] == pytest.approx([0.2, 0.3, 0.4])
        assert Window(tmp_path, "sha-b", size=3).load() == []  # another model's window is not compared
        assert Window(tmp_path, "sha-b", size=3).add(obs[:1]) == 1 and window.load() == []

    def test_too_few_images_is_collecting_not_an_alarm(self) -> None:
        ref = histograms_of([_obs(0.5) for _ in range(300)])
        drifts = compare(histograms_of([_obs(0.9) for _ in range(MIN_IMAGES - 1)]), ref)
        assert {d.status for d in drifts} == {"collecting"} and overall(drifts) == "collecting"
        assert overall(compare(histograms_of([_obs(0.9) for _ in range(MIN_IMAGES)]), ref)) == "alarm"


def _obs(brightness: float) -> Observation:
    return Observation({"brightness": brightness, "contrast": 0.2, "sharpness": 0.03, "score:x": 0.3}, [1] * 20)


# --------------------------------------------------------------------------- acquisition profiles


def _phantoms(n: int, seed: int) -> list[np.ndarray]:
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        anatomy = sample_anatomy(rng)
        out.append(render_phantom(anatomy, MATRIX, rng, opacity=sample_opacity(rng) if rng.random() < 0.4 else None))
    return out


def _observe(scorer: Scorer, folder: Path, images: list[np.ndarray], profile: AcquisitionProfile, *, misread_mono1: bool = False) -> list:
    """Write ``images`` as ``profile`` would, read and score them as fl-predict does."""
    observations = []
    for i, image in enumerate(images):
        path = folder / f"{i}.dcm"
        write_radiograph(path, image, profile, patient_id=f"P{i}", patient_name="SIM^PATIENT", study_uid=f"1.2.826.0.1.3680043.10.{i}",
                         view="PA", seed=i)
        if misread_mono1:  # a faulty export: pixels stored MONOCHROME1 (inverted), header says MONOCHROME2
            ds = pydicom.dcmread(path)
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.PresentationLUTShape = "IDENTITY"
            ds.save_as(path)
        source = read_source(path)
        scored = scorer.score(source.pixels)
        observations.append(Observation.of(scored.model_input, scored.probabilities))
    return observations


@pytest.fixture(scope="module")
def acquisition(scatter_model, tmp_path_factory):
    """(scorer, reference histograms, base profile, new-patient images) for the scanner under test."""
    base = dataclasses.replace(site_profiles(3, seed=0)[1], matrix=MATRIX)  # DX, 14 bit, RLE, one window
    scorer = Scorer(scatter_model, heatmaps=False, threads=1)
    ref = histograms_of(_observe(scorer, tmp_path_factory.mktemp("reference"), _phantoms(N_REFERENCE, seed=1), base))
    return scorer, ref, base, _phantoms(N_WINDOW, seed=2)


def _twelve_bit(p: AcquisitionProfile) -> AcquisitionProfile:
    lo, hi = p.stored_range
    return dataclasses.replace(p, bits_stored=12, stored_range=(lo // 4, hi // 4), windows=tuple((c / 4, w / 4) for c, w in p.windows))


SAME_SCANNER = {
    "same settings": lambda p: p,
    "MONOCHROME1 read correctly": lambda p: dataclasses.replace(p, photometric="MONOCHROME1"),
    "JPEG 2000 lossless instead of RLE": lambda p: dataclasses.replace(p, transfer_syntax=JPEG2000Lossless),
    "12 instead of 14 stored bits": _twelve_bit,
}
CHANGED = {
    "narrower default window": (lambda p: dataclasses.replace(p, windows=((p.windows[0][0], p.windows[0][1] * 0.5),)), False),
    "other gain and contrast": (lambda p: dataclasses.replace(p, gain=0.75, contrast=1.3), False),
    "noisier detector": (lambda p: dataclasses.replace(p, noise=0.06), False),
    "MONOCHROME1 misread": (lambda p: dataclasses.replace(p, photometric="MONOCHROME1"), True),
}


@pytest.mark.parametrize("name", list(SAME_SCANNER))
def test_the_same_scanner_is_not_flagged(acquisition, tmp_path, name) -> None:
    scorer, ref, base, images = acquisition
    drifts = compare(histograms_of(_observe(scorer, tmp_path, images, SAME_SCANNER[name](base))), ref)
    assert all(d.n_window == N_WINDOW for d in drifts)
    assert all(d.status == "ok" for d in drifts), [(d.name, d.psi, d.p_value) for d in drifts]
    assert max(d.psi for d in drifts) < 0.1


@pytest.mark.parametrize("name", list(CHANGED))
def test_a_changed_acquisition_is_flagged(acquisition, tmp_path, name) -> None:
    scorer, ref, base, images = acquisition
    change, misread = CHANGED[name]
    drifts = compare(histograms_of(_observe(scorer, tmp_path, images, change(base), misread_mono1=misread)), ref)
    assert overall(drifts) == "alarm", [(d.name, d.psi, d.p_value) for d in drifts]


# --------------------------------------------------------------------------- fl-predict drift


def test_drift_command_without_reference_says_so_then_builds_one(scatter_model, tmp_path, dicom_writer, capsys) -> None:
    from conftest import chest

    out = tmp_path / "out"
    assert main(["drift", "--model", str(scatter_model), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no drift reference" in err[0] and "--reference" in err[0]

    trusted = tmp_path / "trusted"
    for i in range(6):
        dicom_writer(trusted / f"{i}.dcm", chest(seed=i))
    for i in range(4):
        dicom_writer(tmp_path / "today" / f"{i}.dcm", 1.0 - chest(seed=10 + i))  # inverted: a broken export
    assert main(["--model", str(scatter_model), str(tmp_path / "today"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["drift", "--model", str(scatter_model), "--out", str(out), "--reference", str(trusted), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(lines[-1])
    assert doc["status"] == "collecting" and doc["window_images"] == 4 and doc["reference_images"] == 6
    assert {s["name"] for s in doc["statistics"]} == {*IMAGE_STATS, "score:opacity"}
    assert (out / REPORT_FILE).is_file() and (out / "drift.png").stat().st_size > 1000
    saved = find_reference({}, out, model_sha256=Scorer(scatter_model, heatmaps=False).identity.sha256)
    assert saved is not None and saved.n_images == 6 and (out / REFERENCE_FILE).is_file()
    assert find_reference({}, out, model_sha256="another-model") is None  # a reference holds one model's scores


def test_the_models_own_reference_is_read_from_metadata(scatter_model) -> None:
    scorer = Scorer(scatter_model, heatmaps=False)
    obs = [_obs(0.4), _obs(0.6)]
    text = reference_from_observations(obs, (64, 64), model_sha256=scorer.identity.sha256)
    ref = find_reference({METADATA_KEY: text}, None, model_sha256=scorer.identity.sha256)
    assert ref is not None and ref.source == "model metadata" and ref.n_images == 2
