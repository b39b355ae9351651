"""Threshold & objects: live post-processing of the cached probabilities (no network run)."""

from __future__ import annotations

from typing import Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSlider,
    PushButton,
    SpinBox,
)
from napari.utils.notifications import show_error, show_warning

from ..errors import BulbsegError
from ..postprocess import PostProcess
from . import _text as T
from ._qt import Connections, single_shot, tabify_with_siblings, text_label
from ._session import get_session, real_viewer


def suggest_threshold(
    prob: np.ndarray, truth: np.ndarray, slices: list[int]
) -> tuple[float, float]:
    """The Dice-optimal threshold over ``slices`` of ``prob`` vs ``truth``: ``(t, dice)``."""
    from ..metrics import best_threshold, threshold_sweep

    probs = [np.asarray(prob[z], dtype=np.float32) for z in slices]
    masks = [np.asarray(truth[z]) > 0 for z in slices]
    return best_threshold(threshold_sweep(probs, masks))


class ThresholdWidget(Container):
    """Threshold slider and object priors; the prediction follows at once."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        tabify_with_siblings(self.native)
        self._viewer = viewer = real_viewer(napari_viewer)
        self._session = s = get_session(viewer)
        spec = s.spec
        self.threshold = FloatSlider(
            label="Threshold", value=spec.threshold, min=0.01, max=1.0, step=0.01
        )
        self.threshold.tooltip = T.TIP_THRESHOLD
        self.card_btn = PushButton(text=T.BTN_USE_CARD, tooltip=T.TIP_USE_CARD)
        self.card_lbl = text_label("")
        self.sweep_btn = PushButton(text=T.BTN_SWEEP, tooltip=T.TIP_SWEEP)
        self.sweep_lbl = text_label("")
        self.min_size = SpinBox(label="Min size (px)", value=spec.min_size, min=0, max=10**7)
        self.min_size.tooltip = T.TIP_MIN_SIZE
        self.keep = SpinBox(label="Keep N largest", value=spec.keep_largest, min=0, max=10**5)
        self.keep.tooltip = T.TIP_KEEP
        self.fill = CheckBox(text="Fill holes", value=spec.fill_holes, tooltip=T.TIP_FILL)
        self.expected = SpinBox(label="Max objects/slice", value=s.expected_max, min=0, max=10**5)
        self.expected.tooltip = T.TIP_EXPECTED
        self.flags_lbl = text_label("")
        self.goto = ComboBox(label="Go to flagged", choices=[], nullable=True)
        self.extend(
            [
                self.threshold,
                self.card_btn,
                self.card_lbl,
                self.sweep_btn,
                self.sweep_lbl,
                self.min_size,
                self.keep,
                self.fill,
                self.expected,
                self.flags_lbl,
                self.goto,
            ]
        )
        for w in (self.threshold, self.min_size, self.keep, self.fill, self.expected):
            w.changed.connect(self.apply)
        self.card_btn.changed.connect(self.use_card)
        self.sweep_btn.changed.connect(self.suggest_from_reviewed)
        self.goto.changed.connect(self._goto)
        self._flag_timer = single_shot(self.native, 150, self._update_flags)
        c = Connections(self.native)
        c.connect(s.events.spec_changed, self._sync)
        c.connect(s.events.model_changed, self._on_model)
        c.connect(s.events.counts_changed, self._counts_changed)
        self._on_model()
        self._update_flags()

    # ------------------------------------------------------------------ fields ↔ session
    def spec(self) -> PostProcess:
        """The post-processing the fields describe."""
        return PostProcess(
            threshold=round(float(self.threshold.value), 4),
            min_size=int(self.min_size.value),
            fill_holes=bool(self.fill.value),
            keep_largest=int(self.keep.value),
        )

    def apply(self, _v: Any = None) -> None:
        """Push the fields to the session (re-thresholds the displayed slice at once)."""
        try:
            self._session.set_spec(self.spec(), expected_max=int(self.expected.value))
        except BulbsegError as e:
            show_error(str(e))

    def _sync(self, spec: PostProcess) -> None:
        pairs = (
            (self.threshold, spec.threshold),
            (self.min_size, spec.min_size),
            (self.keep, spec.keep_largest),
            (self.fill, spec.fill_holes),
        )
        for w, v in pairs:
            if w.value != v:
                with w.changed.blocked():
                    w.value = v

    def _on_model(self) -> None:
        loaded = self._session.loaded
        if loaded is None:
            self.card_lbl.value = ""
            self.card_btn.enabled = False
            return
        self.card_btn.enabled = True
        self.card_lbl.value = T.LBL_CARD.format(t=float(loaded.card.threshold))
        self._sync(self._session.spec)

    def use_card(self, _v: Any = None) -> None:
        """Set the threshold the model's validation sweep chose."""
        if self._session.loaded is not None:
            self.threshold.value = float(self._session.loaded.card.threshold)

    def suggest_from_reviewed(self, _v: Any = None) -> float | None:
        """Sweep thresholds over the reviewed slices vs the corrections; apply the best."""
        s = self._session
        if s.prob is None:
            show_warning(T.MSG_NO_PROB)
            return None
        corr = s.layer_for(s.corr_layer)
        slices = sorted(z for z in s.reviewed if s.done[z])
        if corr is None or not slices:
            show_warning(T.MSG_NO_REVIEWED)
            return None
        try:
            t, d = suggest_threshold(s.prob, corr, slices)
        except BulbsegError as e:
            show_error(str(e))
            return None
        self.sweep_lbl.value = T.LBL_SWEEP.format(t=t, d=d)
        self.threshold.value = t
        return t

    # ------------------------------------------------------------------ object-count prior
    def _counts_changed(self) -> None:
        self._flag_timer.start()

    def _update_flags(self) -> None:
        s = self._session
        bad = s.violations
        if s.expected_max <= 0:
            self.flags_lbl.value = ""
        elif not bad:
            self.flags_lbl.value = T.LBL_NO_FLAGS
        else:
            shown = ", ".join(str(z) for z in bad[:12]) + (" …" if len(bad) > 12 else "")
            self.flags_lbl.value = T.LBL_FLAGS.format(n=len(bad), which=shown)
        with self.goto.changed.blocked():
            self.goto.choices = [(f"slice {z} ({s.counts.get(z, '?')} objects)", z) for z in bad]
            self.goto.value = None

    def _goto(self, z: int | None) -> None:
        layer = self._session.image_layer
        if z is None or layer is None or layer.ndim < 3:
            return
        self._viewer.dims.set_point(0, float(layer.data_to_world([z, 0, 0])[0]))
