"""Segment: run the U-Net on an image layer, displayed slice first, in a background worker."""

from __future__ import annotations

import os
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.layers import Image
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer

from ..options import DEFAULT_OVERLAP, DEFAULT_TILE
from . import _text as T
from ._export import ModelExporter
from ._jobs import start_job, user_message, warm_imports
from ._layers import current_index, n_slices
from ._models import FOLDER, ModelChoice, load_choice, model_choices
from ._qt import Connections, OrderedComboBox, tabify_with_siblings, text_label
from ._session import get_session, real_viewer

if TYPE_CHECKING:
    from pathlib import Path

    from ..events import Progress
    from ..inference import Scale
    from ..model import LoadedModel

DEVICES = ("auto", "cuda", "mps", "cpu")
#: PredictOptions' defaults (not imported here: that would load torch with the plugin menu)


def _load_job(
    choice: ModelChoice, folder: str | Path | None, device: str
) -> Generator[None, None, tuple[LoadedModel, str]]:
    from ..inference import select_device

    dev = select_device(device)
    yield
    return load_choice(choice, folder, dev)


def _predict_job(
    loaded: LoadedModel,
    stack: Any,
    options: dict[str, Any],
    prob: np.ndarray,
    order: list[int],
    diameter: float | str | None = None,
) -> Generator[Progress, None, tuple[int, Scale | None]]:
    """One engine job for the whole stack, slices in ``order`` (batched across slices); yields
    its Progress events (``finished`` names the slices that are done) and returns
    ``(n_slices, Scale)`` — the object scale used, for the user and the layers' metadata."""
    from ..inference import PredictOptions, iter_predict

    scales: list[Scale] = []
    gen = iter_predict(
        loaded, stack, PredictOptions(**options), out=prob, slices=order, diameter=diameter,
        on_scale=scales.append,
    )  # fmt: skip
    yield from gen
    return len(order), (scales[0] if scales else None)


def _warm_up() -> None:
    """Do the one-off imports now, while the dock opens, rather than mid-prediction.

    Importing holds the GIL (so a worker thread importing torch freezes the viewer just the
    same), and napari imports pandas the first time a Labels layer is made (~1 s).
    """
    from napari.layers import Labels

    from .. import inference  # noqa: F401 - torch and the engine, once

    Labels(np.zeros((2, 2), np.uint8))
    # the first Labels layer on the canvas builds vispy's dash patterns (~0.1 s of numpy):
    # a background thread can do that while the dock opens
    warm_imports(calls=(_warm_vispy_lines,))


def _warm_vispy_lines() -> None:
    from vispy.visuals.line.dash_atlas import DashAtlas

    DashAtlas()  # fills the module's pattern cache, which every later atlas reuses


