"""Throughput of ``bulbseg predict --cluster local:2`` against single-process predict.

Same files (BBBC039 validation images from ``../shared/data``), the bundled model, CPU. Both
clocks start after the model is loaded (single process) or the workers have imported torch
(cluster) and stop when the last file is written; the cluster's figure includes scheduling,
the worker's own model load, and moving each result into place.

    python benchmarks/bench_distributed.py [--files 16] [--workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from napari_bulbseg.cluster import iter_run, open_client
from napari_bulbseg.cohort import (
    ModelRef,
    new_staging_dir,
    options_key,
    plan,
    predict_file,
    remove_staging_dir,
)
from napari_bulbseg.events import drain
from napari_bulbseg.inference import PredictOptions
from napari_bulbseg.model import bundled_model_dir, load_model
from napari_bulbseg.outputs import OutputFolder
from napari_bulbseg.postprocess import PostProcess

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bbbc039" / "val" / "images"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    files = sorted(DATA.glob("*.tif"))[: args.files]
    if not files:
        raise SystemExit(f"no BBBC039 images in {DATA}")
    loaded = load_model(bundled_model_dir())
    spec = PostProcess.from_dict({**(loaded.card.postprocess or {}), "threshold": 0.45})
    options = PredictOptions(device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        single, dist = Path(tmp) / "single", Path(tmp) / "cluster"
        single.mkdir()
        predict_file(files[0], Path(tmp), loaded, options, spec)  # warm-up
        t0 = time.perf_counter()
        for f in files:
            predict_file(f, single, loaded, options, spec)
        t_single = time.perf_counter() - t0

        folder = OutputFolder(dist)
        model = ModelRef.of(loaded)
        todo, _ = plan(files, folder, model.sha256, options_key(options, spec, None, True))
        staging = new_staging_dir(dist)
        with open_client(f"local:{args.workers}") as (client, threads, startup):
            from napari_bulbseg.cohort import warm_up

            client.run(warm_up)
            summary = drain(
                iter_run(client, todo, folder, staging, model, options, spec, threads=threads)
            )
        remove_staging_dir(staging)
        worst, flipped = 0.0, 0
        for f in files:
            a = tifffile.imread(single / f"{f.stem}_prob.tif").astype(np.float64)
            b = tifffile.imread(dist / f"{f.stem}_prob.tif").astype(np.float64)
            worst = max(worst, float(np.abs(a - b).max()))
            ma = tifffile.imread(single / f"{f.stem}_mask.tif")
            mb = tifffile.imread(dist / f"{f.stem}_mask.tif")
            flipped += int((ma != mb).sum())
    n = len(files)
    r1, r2 = n / t_single, n / summary.seconds
    mean = sum(r.seconds for r in summary.done) / len(summary.done)
    over = summary.overhead_per_task_s()
    print(f"{n} BBBC039 images, bundled model, CPU")
    print(f"single process : {t_single:6.2f} s  {r1:.2f} files/s")
    print(
        f"local:{args.workers} cluster: {summary.seconds:6.2f} s  {r2:.2f} files/s "
        f"(cluster start {startup:.1f} s, not counted; {threads} torch thread(s) per worker)"
    )
    print(f"ratio          : {r2 / r1:.2f}x")
    print(
        f"per task       : {mean:.3f} s predicting, {over:.4f} s between tasks "
        f"({100 * over / mean:.1f} %)"
    )
    print(f"vs single process: max |prob difference| {worst:.2e}, mask pixels differing {flipped}")


if __name__ == "__main__":
    main()
