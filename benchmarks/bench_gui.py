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
3. **Stalls per operation** (``--stalls``) — for each user action, triggered from inside the
   event loop as a click would be — predict, review metrics (choose the reference), keep-N,
   start corrections, fine-tune, autosave (a brush stroke), and a threshold step — the p95
   lateness of the 10 ms timer and the longest single stall (the largest lateness), from the
   action until its work (background passes included) is done, at 3×512², 3×2048², 2×4096²
   and 40×512², idle and with two CPU-burning processes beside it (``--load``). Targets: longest
   stall ≤ 100 ms and p95 ≤ 50 ms at 2048² and on the 40-slice stack; at 4096² threshold step
   p95 ≤ 33 ms and no stall over 250 ms. The reference, per size: napari's own cost of adding
   a Labels layer of the stack's shape and of writing + refreshing one slice of it.

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


STALL_TARGET_MS, STALL_TARGET_4K_MS, STEP_TARGET_4K_MS = 100.0, 250.0, 33.0
STALL_CONFIGS = ((3, 512), (3, 2048), (2, 4096), (40, 512))


def _burners(n: int) -> list:
    import subprocess

    code = "while True: pass"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def _during(qapp, probe: LoopProbe, action, busy, max_s: float = 600.0, tail_s: float = 0.3):
    """Run ``action`` from inside the event loop (as a click), probe until ``busy()`` is false
    and ``tail_s`` more (follow-up passes); return (p95, longest stall, seconds)."""
    from qtpy.QtCore import QTimer

    started = {"done": False}

    def go() -> None:
        action()
        started["done"] = True

    QTimer.singleShot(0, go)
    t0 = time.perf_counter()
    state = {"quiet_since": None}

    def still() -> bool:
        if not started["done"] or busy():
            state["quiet_since"] = None
            return True
        if state["quiet_since"] is None:
            state["quiet_since"] = time.perf_counter()
        return time.perf_counter() - state["quiet_since"] < tail_s

    late = probe.run_while(qapp, still, max_s) or [0.0]
    return float(np.percentile(late, 95)), float(max(late)), time.perf_counter() - t0


