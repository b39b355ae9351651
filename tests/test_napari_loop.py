"""The human-in-the-loop without surprises: a new model keeps the user's rules, untouched
corrections follow the new prediction, and nothing painted is lost when the viewer closes."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from conftest import open_dock
from napari_bulbseg import io

pytestmark = pytest.mark.gui


def _model(tmp_path, name, threshold, shift=0.0):
    """A seeded untrained U-Net; ``shift`` raises its output logits (more foreground)."""
    import torch

    from napari_bulbseg.model import ModelCard, UNet, UNetConfig, save_model

    torch.manual_seed(0)
    net = UNet(UNetConfig(1, 1, 8, 3))
    name_b, bias = list(net.named_parameters())[-1]
    assert name_b.endswith("bias")
    with torch.no_grad():
        bias += shift
    return save_model(tmp_path / name, net, ModelCard(name=name, threshold=threshold))


def _open_bulbs(viewer, tmp_path, n=4, shape=(64, 64)):
    from napari_bulbseg.phantom import bulb_phantom

    image, mask = bulb_phantom(n_slices=n, shape=shape, seed=2)
    path = io.write_tiff(tmp_path / "bulbs.tif", image)
    io.write_mask(tmp_path / "bulbs_mask.tif", mask)
    viewer.open(str(path), plugin="napari-bulbseg")
    return viewer.layers["bulbs"]


def _segment_with(seg, qtbot, s, model_dir):
    from napari_bulbseg._widgets._models import FOLDER

    seg.model.value = next(c for c in seg.model.choices if c.kind == FOLDER)
    seg.folder.value = model_dir
    seg.tile.value, seg.overlap.value = 64, 8
    seg.run()
    qtbot.waitUntil(lambda: not seg.running and s.done is not None and s.done.all(), timeout=30000)
    qtbot.waitUntil(lambda: not s.busy, timeout=5000)
    s.flush()


def _corrected_bulbs(viewer, qtbot, tmp_path, n=6, shift=0.0):
    """Open a bulb stack, segment it with an untrained model, start corrections and copy the
    ground truth into them (the model's mask is uninformative); returns the session and docks."""
    from napari_bulbseg._widgets._session import get_session

    _open_bulbs(viewer, tmp_path, n=n)
    s = get_session(viewer)
    seg = open_dock(viewer, "Segment")
    rw = open_dock(viewer, "Review & correct")
    ft = open_dock(viewer, "Fine-tune")
    _segment_with(seg, qtbot, s, _model(tmp_path, "a", threshold=0.5, shift=shift))
    rw.start_corrections()
    gt, corr = viewer.layers["bulbs ground truth"], s.corrections.layer
    idx = np.nonzero(gt.data != corr.data)
    corr.data_setitem(idx, gt.data[idx])
    return s, seg, rw, ft


def test_new_model_keeps_rules_and_untouched_corrections_follow(
    make_napari_viewer, qtbot, tmp_path, bulbseg_home
):
    from napari_bulbseg._widgets._session import get_session

    viewer = make_napari_viewer()
    _open_bulbs(viewer, tmp_path)
    s = get_session(viewer)
    seg = open_dock(viewer, "Segment")
    tw = open_dock(viewer, "Threshold & objects")
    rw = open_dock(viewer, "Review & correct")
    _segment_with(seg, qtbot, s, _model(tmp_path, "a", threshold=0.5))
    assert s.spec.threshold == pytest.approx(0.5)  # the first model's suggestion, unasked

    # the user's rules: their own threshold and keep-1
    t_user = round(float(np.median(s.prob[0])), 2)
    tw.threshold.value = t_user
    tw.keep.value = 1
    qtbot.waitUntil(lambda: not s.busy, timeout=5000)
    s.flush()

    corr = rw.start_corrections()
    viewer.dims.set_point(0, 1)
    painted = np.zeros(corr.data.shape[1:], np.uint8)
    painted[5:20, 5:20] = 1
    yx = np.nonzero(np.ones(painted.shape, bool))
    corr.data_setitem((np.full(yx[0].shape, 1), *yx), painted[yx])  # a brush stroke on slice 1
    s.set_reviewed(2, True)  # slice 2: accepted as it is
    reviewed2 = np.array(corr.data[2], copy=True)
    old_pred = np.array(s.pred_layer.data, copy=True)

    # --- a new model (as after fine-tuning) with another suggested threshold
    _segment_with(seg, qtbot, s, _model(tmp_path, "b", threshold=0.3, shift=0.05))
    assert s.spec.threshold == pytest.approx(t_user) and s.spec.keep_largest == 1
    assert tw.threshold.value == pytest.approx(t_user) and tw.keep.value == 1
    assert "0.30" in tw.card_lbl.value  # the suggestion is offered, not imposed
    new_pred = np.asarray(s.pred_layer.data)
    assert not np.array_equal(new_pred[[0, 3]], old_pred[[0, 3]])  # the models differ
    for z in (0, 3):  # never touched, not reviewed: follow the new prediction
        np.testing.assert_array_equal(corr.data[z], new_pred[z])
    np.testing.assert_array_equal(corr.data[1], painted)  # painted: kept
    np.testing.assert_array_equal(corr.data[2], reviewed2)  # reviewed: kept

    # "Model's suggestion" applies the card's threshold when the user asks
    tw.card_btn.native.click()
    assert s.spec.threshold == pytest.approx(0.3)


@pytest.mark.parametrize("how", ["close viewer", "remove layer"])
def test_stroke_just_before_close_is_saved(make_napari_viewer, qtbot, tmp_path, bulbseg_home, how):
    from napari_bulbseg._widgets._autosave import CorrectionStore
    from napari_bulbseg._widgets._session import get_session

    viewer = make_napari_viewer()
    image = _open_bulbs(viewer, tmp_path)
    s = get_session(viewer)
    seg = open_dock(viewer, "Segment")
    rw = open_dock(viewer, "Review & correct")
    _segment_with(seg, qtbot, s, _model(tmp_path, "a", threshold=0.5))
    corr = rw.start_corrections()
    saver = rw.corrections.saver
    qtbot.waitUntil(lambda: saver.idle, timeout=5000)
    store = CorrectionStore(image.name, image.data.shape, image.metadata.get("bulbseg_path"))
    viewer.dims.set_point(0, 3)
    stroke = np.zeros(corr.data.shape[1:], np.uint8)
    stroke[30:40, 30:40] = 1
    idx = np.nonzero(stroke)
    new = (1 - corr.data[3][idx]).astype(np.uint8)  # every pixel of the dab changes
    corr.data_setitem((np.full(idx[0].shape, 3), *idx), new)  # autosave still pending
    assert not saver.idle
    if how == "close viewer":
        viewer.close()
    else:
        viewer.layers.remove(corr)
    mask, _ = store.load()
    np.testing.assert_array_equal(mask[3][idx], new)  # the stroke is on disk


def test_finetune_says_what_it_will_train_on(make_napari_viewer, qtbot, tmp_path, bulbseg_home):
    viewer = make_napari_viewer()
    s, _seg, _rw, ft = _corrected_bulbs(viewer, qtbot, tmp_path)
    assert ft.budget.value > 0  # a time budget by default
    s.set_reviewed(0, True)
    assert "review one more" in ft.ready_lbl.value  # the panel and the button agree
    ft.start()
    assert not ft.running and ft.result is None
    for z in range(1, 6):
        s.set_reviewed(z, True)
    assert "6 reviewed slice(s) ready" in ft.ready_lbl.value
    ft.epochs.value, ft.steps.value, ft.patch.value = 1, 1, 32
    ft.then_predict.value = False  # this test re-predicts itself (or not at all)
    said: list[str] = []  # every status line, however soon the next event replaces it
    shown = ft._on_progress

    def record(ev):
        shown(ev)
        said.append(str(ft.status.value))

    ft._on_progress = record
    ft.start()  # the split is worked out in the worker and said before the first step
    qtbot.waitUntil(lambda: any("held out" in m for m in said) or not ft.running, timeout=30000)
    msg = next((m for m in said if "held out" in m), " | ".join(said))
    assert "held out to validate" in msg
    n_train = int(msg.split("Fine-tuning on ")[1].split(" ")[0])
    n_val = int(msg.split("; ")[1].split(" ")[0])
    assert n_train + n_val == 6 and n_val >= 1 and n_train >= 1
    qtbot.waitUntil(lambda: not ft.running, timeout=60000)
    assert ft.result is not None, ft.status.value


def test_start_from_new_weights_is_what_the_version_records(
    make_napari_viewer, qtbot, tmp_path, bulbseg_home
):
    """Start from "new weights", chosen in the dock's combo box, trains new weights of the base's
    shape (no trial of two starts) and the new version's card says so."""
    from napari_bulbseg._widgets._models import get_registry

    viewer = make_napari_viewer()
    s, _seg, _rw, ft = _corrected_bulbs(viewer, qtbot, tmp_path)
    for z in range(6):
        s.set_reviewed(z, True)
    assert ft.start_from.value == "auto"  # the default
    assert "Dice 0.5" in ft.start_from.native.toolTip()  # says what auto does
    box = ft.start_from.native
    box.setCurrentIndex(box.findText("new weights"))  # as a click on the list would
    assert ft.start_from.value == "scratch"
    ft.epochs.value, ft.steps.value, ft.patch.value = 1, 1, 32
    ft.only_better.value, ft.then_predict.value = False, False
    ft.start()
    qtbot.waitUntil(lambda: not ft.running, timeout=60000)
    assert ft.result is not None, ft.status.value
    training = get_registry().load(ft.result.version_id).card.training
    assert training["start"] == {"mode": "scratch"}  # fixed by the user: no automatic trial
    assert training["from_scratch"] is True and training["refining"] is False
    assert ft.result.card.parent.startswith("a@")  # still a fine-tune of the session's model


def test_a_version_that_is_not_better_is_saved_but_not_made_current(
    make_napari_viewer, qtbot, tmp_path, bulbseg_home, monkeypatch
):
    import napari_bulbseg.training as training
    from napari_bulbseg._widgets._models import get_registry

    # every new model now counts as "finds nothing": the widget must keep the user's model
    monkeypatch.setattr(training, "MIN_USEFUL_DICE", 1.01)
    viewer = make_napari_viewer()
    s, _seg, _rw, ft = _corrected_bulbs(viewer, qtbot, tmp_path)
    for z in range(6):
        s.set_reviewed(z, True)
    loaded, version = s.loaded, s.model_version
    assert ft.only_better.value  # the default
    ft.epochs.value, ft.steps.value, ft.patch.value = 1, 1, 32
    ft.then_predict.value = False  # this test re-predicts itself (or not at all)
    ft.start()
    qtbot.waitUntil(lambda: not ft.running, timeout=60000)
    result = ft.result
    assert result is not None and not result.made_current, ft.status.value
    assert s.loaded is loaded and s.model_version == version  # the session kept its model
    reg = get_registry()
    assert reg.current() != result.version_id
    assert result.version_id in [v.id for v in reg.list_versions(include_bundled=False)]
    assert "not made current" in ft.result_lbl.value and "finds next to nothing" in result.verdict
    assert not ft.repredict_btn.enabled
    accepted = reg.load(result.version_id).card.training["accepted"]
    assert accepted["current"] is False and "Dice" in accepted["reason"]


def test_fine_tune_after_restoring_corrections_needs_no_segmentation(
    make_napari_viewer, qtbot, tmp_path, bulbseg_home
):
    """Reopen an image, restore its autosaved corrections, fine-tune: the current model is the
    base; the stack is not predicted again first."""
    from napari_bulbseg._widgets._corrections import store_for
    from napari_bulbseg._widgets._session import get_session
    from napari_bulbseg.phantom import bulb_phantom

    viewer = make_napari_viewer()
    image = _open_bulbs(viewer, tmp_path, n=6)
    _, truth = bulb_phantom(n_slices=6, shape=(64, 64), seed=2)
    store_for(image).save(truth.astype(np.uint8), {1, 2, 3, 4})  # an earlier session's work
    viewer.layers.remove(image)
    image = _open_bulbs(viewer, tmp_path, n=6)  # reopened: the offer appears
    s = get_session(viewer)
    rw = open_dock(viewer, "Review & correct")
    ft = open_dock(viewer, "Fine-tune")
    assert not rw.restore_btn.native.isHidden()
    rw.restore_btn.native.click()
    assert s.reviewed == {1, 2, 3, 4} and s.loaded is None and s.prob is None
    assert "no need to segment again" in ft.ready_lbl.value
    ft.epochs.value, ft.steps.value, ft.patch.value = 1, 1, 32
    ft.only_better.value, ft.then_predict.value = False, False
    ft.start()
    qtbot.waitUntil(lambda: not ft.running, timeout=60000)
    assert ft.result is not None, ft.status.value
    assert ft.result.card.parent.startswith("bundled:")  # the current model was the base
    assert s.prob is None  # nothing was predicted to get there
    assert s.model_version == ft.result.version_id


def test_with_several_images_open_the_panel_says_which_one_trains(
    make_napari_viewer, qtbot, tmp_path, bulbseg_home
):
    from napari_bulbseg._widgets._session import get_session

    viewer = make_napari_viewer()
    _open_bulbs(viewer, tmp_path, n=4)
    s = get_session(viewer)
    seg = open_dock(viewer, "Segment")
    rw = open_dock(viewer, "Review & correct")
    ft = open_dock(viewer, "Fine-tune")
    _segment_with(seg, qtbot, s, _model(tmp_path, "a", threshold=0.5))
    rw.start_corrections()
    s.set_reviewed(0, True)
    s.set_reviewed(1, True)
    assert "several images" not in ft.ready_lbl.value
    viewer.add_image(np.zeros((4, 64, 64), np.uint16), name="other")
    assert "bulbs only" in ft.ready_lbl.value and "one stack" in ft.ready_lbl.value


def test_a_job_that_ends_after_its_dock_closed_does_nothing(qtbot):
    """Worker callbacks into deleted Qt widgets are dropped, not raised into the event loop."""
    import threading

    from qtpy.QtWidgets import QLabel

    from napari_bulbseg._widgets._jobs import start_job

    label = QLabel("before")
    release, called = threading.Event(), []

    def job():
        release.wait(10)
        yield
        return "done"

    def done(value):
        called.append(value)
        label.setText(value)  # the label is gone by now

    worker = start_job(job(), on_done=done)
    label.deleteLater()
    qtbot.waitUntil(lambda: not _alive(label), timeout=5000)
    release.set()
    qtbot.waitUntil(lambda: called == ["done"], timeout=5000)  # called, and nothing raised
    worker.quit()


def _alive(widget) -> bool:
    try:
        widget.objectName()
    except RuntimeError:
        return False
    return True
