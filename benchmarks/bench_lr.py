"""Learning rate and warm-up when refining a model that already does well: held-out Dice by step.

Fine-tunes the bundled default model on 10 ``dsb2018-stained`` images (the same seeded choice as
``bench_finetune.py``) for a fixed number of optimiser steps — steps, not seconds, so a busy
machine gives the same curve — and scores 40 other images of the source (every second held-out
image) at 0.5 after 0, 10, 25, 50, 100 and 150 steps. Each configuration is ``LR:WARMUP``;
everything else is ``TrainConfig``'s default, starting from the base's weights.

    python benchmarks/bench_lr.py                          # 1e-3:0 1e-3:20 3e-4:20
    python benchmarks/bench_lr.py --configs 1e-4:20 --steps 0 50 100
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--configs", nargs="+", default=["1e-3:0", "1e-3:20", "3e-4:20"])
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 10, 25, 50, 100, 150])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from napari_bulbseg.data import prepare_sample, samples_from_folders
    from napari_bulbseg.inference import predict_whole
    from napari_bulbseg.metrics import pooled_pixel_metrics
    from napari_bulbseg.model import bundled_model_dir, load_model
    from napari_bulbseg.training import TrainConfig, TrainRun

    folder = args.data / "dsb2018-stained"
    if not (folder / "images").is_dir():
        print(f"dsb2018-stained not found under {args.data}; pass --data", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    samples = samples_from_folders(folder / "images", folder / "masks")
    order = sorted(range(len(samples)), key=lambda i: samples[i].source)
    samples = [samples[i] for i in order]
    pick = set(np.random.default_rng(args.seed).choice(len(samples), 10, replace=False).tolist())
    train_s = [s for i, s in enumerate(samples) if i in pick]
    held = [s for i, s in enumerate(samples) if i not in pick][::2][:40]
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"10 fine-tuning images, {len(held)} scored")  # fmt: skip
    results = {}
    for spec in args.configs:
        lr, warm = spec.split(":")
        cfg = TrainConfig(
            lr=float(lr), warmup_steps=int(warm), refine_lr_factor=1.0, seed=args.seed,
            num_threads=args.threads, start="base",
        )  # fmt: skip
        run = TrainRun(cfg, train_s, base=load_model(bundled_model_dir()))
        run.setup()
        images = [prepare_sample(s, run.in_c, run.norm, run.prep).image for s in held]
        curve = []
        for k in range(max(args.steps) + 1):
            if k in args.steps:
                model = copy.deepcopy(run.model).eval()
                with torch.no_grad():
                    probs = [predict_whole(model, im, "cpu")[1] for im in images]
                d = pooled_pixel_metrics(probs, [s.mask for s in held], 0.5)["dice"]
                curve.append([k, round(d, 4)])
                print(f"  lr {lr} warm-up {warm}: step {k:4d}  held-out Dice {d:.4f}", flush=True)
            if k < max(args.steps):
                run.step()
        results[spec] = curve
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
