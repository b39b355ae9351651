"""The "correct next" queue in Review & correct, driven as a user does: open, segment, follow
the queue, review, change the rules, predict again."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from conftest import open_dock
from napari_bulbseg.ranking import rank, score_stack
from test_napari_loop import _corrected_bulbs, _model, _open_bulbs, _segment_with

pytestmark = pytest.mark.gui


def _engine_order(s, exclude=()):
    scores = score_stack(s.prob, s.spec, s.expected_max, is_stack=True)
    return [sc.index for sc in rank(scores, exclude=exclude, spread=True)]


def _listed(rw):
    from qtpy.QtCore import Qt

    q = rw.queue
    return [int(q.item(r).data(Qt.ItemDataRole.UserRole)) for r in range(q.count())]


def test_queue_ranks_follows_review_rules_and_new_predictions(
    make_napari_viewer, qtbot, tmp_path, bulbseg_home
):
    from napari_bulbseg._widgets._session import get_session

    viewer = make_napari_viewer()
    rw = open_dock(viewer, "Review & correct")
    # nothing predicted yet: nothing can be marked reviewed
    assert not rw.reviewed.enabled and not rw.goto_btn.enabled
    _open_bulbs(viewer, tmp_path, n=6)
    s = get_session(viewer)
    seg = open_dock(viewer, "Segment")
    _segment_with(seg, qtbot, s, _model(tmp_path, "a", threshold=0.5, shift=0.3))
    qtbot.waitUntil(lambda: not rw.queue.busy and rw.queue.count() == 6, timeout=10000)
    assert rw.reviewed.enabled and rw.goto_btn.enabled
    assert _listed(rw) == _engine_order(s)  # the widget shows the engine's ranking
    assert "6 unreviewed" in rw.queue_lbl.value

    # Show the top slice; review it → it leaves the queue, and the next top is shown
    rw.goto_btn.native.click()
    top = _engine_order(s)[0]
    assert s.displayed() == top
    rw.next_btn.native.click()
    assert top in s.reviewed and top not in _listed(rw) and rw.queue.count() == 5
    assert s.displayed() == _engine_order(s, exclude=s.reviewed)[0]

    # a click on a row shows that slice
    last = rw.queue.item(rw.queue.count() - 1)
    rw.queue.itemClicked.emit(last)
    assert s.displayed() == _listed(rw)[-1]

    # new rules (a threshold that splits the mask, keep the largest object) → rescored under
    # them, in the background
    tw = open_dock(viewer, "Threshold & objects")
    before = [sc.score for sc in rw.queue.scores]
    tw.threshold.value = round(float(np.median(s.prob)), 2)
    tw.keep.value = 1
    qtbot.waitUntil(lambda: s.spec.keep_largest == 1, timeout=5000)
    qtbot.waitUntil(lambda: not rw.queue.busy, timeout=10000)
    qtbot.waitUntil(lambda: [sc.score for sc in rw.queue.scores] != before, timeout=10000)
    assert _listed(rw) == _engine_order(s, exclude=s.reviewed)

    # predicting again with another model refreshes the ranking; reviewed slices stay out
    old = [(sc.index, sc.score) for sc in rw.queue.scores]
    _segment_with(seg, qtbot, s, _model(tmp_path, "b", threshold=0.5, shift=-0.4))
    qtbot.waitUntil(lambda: not rw.queue.busy and rw.queue.count() == 5, timeout=10000)
    qtbot.waitUntil(lambda: [(sc.index, sc.score) for sc in rw.queue.scores] != old, timeout=1e4)
    assert _listed(rw) == _engine_order(s, exclude=s.reviewed) and top not in _listed(rw)

    # review everything: the queue says so
    for z in range(6):
        s.set_reviewed(z, True)
    assert rw.queue.count() == 0 and "every predicted slice is reviewed" in rw.queue_lbl.value
    assert not rw.goto_btn.enabled and rw.goto_next() is None


def test_reviewed_tick_without_a_prediction_does_nothing(make_napari_viewer, qtbot, tmp_path):
    from napari_bulbseg._widgets._session import get_session

    viewer = make_napari_viewer()
    _open_bulbs(viewer, tmp_path, n=3)
    rw = open_dock(viewer, "Review & correct")
    s = get_session(viewer)
    rw.reviewed.value = True  # e.g. a keyboard toggle while disabled
    assert s.reviewed == set() and rw.reviewed.value is False
    assert np.all(viewer.layers["bulbs"].data >= 0)  # the image is untouched


def test_rounds_fine_tune_then_predict_and_refresh_the_queue(
    make_napari_viewer, qtbot, tmp_path, bulbseg_home
):
    """Fine-tune → the stack is predicted again with the new version → the queue is rescored;
    twice; the panel lists both rounds."""
    viewer = make_napari_viewer()
    s, seg, rw, ft = _corrected_bulbs(viewer, qtbot, tmp_path, shift=0.3)
    for z in (0, 2, 4):
        s.set_reviewed(z, True)
    qtbot.waitUntil(lambda: not rw.queue.busy and rw.queue.count() == 3, timeout=10000)
    assert ft.then_predict.value  # the default: a round ends with new predictions
    ft.only_better.value = False  # one step need not beat its base; this test follows the loop
    ft.epochs.value, ft.steps.value, ft.patch.value = 1, 1, 32
    versions = []
    for _round in range(2):
        old_prob, old_scores = s.prob, [(sc.index, sc.score) for sc in rw.queue.scores]
        ft.start()
        qtbot.waitUntil(lambda: not ft.running, timeout=60000)
        assert ft.result is not None and ft.result.made_current, ft.status.value
        versions.append(ft.result.version_id)
        # the Segment dock predicts the stack again with the new version
        qtbot.waitUntil(lambda o=old_prob: s.prob is not o and s.done.all(), timeout=30000)
        qtbot.waitUntil(lambda: not seg.running and not rw.queue.busy, timeout=30000)
        qtbot.waitUntil(
            lambda o=old_scores: [(sc.index, sc.score) for sc in rw.queue.scores] != o,
            timeout=10000,
        )
        assert seg.model.value.version == versions[-1] == s.model_version
        assert _listed(rw) == _engine_order(s, exclude=s.reviewed)
        assert set(_listed(rw)) == {1, 3, 5}  # reviewed slices stay out of the queue
    assert versions == ["v001", "v002"]
    label = ft.rounds_lbl.value
    assert label.index("v001") < label.index("v002") and label.count("→") >= 2
