"""``fl-predict serve``: a DICOM node a PACS sends radiographs to, answering with an SR and a heatmap.

pynetdicom on both sides. As an SCP (``--ae-title``, ``--port``) it answers C-ECHO and accepts
C-STORE of Computed Radiography, Digital X-Ray (For Presentation) and Secondary Capture images
(chest radiographs archived after conversion, such as the SIIM-ACR set, are Secondary Captures),
in every transfer syntax whose decoder is installed: uncompressed, JPEG baseline / extended /
lossless, JPEG-LS, JPEG 2000, HTJ2K, RLE. Other SOP classes are refused during association
negotiation (abstract syntax not supported), which every sender understands before it sends.

Each received image is decoded at once (the one image path, ``common.preprocess.load_pixels``),
so the C-STORE response tells the truth about it:

============================================  ======================================
what arrived                                  response
============================================  ======================================
a radiograph fedxray can read                 0x0000 Success (scored right after)
pixel data that cannot be decoded             0xC000 Cannot understand (+ Error Comment)
a Secondary Capture that is not CR/DX         0xC000 Cannot understand (+ Error Comment)
SOP Class UID differs from the context's      0xA900 Data set does not match SOP Class
the work queue is full / the disk is full     0xA700 Out of resources (the sender retries)
fedxray's own SR / heatmap sent back          0x0000 Success, ignored (no routing loop)
============================================  ======================================

A worker thread scores the queued images, writes ``<SOPInstanceUID>.sr.dcm`` and the heatmap
files to ``--out`` and sends the SR and the heatmap Secondary Capture by C-STORE to
``--forward HOST:PORT:AET`` (three tries with back-off). One log line per image, naming the SOP
Instance UID only. TLS on both associations is optional (``--tls-*``, ``--forward-tls-*``).
"""

from __future__ import annotations

import argparse
import logging
import queue
import shutil
import signal
import ssl
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from clinic.drift import Observation, Window, compare, find_reference, log_line
from clinic.model import Scorer
from clinic.outputs import build_outputs, write_outputs
from clinic.predict import Source, read_source

logger = logging.getLogger(__name__)

STORAGE_CLASSES = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation, SecondaryCaptureImageStorage)
RADIOGRAPH_MODALITIES = ("CR", "DX")
_UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")
_COMPRESSED = (
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.5",
)  # fmt: skip
QUEUE_SIZE = 16  # images decoded and waiting to be scored; beyond this the sender is told to retry
FORWARD_TRIES = 3
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class Destination:
    """Where the SR and heatmap go: ``HOST:PORT:AET`` (an IPv6 host in brackets)."""

    host: str
    port: int
    ae_title: str

    @classmethod
    def parse(cls, text: str) -> Destination:
        try:
            host, port, aet = text.rsplit(":", 2)
            host = host.strip("[]")
            if not host or not aet or len(aet) > 16:
                raise ValueError
            return cls(host, int(port), aet)
        except ValueError as err:
            raise ValueError(
                f"--forward {text!r} is not HOST:PORT:AET (e.g. pacs.local:104:PACS; AE titles have at most 16 characters)"
            ) from err

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def transfer_syntaxes() -> list[str]:
    """Uncompressed syntaxes plus every compressed one whose pydicom decoder is installed."""
    available = []
    for syntax in _COMPRESSED:
        try:
            if get_decoder(UID(syntax)).is_available:
                available.append(syntax)
        except NotImplementedError:
            continue
    return [*_UNCOMPRESSED, *available]


@dataclass
class _Job:
    spool: Path
    sop_instance_uid: str
    source: Source | None = None  # decoded when received; None for an image recovered after a restart


