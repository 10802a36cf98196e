"""What one sender can make ``fl-predict serve`` hold in memory, with the default limits; prints JSON.

Starts ``fl-predict serve`` (default limits, loopback, one thread) and sends, in this order, the
attacks the security review used and then real-sized radiographs, reading the listener's peak
resident memory (``VmHWM`` in /proc) after each: the peak only grows, so each line's
``peak_mb`` is the most the listener has held up to and including that image.

* ``rle_12000``: a 12000 x 12000 RLE image (4.5 MB on the wire; 288 MB decoded);
* ``plain_12000``: the same uncompressed (288 MB on the wire);
* ``j2k_lying``: a JPEG 2000 frame coded at 6000 x 6000 in a data set that says 16 x 16;
* ``chest_3000`` / ``max_5000``: uniform 16-bit CR images of 3000 x 3000 and 5000 x 5000 (the
  default --max-pixels), which must be scored.

    PYTHONPATH=. .venv/bin/python benchmarks/serve_memory.py [--model model.onnx]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _util import machine_info, print_json
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

FL_PREDICT = str(Path(sys.executable).parent / "fl-predict")


def _cr(rows: int, cols: int, *, uniform: bool = False) -> Dataset:
    """A 16-bit CR: a horizontal ramp, or one value (``uniform``: it compresses to almost nothing)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.PatientID = generate_uid(), generate_uid(), "CR", "BENCH"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ramp = np.linspace(200, 3800 if not uniform else 200, cols, dtype=np.float32)[None, :].repeat(rows, axis=0)
    ds.PixelData = ramp.astype(np.uint16).tobytes()
    return ds


def _attacks() -> dict[str, Dataset]:
    rle = _cr(12000, 12000, uniform=True)
    rle.compress(RLELossless)
    lying = _cr(6000, 6000, uniform=True)
    lying.compress(JPEG2000Lossless)
    lying.Rows = lying.Columns = 16
    return {"rle_12000": rle, "plain_12000": _cr(12000, 12000), "j2k_lying": lying}


def _peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc (Linux only), or fl-predict serve has exited: see its log")


def _send(port: int, ds: Dataset) -> str:
    ae = AE("BENCH")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="FEDXRAY")
    if not assoc.is_established:
        return "association refused"
    try:
        status = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    return f"0x{int(status.Status):04X}" if status else "aborted (no response)"


def _model(folder: Path) -> Path:
    from common.models import build_model
    from common.onnx_export import export_onnx

    model = build_model("scatternet", num_outputs=1)
    export_onnx(model, folder / "model.onnx", task="binary", labels=["opacity"], input_size=(64, 64), threshold=0.5,
                metadata={"model": "scatternet", "rounds": "0", "sites": "[]", "epsilon": "{}"})
    return folder / "model.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model.onnx (default: an untrained 64 px ScatterNet made here)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-memory-"))
    model = Path(args.model) if args.model else _model(work)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = work / "out"
    proc = subprocess.Popen([FL_PREDICT, "serve", "--model", str(model), "--port", str(port), "--any-calling-aet",
                             "--out", str(out), "--threads", "1"], stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "w"),
                            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    rows: list[dict[str, Any]] = []
    try:
        ae = AE("BENCH")
        ae.add_requested_context(Verification)
        for _ in range(300):
            if proc.poll() is not None:
                raise RuntimeError(f"fl-predict serve exited: {(work / 'serve.log').read_text()[-2000:]}")
            assoc = ae.associate("127.0.0.1", port, ae_title="FEDXRAY")
            if assoc.is_established:
                assoc.release()
                break
            time.sleep(0.2)
        rows.append({"sent": "nothing (started, C-ECHO answered)", "status": None, "peak_mb": round(_peak_mb(proc.pid), 1)})
        for name, ds in _attacks().items():
            rows.append({"sent": name, "status": _send(port, ds), "peak_mb": round(_peak_mb(proc.pid), 1)})
        for name, size in (("chest_3000", 3000), ("max_5000", 5000)):
            ds = _cr(size, size)
            status = _send(port, ds)
            deadline = time.monotonic() + 120
            while not (out / f"{ds.SOPInstanceUID}.sr.dcm").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            scored = (out / f"{ds.SOPInstanceUID}.sr.dcm").exists()
            rows.append({"sent": name, "status": status, "scored": scored, "peak_mb": round(_peak_mb(proc.pid), 1)})
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    shutil.rmtree(work, ignore_errors=True)
    print_json({"benchmark": "serve_memory", "rows": rows, "machine": machine_info()})


if __name__ == "__main__":
    main()
