"""Screenshots of the napari-bulbseg workflow for docs/user-guide.md.

Opens a real napari viewer (use a real X server, e.g.
``xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/make_screenshots.py``), loads the
synthetic bulb sample, and runs Segment → Threshold → Review → Fine-tune exactly as a user would,
saving ``viewer.screenshot(canvas_only=False)`` PNGs into ``docs/screenshots/``.

Without a bundled model it first trains a small starting model on a *different* synthetic
stack (about a minute on a laptop CPU) so the predictions look like real ones; everything goes
into a temporary NAPARI_BULBSEG_HOME, never into the user's data folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "screenshots"


def wait(qapp, cond, timeout: float = 600.0) -> None:
    t0 = time.perf_counter()
    while not cond():
        qapp.processEvents()
        time.sleep(0.01)
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("gave up waiting")
    for _ in range(10):
        qapp.processEvents()


def starting_model(steps: int) -> str:
    """A registry version trained briefly on a synthetic stack unlike the one shown."""
    from napari_bulbseg.data import samples_from_slices
    from napari_bulbseg.phantom import bulb_phantom
    from napari_bulbseg.registry import Registry
    from napari_bulbseg.training import TrainConfig, train

    image, mask = bulb_phantom(n_slices=10, shape=(192, 192), seed=101)
    cfg = TrainConfig(
        epochs=3,
        steps_per_epoch=max(1, steps // 3),
        patch_size=128,
        base_channels=8,
        depth=3,
        lr=3e-3,
        early_stopping_patience=0,
    )
    result = train(cfg, samples_from_slices(image, mask), registry=Registry(), name="bulbs-demo")
    return result.version_id


def shot(viewer, name: str) -> None:
    from napari._qt.dialogs.qt_notification import NapariQtNotification
    from qtpy.QtWidgets import QApplication

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # transient pop-ups would hide part of the canvas
    for _ in range(20):
        QApplication.processEvents()
    path = OUT / f"{name}.png"
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print("wrote", path.relative_to(ROOT))


def rev_metrics(rev, qapp) -> list:
    wait(qapp, lambda: rev.stack_result is not None and rev._stack_worker is None)
    return rev.stack_result.per_slice


def show_only(docks: dict, name: str) -> None:
    for k, d in docks.items():
        d.setVisible(k == name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150, help="steps for the starting model")
    args = ap.parse_args()
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        os.environ.pop("QT_QPA_PLATFORM")
    os.environ["NAPARI_BULBSEG_HOME"] = tempfile.mkdtemp(prefix="bulbseg-shots-")
    OUT.mkdir(parents=True, exist_ok=True)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_bulbseg._widgets import (
        FinetuneWidget,
        ReviewWidget,
        SegmentWidget,
        ThresholdWidget,
    )
    from napari_bulbseg._widgets._session import get_session
    from napari_bulbseg.model import bundled_model_dir

    have_bundled = (bundled_model_dir() / "model.json").is_file()
    version = None if have_bundled else starting_model(args.steps)

    viewer = napari.Viewer(show=True, title="napari-bulbseg")
    viewer.window._qt_window.resize(1500, 950)
    qapp = QApplication.instance()
    viewer.open_sample("napari-bulbseg", "bulb_phantom")
    gt = viewer.layers["bulb phantom ground truth"]
    gt.visible = False
    s = get_session(viewer)
    widgets = {
        "segment": SegmentWidget(viewer),
        "threshold": ThresholdWidget(viewer),
        "review": ReviewWidget(viewer),
        "finetune": FinetuneWidget(viewer),
    }
    titles = {
        "segment": "Segment",
        "threshold": "Threshold & objects",
        "review": "Review & correct",
        "finetune": "Fine-tune",
    }
    docks = {
        k: viewer.window.add_dock_widget(w, name=titles[k], area="right")
        for k, w in widgets.items()
    }
    viewer.dims.set_point(0, 5)

    # 1. segment
    seg = widgets["segment"]
    show_only(docks, "segment")
    if version is not None:
        seg.select_version(version)
    seg.run()
    wait(qapp, lambda: not seg.running)
    wait(qapp, lambda: not s.busy)
    shot(viewer, "01-segment")

    # 2. threshold & objects, with the two-bulbs prior
    thr = widgets["threshold"]
    show_only(docks, "threshold")
    thr.expected.value = 2
    thr.min_size.value = 30
    thr.fill.value = True
    wait(qapp, lambda: not s.busy)
    thr._update_flags()
    shot(viewer, "02-threshold")

    # 3. review against the ground truth: XOR layer + metrics, on a slice with errors
    rev = widgets["review"]
    show_only(docks, "review")
    rev.reference.value = gt
    worst = int(np.argmax([m.pixel_error for m in rev_metrics(rev, qapp)]))
    viewer.dims.set_point(0, worst)
    wait(qapp, lambda: rev.stack_result is not None and rev._stack_worker is None)
    shot(viewer, "03-review")

    # 4. corrections: start from the prediction, paint the truth into slices, mark reviewed
    corr = rev.start_corrections()
    for z in range(gt.data.shape[0]):
        idx = np.nonzero(corr.data[z] != gt.data[z])
        corr.data_setitem((np.full(idx[0].shape, z), *idx), gt.data[z][idx])
        s.set_reviewed(z, True)
    wait(qapp, lambda: rev.corrections.saver is not None and rev.corrections.saver.idle)
    rev._sync_reviewed()
    shot(viewer, "04-corrections")

    # 5. fine-tune a few steps on the reviewed slices
    ft = widgets["finetune"]
    show_only(docks, "finetune")
    ft.epochs.value, ft.steps.value, ft.patch.value = 3, 8, 128
    ft.start()
    wait(qapp, lambda: not ft.running)
    ft.repredict()
    wait(qapp, lambda: not seg.running)
    wait(qapp, lambda: not s.busy)
    corr.visible = False
    viewer.dims.set_point(0, 5)
    wait(qapp, lambda: rev._stack_worker is None)
    shot(viewer, "05-finetune")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
