"""Site folders (interface 2, docs/interfaces.md): scanning, labels, skipped files, cache, patient-level split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import common.dataset as dataset_mod
from common.cache import SiteCache
from common.dataset import DatasetError, encode_targets, patient_strata, scan_site, split_patients
from common.loaders import load_site
from common.site_files import NON_IMAGE_SUFFIXES, candidate_files

SALT = b"test-salt"


def _chest(seed: int, size: int = 48, positive: bool = False) -> np.ndarray:
    """A crude chest-like image: bright body, two dark lungs, bright spine; optional opacity."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.full((size, size), 0.7)
    for cx in (0.3, 0.7):
        img[((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1] = 0.2
    img[:, int(0.46 * size) : int(0.54 * size)] = 0.95
    if positive:
        img[((xx - 0.3) / 0.08) ** 2 + ((yy - 0.55) / 0.08) ** 2 < 1] = 0.6
    return np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((arr * 255).astype(np.uint8)).save(path)


@pytest.fixture
def png_site(tmp_path: Path) -> Path:
    root = tmp_path / "pngsite"
    for i in range(4):
        _png(root / "NORMAL" / f"n{i}.png", _chest(i))
        _png(root / "PNEUMONIA" / "deep" / f"p{i}.png", _chest(10 + i, positive=True))
    (root / "PNEUMONIA" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "README.txt").write_text("site notes")
    return root


@pytest.fixture
def dicom_site(tmp_path: Path, dicom_writer) -> Path:
    """6 patients x 2 images, labels.csv, one unlabeled file, one missing file, one corrupt file."""
    root = tmp_path / "site"
    rows = ["file,label"]
    for p in range(6):
        label = "opacity" if p % 2 else "normal"
        photometric = "MONOCHROME1" if p % 3 == 0 else "MONOCHROME2"
        for k in range(2):
            rel = f"P{p}/study/{k}.dcm"
            dicom_writer(root / rel, _chest(p * 10 + k, positive=p % 2 == 1), patient_id=f"SECRET-{p:03d}",
                         photometric=photometric)
            rows.append(f"{rel},{label}")
    dicom_writer(root / "extra" / "unlabeled.dcm", _chest(99), patient_id="SECRET-999")
    rows.append("gone/missing.dcm,normal")
    bad = root / "P0" / "study" / "bad.dcm"
    data = (root / "P0" / "study" / "0.dcm").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    rows.append("P0/study/bad.dcm,normal")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


class TestScanFolders:
    def test_class_subfolders_any_depth(self, png_site):
        index = scan_site(png_site, salt=SALT)
        assert index.label_source == "class folders"
        assert len(index.records) == 8
        assert index.class_names == ("NORMAL", "PNEUMONIA")
        assert index.ignored == 1  # README.txt
        assert len(index.skipped) == 1 and "PNG/JPEG" in index.skipped[0].reason

    def test_binary_targets_from_folders(self, png_site):
        index = scan_site(png_site, salt=SALT)
        targets = encode_targets(index, "binary", ("PNEUMONIA",))
        assert targets.y.shape == (8, 1) and targets.y.sum() == 4

    def test_missing_folder_is_one_clear_error(self, tmp_path):
        with pytest.raises(DatasetError, match="does not exist"):
            scan_site(tmp_path / "nope", salt=SALT)

    def test_no_labels_anywhere(self, tmp_path):
        _png(tmp_path / "a.png", _chest(0))
        with pytest.raises(DatasetError, match="labels.csv"):
            scan_site(tmp_path, salt=SALT)

    def test_nothing_usable(self, tmp_path):
        (tmp_path / "NORMAL").mkdir()
        (tmp_path / "NORMAL" / "x.png").write_bytes(b"junk")
        with pytest.raises(DatasetError, match="no usable image"):
            scan_site(tmp_path, salt=SALT)


class TestScanDicom:
    def test_labels_csv_and_skips(self, dicom_site):
        index = scan_site(dicom_site, salt=SALT)
        assert index.label_source == "labels.csv (label column)"
        assert len(index.records) == 12
        reasons = sorted(s.reason for s in index.skipped)
        assert len(reasons) == 3
        assert any("no label" in r for r in reasons)
        assert any("missing" in r for r in reasons)
        # the corrupt file is reported with the reader's reason, not a crash
        assert sum("no label" not in r and "missing" not in r for r in reasons) == 1

    def test_patients_are_salted_hashes(self, dicom_site):
        index = scan_site(dicom_site, salt=SALT)
        assert len({r.patient for r in index.records}) == 6
        blob = json.dumps([r.meta for r in index.records]) + "".join(r.patient for r in index.records)
        assert "SECRET" not in blob
        other = scan_site(dicom_site, salt=b"another-site")
        assert {r.patient for r in index.records}.isdisjoint({r.patient for r in other.records})

    def test_monochrome1_reads_bone_bright(self, dicom_site):
        index = scan_site(dicom_site, salt=SALT, image_size=32)
        for rec in index.records:
            img = rec.pixels.astype(float)
            assert img[:, 15:17].mean() > img[:, 6:10].mean() + 40  # spine brighter than lung

    def test_cache_decodes_once_and_redecodes_changed_file(self, dicom_site, tmp_path, monkeypatch, dicom_writer):
        cache = SiteCache(tmp_path / "cache")
        first = scan_site(dicom_site, salt=SALT, image_size=32, cache=cache)
        calls = []
        real = dataset_mod._decode

        def counting(path, salt, size):
            calls.append(path)
            return real(path, salt, size)

        monkeypatch.setattr(dataset_mod, "_decode", counting)
        second = scan_site(dicom_site, salt=SALT, image_size=32, cache=cache)
        assert calls == []  # every file, the corrupt one included, came from the cache
        assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(first.records, second.records))
        changed = dicom_site / "P1" / "study" / "0.dcm"
        dicom_writer(changed, _chest(12345), patient_id="SECRET-001")
        scan_site(dicom_site, salt=SALT, image_size=32, cache=cache)
        assert calls == [changed]
        scan_site(dicom_site, salt=SALT, image_size=48, cache=cache)  # a new size decodes again
        assert len(calls) == 1 + 12


class TestTargets:
    def test_multilabel_columns(self, tmp_path):
        rows = ["file,effusion,nodule,patient_id"]
        for i in range(6):
            _png(tmp_path / f"{i}.png", _chest(i))
            rows.append(f"{i}.png,{i % 2},{int(i > 3)},pt{i // 2}")
        (tmp_path / "labels.csv").write_text("\n".join(rows))
        index = scan_site(tmp_path, salt=SALT)
        assert index.label_kind == "multi" and index.class_names == ("effusion", "nodule")
        t = encode_targets(index, "multilabel", ("nodule", "effusion"))
        assert t.y.shape == (6, 2) and t.y[:, 0].sum() == 2 and t.y[:, 1].sum() == 3
        assert len({r.patient for r in index.records}) == 3  # patient_id column groups images
        with pytest.raises(DatasetError, match="no column for mass"):
            encode_targets(index, "multilabel", ("mass",))

    def test_multiclass_drops_unknown_class(self, tmp_path):
        rows = ["file,label"]
        for i, cls in enumerate(["a", "b", "c", "a", "b", "x"]):
            _png(tmp_path / f"{i}.png", _chest(i))
            rows.append(f"{i}.png,{cls}")
        (tmp_path / "labels.csv").write_text("\n".join(rows))
        t = encode_targets(scan_site(tmp_path, salt=SALT), "multiclass", ("a", "b", "c"))
        assert t.y.dtype == np.int64 and sorted(t.y.tolist()) == [0, 0, 1, 1, 2]
        assert sum(t.dropped.values()) == 1

    def test_labels_csv_without_file_column(self, tmp_path):
        _png(tmp_path / "a.png", _chest(0))
        (tmp_path / "labels.csv").write_text("image,label\na.png,normal\n")
        with pytest.raises(DatasetError, match="no `file` column"):
            scan_site(tmp_path, salt=SALT)


class TestSplit:
    def test_patient_level_stratified_and_owned_by_the_site(self):
        patients = [f"p{i // 3}" for i in range(60)]  # 20 patients x 3 images
        strata = [1 if (i // 3) % 4 == 0 else 0 for i in range(60)]
        a = split_patients(patients, strata, val_fraction=0.25)
        b = split_patients(list(reversed(patients)), list(reversed(strata)), val_fraction=0.25)
        assert {patients[i] for i in a.val} == {list(reversed(patients))[i] for i in b.val}  # order-free
        train_p = {patients[i] for i in a.train}
        val_p = {patients[i] for i in a.val}
        assert train_p.isdisjoint(val_p) and len(train_p | val_p) == 20
        assert a.val_patients == 5 and a.stratified
        assert sum(strata[i] for i in a.val) > 0 and sum(strata[i] for i in a.train) > 0
        # Other pseudonyms (another site's salt) give another split: the salt, not a seed, decides.
        other = split_patients([p + "x" for p in patients], strata, val_fraction=0.25)
        assert {patients[i] for i in other.val} != val_p

    def test_a_patient_stays_on_its_side_when_others_come_and_go(self):
        patients = [f"p{i}" for i in range(40)]
        full = split_patients(patients, [0] * 40, val_fraction=0.2)
        fewer = split_patients(patients[:30], [0] * 30, val_fraction=0.2)
        val_full = {patients[i] for i in full.val}
        val_fewer = {patients[i] for i in fewer.val}
        # Ranking by the keyed pseudonym: removing patients only ever moves the boundary, never reshuffles.
        assert len(val_fewer - val_full) <= 1

    def test_single_patient_stratum_goes_to_train(self):
        s = split_patients(["a", "b", "b"], [1, 0, 0], val_fraction=0.5)
        assert 0 in s.train.tolist()


class TestLoadSite:
    def test_datasets(self, dicom_site, tmp_path):
        data = load_site(dicom_site, tmp_path / "state", image_size=32, task="binary", labels=("opacity",),
                         val_fraction=0.34)
        assert data.n_train + data.n_val == 12 and data.n_val >= 2
        x, y = data.train_dataset(augment=True)[0]
        assert x.shape == (1, 32, 32) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert y.shape == (1,)
        xv, _ = data.val_dataset()[0]
        assert np.allclose(xv.numpy()[0] * 255, data.images[data.split.val[0]], atol=1e-3)
        assert len(data.train_hashes()) == data.n_train
        assert (tmp_path / "state" / "salt").stat().st_mode & 0o777 == 0o600
        strata = patient_strata(data.targets)
        assert strata[data.split.val].sum() >= 1


class TestScanIndexAndPacks:
    def test_unchanged_files_are_not_hashed_again_and_one_pack_answers(self, dicom_site, tmp_path, monkeypatch,
                                                                      dicom_writer):
        import common.cache as cache_mod

        cache = SiteCache(tmp_path / "cache")
        first = scan_site(dicom_site, salt=SALT, image_size=32, cache=cache)
        hashed, read = [], []
        real_hash, real_read = cache_mod.file_sha256, dataset_mod._read_one
        monkeypatch.setattr(cache_mod, "file_sha256", lambda p, *a: hashed.append(p) or real_hash(p, *a))
        monkeypatch.setattr(dataset_mod, "_read_one", lambda *a: read.append(a[0]) or real_read(*a))
        second = scan_site(dicom_site, salt=SALT, image_size=32, cache=cache)
        assert hashed == [] and read == []  # stat unchanged: no hashing; same content hashes: the scan's pack
        assert [r.content_hash for r in second.records] == [r.content_hash for r in first.records]
        assert [r.meta for r in second.records] == [r.meta for r in first.records]
        assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(first.records, second.records, strict=True))
        assert sorted(s.reason for s in second.skipped) == sorted(s.reason for s in first.skipped)
        changed = dicom_site / "P1" / "study" / "0.dcm"
        dicom_writer(changed, _chest(54321), patient_id="SECRET-001")
        third = scan_site(dicom_site, salt=SALT, image_size=32, cache=cache)
        assert hashed == [changed]  # only the changed file is read and hashed again
        assert len(read) == len(third.records) + 1  # a new set of hashes: no pack (the corrupt file is re-read too)
        changed_rec = next(r for r in third.records if r.path == changed)
        assert changed_rec.content_hash == real_hash(changed)
        assert len(list((cache.root / "scans").glob("32px-*.npz"))) == 1  # the outdated pack is gone

    def test_feature_pack_matches_the_per_image_features(self, dicom_site, tmp_path):
        import shutil

        from common.models import build_model, split_features

        frontend, _, _ = split_features(build_model("scatternet", num_outputs=1, image_size=32))
        data = load_site(dicom_site, tmp_path / "state", image_size=32, task="binary", labels=("opacity",),
                         val_fraction=0.34)
        first = data.features(frontend)
        spec = frontend.cache_spec(32)
        packs = list((data.cache.root / "features" / spec).glob("pack-*.npy"))
        assert len(packs) == 1
        for sub in (data.cache.root / "features" / spec).iterdir():
            if sub.is_dir():
                shutil.rmtree(sub)  # the per-image entries: the pack alone must answer
        again = data.features(frontend)
        np.testing.assert_array_equal(again, first)
        train = data.feature_dataset(frontend, "train")
        assert len(train) == data.n_train
        x0, y0 = train[0]
        np.testing.assert_array_equal(x0.numpy(), first[data.split.train[0]])
        assert float(y0[0]) == float(data.targets.y[data.split.train[0]][0])


def test_candidate_files_keep_os_walk_order_and_rules(tmp_path):
    """The scandir walk lists what os.walk listed, in the same order: hidden names skipped, a folder
    link not followed, a file link kept, labels.csv skipped only at the top, non-images counted."""
    import os

    root = tmp_path / "site"
    for rel in ["b.dcm", "a.dcm", "notes.txt", "labels.csv", "B/z.dcm", "B/labels.csv", "a2/y.png", "a2/deep/x.dcm",
                ".hidden/h.dcm", "A/.h.dcm", "A/w.dcm"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.dcm").write_bytes(b"x")
    (root / "link-dir").symlink_to(outside, target_is_directory=True)
    (root / "link-file.dcm").symlink_to(outside / "o.dcm")

    expected, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or (path.parent == root and name == "labels.csv"):
                continue
            if path.suffix.lower() in NON_IMAGE_SUFFIXES:
                ignored += 1
                continue
            expected.append(path)
    files, n_ignored = candidate_files(root)
    assert files == expected and n_ignored == ignored == 2  # notes.txt and B/labels.csv
    assert [p.relative_to(root).as_posix() for p in files] == [
        "a.dcm", "b.dcm", "link-file.dcm", "A/w.dcm", "B/z.dcm", "a2/y.png", "a2/deep/x.dcm"]
