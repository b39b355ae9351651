"""Threshold & Review widgets on a seeded probability cache (no network), plus autosave restore."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from conftest import open_dock
from napari_bulbseg.metrics import slice_metrics
from napari_bulbseg.postprocess import (
    DIFF_FN,
    DIFF_FP,
    PostProcess,
    difference_map,
    postprocess_slice,
)

pytestmark = pytest.mark.gui


def _phantom_viewer(make_napari_viewer, n=4, shape=(96, 96)):
    from napari_bulbseg._sample_data import bulb_phantom_sample

    viewer = make_napari_viewer()
    for data, meta, kind in bulb_phantom_sample(n_slices=n, shape=shape, seed=3):
        getattr(viewer, f"add_{kind}")(data, **meta)
    return viewer


def _seed(viewer, image_name="bulb phantom"):
    """Fill the session's cache with a smooth 'probability' derived from the ground truth."""
    from scipy import ndimage as ndi

    from napari_bulbseg._widgets._session import get_session

    s = get_session(viewer)
    gt = viewer.layers[image_name + " ground truth"].data
    _, prob = s.begin_prediction(viewer.layers[image_name])
    for z in range(gt.shape[0]):
        prob[z] = np.clip(ndi.gaussian_filter(gt[z].astype(np.float32), 3), 0, 1)
        s.slice_predicted(z)
    return s, gt


