"""``fl-predict --model model.pt``: the TorchScript twin scores as the ONNX model does (issue 12, item 5)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import torch
from conftest import EPSILON

from clinic.cli import main
from clinic.model import Scorer
from common.models import build_model
from common.onnx_export import export_onnx, reference_batch
from common.torchscript_export import export_torchscript


@pytest.fixture(autouse=True, scope="module")
def _keep_torch_threads() -> Iterator[None]:
    """fl-predict --threads sets torch's (process-wide) thread count for model.pt: restore it for later tests."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory, dicom_dir: Path) -> tuple[Path, Path]:
    """model.onnx and model.pt of one ScatterNet, exported as fl-server does (real radiographs in the parity batch)."""
    folder = tmp_path_factory.mktemp("twins")
    torch.manual_seed(1)
    model = build_model("scatternet", num_outputs=1)
    with torch.no_grad():
        model.head.classifier.weight.normal_(0.0, 0.01)
    sample = reference_batch(dicom_dir, (64, 64), limit=4)
    export_onnx(model, folder / "model.onnx", task="binary", labels=["opacity"], input_size=(64, 64), threshold=0.5, sample_batch=sample,
                metadata={"model": "scatternet", "rounds": "3", "sites": json.dumps(sorted(EPSILON)), "epsilon": json.dumps(EPSILON)})
    export_torchscript(model, folder / "model.pt", onnx_model=folder / "model.onnx", sample_batch=sample)
    return folder / "model.onnx", folder / "model.pt"


def _json_lines(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, dict]:
    assert main([*argv, "--json"]) == 0
    return {Path(rec["file"]).name: rec for rec in map(json.loads, capsys.readouterr().out.splitlines())}


def test_real_dicoms_score_the_same_with_model_pt(twins, dicom_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx_path, pt_path = twins
    by_onnx = _json_lines(capsys, "--model", str(onnx_path), "--threads", "1", str(dicom_dir))
    by_pt = _json_lines(capsys, "--model", str(pt_path), "--threads", "1", str(dicom_dir))
    assert sorted(by_pt) == sorted(by_onnx) == sorted(p.name for p in dicom_dir.glob("*.dcm"))
    for name, rec in by_pt.items():
        assert rec["assessed"] == by_onnx[name]["assessed"], name  # the same gate on both runtimes
        if not rec["assessed"]:  # the tibia, the C-spine and the LUT test patterns are outside the intended use
            continue
        assert abs(rec["probabilities"]["opacity"] - by_onnx[name]["probabilities"]["opacity"]) <= 1e-4, name
        assert rec["sop_instance_uid"] == by_onnx[name]["sop_instance_uid"]


def test_model_pt_writes_sr_and_heatmap(twins, dicom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, pt_path = twins
    dicom = dicom_dir / "pydicomdata_RG1_UNCR.dcm"
    rec = next(iter(_json_lines(capsys, "--model", str(pt_path), "--threads", "1", str(dicom), "--out", str(tmp_path)).values()))
    sr = pydicom.dcmread(rec["sr"])
    assert sr.Modality == "SR" and Path(rec["heatmap_png"]).is_file() and Path(rec["heatmap_dcm"]).is_file()


def test_scorer_reads_the_metadata_from_model_pt(twins) -> None:
    onnx_path, pt_path = twins
    by_onnx, by_pt = Scorer(onnx_path, heatmaps=False), Scorer(pt_path, heatmaps=True)
    assert by_pt.classifier.raw_meta == by_onnx.classifier.raw_meta  # drift reference, calibration, ... included
    same = {k: v for k, v in vars(by_pt.identity).items() if k != "sha256"}
    assert same == {k: v for k, v in vars(by_onnx.identity).items() if k != "sha256"}
    assert by_pt.heatmap_method == "occlusion" and by_pt.identity.sha256 != by_onnx.identity.sha256


def test_a_state_dict_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model.pt"
    torch.save({"head.classifier.weight": torch.zeros(1, 3)}, path)
    assert main(["--model", str(path), str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "state_dict" in err[0] and err[0].startswith("fl-predict: cannot use the model")
