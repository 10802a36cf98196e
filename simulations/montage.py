"""A PNG montage of synthetic radiographs, one row per acquisition profile (for the docs).

Each row shows, for one site profile: a normal and an opacity image as a correct reader displays
them (``common.dicom.read_radiograph``), and the opacity image's raw stored values scaled to
grey, which is what a reader that ignores the presentation chain would show (MONOCHROME1 sites
look inverted, VOI LUT sites washed out).

    python -m simulations.montage docs/img/simulated-hospitals.png
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw
from pydicom.uid import ImplicitVRLittleEndian

from simulations.acquisition import AcquisitionProfile, site_profiles, write_radiograph
from simulations.phantom import render_phantom, sample_anatomy, sample_opacity

log = logging.getLogger(__name__)

TILE = 160
LABEL_WIDTH = 260
HEADER = 22
COLUMNS = ("normal (read_radiograph)", "opacity (read_radiograph)", "opacity (raw stored values)")


def make_montage(out_png: str | Path, *, n_profiles: int = 6, seed: int = 0, tile: int = TILE) -> Path:
    """Write the montage to ``out_png`` (parent folders created); returns its path."""
    from common.dicom import read_radiograph
    from common.images import resize_image

    profiles = site_profiles(n_profiles, seed)
    canvas = Image.new("L", (LABEL_WIDTH + tile * len(COLUMNS), HEADER + tile * len(profiles)), 255)
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(COLUMNS):
        draw.text((LABEL_WIDTH + c * tile + 4, 5), title, fill=0)
    with tempfile.TemporaryDirectory() as tmp:
        for r, profile in enumerate(profiles):
            rng = np.random.default_rng(np.random.SeedSequence([seed, r, 0x4D]))
            tiles = []
            for k, opacity in enumerate((None, sample_opacity(rng))):
                image = render_phantom(sample_anatomy(rng), profile.matrix, rng, opacity=opacity)
                path = Path(tmp) / f"{r}-{k}.dcm"
                write_radiograph(
                    path, image, profile, patient_id=f"SIM-M-{r:04d}", patient_name="SYNTHETIC^MONTAGE",
                    study_uid=f"2.25.{10**6 + r * 10 + k}", view="PA", seed=seed * 100 + r * 10 + k,
                )  # fmt: skip
                tiles.append(resize_image(read_radiograph(path).pixels, tile))
            tiles.append(resize_image(_raw_stored(path), tile))
            y = HEADER + r * tile
            for c, pixels in enumerate(tiles):
                canvas.paste(Image.fromarray(np.rint(pixels * 255).astype(np.uint8)), (LABEL_WIDTH + c * tile, y))
            draw.multiline_text((6, y + 6), _describe(profile), fill=0, spacing=3)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)
    log.info("montage of %d profiles written to %s", len(profiles), out)
    return out


def _raw_stored(path: Path) -> np.ndarray:
    """Stored values min-max scaled, no LUTs and no inversion: what a naive reader shows."""
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:  # files without File Meta are implicit VR
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    arr = ds.pixel_array.astype(np.float32)
    return (arr - arr.min()) / max(float(arr.max() - arr.min()), 1.0)


def _describe(p: AcquisitionProfile) -> str:
    syntax = p.to_dict()["transfer_syntax_name"].replace(" Image Compression (Lossless Only)", " lossless")
    lines = [p.name, f"{p.modality} {p.photometric} {p.bits_stored} bit", f"{p.matrix[0]}x{p.matrix[1]}  {syntax}"]
    display = []
    if p.rescale:
        display.append(f"rescale {p.rescale[0]:g}/{p.rescale[1]:g}")
    if p.windows:
        display.append(f"{len(p.windows)} window(s)")
    if p.voi_lut_gamma:
        display.append("VOI LUT Sequence")
    if p.no_file_meta_fraction:
        display.append(f"{p.no_file_meta_fraction:.0%} no File Meta")
    lines.append(", ".join(display) or "no VOI: full range")
    lines.append(f"gain {p.gain:g} contrast {p.contrast:g} noise {p.noise:g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.montage", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="PNG file to write")
    parser.add_argument("--profiles", type=int, default=6, help="number of site profiles (rows)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(make_montage(args.out, n_profiles=args.profiles, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
