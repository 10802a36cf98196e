"""The intended-use gate on images it must refuse and on chest radiographs it must accept; prints JSON.

The issue's goals: no finding claimed on any non-chest image, at least 95% of them marked not
assessed, at most 2% of chest images refused. Every image goes through fl-predict's own scoring
path (``clinic.model.Scorer.score`` with the file's header: header rules, then the image check).

Test sets, built from what is on this machine (nothing is downloaded):

* **non-chest DICOM files**: the test files pydicom ships (and the pydicom-data package's when it
  is installed), pynetdicom's and highdicom's test files when they are in the environment, and
  from ``--dicom`` the tibia (RG3), the 16 x 16 C-spine (CR1_6154) and the LUT test patterns.
  Files that fl-predict cannot read are counted and left out; copies of one image in several
  encodings count once (same pixels at the model's input size). ``image_check_only`` scores the
  same images without their headers: what the image check catches on its own.
* **chest radiographs made unusable**: ``--holdout`` images (the Kermany patients the federation
  never saw) rotated by 90, 180 and 270 degrees, inverted, and cropped (the centre half, one
  quadrant, the top half), with their own chest headers: only the image check can refuse them.
* **chest radiographs**: every ``--holdout`` image, the real chest DICOMs in ``--dicom`` (RG1 in
  three encodings, the SIIM image), and ``--nih`` PNGs when given (adult chests at 64 px, no header).
* **a chest displayed inverted by its header**: ``txv_Fake_MONOHR1`` in ``--dicom`` is the SIIM
  image's MONOCHROME2 pixels under a MONOCHROME1 header. Displayed as the header says (what
  ``common.dicom`` and a viewer do), it is the chest with its grey levels reversed: a real-world
  case of the ``inverted`` transform, counted with the images the gate must refuse.

    PYTHONPATH=. .venv/bin/python benchmarks/intended_use.py --model runs/kermany-gate/run/model.onnx \\
        --holdout runs/kermany-gate/hospitals/holdout --dicom ../shared/data/dicom [--nih ../shared/data/nih-cxr14-1000]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from _util import machine_info, print_json, progress

from clinic.model import Scorer
from clinic.predict import iter_inputs, read_source
from common.images import resize_image

CHEST_DICOM = ("RG1", "siim")  # the real chest radiographs in --dicom
INVERTED_DICOM = ("MONOHR1",)  # SIIM's pixels under a MONOCHROME1 header: displayed inverted


def _zoomed(part: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A crop brought back to the source's matrix, as a detector or a zoomed export would deliver it."""
    return resize_image(np.ascontiguousarray(part), (int(shape[0]), int(shape[1])))