def bench_stalls(viewer, qapp, n: int, size: int) -> dict[str, tuple[float, float, float]]:
    """Each user action on an (n, size, size) bulb stack; {action: (p95, max, seconds)}."""
    import torch

    from napari_bulbseg._widgets._models import FOLDER
    from napari_bulbseg._widgets._session import get_session
    from napari_bulbseg.model import ModelCard, UNet, UNetConfig, save_model
    from napari_bulbseg.phantom import bulb_phantom

    viewer.layers.clear()
    for name in list(viewer.window.dock_widgets):
        viewer.window.remove_dock_widget(viewer.window.dock_widgets[name].native.parent())
    image, mask = bulb_phantom(n_slices=n, shape=(size, size), seed=0)
    viewer.add_image(image, name="bulbs")
    gt = viewer.add_labels(mask.astype(np.uint8), name="bulbs ground truth")
    tmp = Path(tempfile.mkdtemp(prefix="bulbseg-bench-"))
    os.environ["NAPARI_BULBSEG_HOME"] = str(tmp / "home")
    torch.manual_seed(0)
    net = UNet(UNetConfig(1, 1, 4, 2))  # tiny: the GUI's share of the work is what is measured
    model_dir = save_model(tmp / "model", net, ModelCard(name="bench", threshold=0.5))
    s = get_session(viewer)
    probe, out = LoopProbe(), {}
    _, seg = viewer.window.add_plugin_dock_widget("napari-bulbseg", "Segment")
    _, tw = viewer.window.add_plugin_dock_widget("napari-bulbseg", "Threshold & objects")
    _, rw = viewer.window.add_plugin_dock_widget("napari-bulbseg", "Review & correct")
    _, ft = viewer.window.add_plugin_dock_widget("napari-bulbseg", "Fine-tune")
    seg.model.value = next(c for c in seg.model.choices if c.kind == FOLDER)
    seg.folder.value = model_dir

    def settled() -> bool:
        q = getattr(rw, "queue", None)
        return s.busy or rw._stack_worker is not None or (q is not None and q.busy)

    out["predict"] = _during(qapp, probe, seg.run, lambda: seg.running or settled())
    viewer.dims.set_point(0, n // 2)
    out["review metrics"] = _during(
        qapp, probe, lambda: setattr(rw.reference, "value", gt),
        lambda: settled() or rw._stack_timer.isActive() or rw._slice_timer.isActive(),
    )  # fmt: skip
    steps = []
    for v in (0.45, 0.55, 0.5, 0.6):
        t0 = time.perf_counter()
        tw.threshold.value = v
        steps.append((time.perf_counter() - t0) * 1e3)
        while settled() or rw._stack_timer.isActive():
            qapp.processEvents()
            time.sleep(0.001)
    out["threshold step"] = _during(qapp, probe, lambda: setattr(tw.threshold, "value", 0.52),
                                    settled)  # fmt: skip
    out["threshold step"] = (*out["threshold step"][:2], float(np.percentile(steps, 95)) / 1e3)
    out["keep-N"] = _during(qapp, probe, lambda: setattr(tw.keep, "value", 1), settled)
    out["start corrections"] = _during(
        qapp, probe, rw.start_btn.native.click, lambda: settled() or not rw.corrections.saver.idle
    )  # fmt: skip
    corr = rw.corrections.layer
    z = n // 2

    def stroke() -> None:
        yy, xx = np.nonzero(np.ones((20, 20), bool))
        corr.data_setitem((np.full(yy.shape, z), yy + size // 2, xx + size // 2),
                          np.ones(yy.shape, np.uint8))  # fmt: skip

    out["autosave"] = _during(
        qapp, probe, stroke, lambda: not rw.corrections.saver.idle, tail_s=1.5
    )  # fmt: skip
    for k in sorted({max(0, n // 2 - 2), max(0, n // 2 - 1), n // 2, min(n - 1, n // 2 + 1)}):
        s.set_reviewed(k, True)  # slices with bulbs (the end slices of a stack can be empty)
    corr.data[:] = mask
    ft.epochs.value, ft.steps.value, ft.patch.value = 1, 3, 64
    if hasattr(ft, "only_better"):
        ft.only_better.value = False
    if hasattr(ft, "then_predict"):
        ft.then_predict.value = False
    out["fine-tune"] = _during(qapp, probe, ft.start, lambda: ft.running or settled())
    # napari alone: add a Labels layer of the stack's shape; write + refresh one slice
    t0 = time.perf_counter()
    ref_layer = viewer.add_labels(np.zeros(mask.shape, np.uint8), name="ref")
    t1 = time.perf_counter()
    ref_layer.data[z] = mask[z]
    ref_layer.refresh()
    t2 = time.perf_counter()
    out["napari: add labels"] = (0.0, (t1 - t0) * 1e3, t1 - t0)
    out["napari: write+refresh"] = (0.0, (t2 - t1) * 1e3, t2 - t1)
    return out


def report_stalls(viewer, qapp, load: bool, configs=STALL_CONFIGS) -> None:
    burners = _burners(2) if load else []
    try:
        what = "with 2 CPU-burning processes" if load else "idle"
        print(f"\nStalls per action, {what}: p95 lateness / longest stall (ms), action seconds")
        for n, size in configs:
            r = bench_stalls(viewer, qapp, n, size)
            big = size >= 4096
            limit = STALL_TARGET_4K_MS if big else STALL_TARGET_MS
            print(f"  {n}×{size}²")
            for k, (p95, mx, secs) in r.items():
                if k.startswith("napari"):
                    print(f"    {k:18s} {mx:8.1f} ms")
                    continue
                flag = "" if mx <= limit and (big or p95 <= LOOP_TARGET_MS) else "  ← over target"
                extra = ""
                if k == "threshold step":
                    extra = f"  (step itself p95 {secs * 1e3:.1f} ms"
                    extra += f", target {STEP_TARGET_4K_MS:.0f})" if big else ")"
                    secs = 0.0
                print(f"    {k:18s} p95 {p95:7.1f}  max {mx:7.1f}  {secs:6.2f} s{extra}{flag}")
    finally:
        for b in burners:
            b.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller stacks, fewer samples")
    ap.add_argument("--slider-only", action="store_true", help="skip the event-loop part")
    ap.add_argument("--stalls", action="store_true", help="only the stalls per action (part 3)")
    ap.add_argument("--load", action="store_true", help="part 3 also with 2 CPU burners")
    ap.add_argument(
        "--configs", nargs="+", default=None, help="part 3 stacks as NxSIZE, e.g. 3x2048"
    )
    args = ap.parse_args()
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        os.environ.pop("QT_QPA_PLATFORM")  # no GL context there; use Xvfb instead
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    qapp = QApplication.instance()
    n_values = 20 if args.quick else 60
    print(f"napari {napari.__version__}, {os.cpu_count()} CPU core(s)")
    if args.stalls:
        configs = STALL_CONFIGS
        if args.configs:
            configs = tuple(tuple(int(v) for v in c.lower().split("x")) for c in args.configs)
        if len(configs) > 1:  # one viewer per stack: napari's GL state at 4096² does not last
            viewer.close()
            import subprocess

            for n, size in configs:
                cmd = [sys.executable, __file__, "--stalls", "--configs", f"{n}x{size}"]
                subprocess.run(cmd + (["--load"] if args.load else []), check=False)
            return 0
        report_stalls(viewer, qapp, False, configs)
        if args.load:
            report_stalls(viewer, qapp, True, configs)
        viewer.close()
        return 0
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
