"""The corrections layer: created from the prediction, autosaved, restored after a restart."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_info, show_warning
from psygnal import Signal
from qtpy.QtCore import QEvent, QObject

from ..corrections import CorrectionStore
from . import _text as T
from ._autosave import AutoSaver, saved_when
from ._layers import CORR_RGBA, binary_colormap, upsert_labels

if TYPE_CHECKING:
    from ._session import Session

_EDIT_EVENTS = ("paint", "data", "set_data")


class _CloseWatch(QObject):
    """Calls ``on_close`` when the watched window gets its close event."""

    def __init__(self, on_close: Any) -> None:
        super().__init__()
        self._on_close = on_close

    def eventFilter(self, obj: Any, event: Any) -> bool:
        if event.type() == QEvent.Type.Close:
            self._on_close()
        return False


def store_for(image: Image) -> CorrectionStore:
    """Where the corrections of ``image`` are autosaved."""
    source = image.metadata.get("bulbseg_path")
    return CorrectionStore(image.name, image.data.shape[: image.ndim], source)


class Corrections:
    """The session's corrections layer and its autosave; lives as long as the viewer, so edits
    are saved even when the Review dock is closed."""

    #: autosave finished: the path written
    saved = Signal(object)
    #: saved corrections of an opened image can be restored: a sentence for the user
    offered = Signal(str)

    def __init__(self, viewer: Any, session: Session) -> None:
        self._viewer, self._session = viewer, session
        self.layer: Labels | None = None
        self.saver: AutoSaver | None = None
        #: image whose saved corrections can be restored (None: nothing to offer)
        self.offer: Image | None = None
        viewer.layers.events.inserted.connect(self._on_inserted)
        viewer.layers.events.removed.connect(self._on_removed)
        session.events.reviewed_changed.connect(self._touch)
        # a stroke made just before the window closes is saved before it goes
        self._close_watch = _CloseWatch(self.flush)
        window = getattr(getattr(viewer, "window", None), "_qt_window", None)
        if window is not None:
            window.installEventFilter(self._close_watch)

    def flush(self) -> None:
        """Write unsaved edits now (the viewer is closing, or the layer is being removed)."""
        if self.saver is not None:
            self.saver.flush()

    def _on_removed(self, event: Any) -> None:
        if self.layer is not None and event.value is self.layer:
            self.flush()
            self.saver.stop()
            self._connect(False)
            self.layer, self.saver = None, None

    # ------------------------------------------------------------------ restore offer
    def _on_inserted(self, event: Any) -> None:
        self.check_saved(event.value)

    def check_saved(self, image: Any) -> bool:
        """Offer to restore when ``image`` has autosaved corrections and none are open."""
        if not isinstance(image, Image) or image.name.endswith(T.PROB_SUFFIX):
            return False
        store = store_for(image)
        if not store.exists() or (image.name + T.CORR_SUFFIX) in self._viewer.layers:
            return False
        info = store.info()
        when = saved_when(info.get("saved_at"))
        text = T.LBL_RESTORE.format(n=len(info.get("reviewed", [])), when=when)
        if self.offer is not image:
            show_info(text)
        self.offer = image
        self.offered.emit(text)
        return True

    def restore(self) -> Labels | None:
        """Load the autosaved corrections and reviewed flags of the offered image."""
        image, s = self.offer, self._session
        if image is None or image not in self._viewer.layers:
            return None
        mask, reviewed = store_for(image).load()
        s.adopt_image(image.name)
        layer = self._add(image, mask)
        s.restore_reviewed(reviewed)
        show_info(T.MSG_RESTORED.format(name=image.name, n=len(reviewed)))
        return layer

    # ------------------------------------------------------------------ create / attach
    def start(self) -> Labels | None:
        """Copy the prediction into a new corrections layer (or reuse the open one)."""
        s = self._session
        if s.corr_layer is not None:
            return self.attach(s.corr_layer)
        if s.pred_layer is None or s.image_layer is None:
            show_warning(T.MSG_NEED_PRED)
            return None
        s.flush()  # no stale slice may leak into the corrections
        layer = self._add(s.image_layer, np.array(s.pred_layer.data, dtype=np.uint8, copy=True))
        self.saver.touch()
        return layer

    def _add(self, image: Image, mask: np.ndarray) -> Labels:
        layer = upsert_labels(
            self._viewer,
            image.name + T.CORR_SUFFIX,
            mask,
            image,
            colormap=binary_colormap(CORR_RGBA),
            opacity=0.6,
        )
        return self.attach(layer)

    def attach(self, layer: Labels) -> Labels:
        """Make ``layer`` the corrections: autosave it and select it for painting."""
        s = self._session
        if self.saver is not None:
            self.saver.stop()
        self._connect(False)
        self.layer, self.offer = layer, None
        image = s.image_layer
        self.saver = AutoSaver(
            store_for(image),
            lambda: s.layer_for(self.layer),
            lambda: s.reviewed,
            on_saved=self.saved.emit,
        )
        self._connect(True)
        if s.pred_layer is not None:
            s.pred_layer.visible = False
        self._viewer.layers.selection.active = layer
        layer.mode, layer.selected_label = "paint", 1
        return layer

    def _connect(self, on: bool) -> None:
        if self.layer is None:
            return
        for name in _EDIT_EVENTS:
            emitter = getattr(self.layer.events, name)
            (emitter.connect if on else emitter.disconnect)(self._on_edit)

    def _on_edit(self, event: Any) -> None:
        if event.type != "set_data":  # the user painted: this slice no longer follows the model
            self._session.edited(self._session.displayed())
        if self.saver is None:
            return
        if event.type == "set_data":  # undo / redo (or a refresh): save only if data changed
            self.saver.maybe_changed(self._session.displayed())
        else:
            self.saver.touch()

    def _touch(self) -> None:
        if self.saver is not None:
            self.saver.touch()

    def touch(self) -> None:
        """The program changed the corrections: autosave them."""
        self._touch()

    def check_displayed(self) -> None:
        """After navigating or undoing: save if the displayed slice differs from the saved one."""
        if self.saver is not None:
            self.saver.maybe_changed(self._session.displayed())

    # ------------------------------------------------------------------ program edits
    def reset_slice(self) -> None:
        """Put the prediction back into the displayed slice (undoable with napari's undo)."""
        s = self._session
        corr, pred = s.corr_layer, s.layer_for(s.pred_layer)
        if corr is None or pred is None:
            return
        z = s.displayed()
        yx = np.nonzero(np.ones(pred.shape[1:], dtype=bool))
        idx = (np.full(yx[0].shape, z), *yx) if corr.ndim == 3 else yx
        corr.data_setitem(idx, pred[z][yx])
