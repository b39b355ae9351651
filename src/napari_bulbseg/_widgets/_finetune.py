"""Fine-tune: one click trains the current model on the reviewed slices, in the background."""

from __future__ import annotations

import os
import threading
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSpinBox,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.utils.notifications import show_info, show_warning

from ..options import START_MODES
from . import _text as T
from ._jobs import start_job, user_message, warm_imports
from ._layers import as_stack
from ._models import get_registry
from ._plot import CurvePlot
from ._qt import Connections, tabify_with_siblings, text_label
from ._session import get_session, real_viewer

if TYPE_CHECKING:
    from ..events import TrainProgress
    from ..model import LoadedModel
    from ..registry import Registry
    from ..training import TrainConfig, TrainResult

LOSSES = ("focal+dice", "bce", "focal", "dice", "bce+dice")


def _fmt(d: float | None) -> str:
    return "—" if d is None else f"{d:.3f}"


def finetune_job(
    config: TrainConfig,
    planes: list[tuple[int, np.ndarray, np.ndarray]],
    base: LoadedModel | None,
    registry: Registry,
    cancel: threading.Event,
    budget: str,
    rgb: bool | None = None,
) -> Generator[str | TrainProgress, None, TrainResult]:
    """Worker body: samples from the snapshotted ``(z, image, mask)`` planes (hashing them takes
    a while on big slices), the split training will use — said first, as a sentence — then
    training; the engine compares the old and new model on the same validation slices and makes
    the new one current only when it beats the old (``TrainResult.made_current``)."""
    from ..data import samples_from_planes
    from ..errors import InputError
    from ..model import load_model
    from ..training import iter_train, planned_split

    if base is None:  # corrections restored without segmenting: start from the current model
        base = load_model(registry.resolve("current"))
    samples = samples_from_planes(planes, rgb)
    (train, val, _), _ = planned_split(config, samples, base, registry)
    if not train or not val:  # the engine's rule: one slice trains, another validates
        raise InputError(T.LBL_ONE_REVIEWED, "")
    yield T.MSG_SPLIT.format(n_train=len(train), n_val=len(val), budget=budget)
    return (yield from iter_train(config, samples, base=base, registry=registry, cancel=cancel))


