"""The heatmap overlay as a DICOM Secondary Capture image in the source image's study (highdicom).

Why a Secondary Capture rather than a presentation-state overlay: every PACS stores and every
viewer displays an RGB Secondary Capture, whereas colour overlays in a Grayscale Softcopy
Presentation State are 1-bit graphics and Blending Presentation States are rarely supported for
projection radiographs. The image lands in its own series ("fedxray heatmap", series number
9902) of the source study, so the viewer's series list shows it beside the original.

References to the source: Source Image Sequence (it is derived from that instance, with a
Derivation Description) and Referenced Image Sequence. Burned In Annotation is YES: the caption
(finding, probability, threshold, model) is drawn into the pixels; it carries no patient
identifier.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from clinic.model import ModelIdentity
from clinic.sr import strip_free_text

SC_SERIES_NUMBER = 9902
_ORIENTATION_DEFAULT = ("L", "F")  # PA chest: rows run to the patient's left, columns to the feet


def build_secondary_capture(source: Dataset, rgb: NDArray[np.uint8], model: ModelIdentity, *, method: str, label: str,
                            top: bool = True) -> hd.sc.SCImage:
    """An RGB Secondary Capture of the overlay ``rgb`` [H, W, 3] in ``source``'s study.

    ``method`` and ``label`` go into the Derivation Description (how the map was made and for
    which finding). Patient and study attributes are copied from ``source`` by highdicom.
    ``top=False``: the map of another finding of the same image (multilabel), with its own UID.
    """
    orientation = _orientation(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(rgb, dtype=np.uint8),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=model.uid("heatmap-series", source.StudyInstanceUID),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=model.uid("heatmap", source.SOPInstanceUID, *(() if top else (label,))),
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer="fedxray",
        patient_orientation=orientation,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.SeriesDescription = "fedxray heatmap (decision support)"
    sc.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    sc.ConversionType = "WSD"  # workstation: rendered by software, not digitised from film
    sc.BurnedInAnnotation = "YES"
    sc.ManufacturerModelName = f"fedxray {model.name}"[:64]
    sc.SoftwareVersions = model.version[:64]
    sc.DerivationDescription = (f"fedxray {method} attribution map for {label}, overlaid on the source image; "
                                "decision support, not a diagnosis")[:1024]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    sc.ReferencedImageSequence = [_copy(reference)]
    # General Series Laterality is type 2C (paired body parts); validators ask for it on a Secondary Capture:
    # the source's own value (L or R) when it has one, else present and empty (unknown), as type 2 allows.
    side = str(source.get("Laterality") or source.get("ImageLaterality") or "").strip().upper()
    sc.Laterality = side if side in ("L", "R") else ""
    strip_free_text(sc, source)  # the same patient identification as the SR, and no free text about the patient
    return sc


def _orientation(source: Dataset) -> tuple[str, str]:
    """The source's Patient Orientation (the overlay keeps its geometry), else a PA chest's."""
    value = source.get("PatientOrientation")
    if value and len(value) == 2 and all(str(v).strip() for v in value):
        try:
            return (hd.PatientOrientationValuesBiped(str(value[0])).value, hd.PatientOrientationValuesBiped(str(value[1])).value)
        except ValueError:
            pass  # combined values such as "LF" are not in highdicom's enumeration: use the default
    return _ORIENTATION_DEFAULT


def _copy(item: Dataset) -> Dataset:
    out = Dataset()
    out.update(item)
    return out
