"""Benchmark sliding-window prediction against MONAI and against one whole-image forward pass.

    .venv/bin/python benchmarks/bench_inference.py            # CPU, 2 threads, full run
    .venv/bin/python benchmarks/bench_inference.py --quick    # smaller, 1 round: a smoke test

Cases: one 2048×2048 slice and a 16×512×512 stack, built from BBBC039 images in
``../shared/data`` when present (synthetic blobs otherwise). Weights: the bundled model when
present, else a seeded random ``UNetConfig()`` (the table says which). Contenders:

- ``ours:*`` — :func:`napari_bulbseg.inference.predict` on the *raw* image (normalisation,
  padding, tiling, blending and float16 storage included in the time);
- ``monai`` — ``monai.inferers.sliding_window_inference`` (roi 512, overlap 0.25, gaussian,
  same sw_batch_size) with the loaded model, on the *pre-normalised* tensor (not timed);
- ``monai+prepared`` — the same with our prepared network (BN folded, channels-last), which
  separates what tiling gains from what preparing the network gains;
- ``whole`` — one forward pass of the loaded model over the whole pre-normalised slice (the
  stack: slices in batches of ``--batch``);
- ``ours:untiled`` — our pipeline with a tile larger than the image (one forward pass of the
  prepared network): the fair reference for the cost of tiling.

Timing: all contenders in one process, 3 warm-up runs each, then ``--rounds`` rounds in which
every contender runs once (order rotated each round), so a busy machine slows all alike; the
table shows medians of wall time and of CPU time (``time.process_time``, all threads), the
latter less sensitive to other processes. Peak memory: each contender once more in a fresh
subprocess (Linux VmHWM peak RSS during the run minus RSS before it, model and data loaded).
Prints a table and one JSON line.
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
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "bbbc039"

# name -> PredictOptions overrides (tile/overlap/blend/trim); "default" = PredictOptions()
VARIANTS: dict[str, dict] = {
    "ours:default": {},
    "ours:t1024-o96": {"tile": 1024, "overlap": 96},
    "ours:t512-o96": {"tile": 512, "overlap": 96},
    "ours:t1280-o64": {"tile": 1280, "overlap": 64},
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


# --------------------------------------------------------------------------- contenders


def build(name: str, args: argparse.Namespace, loaded, data: np.ndarray):
    """(run, exact): ``run()`` is what is timed; ``exact()`` gives float32 probabilities."""
    import torch

    from napari_bulbseg.inference import PredictOptions, predict, prepare_network, select_device
    from napari_bulbseg.normalize import prepare_image

    device = select_device(args.device)
    card = loaded.card
    net = loaded.model.to(device).eval()
    if name == "monai+prepared":
        net = prepare_network(loaded.model, device)
    x_all = None
    if not name.startswith("ours:"):  # the references get the normalised tensor for free
        norm = [prepare_image(p, card.in_channels, card.norm, card.channel_policy) for p in data]
        x_all = torch.from_numpy(np.stack(norm)).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if name.startswith("ours:"):
        opts = PredictOptions(batch_size=args.batch, device=str(device), **VARIANTS[name])

        def run() -> np.ndarray:
            return predict(loaded, data, opts)

        def exact() -> np.ndarray:  # same tiling, float32 storage, for the agreement figures
            return predict(loaded, data, dataclasses.replace(opts, prob_dtype="float32"))

        return run, exact
    if name.startswith("monai"):
        from monai.inferers import sliding_window_inference

        def run() -> np.ndarray:
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

        return run, run
    if name == "whole":

        def run() -> np.ndarray:
            with torch.inference_mode():
                b = args.batch
                outs = [torch.sigmoid(net(x_all[i : i + b])) for i in range(0, len(x_all), b)]
                sync()
                return torch.cat(outs)[:, 0].float().cpu().numpy()

        return run, run
    raise SystemExit(f"unknown contender {name}")


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def run_child(args: argparse.Namespace) -> None:
    """One contender, once, in a fresh process: peak memory of the run.

    Linux: VmHWM (this process's peak RSS) after resetting it through /proc/self/clear_refs,
    minus VmRSS before the run. ``ru_maxrss`` is only the fallback: Linux carries the parent's
    high-water mark across fork+exec, which hides a child's smaller peak.
    """
    import torch

    torch.set_num_threads(args.threads)
    loaded, _ = load(args.model)
    data, _ = make_data(args.case, args.size, tuple(args.stack))
    run, _ = build(args.child, args, loaded, data)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    before = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        method = "VmHWM"
    except OSError:
        method = "ru_maxrss"
    ru0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    if method == "VmHWM" and before is not None:
        delta = (_status_kib("VmHWM") or 0) - before
    else:
        delta = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - ru0
    res = {"rss_peak_delta_mib": delta / 1024, "memory_method": method}
    if args.device.startswith("cuda"):
        res["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(res), flush=True)


def peak_memory(args: argparse.Namespace, case: str, name: str) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--case", case, "--device", args.device]
    cmd += ["--threads", str(args.threads), "--batch", str(args.batch), "--size", str(args.size)]
    cmd += ["--stack", *map(str, args.stack)] + (["--model", args.model] if args.model else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(f"  memory run {case}/{name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {}
    return json.loads(line[len("RESULT ") :])


# --------------------------------------------------------------------------- driver


def run_case(args: argparse.Namespace, case: str, contenders: list[str]) -> tuple[str, list]:
    import torch

    torch.set_num_threads(args.threads)
    loaded, _ = load(args.model)
    data, desc = make_data(case, args.size, tuple(args.stack))
    runs = {name: build(name, args, loaded, data) for name in contenders}
    for name, (run, _) in runs.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            run()
        print(f"  {case} {name}: warmed up ({time.perf_counter() - t0:.0f} s)", flush=True)
    wall: dict[str, list[float]] = {n: [] for n in runs}
    cpu: dict[str, list[float]] = {n: [] for n in runs}
    names = list(runs)
    for k in range(args.rounds):
        load1 = os.getloadavg()[0]
        for name in names[k % len(names) :] + names[: k % len(names)]:
            c0, t0 = time.process_time(), time.perf_counter()
            runs[name][0]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        print(f"  {case} round {k + 1}/{args.rounds} done (load average {load1:.1f})", flush=True)
    probs = {name: np.asarray(runs[name][1](), dtype=np.float32) for name in runs}
    mp = data.shape[0] * data.shape[1] * data.shape[2] / 1e6
    results = []
    for name in runs:
        r = {
            "name": name,
            "median_s": statistics.median(wall[name]),
            "median_cpu_s": statistics.median(cpu[name]),
            "wall_s": wall[name],
            "cpu_s": cpu[name],
            "megapixels": mp,
        }
        r["mp_per_s"] = mp / r["median_s"]
        if not args.no_memory:
            r.update(peak_memory(args, case, name))
        results.append(r)
    by = {r["name"]: r for r in results}
    for r in results:
        for ref, key in (("monai", "monai"), ("whole", "whole"), ("ours:untiled", "untiled")):
            if ref not in by:
                continue
            r[f"speed_vs_{key}"] = by[ref]["median_s"] / r["median_s"]
            r[f"cpu_speed_vs_{key}"] = by[ref]["median_cpu_s"] / r["median_cpu_s"]
            if ref != "ours:untiled":
                diff = np.abs(probs[r["name"]] - probs[ref])
                r[f"max_abs_vs_{key}"] = float(diff.max())
                r[f"frac_over_1e-3_vs_{key}"] = float((diff > 1e-3).mean())
    return desc, results


def print_table(case: str, desc: str, results: list[dict]) -> None:
    print(f"\n{case}: {desc}")
    head = (
        f"{'contender':18s} {'wall s':>7s} {'cpu s':>7s} {'MP/s':>5s} {'×MONAI':>6s} "
        f"{'t/whole':>7s} {'t/untiled':>9s} {'ΔRSS MiB':>8s} {'|Δ|MONAI':>8s} {'|Δ|whole':>8s}"
    )
    print(head)
    print("-" * len(head))

    def f(r: dict, k: str, fmt: str, inv: bool = False) -> str:
        if k not in r:
            return "—".rjust(int(fmt.split(".")[0]))
        return format(1 / r[k] if inv else r[k], fmt)

    for r in results:
        print(
            f"{r['name']:18s} {r['median_s']:7.2f} {r['median_cpu_s']:7.2f} {r['mp_per_s']:5.2f} "
            f"{f(r, 'speed_vs_monai', '6.2f')} {f(r, 'speed_vs_whole', '7.2f', True)} "
            f"{f(r, 'speed_vs_untiled', '9.2f', True)} {f(r, 'rss_peak_delta_mib', '8.0f')} "
            f"{f(r, 'max_abs_vs_monai', '8.1e')} {f(r, 'max_abs_vs_whole', '8.1e')}"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder (default: bundled, else seeded random)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="our batch_size = MONAI sw_batch_size")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per contender (median)")
    ap.add_argument("--size", type=int, default=2048, help="side of the single-slice case")
    ap.add_argument("--stack", type=int, nargs=3, default=[16, 512, 512], metavar=("Z", "Y", "X"))
    ap.add_argument("--cases", nargs="+", default=["slice", "stack"], choices=["slice", "stack"])
    ap.add_argument("--contenders", nargs="+", help="subset of contenders to run")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--quick", action="store_true", help="1 warm-up, 1 round, small sizes")
    ap.add_argument("--json", type=Path, help="also write the JSON line to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_child(args)
        return
    if args.quick:
        args.warmup, args.rounds, args.size, args.stack = 1, 1, 1024, [4, 512, 512]

    import torch

    from napari_bulbseg.inference import PredictOptions

    _, model_desc = load(args.model)
    d = PredictOptions()
    print(
        f"torch {torch.__version__}, device {args.device}, {os.cpu_count()} CPUs, threads "
        f"{args.threads}, batch {args.batch}, model: {model_desc}\n"
        f"defaults: tile {d.tile}, overlap {d.overlap}, blend {d.blend}, trim {d.effective_trim}; "
        f"warm-up {args.warmup}, median of {args.rounds} interleaved rounds",
        flush=True,
    )
    report = {
        "benchmark": "inference",
        "torch": torch.__version__,
        "device": args.device,
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "batch": args.batch,
        "model": model_desc,
        "defaults": {
            "tile": d.tile,
            "overlap": d.overlap,
            "blend": d.blend,
            "trim": d.effective_trim,
        },
        "load_average_start": os.getloadavg(),
        "cases": {},
    }
    for case in args.cases:
        contenders = SLICE_CONTENDERS if case == "slice" else STACK_CONTENDERS
        if args.contenders:
            contenders = [c for c in contenders if c in args.contenders]
        desc, results = run_case(args, case, contenders)
        report["cases"][case] = {"data": desc, "results": results}
    report["load_average_end"] = os.getloadavg()
    for case, rep in report["cases"].items():
        print_table(case, rep["data"], rep["results"])
    print(f"load average: start {report['load_average_start']}, end {report['load_average_end']}")
    line = json.dumps(report)
    print("\nJSON " + line)
    if args.json:
        args.json.write_text(line + "\n")


if __name__ == "__main__":
    main()
