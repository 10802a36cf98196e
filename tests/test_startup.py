"""The command-line tools start quickly: their modules, --help and a bad input load no heavy library.

torch, flwr, opacus and onnxruntime take seconds to import on the project's CPUs; they load only on
the code paths that need them (benchmarks/startup.py measures the wall time).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "flwr", "opacus", "onnxruntime")

# Runs in a fresh interpreter: import every CLI module, answer --help and bad inputs, list what loaded.
_PROBE = """
import contextlib, io, json, sys
import client.cli, clinic.cli, server.cli, simulations.cli
codes = {}
for name, main, argv in [
    ("fl-client --help", client.cli.main, ["--help"]),
    ("fl-predict --help", clinic.cli.main, ["--help"]),
    ("fl-client status bad dir", client.cli.main, ["status", "--state-dir", "/nonexistent-fedxray"]),
    ("fl-predict missing model", clinic.cli.main, ["--model", "/nonexistent-fedxray.onnx", "x.dcm"]),
    ("fl-sim run bad data", simulations.cli.main, ["run", "--data", "/nonexistent-fedxray"]),
]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            codes[name] = main(argv)
        except SystemExit as exc:
            codes[name] = exc.code
print(json.dumps({"codes": codes, "loaded": [m for m in %r if m in sys.modules]}))
"""


def test_cli_modules_and_bad_input_load_no_heavy_library():
    out = subprocess.run([sys.executable, "-c", _PROBE % (HEAVY,)], capture_output=True, text=True, cwd=ROOT,
                         timeout=60, check=True)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["loaded"] == [], f"the CLI start-up path imports {doc['loaded']}: defer them to the commands that need them"
    assert doc["codes"] == {"fl-client --help": 0, "fl-predict --help": 0, "fl-client status bad dir": 2,
                            "fl-predict missing model": 2, "fl-sim run bad data": 2}


def test_the_clientapp_and_the_default_model_do_not_load_torchvision():
    """A deployed site starts a Python process per Flower message: torchvision (0.5-0.7 s) loads only
    for the CNNs, never for the default ScatterNet's round."""
    probe = ("import sys, client.app\n"
             "from common.models import build_model\n"
             "build_model('scatternet', num_outputs=1, image_size=32)\n"
             "print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
