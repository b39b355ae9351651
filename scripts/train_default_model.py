"""Train the bundled default model: a general nuclei model on three sources.

Usage (from the repository root)::

    python scripts/train_default_model.py --out new-model          # data in ../shared/data
    python scripts/train_default_model.py --data /path/to/data --time-budget 4500 --replace

Sources (see the data README): ``bbbc039/train`` (validated on ``bbbc039/val``, the dataset's
own split, never re-split), ``dsb2018-fluo`` and ``dsb2018-stained`` (each split by file name:
an image validates when ``sha256("<seed>:<name>")`` read as a fraction is below 0.2 — fixed by
the seed, independent of file order). Stained images (RGBA) become their luminance, exactly as
prediction feeds an RGB image to a 1-channel model; the card's normalisation detects their bright
background (``polarity="auto"``) and inverts it, in training and prediction alike.

Every image is rescaled so that its median nucleus (from the mask) is ``--diameter`` px across
(the card records it), with random zoom ``--scale-range`` on top. Patches are drawn per source
with the weights ``--weights`` (bbbc039, fluo, stained). The threshold is chosen on the pooled
validation set; the weights are stored as float16 and every figure is re-measured with them,
per source, and written into the card.

The model is saved as soon as training ends (``<out>.partial``) so that a failure in the final
evaluation loses nothing; the evaluated model then goes to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from napari_bulbseg import io as bio
from napari_bulbseg.data import Sample, make_sample
from napari_bulbseg.events import TrainProgress
from napari_bulbseg.model import bundled_model_dir, load_model, save_model
from napari_bulbseg.normalize import convert_channels
from napari_bulbseg.training import TrainConfig, evaluate_model, iter_train

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("bbbc039", "dsb2018-fluo", "dsb2018-stained")


def val_side(name: str, seed: int, fraction: float = 0.2) -> bool:
    """The fixed per-file split of the DSB sources: True when ``name`` validates."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def load_pairs(images: Path, masks: Path, luminance: bool = False) -> list[Sample]:
    out = []
    for ip, mp in bio.list_pairs(images, masks):
        img = bio.read_image(ip)
        if luminance and img.ndim == 3:
            img = convert_channels(img, 1)[0]  # the conversion prediction applies to RGB(A)
        out.append(make_sample(img, bio.read_mask(mp), source=Path(ip).name))
    return out