class Listener:
    """The SCP, its work queue and the forwarding worker; ``start()`` returns once it listens."""

    def __init__(
        self,
        scorer: Scorer,
        *,
        ae_title: str,
        out: Path,
        state: Path | None,
        forward: Destination | None = None,
        heatmaps: bool = True,
        calling_aets: list[str] | None = None,
        server_tls: ssl.SSLContext | None = None,
        forward_tls: ssl.SSLContext | None = None,
        drift_every: int = 50,
    ) -> None:
        self.scorer = scorer
        self.out = out
        self.spool = out / ".incoming"
        self.forward = forward
        self.heatmaps = heatmaps
        self.server_tls = server_tls
        self.forward_tls = forward_tls
        self.drift_every = max(1, drift_every)
        self.window = Window(state, scorer.identity.sha256) if state is not None else None
        self.reference = find_reference(scorer.classifier.raw_meta, state, model_sha256=scorer.identity.sha256)
        self.jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self.scored = 0
        self.ae = AE(ae_title=ae_title)
        self.ae.maximum_pdu_size = 0  # no limit: radiographs are large
        syntaxes = transfer_syntaxes()
        self.ae.add_supported_context(Verification)
        for sop_class in STORAGE_CLASSES:
            self.ae.add_supported_context(sop_class, syntaxes)
        if calling_aets:
            self.ae.require_calling_aet = calling_aets
        self._server = None
        self._worker = threading.Thread(target=self._work, name="fl-predict-worker", daemon=True)

    def start(self, host: str, port: int) -> None:
        self.spool.mkdir(parents=True, exist_ok=True)
        self._worker.start()
        # Images acknowledged with Success but not scored before a crash or a kill: score them now.
        for stale in sorted(self.spool.glob("*.dcm")):
            logger.info("scoring an image received before the last stop")
            self.jobs.put(_Job(stale, "(received before restart)"))
        handlers = [(evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_REJECTED, self._on_rejected)]
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
        peer = f"{assoc.requestor.ae_title}@{assoc.requestor.address}"
        if refused:
            logger.warning("association from %s: refused SOP class(es) %s (fedxray scores CR, DX and Secondary Capture radiographs)",
                           peer, ", ".join(refused))
        else:
            logger.debug("association from %s accepted", peer)

    def _on_rejected(self, event: evt.Event) -> None:
        assoc = event.assoc
        logger.warning("association from %s@%s rejected (calling AE title not allowed, or no common presentation context)",
                       assoc.requestor.ae_title, assoc.requestor.address)

    def _on_store(self, event: evt.Event) -> Dataset | int:
        """Decode now (to answer truthfully), queue for scoring; never raise into pynetdicom."""
        sop_uid = str(event.request.AffectedSOPInstanceUID or "?")
        context_class = UID(event.context.abstract_syntax)
        spool = self.spool / f"{uuid.uuid4().hex}.dcm"
        try:
            spool.write_bytes(event.encoded_dataset())
        except OSError as err:
            logger.error("C-STORE %s: cannot spool (%s) -> 0xA700", sop_uid, err.strerror)
            return _status(STATUS_OUT_OF_RESOURCES, "no space to receive the image: try later")
        keep = False
        try:
            try:
                source = read_source(spool)
            except ValueError as err:
                reason = getattr(err, "reason", str(err)).replace(str(spool), "<file>")
                logger.warning("C-STORE %s: unreadable image (%s) -> 0xC000", sop_uid, " ".join(reason.split()))
                return _status(STATUS_CANNOT_UNDERSTAND, f"unreadable image: {reason}")
            header = source.header
            assert header is not None
            if str(header.get("SOPClassUID", "")) != context_class:
                logger.warning("C-STORE %s: SOP Class UID %s does not match the context's %s -> 0xA900",
                               sop_uid, header.get("SOPClassUID"), context_class.name)
                return _status(STATUS_MISMATCH, f"data set SOP Class UID does not match the context ({context_class.name})")
            if str(header.get("Manufacturer", "")).startswith("fedxray"):
                logger.info("C-STORE %s: fedxray's own output sent back: ignored", sop_uid)
                return STATUS_SUCCESS
            modality = str(header.get("Modality", "") or "")
            if context_class == SecondaryCaptureImageStorage and modality not in RADIOGRAPH_MODALITIES:
                logger.warning("C-STORE %s: Secondary Capture with Modality %r is not a radiograph -> 0xC000", sop_uid, modality)
                return _status(STATUS_CANNOT_UNDERSTAND, f"not a radiograph (Modality {modality or 'empty'}): not scored")
            try:
                self.jobs.put_nowait(_Job(spool, sop_uid, source))
            except queue.Full:
                logger.warning("C-STORE %s: %d image(s) waiting -> 0xA700 (the sender retries)", sop_uid, QUEUE_SIZE)
                return _status(STATUS_OUT_OF_RESOURCES, "busy scoring: try again shortly")
            keep = True
            return STATUS_SUCCESS
        except Exception as err:  # a handler must answer; pynetdicom would otherwise send 0xC211 without a log line
            logger.exception("C-STORE %s: unexpected %s -> 0xC000", sop_uid, type(err).__name__)
            return _status(STATUS_CANNOT_UNDERSTAND, f"unexpected {type(err).__name__}")
        finally:
            if not keep:
                spool.unlink(missing_ok=True)

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
            finally:
                job.spool.unlink(missing_ok=True)

    def _process(self, job: _Job) -> None:
        source = job.source or read_source(job.spool)
        job.sop_instance_uid = source.sop_instance_uid or job.sop_instance_uid
        scored = self.scorer.score(source.pixels)
        outputs = build_outputs(source, scored, self.scorer)
        for problem in outputs.problems:
            logger.warning("%s: %s", job.sop_instance_uid, problem)
        write_outputs(outputs, self.out)
        sent = self._send(outputs.datasets(), job.sop_instance_uid) if self.forward is not None and outputs.datasets() else False
        probs = ", ".join(f"{label} {p:.3f}" for label, p in scored.probabilities.items())
        verdict = "positive " + "+".join(scored.positive) if scored.positive else "negative"
        where = f"sent to {self.forward}" if sent else "written" if self.forward is None else "written, NOT sent"
        what = "SR + heatmap" if outputs.secondary_capture is not None else "SR" if outputs.sr is not None else "no SR"
        logger.info("scored %s: %s (%s); %s %s", job.sop_instance_uid, verdict, probs, what, where)
        self.scored += 1
        if self.window is not None:
            size = self.window.add([Observation.of(scored.model_input, scored.probabilities)])
            if self.reference is not None and self.scored % self.drift_every == 0:
                logger.info("%s (window %d)", log_line(compare(self.window.histograms(), self.reference)), size)

    def _send(self, datasets: list[Dataset], sop_uid: str) -> bool:
        """C-STORE ``datasets`` to the destination in one association; True when all were stored."""
        dest = self.forward
        assert dest is not None
        for attempt in range(1, FORWARD_TRIES + 1):
            ae = AE(ae_title=self.ae.ae_title)
            for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
                ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
            tls = (self.forward_tls, dest.host) if self.forward_tls is not None else None
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls)
            if assoc.is_established:
                try:
                    statuses = [assoc.send_c_store(ds) for ds in datasets]
                finally:
                    assoc.release()
                codes = [int(s.Status) if s else -1 for s in statuses]
                if all(c == STATUS_SUCCESS or 0xB000 <= c <= 0xBFFF for c in codes):
                    return True
                problem = "statuses " + ", ".join(f"0x{c:04X}" if c >= 0 else "none" for c in codes)
            else:
                problem = "association rejected or aborted" if assoc.is_rejected or assoc.is_aborted else "no connection"
            if attempt < FORWARD_TRIES:
                time.sleep(2 ** (attempt - 1))
        logger.error("forwarding results of %s to %s failed after %d tries (%s): they stay in %s", sop_uid, dest, FORWARD_TRIES,
                     problem, self.out)
        return False


