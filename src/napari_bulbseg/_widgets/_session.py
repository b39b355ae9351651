"""Shared state of the bulbseg widgets for one viewer: model, probability cache, post-processing.

The widgets never talk to each other; they read and change the :class:`Session` of their
viewer (:func:`get_session`) and listen to its psygnal signals. The session owns the rule
"probabilities → prediction layer": the displayed slice is re-thresholded at once on the GUI
thread, every other slice by a background worker whose results are written on the GUI thread.
The review state itself (probability cache, generations, reviewed flags, counts) is the Qt-free
:class:`napari_bulbseg.review_state.ReviewState`; the session adds layers, timer, workers and
signals around it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels, Layer
from psygnal import Signal, SignalGroup
from qtpy.QtCore import QTimer

from ..postprocess import PostProcess
from ..review_state import RefreshItem, ReviewState
from . import _text as T
from ._jobs import start_job
from ._layers import (
    PRED_RGBA,
    as_stack,
    binary_colormap,
    current_index,
    upsert_image,
    upsert_labels,
    write_slice,
)

if TYPE_CHECKING:
    from ..model import LoadedModel

#: delay between the last post-processing change and the background pass over other slices
REFRESH_DELAY_MS = 120
#: the probability layer of a new image is added this long after its prediction layer, so
#: that napari draws the one the user watches before it builds the other
PROB_LAYER_DELAY_MS = 150
_SESSIONS: weakref.WeakKeyDictionary[Any, Session] = weakref.WeakKeyDictionary()


def real_viewer(napari_viewer: Any) -> Any:
    """The viewer itself, where napari injected a ``PublicOnlyProxy`` of it into a dock.

    Through the proxy every layer is a proxy too, so identity checks against our own layers
    fail and napari internals we rely on (the slider's partial redraw) are refused.
    """
    return getattr(napari_viewer, "__wrapped__", napari_viewer)


def get_session(viewer: Any) -> Session:
    """The one :class:`Session` of ``viewer`` (created on first use)."""
    session = _SESSIONS.get(viewer)
    if session is None:
        session = _SESSIONS[viewer] = Session(viewer)
    return session


class SessionSignals(SignalGroup):
    model_changed = Signal()
    #: a new prediction started (layers created or replaced)
    prediction_started = Signal()
    #: slice ``z`` of the prediction layer changed (``-1``: many slices)
    prediction_updated = Signal(int)
    spec_changed = Signal(object)
    #: object counts per slice changed (see :attr:`Session.violations`)
    counts_changed = Signal()
    reviewed_changed = Signal()
    #: ask the Segment widget to predict again with registry version (None: current model)
    predict_requested = Signal(object)


class Session:
    """Model, layers and signals for one viewer's image; the review state is a
    :class:`~napari_bulbseg.review_state.ReviewState` (:attr:`state`), read through the
    properties below and changed through the methods here."""

    def __init__(self, viewer: Any) -> None:
        self._viewer = weakref.ref(viewer)
        self.events = SessionSignals()
        self.state = ReviewState()
        self.loaded: LoadedModel | None = None
        self.model_label: str = ""
        #: registry version of ``loaded`` (None for the bundled model or a folder)
        self.model_version: str | None = None
        self._refresher: Any = None
        # the background pass starts once the slider rests, so it never competes with a drag
        self._refresh_timer = QTimer()
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(REFRESH_DELAY_MS)
        self._refresh_timer.timeout.connect(self._start_refresher)
        viewer.dims.events.current_step.connect(self._on_step)
        from ._corrections import Corrections

        #: the corrections layer and its autosave
        self.corrections = Corrections(viewer, self)

    # ------------------------------------------------------------------ review state (read-only)
    @property
    def image_name(self) -> str | None:
        return self.state.image_name

    @property
    def prob(self) -> np.ndarray | None:
        """(Z, Y, X) float16 probabilities."""
        return self.state.prob

    @property
    def done(self) -> np.ndarray | None:
        """(Z,) bool: probabilities available."""
        return self.state.done

    @property
    def spec(self) -> PostProcess:
        return self.state.spec

    @property
    def user_spec(self) -> bool:
        """The user has set the rules (threshold, object priors): a new model never resets them."""
        return self.state.user_spec

    @property
    def expected_max(self) -> int:
        return self.state.expected_max

    @property
    def counts(self) -> Mapping[int, int]:
        return self.state.counts

    @property
    def reviewed(self) -> frozenset[int]:
        return self.state.reviewed

    @property
    def violations(self) -> list[int]:
        """Slices with more objects than :attr:`expected_max` (empty when the check is off)."""
        return self.state.violations

    @property
    def n_slices(self) -> int:
        return self.state.n_slices

    # ------------------------------------------------------------------ layers
    @property
    def viewer(self) -> Any:
        return self._viewer()

    def _named(self, suffix: str, kind: type) -> Any:
        if self.image_name is None or self.viewer is None:
            return None
        name = self.image_name + suffix
        layers = self.viewer.layers
        return layers[name] if name in layers and isinstance(layers[name], kind) else None

    @property
    def image_layer(self) -> Image | None:
        return self._named("", Image)

    @property
    def prob_layer(self) -> Image | None:
        return self._named(T.PROB_SUFFIX, Image)

    @property
    def pred_layer(self) -> Labels | None:
        return self._named(T.PRED_SUFFIX, Labels)

    @property
    def corr_layer(self) -> Labels | None:
        return self._named(T.CORR_SUFFIX, Labels)

    def displayed(self) -> int:
        layer = self.image_layer
        return 0 if layer is None else current_index(self.viewer, layer)

    # ------------------------------------------------------------------ model
    def card_spec(self) -> PostProcess:
        """The post-processing the model card recommends."""
        if self.loaded is None:
            return PostProcess()
        card = self.loaded.card
        try:
            return PostProcess.from_card(card)
        except Exception:  # a card's odd rules never block the session: its threshold only
            return PostProcess(threshold=float(card.threshold))

    def set_model(self, loaded: LoadedModel, label: str, version: str | None = None) -> None:
        """Make ``loaded`` the session's model (``label`` shown in the panels, ``version`` its
        registry id or None) and emit ``model_changed``."""
        self.loaded, self.model_label, self.model_version = loaded, label, version
        self.events.model_changed.emit()

    # ------------------------------------------------------------------ prediction
    def begin_prediction(self, image: Image) -> tuple[Any, np.ndarray]:
        """Allocate the probability cache and (re)create the probability and prediction layers.

        Returns the (Z, Y, X[, C]) image stack and the float16 (Z, Y, X) cache to fill.

        napari takes 0.1–0.3 s to add one layer (its visuals and overlays), so a new image's
        layers are not made in one go: the prediction layer (what the user watches) now, the
        hidden probability layer on a later turn of the event loop (:meth:`_add_prob_layer`).
        """
        viewer = self.viewer
        follow = self._untouched_slices(image)
        stack = as_stack(image)
        prob, new_image = self.state.begin(image.name, stack.shape[:3], follow)
        if new_image:
            self.events.reviewed_changed.emit()
        two_d = image.ndim == 2
        prob_view = prob[0] if two_d else prob
        pred = np.zeros(prob.shape[1:] if two_d else prob.shape, dtype=np.uint8)
        upsert_labels(
            viewer,
            image.name + T.PRED_SUFFIX,
            pred,
            image,
            opacity=0.45,
            colormap=binary_colormap(PRED_RGBA),
        )
        if self.prob_layer is not None:
            self.prob_layer.data = prob_view
        else:
            QTimer.singleShot(PROB_LAYER_DELAY_MS, lambda: self._add_prob_layer(image, prob))
        viewer.layers.selection.active = image
        self.events.prediction_started.emit()
        return stack, prob

    def _add_prob_layer(self, image: Image, prob: np.ndarray) -> None:
        """Add the hidden probability layer of ``image`` for cache ``prob``, unless a newer
        prediction replaced that cache or the image is gone (their own call adds it then)."""
        if self.prob is not prob or image not in self.viewer.layers:
            return
        if self.prob_layer is not None:
            return
        active = self.viewer.layers.selection.active
        layer = upsert_image(
            self.viewer,
            image.name + T.PROB_SUFFIX,
            prob[0] if image.ndim == 2 else prob,
            image,
            colormap="magma",
            contrast_limits=(0.0, 1.0),
            blending="additive",
            visible=False,
        )
        pred = self.pred_layer
        if pred is not None:  # a prediction that ended first recorded its scale there
            for key in ("bulbseg_diameter_px", "bulbseg_zoom"):
                if key in pred.metadata:
                    layer.metadata[key] = pred.metadata[key]
        self.viewer.layers.selection.active = active  # adding a layer selects it: undo that

    def _untouched_slices(self, image: Image) -> set[int]:
        """Unreviewed slices whose corrections still equal the prediction (never painted)."""
        if self.image_name != image.name:
            return set()
        corr, pred = self.corr_layer, self.pred_layer
        if corr is None or pred is None or self.prob is None:
            return set()
        self.flush()
        return self.state.untouched_slices(self.layer_for(corr), self.layer_for(pred))

    def _follow_slice(self, z: int, mask: np.ndarray) -> None:
        """A new mask for slice ``z``: untouched corrections take it too."""
        corr = self.corr_layer if self.state.follows(z) else None
        if corr is None:
            return
        write_slice(corr, z, mask, displayed=z == self.displayed())
        self.corrections.touch()

    def slice_predicted(self, z: int) -> None:
        """Probabilities of slice ``z`` are final: show them, threshold the slice."""
        if not self.state.mark_predicted(z):
            return
        if z == self.displayed():
            if self.prob_layer is not None:
                self.prob_layer.refresh()
            self.update_slice(z)
        self._start_refresher()

    def update_slice(self, z: int) -> None:
        """Re-threshold slice ``z`` now, on this thread, and write it into the layer."""
        pred = self.pred_layer
        mask = None if pred is None else self.state.mask_for(z)
        if mask is None:
            return
        write_slice(pred, z, mask, displayed=z == self.displayed())
        self.state.mark_written(z)
        self._follow_slice(z, mask)
        self.events.prediction_updated.emit(z)

    def set_spec(
        self, spec: PostProcess, expected_max: int | None = None, *, from_user: bool = True
    ) -> None:
        """New post-processing: the displayed slice at once, the others in the background.

        ``from_user=False`` is a model's suggestion, applied only until the user sets rules.
        """
        if expected_max is not None and self.state.set_expected_max(expected_max):
            self.events.counts_changed.emit()
        if not self.state.set_spec(spec, from_user=from_user):
            return
        if self.prob is not None:
            self.update_slice(self.displayed())
            self._refresh_timer.start()
        self.events.spec_changed.emit(spec)

    def _on_step(self, event: Any = None) -> None:
        if self.prob is None or self.image_layer is None:
            return
        z = self.displayed()
        if self.state.is_stale(z):
            self.update_slice(z)

    # ------------------------------------------------------------------ background refresh
    def _start_refresher(self) -> None:
        worker = self._refresher
        if worker is not None and getattr(worker, "_bulbseg_gen", None) == self.state.gen:
            return  # the running pass already uses this spec and rescans for new slices
        if worker is not None:
            worker.quit()
        gen = self.state.gen
        self._refresher = start_job(
            self.state.iter_refresh(),
            on_yield=self._apply_refreshed,
            on_finish=lambda: self._refresher_finished(gen),
        )
        self._refresher._bulbseg_gen = gen

    def _apply_refreshed(self, item: RefreshItem) -> None:
        gen, z, mask, count = item
        pred = self.pred_layer
        if not self.state.is_current(gen) or pred is None:
            return
        if self.state.needs_write(z, gen):
            write_slice(pred, z, mask, displayed=z == self.displayed())
            self.state.mark_written(z, gen)
            self._follow_slice(z, mask)
            self.events.prediction_updated.emit(z)
        self.state.record_count(z, count)
        self.events.counts_changed.emit()

    def _refresher_finished(self, gen: int) -> None:
        if self._refresher is not None and self._refresher._bulbseg_gen == gen:
            self._refresher = None
            # slices that finished predicting after the last rescan
            if self.state.stale_slices():
                self._start_refresher()

    def flush(self) -> None:
        """Bring every predicted slice up to the current post-processing now (GUI thread)."""
        if self.prob is None or self.pred_layer is None:
            return
        for z in self.state.stale_slices():
            self.update_slice(z)

    @property
    def busy(self) -> bool:
        """Whether a background re-threshold pass is pending or running."""
        return self._refresher is not None or self._refresh_timer.isActive()

    # ------------------------------------------------------------------ review
    def set_reviewed(self, z: int, reviewed: bool) -> None:
        if self.state.set_reviewed(z, reviewed):
            self.events.reviewed_changed.emit()

    def adopt_image(self, image_name: str) -> None:
        """Belong to ``image_name`` before its saved corrections are shown."""
        self.state.adopt_image(image_name)

    def restore_reviewed(self, reviewed: Iterable[int]) -> None:
        """The autosaved reviewed flags are back: set them, emit ``reviewed_changed``."""
        self.state.restore_reviewed(reviewed)
        self.events.reviewed_changed.emit()

    def edited(self, z: int) -> None:
        """The user painted slice ``z`` of the corrections: it no longer follows the model."""
        self.state.stop_following(z)

    def layer_for(self, layer: Layer | None) -> np.ndarray | None:
        """A layer's data as a (Z, Y, X) numpy stack (a view for numpy data)."""
        return None if layer is None else np.asarray(as_stack(layer))
