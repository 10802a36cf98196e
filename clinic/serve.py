"""``fl-predict serve``: a DICOM node a PACS sends radiographs to, answering with an SR and a heatmap.

pynetdicom on both sides. As an SCP (``--ae-title``, ``--host``, ``--port``) it answers C-ECHO and
accepts C-STORE of Computed Radiography, Digital X-Ray (For Presentation) and Secondary Capture
images (chest radiographs archived after conversion, such as the SIIM-ACR set, are Secondary
Captures), in every transfer syntax whose decoder is installed: uncompressed, JPEG baseline /
extended / lossless, JPEG-LS, JPEG 2000, HTJ2K, RLE. Other SOP classes are refused during
association negotiation (abstract syntax not supported), which every sender understands before
it sends. Only the calling AE titles given (``--calling-aet``) may associate, unless
``--any-calling-aet`` says otherwise; the resource limits are clinic/serve_limits.py's.

Each received image is checked and decoded at once (the one image path,
``common.preprocess.load_pixels``), so the C-STORE response tells the truth about it:

============================================  ======================================
what arrived                                  response
============================================  ======================================
a radiograph fedxray can read                 0x0000 Success (scored right after)
a SOP Instance, Study or Series UID that      0xA900 (+ Error Comment): refused, so no
is not a valid DICOM UID                      file name or reference is made from it
SOP Class UID differs from the context's      0xA900 Data set does not match SOP Class
larger than the limits (before decoding)      0xC000 Cannot understand (+ Error Comment)
pixel data that cannot be decoded             0xC000 Cannot understand (+ Error Comment)
a Secondary Capture that is not CR/DX         0xC000 Cannot understand (+ Error Comment)
the work queue is full / the disk is full     0xA700 Out of resources (the sender retries)
fedxray's own SR / heatmap sent back          0x0000 Success, ignored (no routing loop)
============================================  ======================================

A worker thread scores the queued images, writes ``<SOPInstanceUID>.sr.dcm`` and the heatmap
files to ``--out`` and sends the SR and the heatmap Secondary Capture by C-STORE to
``--forward HOST:PORT:AET`` (three tries with back-off), after checking that they belong to the
source image's own study (clinic/study_guard.py). One log line per image, naming the SOP Instance
UID only; every received value a log line quotes goes through ``clinic.log_values.loggable``.
Images wait for scoring in ``--out/.incoming`` (folder 0700, files 0600: they hold patient data).
"""

from __future__ import annotations

import logging
import os
import queue
import ssl
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from clinic.drift import Observation, Window, compare, find_reference, log_line
from clinic.forward import FORWARD_TRIES, Destination, send_results
from clinic.log_values import loggable
from clinic.model import Scorer
from clinic.outputs import build_outputs, write_outputs
from clinic.predict import Source, read_source
from clinic.serve_limits import UNENCAPSULATED, ConnectionGuard, Limits, size_problem
from clinic.study_guard import foreign_references
from clinic.uids import is_valid_uid

logger = logging.getLogger(__name__)

STORAGE_CLASSES = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation, SecondaryCaptureImageStorage)
RADIOGRAPH_MODALITIES = ("CR", "DX")
# Deflated Explicit VR Little Endian (1.2.840.10008.1.2.1.99) is not offered: a few kB of deflate
# inflate to gigabytes while the data set is parsed, before any limit could look at it.
_COMPRESSED = (
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.5",
)  # fmt: skip
QUEUE_SIZE = 16  # images decoded and waiting to be scored; beyond this the sender is told to retry
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
_UID_KEYWORDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def transfer_syntaxes() -> list[str]:
    """Uncompressed syntaxes plus every compressed one whose pydicom decoder is installed."""
    available = []
    for syntax in _COMPRESSED:
        try:
            if get_decoder(UID(syntax)).is_available:
                available.append(syntax)
        except NotImplementedError:
            continue
    return [*UNENCAPSULATED, *available]


