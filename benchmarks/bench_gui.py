"""GUI responsiveness benchmark: threshold-slider latency and event-loop latency under load.

Run under a real X server (not QT_QPA_PLATFORM=offscreen)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/bench_gui.py [--quick]

1. **Slider latency** — time from setting the threshold slider's value to the displayed slice's
   Labels data being updated and the layer refreshed ("update"), and until Qt has also processed
   the resulting events and drawn ("+ draw", software GL under Xvfb, so pessimistic), for 512² and
   2048² slices. Target p95 ≤ 16 ms. The reference is napari's own cost of the same work without
   the plugin: writing a precomputed mask into the layer and calling ``refresh()``.
2. **Event-loop latency** — how late a 10 ms QTimer fires while idle (reference), while the
   Segment widget predicts a stack, and while the Fine-tune widget trains. Target p95 ≤ 50 ms.

Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SLIDER_TARGET_MS = 16.0
LOOP_TARGET_MS = 50.0


def _pct(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 95))


def _smooth_prob(n: int, shape: int, seed: int = 0) -> np.ndarray:
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    small = rng.random((n, shape // 16, shape // 16)).astype(np.float32)
    prob = ndi.zoom(ndi.gaussian_filter(small, (0, 1.5, 1.5)), (1, 16, 16), order=1)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    return prob.astype(np.float16)


def bench_slider(viewer, qapp, size: int, n_values: int) -> dict[str, float]:
    from napari_bulbseg._widgets._session import get_session

    viewer.layers.clear()
    prob = _smooth_prob(3, size)
    viewer.add_image((prob * 1000).astype(np.uint16), name=f"img{size}")
    s = get_session(viewer)
    _, cache = s.begin_prediction(viewer.layers[f"img{size}"])
    cache[:] = prob
    for z in range(3):
        s.slice_predicted(z)
    viewer.dims.set_point(0, 1)
    dock, tw = viewer.window.add_plugin_dock_widget("napari-bulbseg", "Threshold & objects")
    for _ in range(20):
        qapp.processEvents()
    while s.busy:
        qapp.processEvents()
    pred = s.pred_layer
    values = np.linspace(0.2, 0.8, n_values)
    upd, drawn = [], []
    for i, v in enumerate(values):
        # warm-up excluded: the first 3 moves
        t0 = time.perf_counter()
        tw.threshold.value = round(float(v), 2)
        t1 = time.perf_counter()
        qapp.processEvents()
        t2 = time.perf_counter()
        if i >= 3:
            upd.append((t1 - t0) * 1e3)
            drawn.append((t2 - t0) * 1e3)
        while s.busy:  # let the background pass finish so moves do not queue up
            qapp.processEvents()
            time.sleep(0.001)
    from napari_bulbseg.postprocess import postprocess_slice

    if not np.array_equal(pred.data[1], postprocess_slice(prob[1], s.spec)):
        raise RuntimeError("the displayed slice does not match the slider")
    # reference: napari alone — write a ready mask and refresh
    ref = []
    masks = [(prob[1] >= t).astype(np.uint8) for t in values]
    for i, m in enumerate(masks):
        t0 = time.perf_counter()
        pred.data[1] = m
        pred.refresh()
        t1 = time.perf_counter()
        qapp.processEvents()
        if i >= 3:
            ref.append((t1 - t0) * 1e3)
    viewer.window.remove_dock_widget(dock)
    return {
        "update": _pct(upd),
        "draw": _pct(drawn),
        "ref": _pct(ref),
    }


class LoopProbe:
    """A 10 ms QTimer recording how late each tick fires."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.late: list[float] = []
        self._last = None
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.late.append(max(0.0, (now - self._last) * 1e3 - 10.0))
        self._last = now

    def run_while(self, qapp, busy, max_s: float) -> list[float]:
        self.late, self._last = [], None
        self.timer.start()
        t0 = time.perf_counter()
        while busy() and time.perf_counter() - t0 < max_s:
            qapp.processEvents()
            time.sleep(0.0005)
        self.timer.stop()
        return self.late


def bench_loop(viewer, qapp, quick: bool) -> dict[str, tuple[float, float]]:
    import torch

    from napari_bulbseg._widgets._models import FOLDER
    from napari_bulbseg._widgets._session import get_session
    from napari_bulbseg.model import ModelCard, UNet, UNetConfig, save_model
    from napari_bulbseg.phantom import bulb_phantom

    viewer.layers.clear()
    n, size = (4, 256) if quick else (8, 512)
    image, mask = bulb_phantom(n_slices=n, shape=(size, size), seed=0)
    viewer.add_image(image, name="bulbs")
    tmp = Path(tempfile.mkdtemp(prefix="bulbseg-bench-"))
    os.environ["NAPARI_BULBSEG_HOME"] = str(tmp / "home")
    torch.manual_seed(0)
    model_dir = save_model(tmp / "model", UNet(UNetConfig(1, 1, 16, 4)), ModelCard(name="bench"))
    probe = LoopProbe()
    out = {"idle": _pct(probe.run_while(qapp, lambda: True, 1.5))}

    _, seg = viewer.window.add_plugin_dock_widget("napari-bulbseg", "Segment")
    seg.model.value = next(c for c in seg.model.choices if c.kind == FOLDER)
    seg.folder.value = model_dir
    seg.run()
    out["predict"] = _pct(probe.run_while(qapp, lambda: seg.running, 300))

    s = get_session(viewer)
    corr = s.corrections.start()
    corr.data[:] = mask
    for z in range(n):
        s.set_reviewed(z, True)
    _, ft = viewer.window.add_plugin_dock_widget("napari-bulbseg", "Fine-tune")
    ft.epochs.value, ft.steps.value, ft.patch.value = 1, (6 if quick else 20), 128
    ft.start()
    out["finetune"] = _pct(probe.run_while(qapp, lambda: ft.running, 600))
    if ft.result is None:
        print(f"  (fine-tuning did not finish: {ft.status.value})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller stacks, fewer samples")
    ap.add_argument("--slider-only", action="store_true", help="skip the event-loop part")
    args = ap.parse_args()
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        os.environ.pop("QT_QPA_PLATFORM")  # no GL context there; use Xvfb instead
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    qapp = QApplication.instance()
    n_values = 20 if args.quick else 60
    print(f"napari {napari.__version__}, {os.cpu_count()} CPU core(s)")
    print("\nThreshold slider → displayed slice updated (ms)   target p95 ≤ 16 ms")
    for size in (512, 2048):
        r = bench_slider(viewer, qapp, size, n_values)
        (u50, u95), (d50, d95), (_r50, r95) = r["update"], r["draw"], r["ref"]
        print(
            f"  {size:4d}²  update p50 {u50:5.1f}  p95 {u95:5.1f}"
            f"  (p95/target {u95 / SLIDER_TARGET_MS:.2f})"
            f" | + draw p50 {d50:5.1f} p95 {d95:5.1f}"
            f" | napari write+refresh alone p95 {r95:5.1f} (ratio {u95 / max(r95, 1e-9):.2f})"
        )
    if args.slider_only:
        viewer.close()
        return 0
    print("\nEvent-loop latency: lateness of a 10 ms QTimer (ms)   target p95 ≤ 50 ms")
    loop = bench_loop(viewer, qapp, args.quick)
    idle95 = loop["idle"][1]
    for k, (p50, p95) in loop.items():
        print(
            f"  {k:9s} p50 {p50:6.1f}  p95 {p95:6.1f}  (p95/target {p95 / LOOP_TARGET_MS:.2f},"
            f" vs idle {p95 - idle95:+.1f} ms)"
        )
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
