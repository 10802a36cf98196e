"""``fl-predict``: score radiographs with a fedxray ONNX (or TorchScript) model (interface 7, docs/interfaces.md; docs/clinic.md).

    fl-predict --model model.onnx PATH... [--out DIR] [--json]       score files and folders
    fl-predict serve --model model.onnx --port P --calling-aet AET [--host ADDR] [--forward HOST:PORT:AET] [--out DIR]
    fl-predict drift --model model.onnx --out DIR [--reference TRUSTED_DIR]
    fl-predict quantize --model model.onnx --out model.int8.onnx [--method dynamic|static]

Scoring prints one line per image on stdout (``--json``: one JSON object per line); a file that
cannot be read is one line on stderr and is skipped. Exit status: 0 when at least one image was
scored, 1 when none could be, 2 for a usage or model error; ``drift`` exits 3 on an alarm.
Patient identifiers never reach stdout or the log: only paths and SOP Instance UIDs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.cli import fedxray_version

if TYPE_CHECKING:
    from clinic.model import Scorer

# torch, onnxruntime, pydicom and highdicom load only on the code paths that use them (clinic.* and
# common.onnx_* import them): `fl-predict --help` and a usage error answer in well under a second.

logger = logging.getLogger(__name__)

SUBCOMMANDS = ("serve", "drift", "quantize")
EXIT_NOTHING_SCORED = 1
EXIT_USAGE = 2
EXIT_DRIFT_ALARM = 3


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fl-predict`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in SUBCOMMANDS:
        command, rest = args_list[0], args_list[1:]
    else:
        command, rest = "predict", args_list
    parser = _parsers()[command]
    args = parser.parse_args(rest)
    _setup_logging(args.verbose)
    if not Path(args.model).is_file():  # before the heavy imports: a wrong path answers at once
        _err(f"cannot use the model: {args.model} not found; give the model.onnx (or model.pt) of a fedxray run")
        return EXIT_USAGE
    from common.onnx_export import OnnxModelError

    try:
        if command == "serve":
            from clinic.serve_cli import serve_main  # deferred: pynetdicom is only needed by the listener

            return serve_main(args)
        return {"predict": predict_main, "drift": drift_main, "quantize": quantize_main}[command](args)
    except OnnxModelError as err:
        _err(f"cannot use the model: {err}")
        return EXIT_USAGE


# --------------------------------------------------------------------------- predict


def predict_main(args: argparse.Namespace) -> int:
    """Score every image under ``args.paths``; returns the exit status."""
    from clinic.drift import Observation, Window
    from clinic.model import Scorer
    from clinic.outputs import build_outputs, write_outputs
    from clinic.predict import Skipped, iter_inputs, read_source, record, summary_line
    from clinic.uids import OutputNames

    out = Path(args.out) if args.out else None
    state = Path(args.state) if args.state else out
    scorer = Scorer(args.model, heatmaps=bool(out) and not args.no_heatmap, threads=args.threads, device=args.device,
                    gate=not args.no_gate)
    logger.info("scoring on %s", scorer.device)
    window = Window(state, scorer.identity.sha256) if state is not None else None
    observations: list[Observation] = []
    scored_count = skipped = 0
    names = OutputNames()
    for item in iter_inputs(args.paths):
        if isinstance(item, Skipped):
            _err(f"skipped {item.path}: {item.reason}")
            skipped += 1
            continue
        try:
            source = read_source(item)
        except ValueError as err:  # DicomError / ImageError name the file and the reason
            _err(f"skipped {_one_line(str(err))}")
            skipped += 1
            continue
        written: dict[str, Any] = {"sr": None, "heatmap_png": None, "heatmap_dcm": None, "heatmaps": {}}
        try:
            scored = scorer.score(source.pixels, header=source.header)
            if not scored.assessed:
                logger.info("not assessed %s: %s", source.sop_instance_uid or source.path.name, scored.reason)
            if out is not None:
                outputs = build_outputs(source, scored, scorer)
                for problem in outputs.problems:
                    _err(f"{source.path}: {_one_line(problem)}")
                key, first = names.claim(source.key, source.path)
                if first is not None:  # one SOP Instance UID (or one file's bytes) twice: keep both results
                    _err(f"{source.path}: same SOP Instance UID (or same file) as {first}, scored above; results kept as "
                         f"{key}.* instead of overwriting; two different images with one UID are a modality error")
                written = write_outputs(outputs, out, key=key)
        except OSError as err:  # e.g. --out full or not writable: every later image would fail the same way
            _err(f"cannot write results for {source.path} to {out}: {err.strerror}; free space or fix the permissions")
            return EXIT_NOTHING_SCORED if scored_count == 0 else 0
        except Exception as err:  # one image must not end a batch; the type names the failure, never header values
            logger.debug("scoring %s failed", source.path, exc_info=True)
            _err(f"skipped {source.path}: scoring failed ({type(err).__name__}); report it with this file to the fedxray maintainers")
            skipped += 1
            continue
        if scored.assessed:  # the drift window watches what the model answered for
            observations.append(Observation.of(scored.model_input, scored.probabilities))
        print(json.dumps(record(source, scored, scorer, written)) if args.json else summary_line(source, scored), flush=True)
        scored_count += 1
    if window is not None and observations:
        size = window.add(observations)
        logger.info("drift window %s: %d image(s)", window.path, size)
    logger.info("scored %d image(s), skipped %d", scored_count, skipped)
    if scored_count == 0:
        _err("nothing could be scored: give DICOM (or PNG/JPEG) files or folders that contain them")
        return EXIT_NOTHING_SCORED
    return 0


# --------------------------------------------------------------------------- drift


def drift_main(args: argparse.Namespace) -> int:
    """Compare the rolling window under ``--state``/``--out`` with the reference; report and plot."""
    from clinic.drift import REFERENCE_FILE, REPORT_FILE, Window, compare, find_reference, log_line, plot, report
    from clinic.model import Scorer
    from common.reference import ReferenceError

    state = Path(args.state or args.out)
    out = Path(args.out)
    scorer = Scorer(args.model, heatmaps=False, threads=args.threads, device=args.device)
    if args.reference:
        reference = _reference_from_folder(scorer, Path(args.reference), state)
        if reference is None:
            return EXIT_USAGE
    else:
        try:
            reference = find_reference(scorer.classifier.raw_meta, state, model_sha256=scorer.identity.sha256)
        except ReferenceError as err:
            _err(str(err))
            return EXIT_USAGE
        if reference is None:
            _err(f"{args.model} has no drift reference (metadata fedxray.reference) and {state} has no {REFERENCE_FILE}: "
                 f"pass --reference DIR with images the hospital trusts to build one")
            return EXIT_USAGE
    window = Window(state, scorer.identity.sha256).histograms()
    drifts = compare(window, reference)
    doc = report(drifts, reference, window)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    plot(drifts, reference, window, out / "drift.png")
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"reference: {reference.source} ({reference.n_images} images); window: {window.n_images} image(s)")
        for d in drifts:
            print(f"  {d.name:<22} PSI {d.psi:7.3f}  KS D {d.ks_d:.3f} p {d.p_value:<9.3g} {d.status}")
        print(f"{log_line(drifts)}; report {out / REPORT_FILE}, plot {out / 'drift.png'}")
    return EXIT_DRIFT_ALARM if doc["status"] == "alarm" else 0


def _reference_from_folder(scorer: Scorer, folder: Path, state: Path):  # -> Reference | None
    """Score the trusted images in ``folder``, save the reference to ``state``, return it parsed."""
    from clinic.drift import REFERENCE_FILE, Observation, reference_from_observations
    from clinic.predict import Skipped, iter_inputs, read_source
    from common.reference import parse_reference

    observations = []
    for item in iter_inputs([folder]):
        if isinstance(item, Skipped):
            _err(f"skipped {item.path}: {item.reason}")
            continue
        try:
            source = read_source(item)
        except ValueError as err:
            _err(f"skipped {_one_line(str(err))}")
            continue
        scored = scorer.score(source.pixels, header=source.header)
        if not scored.assessed:  # a trusted folder may still hold an image outside the intended use
            _err(f"left out of the reference {source.path}: not assessed ({scored.reason})")
            continue
        observations.append(Observation.of(scored.model_input, scored.probabilities))
    if not observations:
        _err(f"no readable image in {folder}: the reference needs images the hospital trusts")
        return None
    text = reference_from_observations(observations, scorer.input_size, model_sha256=scorer.identity.sha256)
    state.mkdir(parents=True, exist_ok=True)
    (state / REFERENCE_FILE).write_text(text + "\n")
    print(f"reference built from {len(observations)} image(s) in {folder}: {state / REFERENCE_FILE}")
    return parse_reference(text, source=str(folder))


# --------------------------------------------------------------------------- quantize


def quantize_main(args: argparse.Namespace) -> int:
    """Write an int8 copy of the model (clinic.quantize)."""
    from clinic.model import Scorer
    from clinic.predict import Skipped, iter_inputs
    from clinic.quantize import QuantizeError, quantize_model  # deferred: onnxruntime.quantization is slow to import
    from common.preprocess import load_pixels, to_model_input

    calibration = []
    if args.calibration:
        scorer = Scorer(args.model, heatmaps=False)
        for item in iter_inputs([args.calibration]):
            if isinstance(item, Skipped):
                continue
            try:
                calibration.append(to_model_input(load_pixels(item), scorer.input_size))
            except ValueError as err:
                _err(f"skipped {_one_line(str(err))}")
            if len(calibration) >= args.max_calibration:
                break
    try:
        path = quantize_model(args.model, args.out, method=args.method, calibration=calibration)
    except QuantizeError as err:
        _err(str(err))
        return EXIT_USAGE
    print(f"wrote {path} ({args.method} int8; {os.path.getsize(path) / 1e6:.1f} MB); fl-predict takes it like the fp32 model")
    return 0


# --------------------------------------------------------------------------- parsers and helpers


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from clinic.serve_limits import Limits  # light: the listener's defaults, for its --help
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="fedxray model: model.onnx (fp32 or int8) or its TorchScript twin model.pt")
    common.add_argument("--threads", type=int, default=None, help="onnxruntime (or torch, for model.pt) threads (default: all cores)")
    common.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: a GPU when onnxruntime-gpu sees one, else the CPU; cuda without one falls back to "
                             "the CPU with a warning (default: auto)")
    common.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) on stderr")
    common.add_argument("--version", action="version", version=f"fl-predict (fedxray) {fedxray_version()}")

    predict = argparse.ArgumentParser(prog="fl-predict", parents=[common], description=__doc__.split("\n\n")[0],
                                      epilog="Subcommands: fl-predict serve|drift|quantize --help")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="DICOM or PNG/JPEG files, or folders (searched recursively)")
    predict.add_argument("--out", help="write <SOPInstanceUID>.sr.dcm and heatmap files here; also keeps the drift window")
    predict.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    predict.add_argument("--no-heatmap", action="store_true", help="skip the heatmap (PNG and Secondary Capture)")
    predict.add_argument("--state", help="folder of the drift window (default: --out)")
    predict.add_argument("--no-gate", action="store_true",
                         help="research only: score every image, also outside the intended use (the SR says so)")

    serve = argparse.ArgumentParser(prog="fl-predict serve", parents=[common], description="DICOM C-ECHO / C-STORE listener",
                                    epilog="Limits, TLS and the PACS checklist: docs/clinic.md")
    serve.add_argument("--port", type=int, required=True, help="TCP port to listen on (104 or 11112 are usual)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this host only); the hospital-facing address, or 0.0.0.0 in a container")
    serve.add_argument("--ae-title", default="FEDXRAY", help="this node's AE title (default FEDXRAY)")
    serve.add_argument("--forward", help="HOST:PORT:AET of the PACS or viewer that receives the SR and heatmap")
    serve.add_argument("--out", help="also write results here (default: a temporary folder, removed at exit)")
    serve.add_argument("--state", help="folder of the drift window (default: --out)")
    serve.add_argument("--no-heatmap", action="store_true", help="send the SR only")
    callers = serve.add_mutually_exclusive_group(required=True)
    callers.add_argument("--calling-aet", action="append", default=[], metavar="AET",
                         help="accept associations only from this calling AE title, e.g. the PACS's (repeat for several)")
    callers.add_argument("--any-calling-aet", action="store_true",
                         help="accept any calling AE title (a test bench, or mutual TLS --tls-ca as the only gate)")
    limits = Limits()
    serve.add_argument("--max-pixels", type=int, default=limits.max_pixels, metavar="N",
                       help=f"refuse an image of more than N pixel values (Rows x Columns x frames x samples) before decoding "
                            f"it (default {limits.max_pixels})")
    serve.add_argument("--max-associations", type=int, default=limits.max_associations, metavar="N",
                       help=f"associations open at once, all peers (default {limits.max_associations})")
    serve.add_argument("--max-associations-per-peer", type=int, default=limits.max_per_peer, metavar="N",
                       help=f"associations open at once from one IP address (default {limits.max_per_peer})")
    serve.add_argument("--idle-timeout", type=float, default=limits.idle_timeout, metavar="S",
                       help=f"close an association silent for S seconds (default {limits.idle_timeout:.0f})")
    serve.add_argument("--tls-cert", help="serve DICOM over TLS with this certificate (PEM)")
    serve.add_argument("--tls-key", help="private key of --tls-cert (PEM)")
    serve.add_argument("--tls-ca", help="require client certificates signed by this CA (mutual TLS)")
    serve.add_argument("--forward-tls-ca", help="forward over TLS, verifying the destination against this CA")
    serve.add_argument("--forward-tls-cert", help="client certificate for --forward over TLS (PEM)")
    serve.add_argument("--forward-tls-key", help="private key of --forward-tls-cert (PEM)")
    serve.add_argument("--drift-every", type=int, default=50, help="log the drift line every N images (default 50)")
    serve.add_argument("--no-gate", action="store_true",
                       help="research only: score every image, also outside the intended use (the SR says so)")

    drift = argparse.ArgumentParser(prog="fl-predict drift", parents=[common], description="input drift report")
    drift.add_argument("--out", required=True, help="where the report and plot go (and the window, unless --state)")
    drift.add_argument("--state", help="folder of the drift window (default: --out)")
    drift.add_argument("--reference", help="build the reference from this folder of trusted images (saved for later runs)")
    drift.add_argument("--json", action="store_true", help="print the report as one JSON object")

    quantize = argparse.ArgumentParser(prog="fl-predict quantize", parents=[common], description="int8 copy of a model")
    quantize.add_argument("--out", required=True, help="path of the int8 model, e.g. model.int8.onnx")
    quantize.add_argument("--method", choices=("dynamic", "static"), default="dynamic",
                          help="dynamic (no calibration; MatMul/Gemm) or static (Conv too; needs --calibration)")
    quantize.add_argument("--calibration", help="folder of trusted images for static quantisation")
    quantize.add_argument("--max-calibration", type=int, default=64, help="calibration images used at most (default 64)")
    return {"predict": predict, "serve": serve, "drift": drift, "quantize": quantize}


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _err(message: str) -> None:
    print(f"fl-predict: {message}", file=sys.stderr, flush=True)


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
