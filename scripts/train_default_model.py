"""Train the bundled default model on BBBC039 and write it to src/napari_bulbseg/bundled/default.

Usage (from the repository root)::

    python scripts/train_default_model.py                  # data in ../shared/data
    python scripts/train_default_model.py --data /path/to/data --time-budget 1800 --replace

Trains on ``bbbc039/train``, validates on ``bbbc039/val`` (the dataset's own split, never
re-split), chooses the threshold on the validation set, round-trips the weights through float16
(the stored precision) and re-measures validation Dice with them, measures the out-of-domain
Dice on ``dsb2018-stained`` (RGB converted to luminance), records everything in the model card
and prints it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from napari_bulbseg.data import samples_from_folders
from napari_bulbseg.events import TrainProgress
from napari_bulbseg.model import LoadedModel, bundled_model_dir, load_model, save_model
from napari_bulbseg.training import TrainConfig, evaluate_model, iter_train

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=bundled_model_dir())
    ap.add_argument("--replace", action="store_true", help="replace an existing model at --out")
    ap.add_argument("--time-budget", type=float, default=1800.0, help="seconds of training")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--steps-per-epoch", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--loss", default="bce+dice")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    bbbc = args.data / "bbbc039"
    if not (bbbc / "train" / "images").is_dir():
        print(f"BBBC039 not found under {args.data}; pass --data", file=sys.stderr)
        return 2
    if args.out.exists() and not args.replace:
        print(f"{args.out} exists; pass --replace to replace it", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    train_s = samples_from_folders(bbbc / "train" / "images", bbbc / "train" / "masks")
    val_s = samples_from_folders(bbbc / "val" / "images", bbbc / "val" / "masks")
    print(f"{len(train_s)} training and {len(val_s)} validation images", flush=True)

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
        early_stopping_patience=4,
        plateau_patience=1,
        plateau_factor=0.5,
        foreground_fraction=0.5,
        num_threads=args.threads,
        weights_dtype="float16",
        base_channels=16,
        depth=4,
    )
    gen = iter_train(
        config,
        train_s,
        val_samples=val_s,
        name="bulbseg-default",
        description="Default nuclei model: U-Net trained on BBBC039 (U2OS nuclei, Hoechst).",
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
    # the stored precision is float16: measure with exactly the weights that will ship
    model.half().float().eval()
    loaded = LoadedModel(model=model, card=card)
    val16 = evaluate_model(loaded, val_s)
    dsb_dir = args.data / "dsb2018-stained"
    card.metrics["val_float16"] = val16
    if (dsb_dir / "images").is_dir():
        dsb = samples_from_folders(dsb_dir / "images", dsb_dir / "masks")
        ood = evaluate_model(loaded, dsb, policy="luminance")
        ood["channels"] = "RGB(A) → luminance (0.299 R + 0.587 G + 0.114 B), alpha dropped"
        card.metrics["out_of_domain"] = {"dsb2018-stained": ood}
    card.training["data"] = {
        "train": "BBBC039 train (100 images)",
        "val": "BBBC039 val (50 images)",
        "licence": "CC0 1.0; Caicedo et al., Cytometry A 2019; Broad Bioimage Benchmark Collection",
    }
    card.training["command"] = "python scripts/train_default_model.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("/")
    )

    tmp = args.out.with_name(args.out.name + ".new")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(tmp, model, card, dtype="float16")
    load_model(tmp)  # verify before it replaces anything
    if args.out.exists():
        old = args.out.with_name(args.out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        args.out.rename(old)
        tmp.rename(args.out)
        shutil.rmtree(old)
    else:
        tmp.rename(args.out)
    print(json.dumps({"stop_reason": result.stop_reason, **card.metrics}, indent=2))
    print("threshold curve:", json.dumps(card.threshold_curve))
    print(f"written to {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
