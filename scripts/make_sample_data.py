"""Build the small sample stack shipped in the package from BBBC039 validation images.

Usage: python scripts/make_sample_data.py [--data ../shared/data]

BBBC039 (U2OS nuclei, Hoechst) is CC0: Caicedo et al., Cytometry A 2019, Broad Bioimage
Benchmark Collection. The images come from the validation split, never from the training split,
so the demo's metrics are measured on images the bundled model was not trained on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tifffile
from skimage.io import imread

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "napari_bulbseg" / "sample"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--n", type=int, default=3)
    args = ap.parse_args()
    val = args.data / "bbbc039" / "val"
    stems = sorted(p.stem for p in (val / "images").glob("*.tif"))
    # a fixed, spread-out choice of validation images (deterministic: sorted names)
    idx = np.linspace(0, len(stems) - 1, args.n).round().astype(int)
    chosen = [stems[i] for i in idx]
    imgs = np.stack([tifffile.imread(val / "images" / f"{s}.tif") for s in chosen])
    masks = np.stack(
        [(imread(val / "masks" / f"{s}.png") > 0).astype(np.uint8) * 255 for s in chosen]
    )
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"axes": "ZYX", "Info": "BBBC039 validation images (CC0): " + ", ".join(chosen)}
    tifffile.imwrite(
        OUT / "bbbc039_sample.tif", imgs, imagej=True, metadata=meta, compression="zlib"
    )
    tifffile.imwrite(
        OUT / "bbbc039_sample_mask.tif",
        masks,
        imagej=True,
        metadata={"axes": "ZYX"},
        compression="zlib",
    )
    (OUT / "SOURCES.txt").write_text(
        "bbbc039_sample.tif / bbbc039_sample_mask.tif: images and foreground masks from the\n"
        "BBBC039v1 validation split (U2OS nuclei, Hoechst; Caicedo et al., Cytometry A 2019;\n"
        "Broad Bioimage Benchmark Collection; CC0 1.0):\n" + "\n".join(chosen) + "\n",
        encoding="utf-8",
    )
    print(imgs.shape, imgs.dtype, masks.shape, [int(m.sum() // 255) for m in masks])


if __name__ == "__main__":
    main()
