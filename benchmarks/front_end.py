"""What the ScatterNet's fixed front end costs a site per image, as JSON: equalisation, scattering, views.

    nice -n 10 .venv/bin/python benchmarks/front_end.py [--sizes 64,128] [--images 64] [--repeats 5] [--threads 1]

Per image size (J = 2 at 64 px, 3 at 128 px): milliseconds per image, median over ``--repeats``
batches of ``--images`` random images, on ``--threads`` torch threads, for

* ``equalise``: the histogram equalisation (common/equalise.py) as the site computes it (eagerly);
* ``scattering``: the scattering transform eagerly (torch.fft, what the site caches) and with the
  matrix DFTs the exported graph uses (``scattering_matrix_dft``, the cost before issue 22);
* ``front_end``: both, as ``SiteData.features`` computes them;
* ``views``: rendering three acquisition views of an image (common/views.py) and their front end,
  i.e. what ``views = 4`` adds per training image, once.

Wall and CPU time are both reported; on a shared machine the CPU time is the steadier figure.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _util import machine_info, print_json, progress, set_threads, time_call  # noqa: E402

from common.equalise import HistogramEqualisation  # noqa: E402
from common.models import build_model, split_features  # noqa: E402
from common.views import render_views  # noqa: E402


def _per_image(fn, n: int, repeats: int) -> dict[str, float]:
    fn()  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time_call(fn)
        walls.append(wall * 1000 / n)
        cpus.append(cpu * 1000 / n)
    return {"wall_ms": statistics.median(walls), "cpu_ms": statistics.median(cpus)}


def measure(size: int, n: int, repeats: int) -> dict[str, object]:
    j = 2 if size <= 64 else 3
    frontend, _, _ = split_features(build_model("scatternet", num_outputs=1, image_size=size, scatter_j=j))
    scattering = frontend.scattering
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size)).astype(np.uint8)
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    eq = HistogramEqualisation()
    out: dict[str, object] = {"image_size": size, "J": j}
    with torch.no_grad():
        out["equalise"] = _per_image(lambda: eq(x), n, repeats)
        out["scattering"] = _per_image(lambda: scattering(x), n, repeats)
        # The exported graph's path: matrix DFTs (torch.jit.is_tracing() is what selects it).
        real = torch.jit.is_tracing
        torch.jit.is_tracing = lambda: True  # type: ignore[assignment]
        try:
            out["scattering_matrix_dft"] = _per_image(lambda: scattering(x), n, repeats)
        finally:
            torch.jit.is_tracing = real  # type: ignore[assignment]
        out["front_end"] = _per_image(lambda: frontend(x), n, repeats)
        out["views"] = _per_image(
            lambda: frontend(torch.from_numpy(render_views(images, keys, 4).reshape(-1, 1, size, size))), n, repeats)
    progress(f"{size} px: {out}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="64,128")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    set_threads(args.threads)
    results = [measure(int(s), args.images, args.repeats) for s in args.sizes.split(",")]
    print_json({"benchmark": "front_end", "threads": args.threads, "images": args.images, "repeats": args.repeats,
                "results": results, "machine": machine_info()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
