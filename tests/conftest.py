"""Shared fixtures: where the real data lives, and a skip when it is absent; the process-leak guard.

Real data (../shared/data) is read-only and never committed; tests find it through the
FEDXRAY_DATA environment variable and skip cleanly without it, so the suite also passes on a
fresh clone elsewhere.

Process hygiene. Many tests start real processes (SuperLink, SuperNodes, nginx, the bundle
launcher, Ray through fl-sim). When a test module ends, none of them may be left: a leftover
SuperNode keeps a site's identity alive, holds ports and CPU, and hides bugs (a killed
``fl-client start`` whose SuperNode lived on went unnoticed this way). The guard below fails the
module's last test (an error at its teardown) when a process the session started outlives the
module's fixtures, names the test after which it first appeared, and ends it.

"Started by this session" = a descendant of pytest, or a process whose environment carries this
session's marker (``FEDXRAY_TEST_SESSION``, inherited by everything the tests spawn): orphans whose
parent died are re-parented to init and are no longer descendants, but keep the marker. Zombies
(exited, not reaped) are not processes that run and are ignored. Before failing, stragglers get
``LEAK_GRACE_S`` seconds to finish exiting (Flower shuts down in steps), Ray's agents longer
(``RAY_AGENT_GRACE_S``): they notice their raylet's death only after about a minute.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path

import pytest

# OpenMP threads that spin-wait make torch steps 5-20x slower when the 2 cores are shared
# (tests, Ray actors, a SuperLink): yield the core instead. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

# ----------------------------------------------------------------------------- process-leak guard

#: Seconds a leftover process gets to exit by itself before the guard fails the module and ends it.
LEAK_GRACE_S = float(os.environ.get("FEDXRAY_LEAK_GRACE_S", "20"))
#: Ray's agents (ray::DashboardAgent, ray::RuntimeEnvAgent) follow their raylet, but slowly: measured
#: about 60 s after a SIGTERM'd fl-sim (tests/e2e/test_resume.py) before they exit by themselves.
RAY_AGENT_GRACE_S = float(os.environ.get("FEDXRAY_RAY_AGENT_GRACE_S", "150"))
_MARK_NAME = "FEDXRAY_TEST_SESSION"
_MARK = secrets.token_hex(8)
os.environ[_MARK_NAME] = _MARK  # before any test spawns anything: every child inherits it
_SELF = os.getpid()


def _proc_table() -> dict[int, tuple[int, str, int]]:
    """pid -> (ppid, state, start time in clock ticks) of every process, from /proc."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(entry.name)] = (int(fields[1]), fields[0], int(fields[19]))
    return table


def _has_mark(pid: int) -> bool:
    try:
        return f"{_MARK_NAME}={_MARK}".encode() in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _session_processes() -> dict[tuple[int, int], str]:
    """(pid, start time) -> command line, for every running (non-zombie) process this session started."""
    table = _proc_table()
    found = {}
    for pid, (ppid, state, started) in table.items():
        if pid == _SELF or state in ("Z", "X") or started < _SELF_STARTED:  # older than pytest: not ours
            continue
        ancestor, seen = ppid, 0
        while ancestor not in (0, 1, _SELF) and ancestor in table and seen < 64:
            ancestor, seen = table[ancestor][0], seen + 1
        if ancestor == _SELF or _has_mark(pid):
            try:
                cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            found[(pid, started)] = cmd.strip()[:160] or f"pid {pid}"
    return found


_LINUX = Path("/proc/self/stat").exists()
_SELF_STARTED = _proc_table().get(_SELF, (0, "", 0))[2] if _LINUX else 0
_BASELINE = set(_session_processes()) if _LINUX else set()  # e.g. a plugin's helper started before the tests
_FIRST_SEEN: dict[tuple[int, int], str] = {}


