"""Progress events yielded by long jobs (prediction, training) and a helper to drain them."""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

R = TypeVar("R")


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` units of work finished."""

    done: int
    total: int
    message: str = ""
    #: index of the slice a prediction event refers to (``-1`` when not slice-specific)
    slice_index: int = -1
    #: slices whose probabilities became final with this event (prediction; in order)
    finished: tuple[int, ...] = ()

    @property
    def fraction(self) -> float:
        return 1.0 if self.total <= 0 else min(1.0, self.done / self.total)


@dataclass(frozen=True)
class TrainProgress:
    """One step or epoch of training."""

    epoch: int
    step: int
    total_steps: int
    loss: float
    lr: float
    elapsed_s: float
    eta_s: float
    val_loss: float | None = None
    val_dice: float | None = None
    message: str = ""
    #: ``"step"`` after an optimiser step, ``"validate"`` while a validation pass (or the final
    #: check against the base model) runs, ``"epoch"`` after an epoch's validation pass,
    #: ``"probe"`` after a step of the automatic start's trial (``TrainRun.choose_start``)
    kind: str = "step"

    @property
    def fraction(self) -> float:
        return 1.0 if self.total_steps <= 0 else min(1.0, self.step / self.total_steps)


def drain(gen: Generator[Any, Any, R], callback: Callable[[Any], Any] | None = None) -> R:
    """Run a job generator to the end, passing each event to ``callback``; return its result."""
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(event)
