"""The result as a DICOM Structured Report a viewer and a PACS understand (highdicom, TID 1500).

One Comprehensive SR per scored image, in the source image's study. The content follows the
Measurement Report template (PS3.16 TID 1500), which viewers such as OHIF and most PACS list and
render: observation context = the model as a device observer; procedure = plain chest X-ray;
image library = the source image; one measurement group (TID 1501) per label with

* Finding: the label as a code (SNOMED CT / DICOM where one exists, else the local scheme
  ``99FEDXRAY``), and a qualitative evaluation Present / Absent at the model's threshold,
* Probability (DCM 122157) and Threshold Value (DCM 122411), unit "1" (UCUM, no units),
* Algorithm Identification (TID 4019): name, version (export time + file hash), and as
  parameters the task, threshold, rounds, sites and epsilon spent per site,
* the source image (SOP Class and Instance UID) the group was measured on.

TID 1500 is extensible; a final TEXT item (DCM 121106 Comment) states that this is decision
support, not a diagnosis. The header says the same: Verification Flag UNVERIFIED (no physician
signed it), Preliminary Flag PRELIMINARY, and the Series Description. Patient and study
attributes are copied from the source by highdicom, as the SR IOD requires: the SR never leaves
the hospital (it goes to the hospital's own PACS).
"""

from __future__ import annotations

import logging

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from clinic.model import ModelIdentity, Scored

logger = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9901  # high, so the AI series sorts after the modality's own series
LOCAL_SCHEME = "99FEDXRAY"  # "99" prefix: a private coding scheme (PS3.3 8.1)
DECISION_SUPPORT = (
    "Decision support only, not a diagnosis. Produced automatically by a machine-learning model "
    "(named in this report) without review by a physician; it must be read together with the "
    "images by a qualified reader."
)
PROCEDURE = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
NOT_ASSESSED = hd.sr.CodedConcept("not-assessed", LOCAL_SCHEME, "Not assessed: outside the intended use")
GATE_OFF = ("The intended-use check was switched off (--no-gate, research use): this image was scored whether or not "
            "it is a frontal chest radiograph.")
GATE_HEADER_ONLY = ("This model has no image check (it was exported before the check existed): only the DICOM header "
                    "was checked against the intended use.")
UNIT_NONE = hd.sr.CodedConcept("1", "UCUM", "no units")

# Labels with a standard code; the key is the label lower-cased with spaces/underscores as "-".
_FINDING_CODES: dict[str, tuple[str, str, str]] = {
    "pneumonia": ("233604007", "SCT", "Pneumonia"),
    "opacity": ("112001", "DCM", "Opacity"),
    "lung-opacity": ("112001", "DCM", "Opacity"),
    "abnormal": ("263654008", "SCT", "Abnormal"),
    "abnormality": ("263654008", "SCT", "Abnormal"),
    "cardiomegaly": ("287272002", "SCT", "Cardiomegaly"),
    "effusion": ("60046008", "SCT", "Pleural effusion"),
    "pleural-effusion": ("60046008", "SCT", "Pleural effusion"),
    "pneumothorax": ("36118008", "SCT", "Pneumothorax"),
    "edema": ("19242006", "SCT", "Pulmonary edema"),
}


class ReportError(ValueError):
    """The source image lacks what an SR must reference (the message names the attribute and the fix)."""


def finding_code(label: str) -> hd.sr.CodedConcept:
    """The coded concept for a model label: a standard code when known, else ``99FEDXRAY``."""
    key = label.strip().lower().replace("_", "-").replace(" ", "-")
    if key in _FINDING_CODES:
        return hd.sr.CodedConcept(*_FINDING_CODES[key])
    return hd.sr.CodedConcept(value=key[:16] or "finding", scheme_designator=LOCAL_SCHEME, meaning=label[:64] or "finding")


# Type 2 attributes (present, possibly empty) of the Patient and General Study modules that
# highdicom copies from the source into the SR and the Secondary Capture. Research images often
# lack some of them; an empty value is what the standard asks for when the value is unknown.
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


# Free text about the patient that a result does not need: never copied into the SR or the heatmap.
FREE_TEXT = ("PatientComments", "MedicalAlerts", "AdditionalPatientHistory", "Occupation", "Allergies",
             "PatientState", "PregnancyStatus", "SmokingStatus", "ReasonForStudy", "RequestedProcedureComments")


def conformant_header(source: Dataset) -> Dataset:
    """A copy of ``source`` fit to copy from: the type 2 attributes highdicom copies present (empty when
    missing), free-text patient fields gone, and optional values that break their VR dropped (a malformed
    value copied from the source would make the result fail validation)."""
    header = source.copy()
    for keyword in _TYPE2_COPIED:
        if keyword not in header:
            setattr(header, keyword, "")
    for keyword in FREE_TEXT:
        if keyword in header:
            delattr(header, keyword)
    age = str(header.get("PatientAge", "") or "")
    if "PatientAge" in header and not (len(age) == 4 and age[:3].isdigit() and age[3] in "DWMY"):
        del header.PatientAge  # type 3; "62" (no unit) is not an Age String
    return header


