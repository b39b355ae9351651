"""Review & correct: XOR difference layer, live metrics, corrections with autosave."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, PushButton
from napari.layers import Labels
from napari.utils.notifications import show_info, show_warning
from qtpy.QtWidgets import QFileDialog

from . import _text as T
from ._compare import slice_objects_job, slice_pixels, stack_job, summary_slices, summary_text
from ._jobs import start_job, warm_imports
from ._layers import diff_colormap, upsert_labels
from ._metrics_view import MetricsTable
from ._qt import Connections, single_shot, tabify_with_siblings, text_label
from ._queue import CorrectNextQueue
from ._session import get_session, real_viewer

if TYPE_CHECKING:
    from ..metrics import StackMetrics

_EVENTS = ("paint", "data", "set_data")


class ReviewWidget(Container):
    """Compare the prediction with a reference; correct it; mark slices as reviewed."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=False)
        tabify_with_siblings(self.native)
        self._viewer = viewer = real_viewer(napari_viewer)
        self._session = s = get_session(viewer)
        self._ref: Labels | None = None
        self._stack_worker: Any = None
        self.stack_result: StackMetrics | None = None
        self._shape_warned: tuple | None = None
        self._slice_worker: Any = None
        self._slice_next: tuple | None = None
        warm_imports("napari_bulbseg.metrics", "napari_bulbseg.ranking")
        self.reference = ComboBox(label="Reference", choices=self._ref_choices, nullable=True)
        self.reference.tooltip = T.TIP_TRUTH
        self.start_btn = PushButton(text=T.BTN_START_CORR, tooltip=T.TIP_START_CORR)
        self.restore_lbl = text_label("", visible=False)
        self.restore_btn = PushButton(text=T.BTN_RESTORE, visible=False)
        self.reviewed = CheckBox(text=T.CHK_REVIEWED, tooltip=T.TIP_REVIEWED)
        self.next_btn = PushButton(text=T.BTN_NEXT, tooltip=T.TIP_NEXT)
        self.queue_lbl = text_label(T.LBL_QUEUE_WAIT)
        self.queue = CorrectNextQueue(s, self.goto_slice)
        self.goto_btn = PushButton(text=T.BTN_GOTO_NEXT, tooltip=T.TIP_QUEUE)
        self.reset_btn = PushButton(text="Reset this slice to the prediction")
        self.slice_lbl = text_label(T.LBL_NO_TRUTH)
        self.summary_lbl = text_label("")
        self.table = MetricsTable()
        self.export_btn = PushButton(text=T.BTN_EXPORT)
        self.saved_lbl = text_label("")
        row = Container(widgets=[self.reviewed, self.next_btn], layout="horizontal", labels=False)
        self.extend(
            [
                self.reference,
                self.start_btn,
                self.restore_lbl,
                self.restore_btn,
                row,
                self.reset_btn,
                self.queue_lbl,
            ]
        )
        self.extend([self.goto_btn, self.slice_lbl, self.summary_lbl, self.export_btn])
        self.extend([self.saved_lbl])
        # plain Qt widgets, placed by hand: magicgui's extend() counts only its own widgets
        layout = self.native.layout()
        layout.insertWidget(layout.indexOf(self.goto_btn.native), self.queue)
        layout.insertWidget(layout.indexOf(self.export_btn.native), self.table)
        self._slice_timer = single_shot(self.native, 30, self.update_current)
        self._stack_timer = single_shot(self.native, 300, self.update_stack)
        self._conns = c = Connections(self.native)
        self.reference.changed.connect(self._on_reference)
        self.start_btn.changed.connect(self.start_corrections)
        self.restore_btn.changed.connect(self.restore)
        self.reviewed.changed.connect(self._on_reviewed)
        self.next_btn.changed.connect(self.reviewed_next)
        self.goto_btn.changed.connect(self.goto_next)
        self.reset_btn.changed.connect(self.reset_slice)
        self.export_btn.changed.connect(lambda: self.export_csv())
        for ev in (viewer.layers.events.inserted, viewer.layers.events.removed):
            c.connect(ev, self._refresh_choices)
        c.connect(viewer.dims.events.current_step, self._on_step)
        c.connect(s.events.prediction_updated, self._on_prediction)
        c.connect(s.events.prediction_started, self._on_started)
        c.connect(s.events.reviewed_changed, self._sync_reviewed)
        self.queue.refilled.connect(self._update_queue_label)
        self.corrections = s.corrections
        c.connect(self.corrections.saved, self._on_saved)
        c.connect(self.corrections.offered, self._offer)
        for layer in viewer.layers:
            self.corrections.check_saved(layer)
        self._on_started()

    # ------------------------------------------------------------------ layers
    def _refresh_choices(self, _e: Any = None) -> None:
        self.reference.reset_choices()

    def _ref_choices(self, _w: Any = None) -> list[tuple[str, Labels]]:
        own = (T.PRED_SUFFIX, T.DIFF_SUFFIX)
        return [
            (lyr.name, lyr)
            for lyr in self._viewer.layers
            if isinstance(lyr, Labels) and not lyr.name.endswith(own)
        ]

    def _diff_layer(self) -> Labels | None:
        s = self._session
        pred = s.pred_layer
        if pred is None or self._ref is None:
            return None
        name = s.image_name + T.DIFF_SUFFIX
        if name in self._viewer.layers:
            layer = self._viewer.layers[name]
            if isinstance(layer, Labels) and layer.data.shape == pred.data.shape:
                return layer
        active = self._viewer.layers.selection.active
        layer = upsert_labels(
            self._viewer,
            name,
            np.zeros(pred.data.shape, np.uint8),
            s.image_layer or pred,
            colormap=diff_colormap(),
            opacity=0.8,
        )
        pred.visible = False  # the difference map shows true positives too
        if active is not None:
            self._viewer.layers.selection.active = active
        return layer

    def _stacks(self) -> tuple[np.ndarray, np.ndarray] | None:
        s = self._session
        pred, ref = s.layer_for(s.pred_layer), s.layer_for(self._ref)
        if pred is None or ref is None:
            self._clear_metrics()
            return None
        if ref.shape != pred.shape:
            key = (self._ref.name, ref.shape, pred.shape)
            if key != self._shape_warned:  # once per mismatch, not at every update
                self._shape_warned = key
                show_warning(T.MSG_SHAPE.format(a=self._ref.name, sa=ref.shape, sb=pred.shape))
            self._clear_metrics()
            return None
        self._shape_warned = None
        return ref, pred

    def _clear_metrics(self) -> None:
        """No valid reference: nothing computed against an old one stays on screen."""
        if self.stack_result is None and not self.summary_lbl.value:
            return
        self.stack_result = None
        self.summary_lbl.value = ""
        self.table.show_metrics([], set())

    def _connect(self, layer: Labels | None, slot: Any, on: bool) -> None:
        if layer is None:
            return
        for name in _EVENTS:
            emitter = getattr(layer.events, name)
            (self._conns.connect if on else self._conns.disconnect)(emitter, slot)

    def _on_reference(self, layer: Labels | None) -> None:
        self._connect(self._ref, self._on_ref_edit, False)
        self._ref = layer
        self._connect(layer, self._on_ref_edit, True)
        self.refresh_all()

    def _on_ref_edit(self, event: Any) -> None:
        self._slice_timer.start()
        if event.type != "set_data":
            self._stack_timer.start()

    # ------------------------------------------------------------------ live updates
    def refresh_all(self) -> None:
        """Recompute the displayed slice now and the whole stack in the background."""
        self.update_current()
        self.update_stack()

    def update_current(self) -> None:
        """Difference map and pixel metrics of the displayed slice now, on the GUI thread (no
        labelling: quick at any size); its object counts follow from a worker."""
        stacks = self._stacks()
        diff = self._diff_layer() if stacks else None
        if stacks is None or diff is None:
            self.slice_lbl.value = T.LBL_NO_TRUTH
            return
        ref, pred = stacks
        s = self._session
        z = s.displayed()
        d, _m, self.slice_lbl.value = slice_pixels(ref[z], pred[z], z)
        target = diff.data if diff.ndim == 3 else diff.data[None]
        target[z] = d
        diff.refresh()
        self._slice_objects((ref[z] > 0).copy(), np.array(pred[z], copy=True), z)

    def _slice_objects(self, truth: np.ndarray, pred: np.ndarray, z: int) -> None:
        if self._slice_worker is not None:  # one at a time; the newest request runs next
            self._slice_next = (truth, pred, z)
            return
        self._slice_worker = start_job(
            slice_objects_job(truth, pred, z),
            on_done=lambda m: self.table.update_slice(m, m.index in self._session.reviewed),
            on_finish=self._slice_finished,
        )

    def _slice_finished(self) -> None:
        self._slice_worker = None
        if self._slice_next is not None:
            args, self._slice_next = self._slice_next, None
            self._slice_objects(*args)

    def summary_slices(self) -> list[int]:
        """Slices in the stack summary: predicted ones; only reviewed ones vs corrections."""
        s = self._session
        vs_corr = self._ref is not None and self._ref is s.corr_layer
        return summary_slices(s.done, s.reviewed, vs_corr)

    def update_stack(self) -> None:
        """Whole-stack difference map and metrics, in a worker."""
        if self._stack_worker is not None:
            self._stack_timer.start()  # one at a time; try again shortly
            return
        stacks = self._stacks()
        if stacks is None:
            return
        ref, pred = stacks
        self._stack_worker = start_job(
            stack_job((ref > 0).astype(np.uint8), pred.copy(), self.summary_slices()),
            on_done=self._stack_done,
            on_finish=self._stack_finished,
        )

    def _stack_done(self, res: tuple[np.ndarray, StackMetrics | None]) -> None:
        diff_stack, sm = res
        if self._stacks() is None:  # the reference or the prediction changed meanwhile
            return
        diff = self._diff_layer()
        if diff is not None and diff.data.shape[-2:] == diff_stack.shape[-2:]:
            target = diff.data if diff.ndim == 3 else diff.data[None]
            z = self._session.displayed()
            keep = target[z].copy()  # the displayed slice may be newer than this snapshot
            target[:] = diff_stack
            target[z] = keep
            diff.refresh()
        self.stack_result = sm
        if sm is not None:
            self.summary_lbl.value = summary_text(sm)
            self.table.show_metrics(sm.per_slice, self._session.reviewed)

    def _stack_finished(self) -> None:
        self._stack_worker = None

    def _on_prediction(self, z: int) -> None:
        if z < 0 or z == self._session.displayed():
            self._slice_timer.start()
        self._stack_timer.start()

    def _on_step(self, _e: Any = None) -> None:
        self._sync_reviewed()
        self._slice_timer.start()
        self.corrections.check_displayed()

    # ------------------------------------------------------------------ corrections
    def _offer(self, text: str) -> None:
        self.restore_btn.visible = self.restore_lbl.visible = True
        self.restore_lbl.value = text

    def _on_started(self) -> None:
        """A new prediction: offer saved corrections of this image, if any."""
        self.reference.reset_choices()
        image = self._session.image_layer
        if image is not None and self.corrections.layer is None:
            self.corrections.check_saved(image)
        has_pred = self._session.prob is not None
        self.reviewed.enabled = self.next_btn.enabled = has_pred
        self._update_queue_label()
        self.refresh_all()

    def _use_corrections(self, layer: Labels | None) -> Labels | None:
        if layer is not None:
            self.restore_btn.visible = self.restore_lbl.visible = False
            self.reference.reset_choices()
            self.reference.value = layer
        return layer

    def _on_saved(self, path: Path) -> None:
        from datetime import datetime

        self.saved_lbl.value = T.LBL_SAVED.format(when=f"{datetime.now():%H:%M:%S}")
        self.saved_lbl.tooltip = str(path)

    def start_corrections(self) -> Labels | None:
        """Copy the prediction into an editable corrections layer (or select the existing one)."""
        return self._use_corrections(self.corrections.start())

    def restore(self) -> Labels | None:
        """Load the autosaved corrections and reviewed flags of the opened image."""
        return self._use_corrections(self.corrections.restore())

    def reset_slice(self) -> None:
        """Put the prediction back into the displayed slice of the corrections (undoable)."""
        self.corrections.reset_slice()

    # ------------------------------------------------------------------ reviewed flags
    def _sync_reviewed(self) -> None:
        with self.reviewed.changed.blocked():
            self.reviewed.value = self._session.displayed() in self._session.reviewed

    def _on_reviewed(self, value: bool) -> None:
        if self._session.prob is None:  # nothing predicted: there is nothing to review
            with self.reviewed.changed.blocked():
                self.reviewed.value = False
            return
        self._session.set_reviewed(self._session.displayed(), bool(value))
        self._stack_timer.start()

    def reviewed_next(self) -> None:
        """Mark the displayed slice reviewed and show the one most worth correcting next (the
        next slice in order while the queue is empty)."""
        s = self._session
        if s.prob is None:
            show_warning(T.MSG_NEED_PRED)
            return
        self.reviewed.value = True
        image = s.image_layer
        if image is None or image.ndim != 3:
            return
        z = self.queue.top(besides=s.displayed())
        if z is None and not self.queue.scores:
            z = min(s.displayed() + 1, image.data.shape[0] - 1)
        if z is not None:
            self.goto_slice(z)

    def goto_next(self) -> int | None:
        """Show the unreviewed slice at the top of the queue; returns it (None: none left)."""
        z = self.queue.top()
        if z is None:
            show_info(self.queue_lbl.value)
            return None
        self.goto_slice(z)
        return z

    def goto_slice(self, z: int) -> None:
        image = self._session.image_layer
        if image is not None and image.ndim == 3:
            self._viewer.dims.set_point(0, float(image.data_to_world([z, 0, 0])[0]))

    def _update_queue_label(self, *_: Any) -> None:
        s = self._session
        n = self.queue.count()
        if n:
            self.queue_lbl.value = T.LBL_QUEUE.format(n=n)
        elif self.queue.scores and s.done is not None and s.done.all():
            self.queue_lbl.value = T.LBL_QUEUE_EMPTY
        else:
            self.queue_lbl.value = T.LBL_QUEUE_WAIT
        self.goto_btn.enabled = n > 0

    def export_csv(self, path: str | Path | None = None) -> Path | None:
        """Write the per-slice metrics table to CSV (asks for a file when ``path`` is None)."""
        from ..metrics import write_metrics_csv

        if self.stack_result is None:
            show_warning(T.LBL_NO_TRUTH)
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self.native, T.BTN_EXPORT, "metrics.csv", "CSV (*.csv)"
            )
            if not path:
                return None
        out = write_metrics_csv(path, self.stack_result)
        show_info(T.MSG_EXPORTED.format(path=out))
        return Path(out)
