"""Tests for simulations/acquisition.py and simulations/hospitals.py.

Files are read back through ``common.dicom.read_radiograph`` (the reader every site uses), so a
writer and a reader that disagree about the presentation chain fail here.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from common.dicom import DicomError, read_radiograph
from simulations.acquisition import (
    CORRUPT_KINDS,
    AcquisitionProfile,
    ProfileError,
    site_profiles,
    write_corrupt_file,
    write_radiograph,
)
from simulations.hospitals import (
    MANIFEST_FILE,
    HospitalsManifest,
    SimulationError,
    load_image_set,
    make_hospitals_from_images,
    make_synthetic_hospitals,
    pseudonymise,
    read_labels,
    source_prefix,
)
from simulations.phantom import render_phantom, sample_anatomy, sample_opacity


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _write(path: Path, image: np.ndarray, profile: AcquisitionProfile, seed: int = 0) -> None:
    write_radiograph(
        path, image, profile, patient_id="SIM-T-0001", patient_name="SYNTHETIC^T", study_uid="2.25.12345", view="PA", seed=seed
    )


def _dicom_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.dcm"))


# --------------------------------------------------------------------------- acquisition


class TestSiteProfiles:
    def test_deterministic_and_seed_dependent(self) -> None:
        assert site_profiles(4, 1) == site_profiles(4, 1)
        assert site_profiles(4, 1) != site_profiles(4, 2)

    def test_three_sites_cover_the_reader_features(self) -> None:
        profiles = site_profiles(3, 0)
        assert any(p.photometric == "MONOCHROME1" for p in profiles)
        assert {str(p.transfer_syntax) for p in profiles if p.compressed} == {"1.2.840.10008.1.2.4.90", RLELossless}
        assert any(p.voi_lut_gamma for p in profiles)
        assert any(p.no_file_meta_fraction > 0 for p in profiles)
        assert any(len(p.windows) > 1 for p in profiles)
        assert {p.modality for p in profiles} == {"CR", "DX"}
        assert len({p.matrix for p in profiles}) > 1

    def test_six_sites_cover_all_bit_depths(self) -> None:
        assert {p.bits_stored for p in site_profiles(6, 0)} == {8, 10, 12, 14, 16}

    def test_round_trips_through_a_dict(self) -> None:
        for profile in site_profiles(6, 3):
            assert AcquisitionProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile

    def test_invalid_profile_lists_every_problem(self) -> None:
        with pytest.raises(ProfileError) as err:
            AcquisitionProfile(name="bad", modality="MR", photometric="RGB", bits_stored=12, stored_range=(10, 5000))
        message = str(err.value)
        assert "modality" in message and "photometric" in message and "stored_range" in message


class TestWriteRadiograph:
    @pytest.mark.parametrize("index", range(6))
    def test_reader_returns_the_display_image_bone_bright(self, tmp_path: Path, index: int) -> None:
        profile = site_profiles(6, 0)[index]
        rng = np.random.default_rng(index)
        image = render_phantom(sample_anatomy(rng), profile.matrix, rng, opacity=sample_opacity(rng))
        for seed in range(2):  # the no-File-Meta site writes some files each way
            path = tmp_path / f"{seed}.dcm"
            _write(path, image, profile, seed=seed)
            pixels = read_radiograph(path).pixels
            assert pixels.shape == profile.matrix
            assert _corr(pixels, image) > 0.95, profile.name
            cols = pixels.shape[1]
            spine = pixels[:, cols // 2 - 3 : cols // 2 + 3].mean()
            corner = pixels[:10, :10].mean()
            assert spine > corner + 0.3, f"{profile.name}: bone should be bright, air dark"

    def test_monochrome1_is_stored_inverted(self, tmp_path: Path) -> None:
        profile = next(p for p in site_profiles(3, 0) if p.photometric == "MONOCHROME1")
        rng = np.random.default_rng(0)
        image = render_phantom(sample_anatomy(rng), profile.matrix, rng)
        _write(tmp_path / "a.dcm", image, profile)
        raw = pydicom.dcmread(tmp_path / "a.dcm").pixel_array
        assert _corr(raw, image) < -0.95

    def test_header_is_a_valid_radiograph(self, tmp_path: Path) -> None:
        for profile in site_profiles(3, 0):
            rng = np.random.default_rng(0)
            _write(tmp_path / "a.dcm", render_phantom(sample_anatomy(rng), (64, 64), rng), profile, seed=1)
            ds = pydicom.dcmread(tmp_path / "a.dcm", force=True)
            expected = "1.2.840.10008.5.1.4.1.1.1.1" if profile.modality == "DX" else "1.2.840.10008.5.1.4.1.1.1"
            assert ds.SOPClassUID == expected
            assert ds.PatientID == "SIM-T-0001" and ds.ViewPosition == "PA"
            assert ds.BitsStored == profile.bits_stored and ds.PhotometricInterpretation == profile.photometric
            assert pydicom.uid.UID(ds.SOPInstanceUID).is_valid
            if "TransferSyntaxUID" not in ds.file_meta:  # written without File Meta: implicit VR LE
                assert profile.no_file_meta_fraction > 0
                ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
            else:
                assert ds.file_meta.TransferSyntaxUID == profile.transfer_syntax
            lo, hi = profile.stored_range
            assert lo - 1 <= int(ds.pixel_array.min()) and int(ds.pixel_array.max()) <= hi + 1

    def test_some_files_lack_file_meta_at_that_site(self, tmp_path: Path) -> None:
        profile = next(p for p in site_profiles(3, 0) if p.no_file_meta_fraction)
        image = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
        preambles = set()
        for seed in range(8):
            _write(tmp_path / f"{seed}.dcm", image, profile, seed=seed)
            preambles.add((tmp_path / f"{seed}.dcm").read_bytes()[128:132] == b"DICM")
            assert _corr(read_radiograph(tmp_path / f"{seed}.dcm").pixels, image) > 0.95
        assert preambles == {True, False}

    def test_same_seed_same_bytes(self, tmp_path: Path) -> None:
        profile = site_profiles(1, 0)[0]
        image = np.random.default_rng(0).random((48, 40)).astype(np.float32)
        _write(tmp_path / "a.dcm", image, profile, seed=4)
        _write(tmp_path / "b.dcm", image, profile, seed=4)
        assert (tmp_path / "a.dcm").read_bytes() == (tmp_path / "b.dcm").read_bytes()


class TestRleProfile:
    @pytest.mark.parametrize("matrix", [(17, 37), (4, 300), (3, 129), (96, 80)])
    def test_rle_file_holds_the_same_stored_values_as_an_uncompressed_one(
        self, tmp_path: Path, matrix: tuple[int, int]
    ) -> None:
        rle = next(p for p in site_profiles(6, 0) if p.transfer_syntax == RLELossless)
        plain = dataclasses.replace(rle, transfer_syntax=ExplicitVRLittleEndian)
        image = np.random.default_rng(0).random(matrix).astype(np.float32)
        image[:, : matrix[1] // 2] = 0.5  # long runs as well as noise
        _write(tmp_path / "rle.dcm", image, rle, seed=2)
        _write(tmp_path / "plain.dcm", image, plain, seed=2)
        ds = pydicom.dcmread(tmp_path / "rle.dcm")
        assert ds.file_meta.TransferSyntaxUID == RLELossless
        assert np.array_equal(ds.pixel_array, pydicom.dcmread(tmp_path / "plain.dcm").pixel_array)


class TestCorruptFiles:
    @pytest.mark.parametrize("kind", CORRUPT_KINDS)
    def test_reader_refuses_each_kind(self, tmp_path: Path, kind: str) -> None:
        profile = site_profiles(1, 0)[0]
        rng = np.random.default_rng(0)
        _write(tmp_path / "good.dcm", render_phantom(sample_anatomy(rng), (96, 96), rng), profile)
        write_corrupt_file(tmp_path / "bad.dcm", kind, template=tmp_path / "good.dcm", seed=1)
        with pytest.raises(DicomError):
            read_radiograph(tmp_path / "bad.dcm")


# --------------------------------------------------------------------------- synthetic hospitals


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, HospitalsManifest]:
    out = tmp_path_factory.mktemp("synthetic") / "hospitals"
    manifest = make_synthetic_hospitals(out, 3, patients_per_site=8, images_per_patient=(1, 2), corrupt_per_site=3, seed=0)
    return out, manifest


class TestSyntheticHospitals:
    def test_layout_counts_and_labels(self, synthetic: tuple[Path, HospitalsManifest]) -> None:
        out, manifest = synthetic
        assert manifest.site_names == ["hospital-a", "hospital-b", "hospital-c"]
        assert HospitalsManifest.load(out / MANIFEST_FILE) == manifest
        for site in manifest.sites:
            root = out / site.name
            labels = read_labels(root)
            assert sorted(labels) == _dicom_files(root)  # every file listed, corrupt ones included
            assert len(labels) == site.n_images + site.n_corrupt and site.n_patients == 8
            assert set(labels.values()) <= {"normal", "opacity"}
            assert min(site.patients_per_class.values()) >= 1
            assert not any("normal" in f or "opacity" in f for f in labels), "label leaked into the path"

    def test_readable_files_match_the_manifest(self, synthetic: tuple[Path, HospitalsManifest]) -> None:
        out, manifest = synthetic
        for site in manifest.sites:
            readable: Counter[str] = Counter()
            by_patient: dict[str, set[str]] = defaultdict(set)
            failures = []
            for rel, label in read_labels(out / site.name).items():
                try:
                    pixels = read_radiograph(out / site.name / rel).pixels
                except DicomError as err:
                    failures.append(str(err))
                    continue
                assert pixels.shape == tuple(site.profile["matrix"])
                readable[label] += 1
                by_patient[rel.split("/")[0]].add(label)
            assert len(failures) == site.n_corrupt == 3
            assert dict(readable) == site.images_per_class
            assert all(len(v) == 1 for v in by_patient.values())  # labels are per patient

    def test_profiles_vary(self, synthetic: tuple[Path, HospitalsManifest]) -> None:
        _, manifest = synthetic
        profiles = [s.profile for s in manifest.sites]
        assert any(p["photometric"] == "MONOCHROME1" for p in profiles)
        assert any(p["transfer_syntax"] in ("1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90") for p in profiles)
        assert len({p["name"] for p in profiles}) == 3

    def test_manifest_has_no_patient_ids(self, synthetic: tuple[Path, HospitalsManifest]) -> None:
        out, _ = synthetic
        text = (out / MANIFEST_FILE).read_text()
        assert "SIM-" not in text and "SYNTHETIC^" not in text

    def test_same_seed_same_bytes(self, tmp_path: Path) -> None:
        kwargs = dict(patients_per_site=3, images_per_patient=(1, 2), corrupt_per_site=1, seed=5)
        make_synthetic_hospitals(tmp_path / "a", 2, **kwargs)  # type: ignore[arg-type]
        make_synthetic_hospitals(tmp_path / "b", 2, **kwargs)  # type: ignore[arg-type]
        files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
        for rel in files:
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel

    def test_explicit_sizes_and_prevalence_are_used(self, tmp_path: Path) -> None:
        manifest = make_synthetic_hospitals(
            tmp_path / "h", 2, patients_per_site=[4, 10], prevalence=[0.25, 0.5], images_per_patient=(1, 1), corrupt_per_site=0
        )
        assert [s.patients_per_class for s in manifest.sites] == [{"normal": 3, "opacity": 1}, {"normal": 5, "opacity": 5}]

    def test_partition_schemes_change_sizes(self) -> None:
        from simulations.synthetic_hospitals import _synthetic_plan

        iid = _synthetic_plan(4, 40, 0.4, "iid", 0.5, 0, (1, 3), 2)
        skew = _synthetic_plan(4, 40, 0.4, "quantity-skew", 0.5, 0, (1, 3), 2)
        assert set(iid.sum(axis=1).tolist()) == {40}
        assert skew.sum() == 160 and len(set(skew.sum(axis=1).tolist())) > 1

    def test_bad_arguments_and_non_empty_output(self, tmp_path: Path) -> None:
        with pytest.raises(SimulationError, match="partition") as err:
            make_synthetic_hospitals(tmp_path / "x", 2, partition="nope", prevalence=1.5)
        assert "prevalence" in str(err.value)
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "keep.txt").write_text("x")
        with pytest.raises(FileExistsError, match="not empty"):
            make_synthetic_hospitals(tmp_path / "full", 1, patients_per_site=2)


# --------------------------------------------------------------------------- hospitals from images


def _fake_image_set(root: Path, n_patients: int = 40) -> dict[str, int]:
    """A tiny labelled PNG set: patients with 1-2 images, 30 % positive."""
    rng = np.random.default_rng(0)
    rows, patients = [], {}
    for p in range(n_patients):
        label = int(p % 10 < 3)
        patient = f"realpatient{p:03d}"
        patients[patient] = label
        folder = root / ("PNEUMONIA" if label else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(1 + p % 2):
            pixels = (rng.random((40, 40)) * 255).astype(np.uint8)
            name = f"{patient}-{k}.png"
            Image.fromarray(pixels).convert("RGB").save(folder / name)
            rows.append((f"{folder.name}/{name}", label, folder.name.lower(), patient))
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "class_name", "patient_id"])
        writer.writerows(rows)
    return patients


def _patient_ids(site_dir: Path) -> set[str]:
    return {str(pydicom.dcmread(site_dir / f, stop_before_pixels=True, force=True).PatientID) for f in read_labels(site_dir)}


class TestHospitalsFromImages:
    def test_patient_disjoint_with_stratified_holdout(self, tmp_path: Path) -> None:
        patients = _fake_image_set(tmp_path / "src")
        manifest = make_hospitals_from_images(tmp_path / "src", tmp_path / "out", 3, holdout_fraction=0.25, seed=1)
        sites = [*manifest.site_names, "holdout"]
        ids = {s: _patient_ids(tmp_path / "out" / s) for s in sites}
        assert sum(len(v) for v in ids.values()) == len(patients)
        assert len(set().union(*ids.values())) == len(patients)  # disjoint
        assert manifest.holdout is not None
        assert manifest.holdout.patients_per_class == {"NORMAL": 7, "PNEUMONIA": 3}  # 25 % of 28 and of 12
        assert manifest.classes == ["NORMAL", "PNEUMONIA"]

    def test_real_ids_and_names_never_written(self, tmp_path: Path) -> None:
        _fake_image_set(tmp_path / "src", 12)
        make_hospitals_from_images(tmp_path / "src", tmp_path / "out", 2)
        for path in (tmp_path / "out").rglob("*"):
            if path.is_file():
                assert b"realpatient" not in path.read_bytes(), path.name

    def test_label_skew_vs_iid(self, tmp_path: Path) -> None:
        _fake_image_set(tmp_path / "src", 200)
        spreads = {}
        for scheme, alpha in (("iid", 0.5), ("label-skew", 0.1)):
            manifest = make_hospitals_from_images(tmp_path / "src", tmp_path / scheme, 3, partition=scheme, alpha=alpha, seed=2)
            prev = [s.patients_per_class.get("PNEUMONIA", 0) / s.n_patients for s in manifest.sites]
            spreads[scheme] = max(prev) - min(prev)
        assert spreads["iid"] < 0.05
        assert spreads["label-skew"] > 0.2

    def test_deterministic(self, tmp_path: Path) -> None:
        _fake_image_set(tmp_path / "src", 10)
        make_hospitals_from_images(tmp_path / "src", tmp_path / "a", 2, seed=3, image_size=32)
        make_hospitals_from_images(tmp_path / "src", tmp_path / "b", 2, seed=3, image_size=32)
        for path in (tmp_path / "a").rglob("*.dcm"):
            assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()

    def test_class_folders_without_labels_csv(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        _fake_image_set(tmp_path / "src", 10)
        (tmp_path / "src" / "labels.csv").unlink()
        images, classes = load_image_set(tmp_path / "src")
        assert classes == ["NORMAL", "PNEUMONIA"] and len(images) == 15
        assert "each file stem taken as its own patient" in caplog.text

    def test_kermany_subset_round_trip(self, fedxray_data: Path, tmp_path: Path) -> None:
        from common.images import read_image, resize_image

        src = fedxray_data / "kermany-pneumonia"
        out = tmp_path / "out"
        manifest = make_hospitals_from_images(src, out, 2, holdout_fraction=0.2, seed=0, max_images=40, image_size=64)
        images, classes = load_image_set(src)
        by_patient: dict[str, list[Path]] = defaultdict(list)
        label_of = {}
        for img in images:
            by_patient[img.patient].append(img.path)
            label_of[img.path] = classes[img.label]
        pseudonyms = pseudonymise(by_patient, source_prefix(src), 0)
        real_of = {v: k for k, v in pseudonyms.items()}
        written = 0
        for site in [*manifest.site_names, "holdout"]:
            for rel, label in read_labels(out / site).items():
                pid, study = rel.split("/")[0], int(rel.split("/")[1].removeprefix("study-"))
                source = sorted(by_patient[real_of[pid]], key=lambda p: p.as_posix())[study - 1]
                assert label == label_of[source]  # the label survives
                expected = resize_image(read_image(source), 64)
                pixels = read_radiograph(out / site / rel).pixels
                assert pixels.shape == (64, 64)
                assert _corr(pixels, expected) > 0.95
                assert real_of[pid].encode() not in (out / site / rel).read_bytes()
                written += 1
        assert 30 <= written <= 40
        assert sum(s.n_images for s in manifest.sites) + manifest.holdout.n_images == written  # type: ignore[union-attr]
        assert {k for s in manifest.sites for k in s.images_per_class} == {"NORMAL", "PNEUMONIA"}


class TestCliBadInput:
    """fl-sim answers a wrong path or a used folder with one line and a non-zero exit, nothing lost."""

    def test_missing_data_folder(self, tmp_path, capsys):
        from simulations.cli import main

        assert main(["run", "--out", str(tmp_path), "--name", "x", "--data", str(tmp_path / "nope")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not a folder" in err[0]

    def test_existing_simulation_folder_is_kept(self, tmp_path, capsys):
        from simulations.cli import main

        (tmp_path / "old" / "run").mkdir(parents=True)
        (tmp_path / "old" / "run" / "metrics.json").write_text("{}")
        assert main(["run", "--out", str(tmp_path), "--name", "old"]) == 2
        assert "already exists" in capsys.readouterr().err
        assert (tmp_path / "old" / "run" / "metrics.json").read_text() == "{}"

    def test_make_hospitals_into_non_empty_folder(self, tmp_path, capsys):
        from simulations.cli import main

        (tmp_path / "keep.txt").write_text("x")
        assert main(["make-hospitals", "--out", str(tmp_path), "--sites", "1"]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
        assert (tmp_path / "keep.txt").read_text() == "x"


def test_fl_sim_refuses_hospital_folders_without_labels_in_one_line(tmp_path, dicom_writer, capsys):
    """Patient folders given as --data ran a federation of sites that all failed, then a traceback."""
    from simulations.cli import main

    data = tmp_path / "export"
    for p in range(4):
        dicom_writer(data / f"MRN-66{p:02d}" / "1.dcm", np.full((16, 16), 0.5), patient_id=f"MRN-66{p:02d}")
    assert main(["run", "--data", str(data), "--out", str(tmp_path / "runs"), "--rounds", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no labels" in err and "none of its 4 subfolders" in err
    assert "MRN-66" not in err and "`label` (the class name)" in err
    assert not (tmp_path / "runs").exists()  # refused before anything was made


@pytest.mark.parametrize("workers", [1, 2])
def test_making_hospitals_says_how_far_it_got_in_a_log(tmp_path, monkeypatch, capsys, workers):
    """Output to a file: fl-sim said nothing for the minute and a half it spent making the demo's hospitals."""
    from common import progress as progress_module
    from simulations.hospitals import make_synthetic_hospitals

    monkeypatch.setattr(progress_module, "LINE_EVERY_S", 0.0)
    manifest = make_synthetic_hospitals(tmp_path / "h", 2, patients_per_site=3, progress=False, workers=workers,
                                        max_matrix=64)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("progress: synthetic images")]
    done = int(lines[-1].split()[3].split("/")[0])  # "progress: synthetic images 12/12 img (100%), 0 s"
    assert len(lines) >= 2 and done >= sum(s.n_images for s in manifest.sites)


def test_parallel_writers_under_fl_sims_signal_handlers_end_cleanly(tmp_path, capfd):
    """fl-sim raises StopSignal on SIGTERM; forked writers inherited that handler, so ending the pool (SIGTERM)
    printed a traceback per worker, and a worker that died holding the result lock hung the next run."""
    from common.supervisor import stop_signals_raise
    from simulations.hospitals import make_synthetic_hospitals

    with stop_signals_raise():
        for name in ("first", "second"):
            make_synthetic_hospitals(tmp_path / name, 3, patients_per_site=3, workers=2, max_matrix=64)
    assert "Traceback" not in capfd.readouterr().err  # the workers' own stderr