def test_threshold_review_corrections_autosave(make_napari_viewer, qtbot, bulbseg_home):

    viewer = _phantom_viewer(make_napari_viewer)
    tw = open_dock(viewer, "Threshold & objects")
    rw = open_dock(viewer, "Review & correct")
    s, gt = _seed(viewer)
    qtbot.waitUntil(lambda: not s.busy, timeout=5000)
    pred = s.pred_layer
    z = s.displayed()
    assert z == viewer.dims.current_step[0]
    for k in range(gt.shape[0]):
        np.testing.assert_array_equal(pred.data[k], postprocess_slice(s.prob[k], s.spec))

    # --- slider: the displayed slice changes at once, others after the background pass
    before = pred.data.copy()
    tw.threshold.value = 0.8
    assert s.spec == PostProcess(threshold=0.8)
    np.testing.assert_array_equal(pred.data[z], postprocess_slice(s.prob[z], s.spec))
    assert pred.data[z].sum() < before[z].sum()  # a higher threshold shrinks the mask
    qtbot.waitUntil(lambda: not s.busy, timeout=5000)
    for k in range(gt.shape[0]):
        np.testing.assert_array_equal(pred.data[k], postprocess_slice(s.prob[k], s.spec))

    # --- object prior: 0 objects allowed flags every slice with a bulb
    tw.expected.value = 1
    tw.min_size.value = 1
    qtbot.waitUntil(lambda: not s.busy and len(s.counts) == gt.shape[0], timeout=5000)
    tw._update_flags()
    n_obj = [int(c) for _, c in sorted(s.counts.items())]
    assert s.violations == [k for k, c in enumerate(n_obj) if c > 1]

    # --- review against ground truth: XOR layer and metrics follow the threshold
    rw.reference.value = viewer.layers["bulb phantom ground truth"]
    qtbot.waitUntil(lambda: rw.stack_result is not None, timeout=5000)
    diff = viewer.layers["bulb phantom difference"]
    np.testing.assert_array_equal(diff.data, difference_map(gt, pred.data))
    cmap = diff.colormap
    assert not np.allclose(cmap.map(DIFF_FP), cmap.map(DIFF_FN))
    tw.threshold.value = 0.2
    want = difference_map(gt[z], postprocess_slice(s.prob[z], s.spec))
    qtbot.waitUntil(lambda: np.array_equal(diff.data[z], want), timeout=3000)
    m = slice_metrics(gt[z], pred.data[z], index=z)
    assert f"Dice {m.dice:.3f}" in rw.slice_lbl.value  # pixel metrics: at once
    row = rw.table._rows[z]  # object counts: from a worker, equal to the synchronous metrics
    cells = lambda: [rw.table.item(row, c).text() for c in (1, 4, 5, 6)]  # noqa: E731
    want = [f"{m.dice:.3f}", str(m.hits), str(m.misses), str(m.false_positives)]
    qtbot.waitUntil(lambda: cells() == want, timeout=5000)

    # --- corrections: a copy of the prediction; painting updates metrics; undo works
    corr = rw.start_corrections()
    assert corr is s.corr_layer and rw.reference.value is corr
    np.testing.assert_array_equal(corr.data, pred.data)
    qtbot.waitUntil(lambda: "Dice 1.000" in rw.slice_lbl.value, timeout=3000)
    idx = np.nonzero(np.ones((10, 10), bool))
    corr.data_setitem((np.full(100, z), idx[0] + 2, idx[1] + 2), 1)  # background corner
    qtbot.waitUntil(lambda: "Dice 1.000" not in rw.slice_lbl.value, timeout=3000)
    m = slice_metrics(corr.data[z], pred.data[z], index=z)
    assert m.fn == 100 and f"Dice {m.dice:.3f}" in rw.slice_lbl.value
    painted = corr.data.copy()
    corr.undo()
    np.testing.assert_array_equal(corr.data, pred.data)
    corr.redo()
    np.testing.assert_array_equal(corr.data, painted)

    # --- reviewed flags + autosave
    rw.reviewed.value = True
    assert s.reviewed == {z}
    saver = rw.corrections.saver
    qtbot.waitUntil(lambda: saver.saves > 0 and saver.idle, timeout=5000)
    mask, reviewed = saver.store.load()
    np.testing.assert_array_equal(mask, painted)
    assert reviewed == {z}

    # --- threshold from the reviewed slices (sweep vs corrections)
    t = tw.suggest_from_reviewed()
    assert t is not None and 0 < t < 1 and tw.threshold.value == pytest.approx(t)

    # --- export CSV
    qtbot.waitUntil(
        lambda: not rw._stack_timer.isActive() and rw._stack_worker is None, timeout=5000
    )
    out = rw.export_csv(bulbseg_home / "m.csv")
    assert out.read_text().count("\n") >= 2

    # --- a fresh viewer with the same image is offered the saved corrections
    viewer2 = _phantom_viewer(make_napari_viewer)
    rw2 = open_dock(viewer2, "Review & correct")
    assert rw2.corrections.offer is viewer2.layers["bulb phantom"]
    assert not rw2.restore_btn.native.isHidden()
    restored = rw2.restore()
    np.testing.assert_array_equal(restored.data, painted)
    from napari_bulbseg._widgets._session import get_session

    assert get_session(viewer2).reviewed == {z}


def test_fast_slice_redraw_matches_full_refresh(make_napari_viewer, qtbot):
    """The slider's partial redraw (napari internals) must show exactly what refresh() shows."""
    from napari_bulbseg._widgets._session import get_session

    viewer = make_napari_viewer(show=True)
    yy, xx = np.mgrid[:128, :128]
    prob = np.clip(1 - np.hypot(yy - 64, xx - 64) / 64, 0, 1).astype(np.float16)
    viewer.add_image(np.zeros((3, 128, 128), np.uint8), name="img")
    s = get_session(viewer)
    _, cache = s.begin_prediction(viewer.layers["img"])
    cache[:] = prob
    for z in range(3):
        s.slice_predicted(z)
    viewer.dims.set_point(0, 1)
    tw = open_dock(viewer, "Threshold & objects")
    shots = []
    for t in (0.9, 0.3):
        tw.threshold.value = t
        qtbot.wait(50)
        fast = viewer.screenshot(canvas_only=True, flash=False)
        s.pred_layer.refresh()
        qtbot.wait(50)
        shots.append(fast)
        np.testing.assert_array_equal(fast, viewer.screenshot(canvas_only=True, flash=False))
    assert not np.array_equal(shots[0], shots[1])  # the mask really changed on screen
