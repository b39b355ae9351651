"""Benchmark sliding-window prediction against MONAI and against one whole-image forward pass.

    .venv/bin/python benchmarks/bench_inference.py            # CPU, 2 threads, full run
    .venv/bin/python benchmarks/bench_inference.py --quick    # smaller, 1 repeat: a smoke test

Cases: one 2048×2048 slice and a 16×512×512 stack, built from BBBC039 images in
``../shared/data`` when present (synthetic blobs otherwise). Weights: the bundled model when
present, else a seeded random ``UNetConfig()`` (say which in the table). Contenders:

- ``ours:*`` — :func:`napari_bulbseg.inference.predict` on the *raw* image (normalisation,
  padding, tiling, blending and float16 storage included in the time);
- ``monai`` — ``monai.inferers.sliding_window_inference`` (roi 512, overlap 0.25, gaussian,
  same sw_batch_size) with the loaded model, on the *pre-normalised* tensor (not timed);
- ``monai+prepared`` — the same with our prepared network (BN folded, channels-last), which
  separates the gain from tiling from the gain from preparing the network;
- ``whole`` — one forward pass of the loaded model over the whole pre-normalised slice;
- ``ours:untiled`` — our pipeline with a tile larger than the image (one forward pass).

Each contender runs in a fresh subprocess (clean peak RSS: ``ru_maxrss`` after the runs minus
before them); 3 warm-up runs, then the median of ``--repeats`` timed runs. Prints a table and
one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "bbbc039"

# name -> PredictOptions overrides (tile/overlap/blend/trim); "default" = PredictOptions()
VARIANTS: dict[str, dict] = {
    "ours:default": {},
    "ours:t512-o96": {"tile": 512, "overlap": 96},
    "ours:t1024-o64": {"tile": 1024, "overlap": 64},
    "ours:t512-o32-cos": {"tile": 512, "overlap": 32, "blend": "cosine", "trim": 0},
    "ours:t512-o128-gau": {"tile": 512, "overlap": 128, "blend": "gaussian", "trim": 0},
    "ours:untiled": {"tile": 4096, "overlap": 0},
}
SLICE_CONTENDERS = [*VARIANTS, "whole", "monai", "monai+prepared"]
STACK_CONTENDERS = ["ours:default", "whole", "monai", "monai+prepared"]


# --------------------------------------------------------------------------- data and model


def _blobs(shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = shape
    img = np.full(shape, 110.0, np.float32)
    n = h * w // 3000
    cy, cx, r = rng.uniform(0, h, n), rng.uniform(0, w, n), rng.uniform(5, 14, n)
    for y, x, rr in zip(cy, cx, r):
        y0, y1, x0, x1 = (
            int(max(0, y - 3 * rr)),
            int(min(h, y + 3 * rr)),
            int(max(0, x - 3 * rr)),
            int(min(w, x + 3 * rr)),
        )
        yy, xx = np.mgrid[y0:y1, x0:x1]
        img[y0:y1, x0:x1] += 900 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * rr * rr))
    img += rng.normal(0, 30, shape)
    return np.clip(img, 0, 4095).astype(np.uint16)


def make_data(case: str, size: int, stack: tuple[int, int, int]) -> tuple[np.ndarray, str]:
    """(Z, Y, X) uint16 and a description: BBBC039 mosaics/crops, or synthetic blobs."""
    files = sorted((DATA / "val" / "images").glob("*.tif")) if DATA.is_dir() else []
    if files:
        import tifffile

        imgs = [tifffile.imread(f) for f in files[:20]]
        if case == "slice":
            h, w = imgs[0].shape
            rows, cols = -(-size // h), -(-size // w)
            mosaic = np.block([[imgs[r * cols + c] for c in range(cols)] for r in range(rows)])
            return mosaic[None, :size, :size].copy(), f"BBBC039 val mosaic {size}x{size}"
        z, y, x = stack
        return np.stack([imgs[i % len(imgs)][:y, :x] for i in range(z)]), (
            f"BBBC039 val crops {z}x{y}x{x}"
        )
    if case == "slice":
        return _blobs((size, size), 0)[None], f"synthetic blobs {size}x{size}"
    z, y, x = stack
    return np.stack([_blobs((y, x), i) for i in range(z)]), f"synthetic blobs {z}x{y}x{x}"


def load(model_dir: str | None):
    import torch

    from napari_bulbseg.model import (
        LoadedModel,
        ModelCard,
        UNet,
        UNetConfig,
        bundled_model_dir,
        load_model,
    )

    path = Path(model_dir) if model_dir else bundled_model_dir()
    if path.is_dir():
        return load_model(path), f"{path.name} ({path})"
    torch.manual_seed(0)
    net = UNet(UNetConfig()).eval()
    return LoadedModel(net, ModelCard(name="random")), "seeded random UNetConfig() (no bundled)"


# --------------------------------------------------------------------------- one contender


def run_child(args: argparse.Namespace) -> None:
    import torch

    from napari_bulbseg.inference import PredictOptions, predict, prepare_network, select_device
    from napari_bulbseg.normalize import prepare_image

    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    loaded, _ = load(args.model)
    data, _ = make_data(args.case, args.size, tuple(args.stack))
    name = args.child
    card = loaded.card
    if name == "monai" or name == "monai+prepared":
        from monai.inferers import sliding_window_inference
    net = loaded.model.to(device).eval()
    if name == "monai+prepared":
        net = prepare_network(loaded.model, device)
    norm = np.stack(
        [prepare_image(p, card.in_channels, card.norm, card.channel_policy) for p in data]
    )
    x_all = torch.from_numpy(norm).to(device)  # (Z, C, Y, X), normalised outside the timing

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if name.startswith("ours:"):
        opts = PredictOptions(batch_size=args.batch, device=str(device), **VARIANTS[name])

        def once() -> np.ndarray:
            return predict(loaded, data, opts)

        def exact() -> np.ndarray:  # same tiling, float32 storage, for the agreement figures
            return predict(loaded, data, dataclasses.replace(opts, prob_dtype="float32"))

    elif name.startswith("monai"):

        def once() -> np.ndarray:
            with torch.inference_mode():
                y = sliding_window_inference(
                    x_all,
                    roi_size=(512, 512),
                    sw_batch_size=args.batch,
                    predictor=lambda t: torch.sigmoid(net(t)),
                    overlap=0.25,
                    mode="gaussian",
                )
                sync()
                return y[:, 0].float().cpu().numpy()

        exact = once
    elif name == "whole":

        def once() -> np.ndarray:
            with torch.inference_mode():
                step = args.batch
                outs = [torch.sigmoid(net(x_all[i : i + step])) for i in range(0, len(x_all), step)]
                sync()
                return torch.cat(outs)[:, 0].float().cpu().numpy()

        exact = once
    else:
        raise SystemExit(f"unknown contender {name}")

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # model + data loaded, no run yet
    for _ in range(args.warmup):
        once()
    times = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - t0)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prob = np.asarray(exact(), dtype=np.float32)
    np.save(Path(args.tmp) / f"{args.case}-{name.replace(':', '_').replace('+', '_')}.npy", prob)
    res = {
        "name": name,
        "median_s": statistics.median(times),
        "times_s": times,
        "rss_peak_mib": rss1 / 1024,
        "rss_peak_delta_mib": (rss1 - rss0) / 1024,
        "megapixels": data.shape[0] * data.shape[1] * data.shape[2] / 1e6,
    }
    if device.type == "cuda":  # over warm-up and timed runs
        res["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(res), flush=True)


# --------------------------------------------------------------------------- driver


def run_case(args: argparse.Namespace, case: str, contenders: list[str], tmp: str) -> list[dict]:
    results = []
    for name in contenders:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--case",
            case,
            "--tmp",
            tmp,
            "--device",
            args.device,
            "--threads",
            str(args.threads),
            "--batch",
            str(args.batch),
            "--warmup",
            str(args.warmup),
            "--repeats",
            str(args.repeats),
            "--size",
            str(args.size),
            "--stack",
            *map(str, args.stack),
        ]
        if args.model:
            cmd += ["--model", args.model]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"  {case}/{name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(line[len("RESULT ") :])
        print(
            f"  {case:5s} {name:18s} {r['median_s']:7.2f} s"
            f"  ({time.perf_counter() - t0:.0f} s wall)",
            flush=True,
        )
        results.append(r)
    probs = {
        r["name"]: np.load(
            Path(tmp) / f"{case}-{r['name'].replace(':', '_').replace('+', '_')}.npy"
        )
        for r in results
    }
    by = {r["name"]: r for r in results}
    for r in results:
        r["mp_per_s"] = r["megapixels"] / r["median_s"]
        if "monai" in by:
            r["x_monai"] = by["monai"]["median_s"] / r["median_s"]
            r["max_abs_vs_monai"] = float(np.abs(probs[r["name"]] - probs["monai"]).max())
        if "whole" in by:
            r["time_vs_whole"] = r["median_s"] / by["whole"]["median_s"]
            r["max_abs_vs_whole"] = float(np.abs(probs[r["name"]] - probs["whole"]).max())
        if "ours:untiled" in by:
            r["time_vs_untiled"] = r["median_s"] / by["ours:untiled"]["median_s"]
    return results


def print_table(case: str, desc: str, results: list[dict]) -> None:
    print(f"\n{case}: {desc}")
    head = (
        f"{'contender':18s} {'median s':>9s} {'MP/s':>6s} {'×MONAI':>7s} {'t/whole':>8s} "
        f"{'t/untiled':>9s} {'peak ΔRSS MiB':>13s} {'max|Δ| MONAI':>12s} {'max|Δ| whole':>12s}"
    )
    print(head)
    print("-" * len(head))

    def f(r: dict, k: str, fmt: str) -> str:
        return format(r[k], fmt) if k in r else "—"

    for r in results:
        print(
            f"{r['name']:18s} {r['median_s']:9.2f} {r['mp_per_s']:6.2f} {f(r, 'x_monai', '7.2f')} "
            f"{f(r, 'time_vs_whole', '8.2f')} {f(r, 'time_vs_untiled', '9.2f')} "
            f"{r['rss_peak_delta_mib']:13.0f} {f(r, 'max_abs_vs_monai', '12.1e')} "
            f"{f(r, 'max_abs_vs_whole', '12.1e')}"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder (default: bundled, else seeded random)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="our batch_size = MONAI sw_batch_size")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=2048, help="side of the single-slice case")
    ap.add_argument("--stack", type=int, nargs=3, default=[16, 512, 512], metavar=("Z", "Y", "X"))
    ap.add_argument("--cases", nargs="+", default=["slice", "stack"], choices=["slice", "stack"])
    ap.add_argument("--contenders", nargs="+", help="subset of contenders to run")
    ap.add_argument(
        "--quick", action="store_true", help="1 warm-up, 1 repeat, 1024 slice, 4 slices"
    )
    ap.add_argument("--json", type=Path, help="also write the JSON line to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_child(args)
        return
    if args.quick:
        args.warmup, args.repeats, args.size, args.stack = 1, 1, 1024, [4, 512, 512]

    import torch

    from napari_bulbseg.inference import PredictOptions

    _, model_desc = load(args.model)
    d = PredictOptions()
    print(
        f"torch {torch.__version__}, device {args.device}, threads {args.threads}, "
        f"batch {args.batch}, model: {model_desc}\n"
        f"defaults: tile {d.tile}, overlap {d.overlap}, blend {d.blend}, trim {d.effective_trim}; "
        f"warm-up {args.warmup}, median of {args.repeats}"
    )
    report = {
        "benchmark": "inference",
        "torch": torch.__version__,
        "device": args.device,
        "threads": args.threads,
        "batch": args.batch,
        "model": model_desc,
        "defaults": {
            "tile": d.tile,
            "overlap": d.overlap,
            "blend": d.blend,
            "trim": d.effective_trim,
        },
        "cases": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        for case in args.cases:
            contenders = SLICE_CONTENDERS if case == "slice" else STACK_CONTENDERS
            if args.contenders:
                contenders = [c for c in contenders if c in args.contenders]
            _, desc = make_data(case, args.size, tuple(args.stack))
            results = run_case(args, case, contenders, tmp)
            report["cases"][case] = {"data": desc, "results": results}
    for case, rep in report["cases"].items():
        print_table(case, rep["data"], rep["results"])
    line = json.dumps(report)
    print("\nJSON " + line)
    if args.json:
        args.json.write_text(line + "\n")


if __name__ == "__main__":
    main()
