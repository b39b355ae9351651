"""The "correct next" queue: unreviewed slices, most worth correcting first (engine: ranking)."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import QAbstractItemView, QListWidget, QListWidgetItem

from . import _text as T
from ._jobs import start_job
from ._qt import Connections, single_shot

if TYPE_CHECKING:
    from ..postprocess import PostProcess
    from ..ranking import SliceScore
    from ._session import Session

#: rows the list shows before it scrolls (it must not push the dock past a laptop screen)
VISIBLE_ROWS = 4


def score_job(
    prob: np.ndarray, done: np.ndarray, spec: PostProcess, expected_max: int, is_stack: bool
) -> Generator[int, None, list[SliceScore]]:
    """Score the predicted slices in a worker (the engine's generator; one slice per step)."""
    from ..ranking import iter_score_stack

    return (
        yield from iter_score_stack(
            prob, spec, expected_max, is_stack=is_stack, slices=np.flatnonzero(done)
        )
    )


class CorrectNextQueue(QListWidget):
    """Ranked unreviewed slices; a click (or :meth:`top`) says which slice to show.

    Scores are recomputed in the background after every prediction and every change of the
    rules (debounced); reviewing a slice only removes it from the list."""

    #: the rows were rebuilt
    refilled = Signal()

    def __init__(self, session: Session, goto: Callable[[int], Any]) -> None:
        super().__init__()
        self._session = s = session
        self._goto = goto
        self._worker: Any = None
        self._again = False
        self.scores: list[SliceScore] = []
        self._is_stack = True
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setToolTip(T.TIP_QUEUE)
        row = self.fontMetrics().height() + 6
        self.setFixedHeight(row * VISIBLE_ROWS + 6)
        self.itemActivated.connect(self._activated)
        self.itemClicked.connect(self._activated)
        self._timer = single_shot(self, 400, self.recompute)
        c = Connections(self)
        c.connect(s.events.prediction_updated, self._on_prediction)
        c.connect(s.events.prediction_started, self._on_started)
        c.connect(s.events.spec_changed, lambda *_: self._timer.start())
        c.connect(s.events.counts_changed, self._on_counts)
        c.connect(s.events.reviewed_changed, self.refill)
        self._expected = s.expected_max

    # ------------------------------------------------------------------ scoring
    def _on_started(self) -> None:
        self.scores = []
        self.refill()

    def _on_prediction(self, _z: int = -1) -> None:
        self._timer.start()

    def _on_counts(self) -> None:
        if self._session.expected_max != self._expected:  # the expected maximum changed
            self._expected = self._session.expected_max
            self._timer.start()

    def recompute(self) -> None:
        """Score every predicted slice under the current rules, in a worker."""
        s = self._session
        if s.prob is None or s.done is None or not s.done.any():
            return
        if self._worker is not None:
            self._again = True  # one pass at a time; the newest state is scored next
            return
        image = s.image_layer
        is_stack = image is not None and image.ndim >= 3 and s.prob.shape[0] > 1
        self._is_stack = is_stack
        prob = s.prob
        self._worker = start_job(
            score_job(prob, s.done.copy(), s.spec, int(s.expected_max), is_stack),
            on_done=lambda scores: self._scored(scores, prob),
            on_finish=self._finished,
        )

    @property
    def busy(self) -> bool:
        return self._worker is not None or self._timer.isActive()

    def _scored(self, scores: list[SliceScore], prob: np.ndarray) -> None:
        if prob is not self._session.prob:  # a new prediction began meanwhile
            self._again = True
            return
        self.scores = scores
        self.refill()

    def _finished(self) -> None:
        self._worker = None
        if self._again:
            self._again = False
            self.recompute()

    # ------------------------------------------------------------------ the list
    def ranked(self) -> list[SliceScore]:
        """Unreviewed slices, most worth correcting first."""
        from ..ranking import rank

        return rank(self.scores, exclude=self._session.reviewed, spread=self._is_stack)

    def top(self, besides: int | None = None) -> int | None:
        """The slice to correct next (not ``besides``), or None when none is left."""
        for sc in self.ranked():
            if sc.index != besides:
                return int(sc.index)
        return None

    def refill(self) -> None:
        self.clear()
        for sc in self.ranked():
            item = QListWidgetItem(T.QUEUE_ROW.format(z=sc.index, score=sc.score, why=sc.reasons))
            item.setData(Qt.ItemDataRole.UserRole, int(sc.index))
            self.addItem(item)
        self.refilled.emit()

    def _activated(self, item: QListWidgetItem) -> None:
        self._goto(int(item.data(Qt.ItemDataRole.UserRole)))
