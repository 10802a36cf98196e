"""`fl-client check`: the pre-join summary, with no patient identifiers in it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from client.cli import main


@pytest.fixture
def site(tmp_path, dicom_writer):
    root = tmp_path / "hospital"
    rows = ["file,label"]
    for p in range(8):
        label = "pneumonia" if p < 3 else "normal"
        for k in range(2):
            rel = f"pat{p}/{k}.dcm"
            img = np.tile(np.linspace(0.1, 0.9, 32), (32, 1))
            dicom_writer(root / rel, img, patient_id=f"MRN-77{p:02d}", bits=12 if p % 2 else 8,
                         photometric="MONOCHROME1" if p == 0 else "MONOCHROME2")
            rows.append(f"{rel},{label}")
    (root / "pat0" / "junk.dcm").write_bytes(b"DICM but not really")
    rows.append("pat0/junk.dcm,normal")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_summary_text(site, capsys):
    assert main(["check", str(site)]) == 0
    out = capsys.readouterr().out
    assert "usable images: 16   patients: 8" in out
    assert "pneumonia" in out and "normal" in out
    assert "skipped files: 1" in out
    assert "MONOCHROME1 2" in out and "MONOCHROME2 14" in out
    assert "patient-level split (binary: pneumonia" in out
    assert "MRN-77" not in out and "pat0" not in out and "junk.dcm" not in out


def test_summary_json_counts(site, capsys):
    assert main(["check", str(site), "--json", "--val-fraction", "0.25"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["classes"]["pneumonia"] == {"images": 6, "patients": 3}
    assert summary["mix"]["bits_stored"] == {"8": 8, "12": 8}
    split = summary["split"]
    assert split["train_images"] + split["val_images"] == 16
    assert split["val_patients"] == 2 and split["val_positive"] >= 1
    assert "MRN" not in json.dumps(summary)


def test_list_skipped_shows_local_paths_only_on_request(site, capsys):
    assert main(["check", str(site), "--list-skipped"]) == 0
    assert "pat0/junk.dcm" in capsys.readouterr().out


def test_reads_only(site):
    before = sorted(p.relative_to(site) for p in site.rglob("*"))
    main(["check", str(site)])
    assert sorted(p.relative_to(site) for p in site.rglob("*")) == before


def test_wrong_path_one_clear_line(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_multilabel_check_counts_findings_from_an_nih_style_table(tmp_path, capsys):
    """finding_labels, not the binary `label` column, for a multilabel task; per finding counts; too few named."""
    from PIL import Image

    rows = ["path,label,finding_labels,patient_id"]
    findings = ["Effusion|Infiltration", "No Finding", "Effusion", "Pleural effusion", "No Finding", "Atelectasis"]
    for i in range(24):
        Image.fromarray(np.full((16, 16), 10 * i, np.uint8)).save(tmp_path / f"{i}.png")
        f = findings[i % len(findings)]
        rows.append(f"{i}.png,{int(f != 'No Finding')},{f},p{i // 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    assert main(["check", str(tmp_path), "--task", "multilabel", "--labels", "Effusion,Infiltration,Nodule",
                 "--label-map", "Pleural effusion=Effusion", "--json"]) == 0
    split = json.loads(capsys.readouterr().out)["split"]
    per = split["per_label"]
    assert per["Effusion"]["images"] == 12 and per["Infiltration"]["images"] == 4 and per["Nodule"]["images"] == 0
    assert per["Effusion"]["train_images"] + per["Effusion"]["val_images"] == 12
    assert "finding_labels" in split["label_source"] and "Nodule" in split["too_few_to_validate"]
    assert main(["check", str(tmp_path), "--task", "multilabel", "--labels", "Effusion,Infiltration,Nodule"]) == 0
    out = capsys.readouterr().out
    assert "per finding (labels from labels.csv column 'finding_labels'" in out and "too few positives to validate" in out


def _unlabelled_site(root, dicom_writer, n: int = 6, nested: bool = True):
    for p in range(n):
        dicom_writer(root / (f"MRN-55{p:02d}/1.dcm" if nested else f"{p}.dcm"), np.full((16, 16), 0.5),
                     patient_id=f"MRN-55{p:02d}")
    return root


@pytest.mark.parametrize("values", [("normal", "pneumonia"), ("0", "1")])
def test_a_misspelt_label_column_fails_and_names_the_closest_column(tmp_path, dicom_writer, capsys, values):
    # 0/1 values made `lable` pass as a finding named "lable", exit 0.
    root = _unlabelled_site(tmp_path / "site", dicom_writer)
    rows = [f"MRN-55{p:02d}/1.dcm,{values[p % 2]}" for p in range(6)]
    (root / "labels.csv").write_text("file,lable\n" + "\n".join(rows) + "\n")
    assert main(["check", str(root)]) == 2
    out, err = capsys.readouterr()
    [line] = [x for x in err.splitlines() if x.startswith("fl-client check:")]
    assert "`lable` looks like a misspelt `label`" in line and "columns found: file, lable" in line
    assert "expected: `file`" in line and "rename it to `label`" in line and "usable images" not in out


def test_a_folder_of_patient_folders_is_not_taken_for_class_folders(tmp_path, dicom_writer, capsys):
    # Every subfolder one patient: before, six "classes" named by patient folder and no word of warning.
    root = _unlabelled_site(tmp_path / "site", dicom_writer)
    (root / "label.csv").write_text("file,label\n")
    assert main(["check", str(root), "--json"]) == 0
    problem = json.loads(capsys.readouterr().out)["labels_problem"]
    assert "each of the 6 subfolders taken as classes holds a single patient" in problem
    assert "found label.csv: name it labels.csv" in problem and "`label` (the class name)" in problem


def test_no_labels_at_all_says_what_was_found_and_what_is_expected(tmp_path, dicom_writer, capsys):
    from common.dataset import DatasetError, scan_site

    root = _unlabelled_site(tmp_path / "flat", dicom_writer, n=3, nested=False)
    (root / "Labels.txt").write_text("file,label\n")
    with pytest.raises(DatasetError) as err:
        scan_site(root, salt="s")
    message = str(err.value)
    assert "no labels.csv and no class subfolders (found 3 image file(s) directly in it)" in message
    assert "found Labels.txt: name it labels.csv" in message and "`file` (or `path`" in message
    assert main(["check", str(root)]) == 0  # check looks before labelling: it reports, it does not refuse
    assert "LABELS: " in capsys.readouterr().out