@dataclass
class _Job:
    spool: Path
    sop_instance_uid: str
    source: Source | None = None  # decoded when received; None for an image recovered after a restart
    pixels: int = 0  # decoded pixel values it holds while it waits


class Listener:
    """The SCP, its work queue and the forwarding worker; ``start()`` returns once it listens."""

    def __init__(
        self,
        scorer: Scorer,
        *,
        ae_title: str,
        out: Path,
        state: Path | None,
        calling_aets: list[str] | None,
        forward: Destination | None = None,
        heatmaps: bool = True,
        server_tls: ssl.SSLContext | None = None,
        forward_tls: ssl.SSLContext | None = None,
        drift_every: int = 50,
        limits: Limits | None = None,
    ) -> None:
        """``calling_aets``: the AE titles that may associate; None accepts any (``--any-calling-aet``)."""
        self.scorer = scorer
        self.out = out
        self.spool = out / ".incoming"
        self.forward = forward
        self.heatmaps = heatmaps
        self.server_tls = server_tls
        self.forward_tls = forward_tls
        self.drift_every = max(1, drift_every)
        self.limits = limits or Limits()
        self.window = Window(state, scorer.identity.sha256) if state is not None else None
        self.reference = find_reference(scorer.classifier.raw_meta, state, model_sha256=scorer.identity.sha256)
        self.jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self._queued_pixels = 0  # decoded pixel values waiting in `jobs` (at most limits.max_queued_pixels)
        self._queue_lock = threading.Lock()
        self.scored = 0
        self.ae = AE(ae_title=ae_title)
        self.guard = ConnectionGuard(self.limits)
        self.guard.configure(self.ae)
        syntaxes = transfer_syntaxes()
        self.ae.add_supported_context(Verification)
        for sop_class in STORAGE_CLASSES:
            self.ae.add_supported_context(sop_class, syntaxes)
        if calling_aets is not None:
            if not calling_aets:
                raise ValueError("no calling AE title allowed: give --calling-aet AET (or --any-calling-aet)")
            self.ae.require_calling_aet = calling_aets
        self._server = None
        self._worker = threading.Thread(target=self._work, name="fl-predict-worker", daemon=True)

    def start(self, host: str, port: int) -> None:
        self.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.spool.chmod(0o700)  # also a folder an older version made 0755: it holds received images
        self._worker.start()
        # Images acknowledged with Success but not scored before a crash or a kill: score them now.
        for stale in sorted(self.spool.glob("*.dcm")):
            stale.chmod(0o600)
            logger.info("scoring an image received before the last stop")
            self.jobs.put(_Job(stale, "(received before restart)"))
        handlers = [(evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_REJECTED, self._on_rejected), *self.guard.handlers()]
        self._server = self.ae.start_server((host, port), block=False, evt_handlers=handlers, ssl_context=self.server_tls)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, score and forward what is queued (up to ``timeout`` s), then stop the worker."""
        if self._server is not None:
            self._server.shutdown()
        self.jobs.put(None)
        self._worker.join(timeout)
        if self._worker.is_alive():
            logger.warning("worker still busy after %.0f s at shutdown; %d image(s) not scored", timeout, self.jobs.qsize())

    # ------------------------------------------------------------------ DIMSE handlers

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        refused = sorted({UID(c.abstract_syntax).name for c in assoc.rejected_contexts})
        peer = f"{loggable(assoc.requestor.ae_title, 16)}@{assoc.requestor.address}"
        if refused:
            logger.warning("association from %s: refused SOP class(es) %s (fedxray scores CR, DX and Secondary Capture radiographs)",
                           peer, loggable(", ".join(refused), 200))
        else:
            logger.debug("association from %s accepted", peer)

    def _on_rejected(self, event: evt.Event) -> None:
        assoc = event.assoc
        logger.warning("association from %s@%s rejected (calling AE title not allowed, or no common presentation context)",
                       loggable(assoc.requestor.primitive.calling_ae_title, 16), assoc.requestor.address)

    def _on_store(self, event: evt.Event) -> Dataset | int:
        """Check, decode (to answer truthfully), queue for scoring; never raise into pynetdicom."""
        sop_uid = str(event.request.AffectedSOPInstanceUID or "")
        if not is_valid_uid(sop_uid):
            logger.warning("C-STORE %s: SOP Instance UID is not a valid DICOM UID -> 0xA900", loggable(sop_uid))
            return _status(STATUS_MISMATCH, "SOP Instance UID is not a valid DICOM UID")
        spool = self.spool / f"{uuid.uuid4().hex}.dcm"
        keep = False
        try:
            refusal = self._check(event, sop_uid)
            if refusal is not None:
                return refusal
            try:
                _write_private(spool, event.encoded_dataset())
            except OSError as err:
                logger.error("C-STORE %s: cannot spool (%s) -> 0xA700", sop_uid, err.strerror)
                return _status(STATUS_OUT_OF_RESOURCES, "no space to receive the image: try later")
            try:
                source = read_source(spool)
            except ValueError as err:
                reason = getattr(err, "reason", str(err)).replace(str(spool), "<file>")
                logger.warning("C-STORE %s: unreadable image (%s) -> 0xC000", sop_uid, loggable(reason, 300))
                return _status(STATUS_CANNOT_UNDERSTAND, f"unreadable image: {reason}")
            header = source.header
            assert header is not None
            if str(header.get("Manufacturer", "")).startswith("fedxray"):
                logger.info("C-STORE %s: fedxray's own output sent back: ignored", sop_uid)
                return STATUS_SUCCESS
            modality = str(header.get("Modality", "") or "")
            if UID(event.context.abstract_syntax) == SecondaryCaptureImageStorage and modality not in RADIOGRAPH_MODALITIES:
                logger.warning("C-STORE %s: Secondary Capture with Modality %s is not a radiograph -> 0xC000", sop_uid,
                               loggable(modality or "(empty)", 16))
                return _status(STATUS_CANNOT_UNDERSTAND, f"not a radiograph (Modality {modality[:16] or 'empty'}): not scored")
            if not self._enqueue(_Job(spool, sop_uid, source, int(source.pixels.size))):
                logger.warning("C-STORE %s: %d image(s) waiting -> 0xA700 (the sender retries)", sop_uid, self.jobs.qsize())
                return _status(STATUS_OUT_OF_RESOURCES, "busy scoring: try again shortly")
            keep = True
            return STATUS_SUCCESS
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001 - Rust decoders panic with a BaseException; a handler must answer
            logger.error("C-STORE %s: unexpected %s -> 0xC000", sop_uid, type(err).__name__, exc_info=isinstance(err, Exception))
            return _status(STATUS_CANNOT_UNDERSTAND, f"unexpected {type(err).__name__}")
        finally:
            if not keep:
                spool.unlink(missing_ok=True)

    def _check(self, event: evt.Event, sop_uid: str) -> Dataset | None:
        """The refusals decided on the header alone, before anything is written or decoded; None to go on."""
        context_class = UID(event.context.abstract_syntax)
        ds = event.dataset
        if str(ds.get("SOPInstanceUID", "")) != sop_uid:
            logger.warning("C-STORE %s: the data set's SOP Instance UID differs from the request's -> 0xA900", sop_uid)
            return _status(STATUS_MISMATCH, "data set SOP Instance UID differs from the request's")
        invalid = [kw for kw in _UID_KEYWORDS if not is_valid_uid(str(ds.get(kw, "")))]
        if invalid:
            logger.warning("C-STORE %s: %s not a valid DICOM UID -> 0xA900", sop_uid, " and ".join(invalid))
            return _status(STATUS_MISMATCH, f"{invalid[0]} is not a valid DICOM UID")
        if str(ds.get("SOPClassUID", "")) != context_class:
            logger.warning("C-STORE %s: SOP Class UID %s does not match the context's %s -> 0xA900",
                           sop_uid, loggable(ds.get("SOPClassUID")), context_class.name)
            return _status(STATUS_MISMATCH, f"data set SOP Class UID does not match the context ({context_class.name})")
        problem = size_problem(ds, event.context.transfer_syntax, self.limits)
        if problem is not None:
            logger.warning("C-STORE %s: too large to decode (%s) -> 0xC000", sop_uid, problem)
            return _status(STATUS_CANNOT_UNDERSTAND, f"too large: {problem}")
        return None

    def _enqueue(self, job: _Job) -> bool:
        """Queue ``job`` unless the queue is full or its decoded pixels would pass the budget."""
        with self._queue_lock:
            if self._queued_pixels + job.pixels > self.limits.max_queued_pixels:
                return False
            try:
                self.jobs.put_nowait(job)
            except queue.Full:
                return False
            self._queued_pixels += job.pixels
            return True

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                self._process(job)
            except Exception:  # one bad image must not stop the service
                logger.exception("scoring %s failed", job.sop_instance_uid)
            except BaseException as err:  # a decoder's panic on an image recovered after a restart
                if isinstance(err, KeyboardInterrupt | SystemExit):
                    raise
                logger.error("scoring %s failed (%s)", job.sop_instance_uid, type(err).__name__)
            finally:
                with self._queue_lock:
                    self._queued_pixels -= job.pixels
                job.spool.unlink(missing_ok=True)

    def _process(self, job: _Job) -> None:
        source = job.source or read_source(job.spool)
        if is_valid_uid(source.sop_instance_uid):
            job.sop_instance_uid = str(source.sop_instance_uid)
        scored = self.scorer.score(source.pixels, header=source.header)
        outputs = build_outputs(source, scored, self.scorer)
        for problem in outputs.problems:
            logger.warning("%s: %s", job.sop_instance_uid, loggable(problem, 300))
        assert source.header is not None
        foreign = foreign_references(source.header, outputs.datasets())
        if foreign:
            logger.error("%s: results not written or sent, they would leave the image's study: %s", job.sop_instance_uid,
                         "; ".join(foreign))
            return
        write_outputs(outputs, self.out)
        sent = self._send(outputs.datasets(), job.sop_instance_uid) if self.forward is not None and outputs.datasets() else False
        probs = ", ".join(f"{label} {p:.3f}" for label, p in scored.probabilities.items())
        where = f"sent to {self.forward}" if sent else "written" if self.forward is None else "written, NOT sent"
        what = "SR + heatmap" if outputs.secondary_capture is not None else "SR" if outputs.sr is not None else "no SR"
        logger.info("scored %s: %s (%s); %s %s", job.sop_instance_uid, loggable(scored.verdict, 300), probs, what, where)
        self.scored += 1
        if self.window is not None and scored.assessed:  # the drift window watches what the model answered for
            size = self.window.add([Observation.of(scored.model_input, scored.probabilities)])
            if self.reference is not None and self.scored % self.drift_every == 0:
                logger.info("%s (window %d)", log_line(compare(self.window.histograms(), self.reference)), size)

    def _send(self, datasets: list[Dataset], sop_uid: str) -> bool:
        """C-STORE ``datasets`` to the destination in one association; True when all were stored."""
        assert self.forward is not None
        problem = send_results(datasets, self.forward, calling_aet=self.ae.ae_title, tls=self.forward_tls)
        if problem is not None:
            logger.error("forwarding results of %s to %s failed after %d tries (%s): they stay in %s", sop_uid, self.forward,
                         FORWARD_TRIES, problem, self.out)
        return problem is None


def _status(code: int, comment: str) -> Dataset:
    """A C-STORE response with an Error Comment (0000,0902): at most 64 characters, no patient data."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def _write_private(path: Path, data: bytes) -> None:
    """Write a received image readable by this user only (0600 from creation, whatever the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
