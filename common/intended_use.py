"""The intended-use gate: is this image a frontal chest radiograph the model may answer for?

A fedxray model was trained on frontal (PA/AP) chest radiographs. Shown anything else it still
returns a probability, and that number means nothing. The gate stands in front of the model in
``fl-predict`` (files and ``serve``) and in ``fl-client evaluate``; an image it refuses gets no
finding, only the reason (one line a radiologist understands).

Two kinds of evidence, in this order:

1. **Header rules** (:func:`check_header`): Modality CR or DX (a Secondary Capture counts when its
   Modality says CR or DX: digitised or converted radiographs are archived that way), one frame,
   greyscale, Body Part Examined chest/thorax when present, View Position PA or AP when present
   (a lateral is outside the use of a model trained on frontal views), and a matrix no smaller
   than the model's input. A header that says nothing about a rule passes it: the image check
   decides.
2. **The image check** (:func:`check_score`): the model's out-of-distribution score
   (common/ood.py, the ``ood_score`` output of the exported graph) against the cut-off the
   federation set under DP. It does not trust headers. A model exported before the check existed
   has no such output: only the header rules apply, and the caller says so once.

This module is plain Python on purpose: the clinic and the site's own evaluation share it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RADIOGRAPH_MODALITIES = ("CR", "DX")
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
FRONTAL_VIEWS = ("PA", "AP")
CHEST_TERMS = ("CHEST", "THORAX", "LUNG")
GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
OOD_SCHEMA = "fedxray.ood/1"
OOD_METADATA_KEY = "fedxray.ood"  # the image check's cut-off and how it was set (JSON), in model.onnx and model.pt
OOD_OUTPUT = "ood_score"  # the exported graph's second output, float32 [N] (common/ood.py)


class OodError(ValueError):
    """A reference, histogram, metadata or model that the image check cannot use (the message names the fix)."""


@dataclass(frozen=True)
class Verdict:
    """The gate's answer for one image."""

    assessed: bool
    reason: str = ""  # why not assessed: one line, no patient data
    rule: str = ""  # modality | frames | colour | body-part | view | matrix | image

    @classmethod
    def refuse(cls, rule: str, reason: str) -> Verdict:
        return cls(False, reason, rule)


ASSESSED = Verdict(True)


def facts_from_dataset(ds: Any) -> dict[str, Any]:
    """The header facts the rules read, from a pydicom Dataset (or any object with ``.get(keyword)``)."""
    def get(keyword: str) -> Any:
        try:
            return ds.get(keyword)
        except Exception:  # a malformed element must not stop the gate: it is treated as absent
            return None

    return {"modality": get("Modality"), "sop_class": get("SOPClassUID"), "frames": get("NumberOfFrames"),
            "photometric": get("PhotometricInterpretation"), "samples": get("SamplesPerPixel"),
            "body_part": get("BodyPartExamined"), "view": get("ViewPosition"), "rows": get("Rows"), "cols": get("Columns")}


def facts_from_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The header facts from a site record's non-identifying meta (common.dicom ``_safe_meta``)."""
    return {"modality": meta.get("modality"), "frames": meta.get("frames"), "photometric": meta.get("photometric"),
            "view": meta.get("view"), "rows": meta.get("rows"), "cols": meta.get("cols")}


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return "\\".join(str(v) for v in value).strip().upper()
    return str(value).strip().upper()


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def check_header(facts: Mapping[str, Any], *, min_side: int) -> Verdict:
    """Apply the header rules in order; the first that fails gives the reason. Absent facts pass."""
    modality = _text(facts.get("modality"))
    if modality and modality not in RADIOGRAPH_MODALITIES:
        what = "a Secondary Capture" if _text(facts.get("sop_class")) == SECONDARY_CAPTURE else f"a {modality} image"
        return Verdict.refuse("modality", f"Modality {modality}: {what}, not a chest radiograph (CR or DX)")
    frames = _int(facts.get("frames"))
    if frames is not None and frames > 1:
        return Verdict.refuse("frames", f"{frames} frames: the model reads single radiographs, not series or cine loops")
    photometric = _text(facts.get("photometric"))
    samples = _int(facts.get("samples"))
    if (photometric and photometric not in GREYSCALE) or (samples is not None and samples > 1):
        return Verdict.refuse("colour", f"colour image ({photometric or f'{samples} samples per pixel'}): "
                              "the model reads greyscale radiographs")
    body = _text(facts.get("body_part"))
    if body and not any(term in body for term in CHEST_TERMS):
        return Verdict.refuse("body-part", f"Body Part Examined {body}: the model reads chest radiographs only")
    view = _text(facts.get("view"))
    if view and view not in FRONTAL_VIEWS:
        kind = " (lateral)" if view in ("LL", "RL", "LAT", "LATERAL") else ""
        return Verdict.refuse("view", f"View Position {view}{kind}: the model was trained on frontal (PA/AP) chest views")
    rows, cols = _int(facts.get("rows")), _int(facts.get("cols"))
    return check_matrix((rows or min_side, cols or min_side), min_side=min_side)


def check_matrix(shape: tuple[int, int], *, min_side: int) -> Verdict:
    """An image smaller than the model's input has less detail than anything it was trained on."""
    rows, cols = int(shape[0]), int(shape[1])
    if min(rows, cols) < min_side:
        return Verdict.refuse("matrix", f"matrix {rows} x {cols}: smaller than the {min_side} x {min_side} "
                              "the model reads; too little detail to assess")
    return ASSESSED


def check_score(score: float, cutoff: float) -> Verdict:
    """The image check: refuse an out-of-distribution score above the federation's cut-off (NaN is refused)."""
    if score <= cutoff:
        return ASSESSED
    return Verdict.refuse("image", f"the image does not look like the frontal chest radiographs the model was "
                          f"trained on (out-of-distribution score {score:.3g} above the cut-off {cutoff:.3g})")


def parse_ood_metadata(raw: Mapping[str, str]) -> dict[str, Any] | None:
    """The parsed ``fedxray.ood`` metadata of a model, None when absent; OodError when malformed."""
    text = raw.get(OOD_METADATA_KEY)
    if not text:
        return None
    try:
        doc = json.loads(text)
        if doc.get("schema") != OOD_SCHEMA:
            raise ValueError(f"schema {doc.get('schema')!r}")
        doc["cutoff"] = float(doc["cutoff"])
        if not (doc["cutoff"] > 0 and math.isfinite(doc["cutoff"])):
            raise ValueError("cutoff must be a positive number")
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise OodError(f"the model's {OOD_METADATA_KEY} metadata is malformed ({err}); re-export it") from err
    return doc
