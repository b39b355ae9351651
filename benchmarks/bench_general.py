"""How general is a model? Pooled Dice per source vs plain Otsu, and under rescaling.

Usage (from the repository root; data in ../shared/data)::

    python benchmarks/bench_general.py                       # the bundled model
    python benchmarks/bench_general.py --model path/to/model --baseline bundled
    python benchmarks/bench_general.py --rescale-images 20   # fewer images for the 0.5×/2× rows
    python benchmarks/bench_general.py --sources dsb2018-stained --limit 20   # one source

For each source's validation split (bbbc039/val; the fixed per-file splits of dsb2018-fluo and
dsb2018-stained made by ``scripts/train_default_model.py``) it runs the real prediction path
(``inference.predict``: card normalisation, tiling, the card's threshold) at the image's own
scale (``diameter="none"``) and with ``diameter="auto"`` (for one image the same as the bundled
model's default, ``auto-slice``), and prints the pooled pixel Dice, the ratio to plain Otsu on
the same images (luminance; objects = the brighter class for fluorescence, the
darker class for stained tissue — Otsu's best case), and the same for a baseline model. Then the
images (and masks) are rescaled 0.5× and 2× and predicted with and without ``auto``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from skimage.filters import threshold_otsu

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from train_default_model import SOURCES, load_sources  # noqa: E402

from napari_bulbseg.inference import PredictOptions, predict  # noqa: E402
from napari_bulbseg.model import load_model  # noqa: E402
from napari_bulbseg.postprocess import threshold_prob  # noqa: E402
from napari_bulbseg.registry import Registry  # noqa: E402
from napari_bulbseg.scale import resize_image, resize_mask, resized_shape  # noqa: E402


def pooled(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    tp = fp = fn = 0
    for pred, truth in pairs:
        t = truth.astype(bool)
        tp += int(np.count_nonzero(pred & t))
        fp += int(np.count_nonzero(pred & ~t))
        fn += int(np.count_nonzero(~pred & t))
    return 2 * tp / max(2 * tp + fp + fn, 1)


def otsu(image: np.ndarray, dark_objects: bool) -> np.ndarray:
    g = image.astype(np.float32)
    if g.ndim == 3:
        g = g[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    t = threshold_otsu(g)
    return g <= t if dark_objects else g > t


def model_masks(loaded, samples, diameter, options) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for s in samples:
        prob = predict(loaded, s.image[None], options, diameter=diameter)[0]
        if prob.shape != s.mask.shape:
            raise RuntimeError(f"output shape {prob.shape} != input {s.mask.shape}")
        out.append((threshold_prob(prob.astype(np.float32), loaded.card.threshold), s.mask))
    return out


def rescaled(samples, factor: float):
    from napari_bulbseg.data import make_sample

    out = []
    for s in samples:
        shape = resized_shape(s.mask.shape, factor)
        img = s.image.astype(np.float32)
        if img.ndim == 3:  # (Y, X, C): resize channels first
            img = np.moveaxis(resize_image(np.moveaxis(img, -1, 0), shape), 0, -1)
        else:
            img = resize_image(img, shape)
        out.append(make_sample(img, resize_mask(s.mask, shape), s.source))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--baseline", default=None, help="a second model to compare ('bundled')")
    ap.add_argument("--rescale-images", type=int, default=20, help="images per source, 0 = skip")
    ap.add_argument("--limit", type=int, default=0, help="validation images per source (0 = all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sources", default=",".join(SOURCES), help="comma-separated sources")
    ap.add_argument("--seed", type=int, default=0, help="the split seed of the training script")
    args = ap.parse_args(argv)
    picked = [p.strip() for p in args.sources.split(",") if p.strip()]
    if not picked or any(p not in SOURCES for p in picked):
        ap.error(f"--sources: choose among {', '.join(SOURCES)}")
    if not (args.data / "bbbc039").is_dir():
        print(f"no data under {args.data}; skipping", file=sys.stderr)
        return 0
    torch.set_num_threads(args.threads)

    def load(spec: str):
        return load_model(Registry().resolve(spec))

    loaded = load(args.model)
    base = load(args.baseline) if args.baseline else None
    options = PredictOptions(device="cpu", num_threads=args.threads)
    sources = load_sources(args.data, args.seed)
    if args.limit:
        sources = {k: (t, v[: args.limit]) for k, (t, v) in sources.items()}
    print(f"model: {loaded.name} (trained diameter {loaded.card.diameter} px)")
    print(
        "| source (val) | images | Otsu | model, own scale | ratio to Otsu | model, auto | "
        "ratio to Otsu |" + (" baseline | ratio |" if base else "")
    )
    print("|---|---|---|---|---|---|---|" + ("---|---|" if base else ""))
    for src in picked:
        val = sources[src][1]
        t0 = time.perf_counter()
        o = pooled([(otsu(s.image, src == "dsb2018-stained"), s.mask) for s in val])
        m = pooled(model_masks(loaded, val, "none", options))
        a = pooled(model_masks(loaded, val, "auto", options)) if loaded.card.diameter else m
        row = f"| {src} | {len(val)} | {o:.4f} | {m:.4f} | {m / o:.2f} | {a:.4f} | {a / o:.2f} |"
        if base is not None:
            b = pooled(model_masks(base, val, "none", options))
            row += f" {b:.4f} | {b / o:.2f} |"
        print(row + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)

    if args.rescale_images and loaded.card.diameter:
        print("\nRescaled images (first", args.rescale_images, "validation images per source)")
        print("| source | factor | Dice, no diameter | Dice, auto | Dice at 1×, auto |")
        print("|---|---|---|---|---|")
        for src in picked:
            val = sources[src][1][: args.rescale_images]
            ref = pooled(model_masks(loaded, val, "auto", options))
            for f in (0.5, 2.0):
                rs = rescaled(val, f)
                n = pooled(model_masks(loaded, rs, "none", options))
                t0 = time.perf_counter()
                a = pooled(model_masks(loaded, rs, "auto", options))
                dt = time.perf_counter() - t0
                print(
                    f"| {src} | {f:g}× | {n:.4f} | {a:.4f} | {ref:.4f} |  (auto {dt:.0f} s)",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