class FinetuneWidget(Container):
    """Fine-tune on reviewed slices with live curves; save a version; re-predict or roll back."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        tabify_with_siblings(self.native)
        self._viewer = viewer = real_viewer(napari_viewer)
        self._session = s = get_session(viewer)
        self._worker: Any = None
        self._cancel = threading.Event()
        self.result: TrainResult | None = None
        # the first optimiser imports torch._dynamo (~0.3 s holding the GIL): not at Start
        warm_imports("napari_bulbseg.training", "torch._dynamo", "torch.optim")
        self.ready_lbl = text_label(T.LBL_NEED_REVIEW)
        self.loss = ComboBox(label="Loss", choices=LOSSES, value="focal+dice", tooltip=T.TIP_LOSS)
        self.start_from = ComboBox(
            label=T.LBL_START,
            choices=[(T.START_NAMES[m], m) for m in START_MODES],
            value="auto",
            tooltip=T.TIP_START,
        )
        self.epochs = SpinBox(label="Epochs", value=10, min=1, max=1000, tooltip=T.TIP_EPOCHS)
        self.steps = SpinBox(label="Steps/epoch", value=25, min=1, max=10000)
        self.patch = SpinBox(label="Patch size", value=256, min=32, max=2048, step=32)
        self.budget = FloatSpinBox(label="Time budget (min)", value=2.0, min=0.0, max=1440.0)
        self.budget.tooltip = T.TIP_BUDGET
        self.only_better = CheckBox(text=T.CHK_ONLY_BETTER, value=True, tooltip=T.TIP_ONLY_BETTER)
        self.train_btn = PushButton(text=T.BTN_TRAIN)
        self.cancel_btn = PushButton(text=T.BTN_CANCEL, enabled=False)
        self.bar = ProgressBar(value=0, min=0, max=1000, visible=False, label="")
        self.status = text_label("")
        self.plot = CurvePlot()
        self.result_lbl = text_label("")
        self.rounds_lbl = text_label("", tooltip=T.TIP_ROUNDS)
        self.then_predict = CheckBox(text=T.CHK_THEN_PREDICT, value=True)
        self.repredict_btn = PushButton(text=T.BTN_REPREDICT_NONE, enabled=False)
        self.rollback_btn = PushButton(text=T.BTN_ROLLBACK)
        self.extend(
            [
                self.ready_lbl,
                self.loss,
                self.start_from,
                self.epochs,
                self.steps,
                self.patch,
                self.budget,
                self.only_better,
                self.then_predict,
                self.train_btn,
                self.cancel_btn,
                self.bar,
                self.status,
            ]
        )
        self.native.layout().addWidget(self.plot)
        self.extend([self.result_lbl, self.rounds_lbl, self.repredict_btn, self.rollback_btn])
        self.train_btn.changed.connect(self.start)
        self.cancel_btn.changed.connect(self.cancel)
        self.repredict_btn.changed.connect(self.repredict)
        self.rollback_btn.changed.connect(self.rollback)
        c = Connections(self.native)
        c.connect(s.events.reviewed_changed, self._update_ready)
        for ev in (viewer.layers.events.inserted, viewer.layers.events.removed):
            c.connect(ev, lambda *_: self._update_ready())
        c.connect(s.events.model_changed, self._update_ready)
        c.connect(s.events.model_changed, self._update_rounds)
        self._update_ready()
        self._update_rounds()

    def _update_ready(self) -> None:
        s = self._session
        if s.loaded is None and s.corr_layer is None:
            self.ready_lbl.value = T.MSG_NO_MODEL
        elif not s.reviewed or s.corr_layer is None:
            self.ready_lbl.value = T.LBL_NEED_REVIEW
        elif len(s.reviewed) == 1:
            self.ready_lbl.value = T.LBL_ONE_REVIEWED
        else:
            model = s.model_label if s.loaded is not None else T.CURRENT_MODEL
            self.ready_lbl.value = T.LBL_READY.format(n=len(s.reviewed), model=model)
        if s.image_layer is not None and s.corr_layer is not None:
            others = [
                lyr.name
                for lyr in self._viewer.layers
                if lyr is not s.image_layer and type(lyr) is type(s.image_layer)
                and not lyr.name.endswith(T.PROB_SUFFIX)
            ]  # fmt: skip
            if others:  # several images open: say which one trains, and how to use them all
                self.ready_lbl.value += " " + T.LBL_ONE_IMAGE.format(image=s.image_name)

    # ------------------------------------------------------------------ training
    def config(self) -> TrainConfig:
        """The training settings the fields describe."""
        from ..training import TrainConfig

        minutes = float(self.budget.value)
        return TrainConfig(
            epochs=int(self.epochs.value),
            steps_per_epoch=int(self.steps.value),
            time_budget_s=minutes * 60 if minutes > 0 else None,
            patch_size=int(self.patch.value),
            loss=str(self.loss.value),
            start=str(self.start_from.value),
            device="auto",
            require_improvement=bool(self.only_better.value),
            # leave one core to napari so the viewer stays responsive
            num_threads=max(1, (os.cpu_count() or 2) - 1),
        )

    @property
    def running(self) -> bool:
        return self._worker is not None

    def start(self) -> None:
        """Fine-tune the session's model on its reviewed, corrected slices (in a worker; the
        GUI thread only copies the reviewed slices, so painting can go on)."""
        s = self._session
        if self.running:
            return
        if s.loaded is None and s.corr_layer is None:
            show_warning(T.MSG_NO_MODEL)
            return
        if s.corr_layer is None or not s.reviewed or s.image_layer is None:
            show_warning(T.MSG_NO_CORR)
            return
        if len(s.reviewed) < 2:  # one slice trains, another validates: no split can do with one
            show_warning(T.LBL_ONE_REVIEWED)
            return
        try:
            stack, corr = as_stack(s.image_layer), s.layer_for(s.corr_layer)
            planes = [(z, np.array(stack[z]), np.asarray(corr[z]) > 0) for z in sorted(s.reviewed)]
            config = self.config()
            registry = get_registry()
            registry.check_writable()  # before training, not after the time budget is spent
        except Exception as e:
            show_warning(user_message(e))
            return
        minutes = float(self.budget.value)
        budget = f"{minutes:g} min" if minutes > 0 else "no time limit"
        self.status.value = T.MSG_PREPARING
        self._cancel = threading.Event()
        self.plot.clear(config.epochs * config.steps_per_epoch)
        self.result_lbl.value = ""
        self.repredict_btn.enabled = False
        self._set_running(True)
        self._worker = start_job(
            finetune_job(
                config, planes, s.loaded, registry, self._cancel, budget, bool(s.image_layer.rgb)
            ),
            on_yield=self._on_progress,
            on_done=self._done,
            on_error=self._failed,
            on_abort=self._aborted,
            on_finish=self._finished,
        )

    def _on_progress(self, ev: str | TrainProgress) -> None:
        if isinstance(ev, str):  # what the job will train on, before the first step
            self.status.value = ev
            show_info(ev)
            return
        self.bar.value = int(1000 * ev.fraction)
        if ev.kind == "step":
            self.plot.add_loss(ev.step, ev.loss)
        elif ev.kind == "epoch" and ev.val_dice is not None:
            self.plot.add_dice(ev.step, ev.val_dice)
        self.status.value = ev.message or T.LBL_TRAINING.format(
            epoch=ev.epoch, step=ev.step, total=ev.total_steps, loss=ev.loss, eta=ev.eta_s
        )

    def _done(self, result: TrainResult) -> None:
        from ..model import load_model

        self.result = result
        version = result.version_id
        compared = result.card.metrics.get("val", {}).get("compared", {})
        msg = T.LBL_RESULT.format(
            version=version,
            n=result.card.metrics.get("val", {}).get("n_images", 0),
            before=_fmt(compared.get("base_dice")),
            after=_fmt(compared.get("new_dice")),
        )
        for note in (result.start_note, result.time_note):  # new weights; what time would buy
            if note:
                msg = f"{msg}\n{note}"
        s = self._session
        self.status.value = T.MSG_TRAIN_DONE.format(
            reason=result.stop_reason.replace("_", " "), epoch=result.best_epoch
        )
        if not result.made_current:  # saved, but the user keeps the model they had
            msg = f"{msg}\n{result.verdict}"
            self.result_lbl.value = msg
            show_warning(msg)
            return
        if result.verdict:  # e.g. a comparison on one or two held-out slices only
            msg = f"{msg}\n{result.verdict}"
        self.result_lbl.value = msg
        show_info(msg)
        device = getattr(s.loaded, "device", "cpu")
        s.set_model(load_model(result.path, device=device), str(version), version)
        self._offer_repredict(version)
        if self.then_predict.value:  # the next round: new predictions, a refreshed queue
            self.repredict()

    def _update_rounds(self) -> None:
        """Validation Dice of each fine-tuning round that led to the session's model."""
        version = self._session.model_version
        rows = []
        if version and version != "bundled":
            try:
                rows = get_registry().lineage(version)
            except Exception:  # a damaged registry is reported where it is used
                rows = []
        parts = []
        for info in rows:
            cmp = info.metrics.get("compared") or {}
            before, after = cmp.get("base_dice"), cmp.get("new_dice", info.val_dice)
            step = f"{_fmt(before)} → {_fmt(after)}" if before is not None else _fmt(after)
            parts.append(f"{info.id} {step}")
        self.rounds_lbl.value = T.LBL_ROUNDS.format(rounds=" · ".join(parts)) if parts else ""

    def _offer_repredict(self, version: str | None) -> None:
        self.repredict_btn.text = T.BTN_REPREDICT.format(version=version)
        self.repredict_btn.enabled = True

    def _aborted(self) -> None:
        self.status.value = T.MSG_TRAIN_CANCELLED
        show_info(T.MSG_TRAIN_CANCELLED)

    def _failed(self, error: BaseException) -> None:
        from napari.utils.notifications import show_error

        self.status.value = user_message(error)
        show_error(user_message(error))

    def _finished(self) -> None:
        self._set_running(False)

    def cancel(self) -> None:
        """Stop training at the next step; nothing is saved."""
        self._cancel.set()
        if self._worker is not None:
            self._worker.quit()

    def _set_running(self, running: bool) -> None:
        if not running:
            self._worker = None
        self.train_btn.enabled = not running
        self.cancel_btn.enabled = running
        self.bar.visible = running

    # ------------------------------------------------------------------ after training
    def repredict(self) -> None:
        """Predict the stack again with the session's (new) model."""
        s = self._session
        if len(s.events.predict_requested) == 0:
            self._viewer.window.add_plugin_dock_widget("napari-bulbseg", "Segment")
        s.events.predict_requested.emit(s.model_version)

    def rollback(self) -> None:
        """Make the previous version current again and load it."""
        from ..model import load_model

        s = self._session
        try:
            reg = get_registry()
            version = reg.rollback()
            loaded = load_model(reg.path_of(version), device=getattr(s.loaded, "device", "cpu"))
        except Exception as e:
            show_warning(user_message(e))
            return
        s.set_model(loaded, str(version), version)
        self.result_lbl.value = T.LBL_ROLLED.format(version=version)
        self._offer_repredict(version)
        show_info(self.result_lbl.value)
