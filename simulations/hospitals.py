"""Folders of DICOM files that look like several hospitals (synthetic, or from a real image set).

Both builders write the same layout, which is what a hospital's ``fl-client`` reads (interface 2, docs/interfaces.md)::

    <out>/manifest.json                      sites, class counts, profiles, seed (no identifiers)
    <out>/<site>/labels.csv                  file (relative to the site folder), label (class name)
    <out>/<site>/<patient>/<study>/<n>.dcm   the radiographs; the label is never in the path
    <out>/holdout/...                        optional common test set, same layout

Each site writes through its own ``AcquisitionProfile`` (simulations.acquisition), so sites differ
in how their pixels are stored as well as in size and class mix (simulations.partition). Same
arguments and seed give byte-identical files.

This module is the one place callers import from; the work is done in
simulations/hospital_layout.py (the layout, the manifest), simulations/synthetic_hospitals.py and
simulations/image_hospitals.py.
"""

from simulations.hospital_layout import (
    HOLDOUT_SITE,
    LABELS_FILE,
    MANIFEST_FILE,
    SYNTHETIC_CLASSES,
    HospitalsManifest,
    SimulationError,
    SiteSummary,
    iter_dicom_files,
    read_labels,
    site_name,
)
from simulations.image_hospitals import load_image_set, make_hospitals_from_images, pseudonymise, source_prefix
from simulations.synthetic_hospitals import AP_SHARE, make_synthetic_hospitals

__all__ = [
    "AP_SHARE",
    "HOLDOUT_SITE",
    "LABELS_FILE",
    "MANIFEST_FILE",
    "SYNTHETIC_CLASSES",
    "HospitalsManifest",
    "SimulationError",
    "SiteSummary",
    "iter_dicom_files",
    "load_image_set",
    "make_hospitals_from_images",
    "make_synthetic_hospitals",
    "pseudonymise",
    "read_labels",
    "site_name",
    "source_prefix",
]