def strip_free_text(result: Dataset, source: Dataset) -> None:
    """In place: no free-text patient field in ``result``; Issuer of Patient ID as in ``source`` (SR and heatmap alike)."""
    for keyword in FREE_TEXT:
        if keyword in result:
            delattr(result, keyword)
    if source.get("IssuerOfPatientID"):
        result.IssuerOfPatientID = source.IssuerOfPatientID


def check_source(source: Dataset) -> None:
    """Raise ReportError when ``source`` cannot be referenced by an SR (UIDs missing)."""
    missing = [kw for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not source.get(kw)]
    if missing:
        raise ReportError(f"no SR: the image lacks {', '.join(missing)}; an SR must reference its study, series and instance")


def build_sr(source: Dataset, scored: Scored, model: ModelIdentity, *, heatmap_method: str | None,
             gate: str = "on") -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR for ``scored`` on ``source`` (the image's header; pixel data not needed).

    UIDs derive from the source instance and the model file, so scoring the same image with the
    same model again gives the same SR (a PACS stores it once) and another model a new one.
    An image outside the intended use (``scored.assessed`` false) gets an SR that says so and why,
    with no finding; ``gate`` ("on", "header-only", "off") is stated when the check was partial or off.
    """
    check_source(source)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=model.uid("device"), name=f"fedxray {model.name}", manufacturer_name="fedxray", model_name=model.name
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device)
    )
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"fedxray {model.name}", version=model.version, parameters=model.parameters(), manufacturer="fedxray"
    )
    groups = [] if scored.assessed else [_not_assessed_group(source, model, algorithm)]
    thresholds = model.label_thresholds
    for label, probability in scored.probabilities.items():
        finding = finding_code(label)
        present = label in scored.positive
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=model.uid("tracking", source.SOPInstanceUID, label), identifier=f"fedxray {label}"
                ),
                finding_type=finding,
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(name=codes.DCM.Probability, value=round(probability, 6), unit=UNIT_NONE),
                    hd.sr.Measurement(name=codes.DCM.ThresholdValue, value=thresholds.get(label, model.threshold),
                                      unit=UNIT_NONE),
                ],
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(name=finding, value=codes.SCT.Present if present else codes.SCT.Absent)
                ],
                source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
            )
        )
    try:
        report = hd.sr.MeasurementReport(
            observation_context=context, procedure_reported=PROCEDURE, imaging_measurements=groups, referenced_images=[source]
        )
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as err:
        # The Image Library (TID 1600) entry of a projection radiograph needs Imager Pixel Spacing
        # and a Patient Orientation, which CR images need not carry (type 3 / type 2, so possibly
        # empty). The library is optional in TID 1500 and every measurement group references the
        # source image itself, so the report goes without it.
        logger.debug("SR without Image Library: %s", err)
        report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=PROCEDURE, imaging_measurements=groups)
    statement = f"{DECISION_SUPPORT} {model.operating_point_text}" if scored.assessed else not_assessed_text(scored, model)
    if scored.assessed and heatmap_method is not None:
        statement += (
            f" A heatmap (Secondary Capture, series 'fedxray heatmap') shows where the model found evidence for "
            f"{scored.explained_label} ({heatmap_method})."
        )
        if scored.more_attributions:
            statement += f" Further heatmaps in that series: {', '.join(scored.more_attributions)}."
    statement += {"off": " " + GATE_OFF, "header-only": " " + GATE_HEADER_ONLY}.get(gate, "")
    report[0].ContentSequence.append(
        hd.sr.TextContentItem(name=codes.DCM.Comment, value=statement, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=report[0],
        series_instance_uid=model.uid("sr-series", source.StudyInstanceUID),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=model.uid("sr", source.SOPInstanceUID),
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer="fedxray",
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = "fedxray AI decision support" if scored.assessed else "fedxray AI: not assessed"
    sr.ManufacturerModelName = f"fedxray {model.name}"[:64]
    sr.SoftwareVersions = model.version[:64]
    strip_free_text(sr, source)
    return sr


def not_assessed_text(scored: Scored, model: ModelIdentity) -> str:
    """What the reader is told about an image the model declined: that it saw it, why it declined, no finding."""
    return (f"Not assessed: {scored.reason}. fedxray {model.name} received this image and did not score it: it is "
            "outside the model's intended use (frontal PA/AP chest radiographs, CR or DX). No finding is reported; "
            "read the image without AI support.")


def _not_assessed_group(source: Dataset, model: ModelIdentity,
                        algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The one measurement group of a not-assessed SR (TID 1500 needs one): the finding "not assessed", no values."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=model.uid("tracking", source.SOPInstanceUID, "not-assessed"),
                                                     identifier="fedxray not assessed"),
        finding_type=NOT_ASSESSED, algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
