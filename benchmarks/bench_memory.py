"""Large data: peak memory of opening and predicting a stack far larger than a slice.

Creates a sparse, uncompressed TIFF (default 64 × 8192 × 8192 uint8 = 4 GiB; only a few planes
hold data, the rest is never written, so it costs almost no disk), opens it lazily, times the
first slice, predicts a few slices one at a time into a probability cache (an ``np.memmap`` on
disk, or an array in RAM) and reports the peak resident memory (``VmHWM``) against the stack
size and against one slice's working set. A tiny untrained U-Net is used, because what is
measured is memory, not accuracy; its speed says nothing about the real model's.

    python benchmarks/bench_memory.py                      # 64×8192×8192 uint8, 2 slices, memmap
    python benchmarks/bench_memory.py --cache ram --slices 0 63
    python benchmarks/bench_memory.py --shape 16 4096 4096 --dtype uint16

Everything is written to a temporary folder that is deleted at the end. One process per
configuration (peak RSS cannot be reset within a process).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _status(key: str) -> int:
    """A ``/proc/self/status`` value in bytes (e.g. VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def create(path: str, dtype_name: str, z: int, y: int, x: int, planes: list[int]) -> None:
    """Write the sparse TIFF: blobs and a little noise in ``planes``, nothing elsewhere."""
    import tifffile

    dtype = np.dtype(dtype_name)
    mm = tifffile.memmap(
        path, shape=(z, y, x), dtype=dtype, photometric="minisblack", metadata={"axes": "ZYX"}
    )
    rng = np.random.default_rng(0)
    yy, xx = np.ogrid[:y, :x]
    for k in planes:
        for r0 in range(0, y, 1024):  # in bands, to keep this process small as well
            band = (yy[r0 : r0 + 1024] % 1024 - 512) ** 2 + (xx % 1024 - 512) ** 2
            blobs = band < (200 + 20 * k) ** 2
            noise = rng.integers(0, 40, blobs.shape, dtype=dtype)
            mm[k, r0 : r0 + 1024] = blobs.astype(dtype) * (np.iinfo(dtype).max // 2) + noise
    mm.flush()
    del mm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[64, 8192, 8192], metavar=("Z", "Y", "X"))
    ap.add_argument("--dtype", default="uint8", choices=["uint8", "uint16"])
    ap.add_argument("--slices", type=int, nargs="+", default=[0, 40])
    ap.add_argument("--cache", choices=["memmap", "ram"], default="memmap")
    ap.add_argument("--prob-dtype", choices=["float16", "uint8"], default="float16")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to create the temporary folder")
    args = ap.parse_args(argv)

    import torch

    from napari_bulbseg.events import drain
    from napari_bulbseg.inference import PredictOptions, iter_predict
    from napari_bulbseg.io import read_stack
    from napari_bulbseg.model import LoadedModel, ModelCard, UNet, UNetConfig

    torch.set_num_threads(args.threads)
    z, y, x = args.shape
    dtype = np.dtype(args.dtype)
    stack_bytes = z * y * x * dtype.itemsize
    plane_px = y * x
    work = Path(tempfile.mkdtemp(prefix="bulbseg-bench-memory ", dir=args.dir))
    try:
        # ---- a sparse uncompressed TIFF: only the planes we predict (and one more) get data;
        # written by a child process so that its memory does not count in our peak
        path = work / "big stack.tif"
        t0 = time.perf_counter()
        planes = sorted({*args.slices, z - 1})
        subprocess.run(
            [sys.executable, __file__, "--create", str(path), args.dtype, str(z), str(y), str(x)]
            + [str(k) for k in planes],
            check=True,
        )
        t_create = time.perf_counter() - t0
        st = os.stat(path)
        on_disk = st.st_blocks * 512

        torch.manual_seed(0)
        net = UNet(UNetConfig(1, 1, 4, 2)).eval()
        loaded = LoadedModel(net, ModelCard(architecture=net.config.to_dict()))
        baseline = _status("VmRSS")  # after imports and the model: the fixed cost

        # ---- open lazily, time to first slice
        t0 = time.perf_counter()
        stack = read_stack(path, lazy=True)
        t_open = time.perf_counter() - t0
        t0 = time.perf_counter()
        first = stack.plane(args.slices[0])
        t_first = time.perf_counter() - t0
        assert first.shape == (y, x)
        del first
        rss_open = _status("VmHWM")

        # ---- predict slice by slice into the cache
        prob_dtype = np.dtype(args.prob_dtype)
        if args.cache == "memmap":
            cache = np.lib.format.open_memmap(
                work / "prob cache.npy", mode="w+", dtype=prob_dtype, shape=(z, y, x)
            )
        else:
            cache = np.zeros((z, y, x), prob_dtype)  # pages are committed only when written
        options = PredictOptions(tile=args.tile, overlap=32, batch_size=4, device="cpu")
        times = []
        for k in args.slices:
            t0 = time.perf_counter()
            drain(iter_predict(loaded, stack, options, out=cache, slices=[k]))
            if args.cache == "memmap":
                cache.flush()
            times.append(time.perf_counter() - t0)
        peak = _status("VmHWM")
        cache_bytes = z * y * x * prob_dtype.itemsize
        done_cache = len(args.slices) * plane_px * prob_dtype.itemsize
        stack.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"stack       {z}×{y}×{x} {dtype} = {_mib(stack_bytes)} (on disk {_mib(on_disk)}, "
        f"sparse; created in {t_create:.1f}s)"
    )
    print(
        f"open        lazy in {t_open * 1e3:.1f} ms; first slice "
        f"({_mib(plane_px * dtype.itemsize)}) in {t_first * 1e3:.0f} ms; "
        f"peak RSS so far {_mib(rss_open)}"
    )
    print(
        f"predict     {len(args.slices)} slices, {', '.join(f'{t:.1f}s' for t in times)} "
        f"(tiny U-Net, {args.threads} CPU threads, tile {args.tile}); cache {args.cache} "
        f"{args.prob_dtype} {_mib(cache_bytes)} for the whole stack, {_mib(done_cache)} written"
    )
    print(
        f"memory      baseline (imports + model) {_mib(baseline)}; peak RSS {_mib(peak)}; "
        f"peak − baseline {_mib(peak - baseline)}"
    )
    print(
        f"ratios      (peak − baseline) / stack size = {(peak - baseline) / stack_bytes:.3f}; "
        f"/ one slice's pixels = {(peak - baseline) / plane_px:.1f} bytes per pixel of a slice; "
        f"/ whole-stack cache = {(peak - baseline) / cache_bytes:.3f}"
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--create":
        a = sys.argv[2:]
        create(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), [int(k) for k in a[5:]])
        sys.exit(0)
    sys.exit(main())