def load_sources(data: Path, seed: int) -> dict[str, tuple[list[Sample], list[Sample]]]:
    """``{source: (train, val)}`` for the three sources, with their fixed splits."""
    bb = data / "bbbc039"
    out = {
        "bbbc039": (
            load_pairs(bb / "train" / "images", bb / "train" / "masks"),
            load_pairs(bb / "val" / "images", bb / "val" / "masks"),
        )
    }
    for src, lum in (("dsb2018-fluo", False), ("dsb2018-stained", True)):
        allp = load_pairs(data / src / "images", data / src / "masks", luminance=lum)
        tr = [s for s in allp if not val_side(s.source, seed)]
        va = [s for s in allp if val_side(s.source, seed)]
        out[src] = (tr, va)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=bundled_model_dir())
    ap.add_argument("--replace", action="store_true", help="replace an existing model at --out")
    ap.add_argument("--time-budget", type=float, default=4500.0, help="seconds of training")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--steps-per-epoch", type=int, default=500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--base-channels", type=int, default=24, help="U-Net width (first level)")
    ap.add_argument("--loss", default="bce+dice")
    ap.add_argument("--diameter", type=float, default=30.0, help="trained object diameter (px)")
    ap.add_argument("--scale-range", type=float, nargs=2, default=(0.7, 1.4))
    ap.add_argument("--noise-floor", type=float, default=20.0)
    ap.add_argument(
        "--weights", type=float, nargs=3, default=(0.35, 0.45, 0.2),
        help="share of patches from bbbc039, dsb2018-fluo, dsb2018-stained",
    )  # fmt: skip
    ap.add_argument(
        "--leave-out", choices=SOURCES, default=None,
        help="train without this source (leave-one-source-out); it is still scored",
    )  # fmt: skip
    ap.add_argument("--limit", type=int, default=0, help="at most this many images per split")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if not (args.data / "bbbc039" / "train" / "images").is_dir():
        print(f"BBBC039 not found under {args.data}; pass --data", file=sys.stderr)
        return 2
    if args.out.exists() and not args.replace:
        print(f"{args.out} exists; pass --replace to replace it", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    sources = load_sources(args.data, args.seed)
    if args.limit:
        sources = {k: (t[: args.limit], v[: args.limit]) for k, (t, v) in sources.items()}
    for k, (t, v) in sources.items():
        print(f"{k}: {len(t)} training, {len(v)} validation images", flush=True)
    used = [k for k in SOURCES if k != args.leave_out]
    train_s = [s for k in used for s in sources[k][0]]
    val_s = [s for k in used for s in sources[k][1]]
    share = dict(zip(SOURCES, args.weights, strict=True))
    weights = {s.key: share[k] / len(sources[k][0]) for k in used for s in sources[k][0]}

    config = TrainConfig(
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        time_budget_s=args.time_budget,
        batch_size=args.batch,
        patch_size=args.patch,
        lr=args.lr,
        optimizer="adamw",
        weight_decay=1e-4,
        loss=args.loss,
        seed=args.seed,
        early_stopping_patience=6,
        plateau_patience=2,
        plateau_factor=0.5,
        foreground_fraction=0.5,
        num_threads=args.threads,
        weights_dtype="float16",
        base_channels=args.base_channels,
        depth=4,
        normalization={
            "method": "percentile",
            "low": 1.0,
            "high": 99.8,
            "polarity": "auto",
            "noise_floor": args.noise_floor,
        },
        diameter=args.diameter,
        scale_range=tuple(args.scale_range),
    )
    gen = iter_train(
        config,
        train_s,
        val_samples=val_s,
        name="bulbseg-default",
        description=(
            "Default nuclei model: U-Net trained on BBBC039 (U2OS, Hoechst), DSB2018 "
            "fluorescence nuclei and DSB2018 stained tissue (luminance, inverted), at a "
            f"median nucleus diameter of {args.diameter:g} px."
        ),
        sample_weights=weights,
    )
    t0 = time.perf_counter()
    while True:
        try:
            ev: TrainProgress = next(gen)
        except StopIteration as stop:
            result = stop.value
            break
        if ev.kind == "epoch" or (ev.kind == "step" and ev.step % 10 == 0):
            extra = f" val_loss {ev.val_loss:.4f} val_dice {ev.val_dice:.4f}" if ev.val_dice else ""
            print(
                f"[{time.perf_counter() - t0:7.0f}s] epoch {ev.epoch} step {ev.step}/"
                f"{ev.total_steps} loss {ev.loss:.4f} lr {ev.lr:.2e} eta {ev.eta_s:.0f}s{extra}",
                flush=True,
            )

    card, model = result.card, result.model
    card.training["data"] = {
        "sources": {
            k: {"train": len(sources[k][0]), "val": len(sources[k][1]), "used": k in used}
            for k in SOURCES
        },
        "split": (
            "bbbc039: the dataset's own train/val; dsb2018-*: a file validates when "
            f'sha256("{args.seed}:<file name>") as a fraction is < 0.2'
        ),
        "val_files": {k: [s.source for s in sources[k][1]] for k in SOURCES[1:]},
        "patch_share": share,
        "stained_channels": "RGB(A) → luminance (0.299 R + 0.587 G + 0.114 B), alpha dropped",
        "licence": "CC0 1.0: BBBC039 (Caicedo et al., Cytometry A 2019), BBBC038 / DSB2018",
    }
    # the command without this machine's paths: path-valued options are dropped with their value
    words, skip = [], False
    for a in argv if argv is not None else sys.argv[1:]:
        if skip or a.startswith(("/", "--out=", "--data=")):
            skip = False
            continue
        if a in ("--out", "--data"):
            skip = True
            continue
        words.append(a)
    card.training["command"] = " ".join(["python scripts/train_default_model.py", *words])
    # save at once: a failure below must not lose the training run
    partial = args.out.with_name(args.out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    save_model(partial, model, card, dtype="float16")
    print(f"saved the trained model to {partial}", flush=True)

    # the stored precision is float16: measure with exactly the weights that will ship
    loaded = load_model(partial)
    per_source = {}
    for k in SOURCES:
        vs = sources[k][1]
        te = time.perf_counter()
        m_scale = evaluate_model(loaded, vs)
        m_oracle = evaluate_model(loaded, vs, diameter="mask")
        per_source[k] = {
            "at_image_scale": m_scale,
            "rescaled_to_true_diameter": m_oracle,
            "left_out": k == args.leave_out,
        }
        print(
            f"{k} val ({len(vs)} images): Dice {m_scale['dice']:.4f} at the image's scale, "
            f"{m_oracle['dice']:.4f} rescaled by the true diameter "
            f"({time.perf_counter() - te:.0f}s)",
            flush=True,
        )
    card.metrics["val_per_source_float16"] = per_source

    tmp = args.out.with_name(args.out.name + ".new")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(tmp, loaded.model, card, dtype="float16")
    load_model(tmp)  # verify before it replaces anything
    if args.out.exists():
        old = args.out.with_name(args.out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        args.out.rename(old)
        tmp.rename(args.out)
        shutil.rmtree(old)
    else:
        tmp.rename(args.out)
    shutil.rmtree(partial, ignore_errors=True)
    print(json.dumps({"stop_reason": result.stop_reason, **card.metrics}, indent=2))
    print("threshold curve:", json.dumps(card.threshold_curve))
    print(f"written to {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