TRANSFORMS = {
    "rotated-90": lambda p: np.rot90(p, 1),
    "rotated-180": lambda p: np.rot90(p, 2),
    "rotated-270": lambda p: np.rot90(p, 3),
    "inverted": lambda p: 1.0 - p,
    "cropped-centre": lambda p: _zoomed(p[p.shape[0] // 4 : 3 * p.shape[0] // 4, p.shape[1] // 4 : 3 * p.shape[1] // 4], p.shape),
    "cropped-quadrant": lambda p: _zoomed(p[: p.shape[0] // 2, : p.shape[1] // 2], p.shape),
    "cropped-top-half": lambda p: _zoomed(p[: p.shape[0] // 2], p.shape),
}


def _test_file_folders(dicom: Path) -> list[Path]:
    """Where the shipped test files are: pydicom's (and pydicom-data's), pynetdicom's, highdicom's."""
    folders = []
    for package, sub in (("pydicom", "data/test_files"), ("data_store", "data"), ("pynetdicom", "tests/dicom_files"),
                         ("highdicom", "../tests/data"), ("highdicom", "data/test_files")):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            folder = (Path(spec.origin).parent / sub).resolve()
            if folder.is_dir():
                folders.append(folder)
    return folders


def _non_chest_files(dicom: Path) -> list[Path]:
    files = [p for folder in _test_file_folders(dicom) for p in sorted(folder.rglob("*")) if p.is_file()
             and p.suffix.lower() in ("", ".dcm") and not p.name.startswith(".")]
    files += sorted(dicom.glob("*.dcm"))
    chest = CHEST_DICOM + INVERTED_DICOM  # pydicom-data ships the RG1 chest too
    return [p for p in files if not any(k in p.name for k in chest)]


def _key(pixels: np.ndarray, size: tuple[int, int]) -> str:
    return hashlib.sha256(np.round(resize_image(pixels, size), 2).tobytes()).hexdigest()


def _tally(results: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(results)
    refused = [r for r in results if not r["assessed"]]
    scores = [r["ood"] for r in results if r.get("ood") is not None]
    return {"images": n, "not_assessed": len(refused), "not_assessed_share": round(len(refused) / n, 4) if n else None,
            "assessed": n - len(refused), "findings_claimed": sum(1 for r in results if r["positive"]),
            "by_rule": dict(Counter(r["rule"] for r in refused).most_common()),
            "ood_score_q05_q50_q95": [round(float(q), 2) for q in np.quantile(scores, [0.05, 0.5, 0.95])] if scores else None}


def _result(scorer: Scorer, pixels: np.ndarray, header: Any) -> dict[str, Any]:
    scored = scorer.score(pixels, header=header)
    return {"assessed": scored.assessed, "positive": list(scored.positive), "rule": scored.rule, "ood": scored.ood_score}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Kermany-trained model.onnx with the image check")
    parser.add_argument("--holdout", required=True, help="the held-out patients' DICOM folder (fl-sim's hospitals/holdout)")
    parser.add_argument("--dicom", required=True, help="the shared real DICOM folder (tibia, C-spine, chest radiographs)")
    parser.add_argument("--nih", help="optional: NIH ChestX-ray14 PNGs (adult chests) as a second chest population")
    parser.add_argument("--transform-images", type=int, default=200, help="held-out images per transform (default 200)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    scorer = Scorer(args.model, heatmaps=False, threads=1)
    size = scorer.input_size

    progress("non-chest files ...")
    seen: set[str] = set()
    files, unreadable, duplicates = [], 0, 0
    non_chest, image_only = [], []
    for path in _non_chest_files(Path(args.dicom)):
        try:
            source = read_source(path)
        except ValueError:
            unreadable += 1
            continue
        key = _key(source.pixels, size)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        res = _result(scorer, source.pixels, source.header)
        alone = _result(scorer, source.pixels, None)
        non_chest.append(res)
        image_only.append(alone)
        files.append({"file": path.name, "modality": str(source.header.get("Modality", "")) if source.header else "",
                      "assessed": res["assessed"], "rule": res["rule"], "image_check_alone": alone["assessed"] is False,
                      "ood_score": None if alone["ood"] is None else round(alone["ood"], 3)})

    progress("held-out chest images and their transforms ...")
    holdout = [p for p in iter_inputs([args.holdout]) if isinstance(p, Path)]
    chest_holdout, transformed = [], {name: [] for name in TRANSFORMS}
    for i, path in enumerate(holdout):
        source = read_source(path)
        chest_holdout.append(_result(scorer, source.pixels, source.header))
        if i < args.transform_images:
            for name, fn in TRANSFORMS.items():
                transformed[name].append(_result(scorer, np.ascontiguousarray(fn(source.pixels)), source.header))

    progress("real chest DICOMs ...")
    real, inverted_dicom = [], []
    for path in sorted(Path(args.dicom).glob("*.dcm")):
        for keys, out in ((CHEST_DICOM, real), (INVERTED_DICOM, inverted_dicom)):
            if any(k in path.name for k in keys):
                source = read_source(path)
                res = _result(scorer, source.pixels, source.header)
                out.append({"file": path.name, "assessed": res["assessed"], "rule": res["rule"],
                            "positive": res["positive"], "ood_score": None if res["ood"] is None else round(res["ood"], 3)})
    nih = []
    if args.nih:
        progress("NIH chest PNGs ...")
        nih = [_result(scorer, read_source(p).pixels, None) for p in iter_inputs([args.nih]) if isinstance(p, Path)]

    all_transformed = [r for rs in transformed.values() for r in rs] + inverted_dicom
    refusable = non_chest + all_transformed
    chest_all = chest_holdout + [{"assessed": r["assessed"], "positive": [], "rule": r["rule"], "ood": None} for r in real]
    doc = {
        "model": args.model, "gate": scorer.gate_mode, "cutoff": (scorer.ood or {}).get("cutoff"),
        "sources": [str(f) for f in _test_file_folders(Path(args.dicom))] + [args.dicom],
        "non_chest": {**_tally(non_chest), "unreadable_files": unreadable, "duplicate_encodings_left_out": duplicates},
        "non_chest_image_check_only": _tally(image_only),
        "transformed_chest": {name: _tally(rs) for name, rs in transformed.items()},
        "chest_holdout": _tally(chest_holdout),
        "chest_real_dicom": real,
        "chest_inverted_by_header_dicom": inverted_dicom,
        "chest_nih": _tally(nih) if nih else None,
        "goals": {
            "findings_claimed_on_non_chest": sum(1 for r in non_chest if r["positive"]),
            "non_chest_not_assessed_share": _tally(non_chest)["not_assessed_share"],
            "non_chest_and_transformed_not_assessed_share": _tally(refusable)["not_assessed_share"],
            "findings_claimed_on_transformed": sum(1 for r in all_transformed if r["positive"]),
            "chest_refused_share": _tally(chest_all)["not_assessed_share"],
            "real_chest_dicoms_all_assessed": all(r["assessed"] for r in real),
            "chest_refused_share_with_nih": _tally(chest_all + nih)["not_assessed_share"],
            "transformed_not_assessed_share": _tally(all_transformed)["not_assessed_share"],
            "rotated_and_inverted_not_assessed_share": _tally(
                [r for name, rs in transformed.items() if not name.startswith("cropped") for r in rs] + inverted_dicom
            )["not_assessed_share"],
        },
        "files": files,
        "machine": machine_info(),
    }
    print_json(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