class SegmentWidget(Container):
    """Pick an image and a model; predict the stack into probability + prediction layers."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        tabify_with_siblings(self.native)
        self._viewer = viewer = real_viewer(napari_viewer)
        self._session = get_session(viewer)
        self._worker: Any = None
        self._t0 = 0.0
        self._finished = 0
        self._cancelled = False  # Cancel was pressed during this run
        self.image = ComboBox(label="Image", choices=self._image_choices, tooltip=T.TIP_IMAGE)
        self.model = OrderedComboBox(
            label="Model", choices=self._model_choices, tooltip=T.TIP_MODEL
        )
        self.folder = FileEdit(label="Folder", mode="d", tooltip=T.TIP_FOLDER, visible=False)
        self.device = ComboBox(label="Device", choices=DEVICES, value="auto", tooltip=T.TIP_DEVICE)
        self.tile = SpinBox(label="Tile size", value=DEFAULT_TILE, min=64, max=4096, step=64)
        self.tile.tooltip = T.TIP_TILE
        self.overlap = SpinBox(label="Overlap (px)", value=DEFAULT_OVERLAP, min=0, max=1024, step=8)
        self.overlap.tooltip = T.TIP_OVERLAP
        self.tta = CheckBox(text="Test-time augmentation", value=False, tooltip=T.TIP_TTA)
        self.diameter = LineEdit(label="Object size (px)", value="", tooltip=T.TIP_DIAMETER)
        self.diameter.native.setPlaceholderText(T.HINT_DIAMETER)
        self.run_btn = PushButton(text=T.BTN_RUN)
        self.cancel_btn = PushButton(text=T.BTN_CANCEL, enabled=False)
        self.bar = ProgressBar(value=0, min=0, max=1000, visible=False, label="")
        self.status = text_label("")
        self.exporter = ModelExporter(self, lambda: (self.model.value, self.folder.value))
        self.export_btn = self.exporter.button
        self.extend(
            [
                self.image,
                self.model,
                self.folder,
                self.export_btn,
                self.device,
                self.tile,
                self.overlap,
                self.tta,
                self.diameter,
                self.run_btn,
                self.cancel_btn,
                self.bar,
                self.status,
            ]
        )
        self.model.changed.connect(self._on_model_choice)
        self.run_btn.changed.connect(self.run)
        self.cancel_btn.changed.connect(self.cancel)
        c = Connections(self.native)
        for ev in (viewer.layers.events.inserted, viewer.layers.events.removed):
            c.connect(ev, self._refresh_images)
        c.connect(self._session.events.model_changed, self._refresh_models)
        c.connect(self._session.events.predict_requested, self._on_predict_requested)
        self._on_model_choice()
        QTimer.singleShot(0, _warm_up)

    # ------------------------------------------------------------------ choices
    def _image_choices(self, _w: Any = None) -> list[tuple[str, Image]]:
        return [
            (lyr.name, lyr)
            for lyr in self._viewer.layers
            if isinstance(lyr, Image) and not lyr.name.endswith(T.PROB_SUFFIX)
        ]

    def _model_choices(self, _w: Any = None) -> list[tuple[str, ModelChoice]]:
        return [(c.label, c) for c in model_choices()]

    def _refresh_images(self, _e: Any = None) -> None:
        self.image.reset_choices()

    def _refresh_models(self) -> None:
        """The session's model changed (fine-tune, rollback): show it in the menu."""
        version = self._session.model_version
        if version is not None:
            self.select_version(version)
            return
        current = self.model.value  # a folder model: keep that choice
        self.model.reset_choices()
        for c in self.model.choices:
            if current is not None and (c.kind, c.version) == (current.kind, current.version):
                self.model.value = c
                return

    def _on_model_choice(self, _v: Any = None) -> None:
        choice = self.model.value
        self.folder.visible = choice is not None and choice.kind == FOLDER

    def select_version(self, version: str) -> None:
        """Pick registry ``version`` in the model menu (after fine-tuning or a rollback)."""
        self.model.reset_choices()
        for c in self.model.choices:
            if c.version == version:
                self.model.value = c
                return

    def _on_predict_requested(self, version: str | None) -> None:
        if version is not None:
            self.select_version(version)
        image = self._session.image_layer
        if image is not None and image in self.image.choices:
            self.image.value = image
        self.run()

    # ------------------------------------------------------------------ run
    @property
    def running(self) -> bool:
        return self._worker is not None

    def run(self) -> None:
        """Load the chosen model, then predict the image: displayed slice first."""
        if self.running:
            return
        image = self.image.value
        if image is None:
            show_warning(T.MSG_NO_IMAGE)
            return
        choice = self.model.value
        folder = self.folder.value if choice is not None and choice.kind == FOLDER else None
        self._set_running(True)
        self._cancelled = False
        self.status.value = T.MSG_LOADING
        self._worker = start_job(
            _load_job(choice, folder, self.device.value),
            on_done=lambda res: self._predict(image, choice, *res),
            on_error=self._failed,
            on_abort=self._load_aborted,
        )

    def _load_aborted(self) -> None:
        self.status.value = T.MSG_LOAD_CANCELLED
        show_info(T.MSG_LOAD_CANCELLED)
        self._set_running(False)

    def _options(self) -> dict[str, Any]:
        """PredictOptions fields (built in the worker: importing torch here would block the GUI)."""
        return {
            "tile": int(self.tile.value),
            "overlap": int(self.overlap.value),
            "tta": bool(self.tta.value),
            "device": str(self.device.value),
            # on the CPU, leave one core to napari so the viewer stays responsive
            "num_threads": max(1, (os.cpu_count() or 2) - 1),
        }

    def _predict(self, image: Image, choice: ModelChoice, loaded: LoadedModel, label: str) -> None:
        if self._cancelled:  # cancelled while the model loaded: that finished, nothing else
            self._load_aborted()
            return
        s = self._session
        s.set_model(loaded, label, choice.version)
        if image not in self._viewer.layers:
            self.status.value = T.MSG_IMAGE_GONE
            self._set_running(False)
            return
        suggested = s.card_spec()
        if not s.user_spec:
            s.set_spec(suggested, from_user=False)
        elif abs(suggested.threshold - s.spec.threshold) > 1e-6:
            show_info(T.MSG_KEPT_RULES.format(t=s.spec.threshold, card=suggested.threshold))
        z0 = current_index(self._viewer, image)
        order = [z0] + [z for z in range(n_slices(image)) if z != z0]
        stack, prob = s.begin_prediction(image)
        self._t0, self._finished = time.perf_counter(), 0
        self.status.value = T.MSG_PREDICTING.format(z=z0)
        self._worker = start_job(
            _predict_job(loaded, stack, self._options(), prob, order, self._diameter()),
            on_yield=self._on_event,
            on_done=self._done,
            on_error=self._failed,
            on_abort=self._aborted,
        )

    def _diameter(self) -> str | None:
        """The field's text: empty = the model card's default, "auto", "none" (the image's
        own scale) or pixels (the engine resolves and checks it and says what is valid)."""
        text = str(self.diameter.value or "").strip()
        return text or None

    def _on_event(self, ev: Progress) -> None:
        self.bar.value = int(1000 * ev.fraction)
        for z in ev.finished:
            self._finished += 1
            self._session.slice_predicted(z)

    def _done(self, res: tuple[int, Scale | None]) -> None:
        n, scale = res
        dt = time.perf_counter() - self._t0
        msg = T.MSG_PRED_DONE.format(n=n, model=self._session.model_label, s=dt)
        if scale is not None and scale.diameter is not None:
            msg = f"{msg} {scale.message}."
        for layer in (self._session.prob_layer, self._session.pred_layer):
            if layer is None:
                continue
            if scale is not None and scale.diameter is not None:
                # saved with the layer: the scale its mask was made at
                layer.metadata["bulbseg_diameter_px"] = float(scale.diameter)
                layer.metadata["bulbseg_zoom"] = float(scale.zoom)
            else:  # the image's own scale: no stale figure from an earlier prediction
                layer.metadata.pop("bulbseg_diameter_px", None)
                layer.metadata.pop("bulbseg_zoom", None)
        self.status.value = msg
        show_info(msg)
        self._set_running(False)

    def _aborted(self) -> None:
        msg = T.MSG_PRED_CANCELLED.format(n=self._finished)
        self.status.value = msg
        show_info(msg)
        self._set_running(False)

    def _failed(self, error: BaseException) -> None:
        self.status.value = user_message(error)
        show_error(user_message(error))
        self._set_running(False)

    def cancel(self) -> None:
        """Stop after the tile in progress; finished slices are kept."""
        if self._worker is not None:
            self._cancelled = True
            self._worker.quit()

    def _set_running(self, running: bool) -> None:
        if not running:
            self._worker = None
        self.run_btn.enabled = not running
        self.cancel_btn.enabled = running
        self.bar.visible = running
        if running:
            self.bar.value = 0
