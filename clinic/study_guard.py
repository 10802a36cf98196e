"""Results go only into the study the image itself came from.

``serve`` forwards what it builds into a PACS, where a Study Instance UID decides which patient's
record a report joins. The SR and the heatmap are built from the received image's own header, so
they belong to its study; this guard checks that, on the objects as they are about to leave,
whatever built them: each one's Study Instance UID and Patient ID are the source's, every Study
Instance UID nested in it (evidence, references) is the source's, and every instance it
references is the source image or one of the results themselves. A result that fails is neither
written nor sent.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydicom.dataset import Dataset


def foreign_references(source: Dataset, results: list[Dataset]) -> list[str]:
    """One line per way a result leaves ``source``'s study (no UID or patient value quoted); [] when none."""
    study = str(source.get("StudyInstanceUID", "") or "")
    patient = str(source.get("PatientID", "") or "")
    allowed = {str(source.get("SOPInstanceUID", "") or "")} | {str(ds.get("SOPInstanceUID", "") or "") for ds in results}
    problems = []
    for ds in results:
        name = f"{ds.get('Modality', '?')} result"
        if not study or str(ds.get("StudyInstanceUID", "") or "") != study:
            problems.append(f"{name}: Study Instance UID is not the source image's")
        if str(ds.get("PatientID", "") or "") != patient:
            problems.append(f"{name}: Patient ID is not the source image's")
        nested_studies = {str(item.StudyInstanceUID) for item in _items(ds) if "StudyInstanceUID" in item}
        if nested_studies - {study}:
            problems.append(f"{name}: references another study")
        referenced = {str(item.ReferencedSOPInstanceUID) for item in _items(ds) if "ReferencedSOPInstanceUID" in item}
        if referenced - allowed:
            problems.append(f"{name}: references an instance other than the source image")
    return problems


def _items(ds: Dataset) -> Iterator[Dataset]:
    """Every item of every sequence in ``ds``, at any depth."""
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield item
                yield from _items(item)