def _end(keys: list[tuple[int, int]]) -> None:
    """SIGTERM, then SIGKILL, what is still running (the pid is checked against its start time first)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        table = _proc_table()
        alive = [pid for pid, started in keys if pid in table and table[pid][2] == started and table[pid][1] != "Z"]
        for pid in alive:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        if alive and sig == signal.SIGTERM:
            time.sleep(5)


def _grace(cmd: str) -> float:
    return RAY_AGENT_GRACE_S if cmd.startswith("ray::") and cmd.endswith("Agent") else LEAK_GRACE_S


def _describe_parent(table: dict[int, tuple[int, str, int]], pid: int) -> str:
    """'1234 (zombie)' or '1 (init: its parent died)': tells an orphan from a child of a live process."""
    ppid = table.get(pid, (0, "", 0))[0]
    if ppid == 1:
        return "1 (init: its parent died)"
    return f"{ppid}{' (zombie)' if table.get(ppid, (0, '', 0))[1] == 'Z' else ''}"


@pytest.fixture(autouse=True)
def _note_new_processes(request):
    """Remember after which test each process first appeared (for the leak report)."""
    yield
    if _LINUX:
        for key in _session_processes():
            _FIRST_SEEN.setdefault(key, request.node.nodeid)


@pytest.fixture(autouse=True, scope="module")
def _no_processes_left_behind(request):
    """After the module's own fixtures are torn down, nothing the session started may still run."""
    yield
    if not _LINUX:
        return  # no /proc to read
    began = time.monotonic()
    left = {k: v for k, v in _session_processes().items() if k not in _BASELINE}
    while left and time.monotonic() - began < max(_grace(cmd) for cmd in left.values()):
        time.sleep(0.5)
        left = {k: v for k, v in _session_processes().items() if k not in _BASELINE}
    if not left:
        return
    table = _proc_table()
    lines = [f"pid {pid}: {cmd} (parent {_describe_parent(table, pid)}; first seen after "
             f"{_FIRST_SEEN.get((pid, started), 'the module fixtures')})" for (pid, started), cmd in sorted(left.items())]
    _end(list(left))
    pytest.fail(f"{request.module.__name__} left {len(left)} process(es) running {time.monotonic() - began:.0f} s "
                "after its fixtures were torn down (now ended):\n  " + "\n  ".join(lines), pytrace=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests on one intra-op thread, then restore the setting.

    On the 2 shared cores of CI/dev machines a 2-thread OpenMP pool waits for a thread that
    another process holds: a DenseNet DP step took 34 s instead of 5 s.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _data_root() -> Path | None:
    value = os.environ.get("FEDXRAY_DATA")
    if not value:
        return None
    root = Path(value).expanduser().resolve()
    return root if root.is_dir() else None


@pytest.fixture(scope="session")
def fedxray_data() -> Path:
    """Root of the shared real data; skips the test when FEDXRAY_DATA is unset or missing."""
    root = _data_root()
    if root is None:
        pytest.skip("FEDXRAY_DATA is not set (or missing): real-data test skipped")
    return root


@pytest.fixture(scope="session")
def dicom_dir(fedxray_data: Path) -> Path:
    """Folder of real DICOM radiographs and LUT test objects."""
    path = fedxray_data / "dicom"
    if not path.is_dir():
        pytest.skip(f"{path} not found: real-DICOM test skipped")
    return path


def write_test_dicom(
    path: Path,
    pixels,
    *,
    patient_id: str = "TEST-0001",
    study_uid: str | None = None,
    photometric: str = "MONOCHROME2",
    bits: int = 8,
    modality: str = "CR",
) -> Path:
    """Write a small uncompressed DICOM radiograph (tests only).

    ``pixels`` are display values in [0, 1] (1 brightest); MONOCHROME1 files store them inverted,
    as a real MONOCHROME1 modality would, so a correct reader gives ``pixels`` back.
    """
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    arr = np.asarray(pixels, dtype=np.float64)
    top = (1 << bits) - 1
    stored = arr if photometric == "MONOCHROME2" else 1.0 - arr
    values = np.rint(stored * top).astype(np.uint8 if bits <= 8 else np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = "Test^Patient"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = values.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def dicom_writer():
    """The test DICOM writer as a fixture, for tests that build small sites in tmp dirs."""
    return write_test_dicom