def _status(code: int, comment: str) -> Dataset:
    """A C-STORE response with an Error Comment (0000,0902): at most 64 characters, no patient data."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


# --------------------------------------------------------------------------- entry point


def server_tls(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext | None:
    """TLS for the listener: a certificate and key; with ``ca``, client certificates are required."""
    if not cert and not key:
        if ca:
            raise ValueError("--tls-ca needs --tls-cert and --tls-key: the listener must have its own certificate")
        return None
    if not (cert and key):
        raise ValueError("--tls-cert and --tls-key go together: give both PEM files")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(ca)
    return ctx


def client_tls(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """TLS for forwarding: verify the destination against ``ca``; optionally present a client certificate."""
    if not ca:
        if cert or key:
            raise ValueError("--forward-tls-cert/--forward-tls-key need --forward-tls-ca to verify the destination")
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert or key:
        if not (cert and key):
            raise ValueError("--forward-tls-cert and --forward-tls-key go together: give both PEM files")
        ctx.load_cert_chain(cert, key)
    return ctx


def serve_main(args: argparse.Namespace) -> int:
    """Run the listener until SIGTERM / SIGINT; returns the exit status."""
    logging.getLogger("clinic").setLevel(logging.INFO)  # a service logs one line per image
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    try:
        forward = Destination.parse(args.forward) if args.forward else None
        tls_in = server_tls(args.tls_cert, args.tls_key, args.tls_ca)
        tls_out = client_tls(args.forward_tls_ca, args.forward_tls_cert, args.forward_tls_key)
    except (ValueError, OSError, ssl.SSLError) as err:
        print(f"fl-predict serve: {err}", flush=True)
        return 2
    if len(args.ae_title) > 16:
        print(f"fl-predict serve: --ae-title {args.ae_title!r} is longer than 16 characters", flush=True)
        return 2
    temporary = None
    if args.out:
        out = Path(args.out)
    else:
        temporary = Path(tempfile.mkdtemp(prefix="fl-predict-serve-"))
        out = temporary
        logger.warning("no --out: results are only forwarded (kept in %s until exit); the drift window is not kept", out)
    state = Path(args.state) if args.state else (None if temporary else out)
    scorer = Scorer(args.model, heatmaps=not args.no_heatmap, threads=args.threads, device=args.device)
    listener = Listener(scorer, ae_title=args.ae_title, out=out, state=state, forward=forward, heatmaps=not args.no_heatmap,
                        calling_aets=args.calling_aet, server_tls=tls_in, forward_tls=tls_out, drift_every=args.drift_every)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        listener.start(args.host, args.port)
    except OSError as err:
        print(f"fl-predict serve: cannot listen on {args.host}:{args.port} ({err.strerror}): choose a free port", flush=True)
        return 2
    logger.info("listening on %s:%d as %s (%s); model %s %s; heatmap %s; forwarding to %s", args.host, args.port, args.ae_title,
                "TLS" if tls_in else "no TLS", scorer.identity.name, scorer.identity.version, scorer.heatmap_method or "off",
                forward or "nowhere (files only)")
    if listener.reference is None:
        logger.info("no drift reference (model metadata or %s): drift is not logged", "drift-reference.json")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        logger.info("stopping: finishing queued images")
        listener.stop()
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    return 0
