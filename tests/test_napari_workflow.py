"""End to end in a real viewer: reader → predict → threshold → correct → fine-tune → re-predict.

Uses a tiny untrained U-Net and a small synthetic bulb stack so the whole flow stays fast.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from conftest import open_dock
from napari_bulbseg import io
from napari_bulbseg.postprocess import difference_map, postprocess_slice

pytestmark = pytest.mark.gui


def _open_phantom(viewer, tmp_path, n=4, shape=(64, 64)):
    from napari_bulbseg.phantom import bulb_phantom

    image, mask = bulb_phantom(n_slices=n, shape=shape, seed=2)
    path = io.write_tiff(tmp_path / "bulbs.tif", image, pixel_size=(0.8, 0.8))
    io.write_mask(tmp_path / "bulbs_mask.tif", mask)
    viewer.open(str(path), plugin="napari-bulbseg")
    return viewer.layers["bulbs"], viewer.layers["bulbs ground truth"]


def _segment(viewer, folder):
    from napari_bulbseg._widgets._models import FOLDER

    w = open_dock(viewer, "Segment")
    w.model.value = next(c for c in w.model.choices if c.kind == FOLDER)
    w.folder.value = folder
    w.tile.value, w.overlap.value = 64, 8
    return w


def test_workflow_end_to_end(make_napari_viewer, qtbot, tmp_path, tiny_model_dir, bulbseg_home):
    from napari_bulbseg._widgets._models import get_registry
    from napari_bulbseg._widgets._session import get_session

    viewer = make_napari_viewer()
    image, gt = _open_phantom(viewer, tmp_path)
    assert image.scale[1:] == pytest.approx((0.8, 0.8))
    viewer.dims.set_point(0, 2.0)  # look at slice 2: it is predicted first
    seg = _segment(viewer, tiny_model_dir)
    s = get_session(viewer)
    order = []
    s.events.prediction_updated.connect(order.append)
    seg.run()
    qtbot.waitUntil(lambda: not seg.running, timeout=30000)
    assert order[0] == 2
    assert s.done.all() and s.prob.dtype == np.float16
    assert all(s.prob[z].std() > 0 for z in range(4))
    qtbot.waitUntil(lambda: not s.busy, timeout=5000)
    pred = s.pred_layer
    assert pred.data.shape == gt.data.shape and pred.scale[1:] == pytest.approx((0.8, 0.8))

    # --- slider → the displayed slice follows at once; XOR layer follows the prediction
    tw = open_dock(viewer, "Threshold & objects")
    rw = open_dock(viewer, "Review & correct")
    rw.reference.value = gt
    t = float(np.median(s.prob[2]))
    tw.threshold.value = round(t, 2)
    np.testing.assert_array_equal(pred.data[2], postprocess_slice(s.prob[2], s.spec))
    diff = viewer.layers["bulbs difference"]
    want = difference_map(gt.data[2], pred.data[2])
    qtbot.waitUntil(lambda: np.array_equal(diff.data[2], want), timeout=3000)

    # --- corrections on slices 0..3 = the ground truth; all reviewed
    corr = rw.start_corrections()
    idx = np.nonzero(gt.data != corr.data)
    corr.data_setitem(idx, gt.data[idx])
    np.testing.assert_array_equal(corr.data, gt.data)
    for k in range(4):
        s.set_reviewed(k, True)

    # --- fine-tune a few steps → a new registry version, current, loaded in the session
    ft = open_dock(viewer, "Fine-tune")
    ft.epochs.value, ft.steps.value, ft.patch.value = 1, 2, 32
    ft.then_predict.value = False  # this test re-predicts itself (or not at all)
    ft.only_better.value = False  # two steps need not beat the base; this test follows the loop
    ft.start()
    qtbot.waitUntil(lambda: not ft.running, timeout=60000)
    assert ft.result is not None, ft.status.value
    reg = get_registry()
    assert reg.current() == ft.result.version_id == s.model_version
    assert len(ft.plot.loss) == 2 and len(ft.plot.dice) == 1
    assert "Validation Dice" in ft.result_lbl.value

    # --- re-predict with the new model through the Segment widget
    old = s.prob.copy()
    ft.repredict()
    qtbot.waitUntil(lambda: not seg.running and s.done.all(), timeout=30000)
    assert seg.model.value.version == ft.result.version_id
    assert not np.array_equal(old, s.prob)


def test_our_layers_carry_the_image_units(
    make_napari_viewer, qtbot, tmp_path, tiny_model_dir, bulbseg_home, monkeypatch
):
    """An image in µm: prediction, probability, difference and corrections are in µm too,
    so napari keeps the units (and does not warn "Inconsistent units across layers")."""
    from napari.utils.notifications import notification_manager

    from napari_bulbseg._widgets._session import get_session

    seen = []
    monkeypatch.setattr(notification_manager, "dispatch", lambda n: seen.append(str(n.message)))
    viewer = make_napari_viewer()
    image, gt = _open_phantom(viewer, tmp_path)
    assert [str(u) for u in image.units] == ["micrometer"] * 3
    seg = _segment(viewer, tiny_model_dir)
    s = get_session(viewer)
    seg.run_btn.native.click()
    qtbot.waitUntil(lambda: not seg.running, timeout=30000)
    qtbot.waitUntil(lambda: s.prob_layer is not None, timeout=5000)  # added a turn later
    rw = open_dock(viewer, "Review & correct")
    rw.reference.value = gt
    rw.start_btn.native.click()
    ours = [s.pred_layer, s.prob_layer, s.corr_layer, viewer.layers["bulbs difference"], gt]
    assert all(layer is not None for layer in ours)
    for layer in ours:
        assert layer.units == image.units, layer.name
        assert layer.scale == pytest.approx(image.scale), layer.name
    assert viewer.layers.extent.units == image.units
    viewer.window._qt_viewer.canvas.native.repaint()  # napari checks the units when it draws
    assert not [m for m in seen if "Inconsistent units" in m]


def test_review_shows_no_stale_metrics_and_warns_once(
    make_napari_viewer, qtbot, tmp_path, tiny_model_dir, bulbseg_home, monkeypatch
):
    from napari_bulbseg._widgets import _review
    from napari_bulbseg._widgets._session import get_session
    from napari_bulbseg.phantom import bulb_phantom

    warned = []
    monkeypatch.setattr(_review, "show_warning", warned.append)
    viewer = make_napari_viewer()
    for name, shape in (("a", (64, 64)), ("b", (48, 48))):
        image, mask = bulb_phantom(n_slices=3, shape=shape, seed=2)
        io.write_tiff(tmp_path / f"{name}.tif", image, pixel_size=(0.8, 0.8))
        io.write_mask(tmp_path / f"{name}_mask.tif", mask)
        viewer.open(str(tmp_path / f"{name}.tif"), plugin="napari-bulbseg")
    seg = _segment(viewer, tiny_model_dir)
    s = get_session(viewer)
    rw = open_dock(viewer, "Review & correct")

    def settled():
        return (
            not seg.running
            and not s.busy
            and rw._stack_worker is None
            and (not rw._stack_timer.isActive() and not rw._slice_timer.isActive())
        )

    seg.image.value = viewer.layers["a"]
    seg.run_btn.native.click()
    qtbot.waitUntil(settled, timeout=30000)
    rw.reference.value = viewer.layers["a ground truth"]
    qtbot.waitUntil(lambda: settled() and rw.stack_result is not None, timeout=30000)
    assert rw.summary_lbl.value and rw.table.rowCount() == 3

    # clearing the reference clears what was computed against it
    rw.reference.value = None
    qtbot.waitUntil(settled, timeout=30000)
    assert (rw.summary_lbl.value, rw.table.rowCount(), rw.stack_result) == ("", 0, None)

    # segmenting another image (another shape) against a's reference: one warning, no old table
    rw.reference.value = viewer.layers["a ground truth"]
    qtbot.waitUntil(lambda: settled() and rw.stack_result is not None, timeout=30000)
    seg.image.value = viewer.layers["b"]
    seg.run_btn.native.click()
    qtbot.waitUntil(lambda: settled() and s.image_name == "b" and s.done.all(), timeout=30000)
    assert len(warned) == 1, warned
    assert (rw.summary_lbl.value, rw.table.rowCount(), rw.stack_result) == ("", 0, None)


def test_cancel_prediction_and_finetune(
    make_napari_viewer, qtbot, tmp_path, tiny_model_dir, bulbseg_home
):
    from napari_bulbseg._widgets._models import get_registry
    from napari_bulbseg._widgets._session import get_session

    viewer = make_napari_viewer()
    _open_phantom(viewer, tmp_path, n=12, shape=(128, 128))
    seg = _segment(viewer, tiny_model_dir)
    s = get_session(viewer)
    seg.run()
    qtbot.waitUntil(lambda: s.done is not None and s.done.any(), timeout=30000)
    seg.cancel()
    qtbot.waitUntil(lambda: not seg.running, timeout=10000)
    assert "cancelled" in seg.status.value and not s.done.all()

    # fine-tune: cancel after the first step; nothing is saved
    corr = s.corrections.start()
    for k in np.flatnonzero(s.done):
        s.set_reviewed(int(k), True)
    s.set_reviewed(int(np.flatnonzero(s.done)[0]) + 1, True)  # need two samples
    assert corr is not None
    ft = open_dock(viewer, "Fine-tune")
    ft.epochs.value, ft.steps.value, ft.patch.value = 50, 50, 32
    ft.then_predict.value = False  # this test re-predicts itself (or not at all)
    ft.start()
    qtbot.waitUntil(lambda: len(ft.plot.loss) > 0, timeout=30000)
    ft.cancel()
    qtbot.waitUntil(lambda: not ft.running, timeout=10000)
    assert ft.result is None and "cancelled" in ft.status.value
    assert [v.id for v in get_registry().list_versions(include_bundled=False)] == []


def _finetune_round(viewer, qtbot, ft, s):
    ft.epochs.value, ft.steps.value, ft.patch.value = 1, 2, 32
    ft.then_predict.value = False  # this test re-predicts itself (or not at all)
    ft.only_better.value = False  # rounds of two steps need not beat their base
    ft.start()
    qtbot.waitUntil(lambda: not ft.running, timeout=60000)
    assert ft.result is not None, ft.status.value
    return ft.result.version_id


@pytest.mark.slow
def test_rollback_after_finetune(make_napari_viewer, qtbot, tmp_path, bulbseg_home):
    """Bundled model → v001 → v002; Roll back twice: v001, then the bundled model again."""
    from napari_bulbseg._widgets._models import BUNDLED, FOLDER, VERSION, get_registry
    from napari_bulbseg._widgets._session import get_session
    from napari_bulbseg.model import bundled_model_dir

    viewer = make_napari_viewer()
    _, gt = _open_phantom(viewer, tmp_path)
    seg = open_dock(viewer, "Segment")
    assert seg.model.value.kind == BUNDLED  # a fresh install starts from the bundled model
    seg.tile.value, seg.overlap.value = 64, 8
    s = get_session(viewer)
    seg.run()
    qtbot.waitUntil(lambda: not seg.running and s.done is not None and s.done.all(), timeout=30000)
    assert s.model_version == "bundled"
    corr = s.corrections.start()
    idx = np.nonzero(gt.data != corr.data)
    corr.data_setitem(idx, gt.data[idx])
    for k in range(gt.data.shape[0]):
        s.set_reviewed(k, True)

    ft = open_dock(viewer, "Fine-tune")
    reg = get_registry()
    v1 = _finetune_round(viewer, qtbot, ft, s)
    assert reg.info(v1).parent.startswith("bundled:")
    # the new version is listed first, "Model folder…" stays last
    assert [(c.kind, c.version) for c in seg.model.choices] == [
        (VERSION, v1),
        (BUNDLED, "bundled"),
        (FOLDER, None),
    ]
    v2 = _finetune_round(viewer, qtbot, ft, s)
    assert reg.info(v2).parent == v1
    assert reg.current() == v2 == s.model_version
    assert (seg.model.value.kind, seg.model.value.version) == (VERSION, v2)
    assert [c.version for c in seg.model.choices] == [v2, v1, "bundled", None]

    ft.rollback_btn.native.click()
    assert reg.current() == v1 == s.model_version
    assert (seg.model.value.kind, seg.model.value.version) == (VERSION, v1)
    assert [c.version for c in seg.model.choices] == [v1, v2, "bundled", None]
    assert "(current)" in seg.model.value.label
    assert s.loaded.path.resolve() == reg.path_of(v1).resolve()
    assert v1 in ft.result_lbl.value

    ft.rollback_btn.native.click()
    assert reg.current() == "bundled" == s.model_version
    assert seg.model.value.kind == BUNDLED and "(current)" in seg.model.value.label
    assert s.loaded.path.resolve() == bundled_model_dir().resolve()
    # nothing was deleted: both fine-tuned versions can still be picked
    assert {c.version for c in seg.model.choices if c.kind == VERSION} == {v1, v2}

    # re-predict runs with the rolled-back (bundled) model
    ft.repredict()
    qtbot.waitUntil(lambda: not seg.running and s.done.all(), timeout=30000)
    assert seg.model.value.kind == BUNDLED and s.model_version == "bundled"
