"""Screenshots of the napari-bulbseg workflow for docs/user-guide.md.

Opens a real napari viewer (use a real X server, e.g.
``xvfb-run -a -s "-screen 0 1920x1080x24" python scripts/make_screenshots.py``) and clicks
through the widgets as a user would, saving ``viewer.screenshot(canvas_only=False)`` PNGs into
``docs/screenshots/``:

1-3. the **bundled model** on the bundled BBBC039 nuclei sample: Segment, Threshold & objects,
     Review against the ground truth (on the slice with the most errors);
4-5. the synthetic bulb sample, segmented by a small bulb model trained first on a *different*
     synthetic stack (about a minute on a laptop CPU; the bundled model knows nuclei, not
     bulbs): six slices corrected in the order the correct-next queue gives, then Fine-tune on
     them, which re-predicts the stack with the new version (the next round's queue).

All four docks are opened from Plugins ▸ napari-bulbseg in a 1920×1080 window, where they stack
as tabs; each shot brings its tab to the front.

Everything goes into a temporary NAPARI_BULBSEG_HOME, never into the user's data folder.
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
#: a laptop's full-HD screen: the docks open from the menu stack as tabs and must fit it
WINDOW = (1920, 1080)


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
    from qtpy.QtWidgets import QAbstractSpinBox, QApplication, QLineEdit

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # transient pop-ups would hide part of the canvas
    viewer.window._qt_window.resize(*WINDOW)  # napari may restore a saved window size
    focused = QApplication.focusWidget()
    if focused is not None:
        focused.clearFocus()
    for box in viewer.window._qt_window.findChildren(QAbstractSpinBox):
        for edit in box.findChildren(QLineEdit):
            edit.deselect()  # no highlighted text in a spin box
    for _ in range(20):
        QApplication.processEvents()
    path = OUT / f"{name}.png"
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print("wrote", path.relative_to(ROOT))


def rev_metrics(rev, qapp) -> list:
    wait(qapp, lambda: rev.stack_result is not None and rev._stack_worker is None)
    wait(qapp, lambda: not rev._stack_timer.isActive() and rev._stack_worker is None)
    return rev.stack_result.per_slice


def zoom_on(viewer, errors: np.ndarray, zoom: float = 2.0, block: int = 128) -> None:
    """Centre the camera on the ``block``-px window with the most error pixels and zoom in."""
    h, w = errors.shape
    best, centre = -1, (h / 2, w / 2)
    for y in range(0, max(1, h - block + 1), block // 4):
        for x in range(0, max(1, w - block + 1), block // 4):
            n = int(errors[y : y + block, x : x + block].sum())
            if n > best:
                best, centre = n, (y + block / 2, x + block / 2)
    viewer.camera.center = (0.0, *centre)
    viewer.camera.zoom = viewer.camera.zoom * zoom


def make_viewer(docks_for: dict):
    import napari

    viewer = napari.Viewer(show=True, title="napari-bulbseg")
    viewer.window._qt_window.resize(*WINDOW)
    # open every dock as a user does: Plugins ▸ napari-bulbseg ▸ <name>
    plugin_menu = next(
        a.menu() for a in viewer.window.plugins_menu.actions() if a.text() == "napari-bulbseg"
    )
    actions = {a.text().replace("&&", "&"): a for a in plugin_menu.actions()}
    from qtpy.QtWidgets import QApplication

    for title in docks_for.values():
        actions[f"{title} (napari-bulbseg)"].trigger()
    for _ in range(20):  # the docks stack as tabs on the next turns of the event loop
        QApplication.processEvents()
    widgets, docks = {}, {}
    for k, title in docks_for.items():
        # already docked by the menu action: napari hands back the same dock and widget
        docks[k], widgets[k] = viewer.window.add_plugin_dock_widget("napari-bulbseg", title)
    return viewer, widgets, docks


def show_only(docks: dict, name: str, viewer=None) -> None:
    """Bring one dock's tab to the front, as a click on its tab does; with ``viewer``, fit the
    image to the canvas that is left."""
    from qtpy.QtWidgets import QApplication

    docks[name].show()
    docks[name].raise_()
    if viewer is not None:
        viewer.window._qt_window.resize(*WINDOW)
        for _ in range(20):
            QApplication.processEvents()
        viewer.reset_view()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150, help="steps for the bulb starting model")
    args = ap.parse_args()
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        os.environ.pop("QT_QPA_PLATFORM")
    os.environ["NAPARI_BULBSEG_HOME"] = tempfile.mkdtemp(prefix="bulbseg-shots-")
    OUT.mkdir(parents=True, exist_ok=True)

    from qtpy.QtWidgets import QApplication

    from napari_bulbseg._widgets._models import BUNDLED
    from napari_bulbseg._widgets._session import get_session
    from napari_bulbseg.postprocess import DIFF_FN, DIFF_FP

    panels = {
        "segment": "Segment",
        "threshold": "Threshold & objects",
        "review": "Review & correct",
        "finetune": "Fine-tune",
    }

    # ---------------------------------------------------------------- the bundled model on BBBC039
    viewer, widgets, docks = make_viewer(panels)
    qapp = QApplication.instance()
    viewer.open_sample("napari-bulbseg", "bbbc039")
    gt = viewer.layers["bbbc039 ground truth"]
    gt.visible = False
    s = get_session(viewer)

    # 1. segment with the bundled default model (the first choice on a fresh install)
    seg = widgets["segment"]
    show_only(docks, "segment", viewer)
    assert seg.model.value.kind == BUNDLED, seg.model.value
    seg.run()
    wait(qapp, lambda: not seg.running)
    wait(qapp, lambda: not s.busy)
    shot(viewer, "01-segment")

    # 2. threshold & objects: the model's threshold, fill holes, drop specks
    thr = widgets["threshold"]
    show_only(docks, "threshold", viewer)
    thr.min_size.value = 30
    thr.fill.value = True
    wait(qapp, lambda: not s.busy)
    s.pred_layer.contour = 2  # outlines: the threshold moves the nuclei's edges
    s.pred_layer.opacity = 1.0
    zoom_on(viewer, s.pred_layer.data[s.displayed()] > 0, zoom=2.0, block=256)
    thr._update_flags()
    shot(viewer, "02-threshold")
    s.pred_layer.contour, s.pred_layer.opacity = 0, 0.45

    # 3. review against the ground truth on the slice with the most errors, zoomed on them
    rev = widgets["review"]
    show_only(docks, "review", viewer)
    rev.reference.value = gt
    worst = int(np.argmax([m.pixel_error for m in rev_metrics(rev, qapp)]))
    viewer.dims.set_point(0, worst)
    wait(qapp, lambda: not rev._slice_timer.isActive())
    diff = viewer.layers["bbbc039 difference"].data[worst]
    zoom_on(viewer, (diff == DIFF_FP) | (diff == DIFF_FN), zoom=2.0, block=200)
    viewer.layers.selection.active = viewer.layers["bbbc039 difference"]
    shot(viewer, "03-review")
    viewer.close()

    # ---------------------------------------------------------------- bulbs: correct, fine-tune
    version = starting_model(args.steps)
    viewer, widgets, docks = make_viewer(panels)
    viewer.open_sample("napari-bulbseg", "bulb_phantom")
    gt = viewer.layers["bulb phantom ground truth"]
    gt.visible = False
    s = get_session(viewer)
    seg = widgets["segment"]
    seg.select_version(version)
    seg.run()
    wait(qapp, lambda: not seg.running)
    wait(qapp, lambda: not s.busy)

    # 4. corrections, following the correct-next queue: show the top slice, paint the truth
    #    into it, "Reviewed → next to correct" — six times, as a user would
    rev = widgets["review"]
    show_only(docks, "review", viewer)
    corr = rev.start_corrections()
    wait(qapp, lambda: not rev.queue.busy and rev.queue.count() > 0)
    first_rank = [sc.index for sc in rev.queue.ranked()]
    print("queue before corrections:", first_rank)
    rev.goto_btn.native.click()
    for _ in range(6):
        z = s.displayed()
        idx = np.nonzero(corr.data[z] != gt.data[z])
        corr.data_setitem((np.full(idx[0].shape, z), *idx), gt.data[z][idx])
        rev.next_btn.native.click()
    print("reviewed:", sorted(s.reviewed))
    wait(qapp, lambda: rev.corrections.saver is not None and rev.corrections.saver.idle)
    rev_metrics(rev, qapp)
    rev._sync_reviewed()
    shot(viewer, "04-corrections")

    # 5. fine-tune on the reviewed slices; the new version re-predicts the stack (next round)
    ft = widgets["finetune"]
    show_only(docks, "finetune")
    ft.epochs.value, ft.steps.value, ft.patch.value = 4, 10, 128
    t0 = time.perf_counter()
    ft.start()
    wait(qapp, lambda: not ft.running)
    print(f"fine-tune took {time.perf_counter() - t0:.0f} s:", ft.result_lbl.value)
    wait(qapp, lambda: not seg.running)
    wait(qapp, lambda: not s.busy and not rev.queue.busy)
    corr.visible = False
    rev.reference.value = gt
    rev_metrics(rev, qapp)
    # the re-prediction on a slice nobody corrected: the one with the most bulb in the truth
    unreviewed = [z for z in range(gt.data.shape[0]) if z not in s.reviewed]
    z_show = max(unreviewed, key=lambda z: int((gt.data[z] > 0).sum()))
    viewer.dims.set_point(0, z_show)
    wait(qapp, lambda: not rev._slice_timer.isActive() and rev._stack_worker is None)
    print(rev.slice_lbl.value, "|", rev.summary_lbl.value)
    print("queue after the round:", [sc.index for sc in rev.queue.ranked()])
    shot(viewer, "05-finetune")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
