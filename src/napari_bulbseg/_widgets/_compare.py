"""What the Review panel shows, computed without Qt: difference maps, metrics and their text."""

from __future__ import annotations

from collections.abc import Generator, Iterable
from typing import Any

import numpy as np

from . import _text as T


def slice_report(truth: np.ndarray, pred: np.ndarray, z: int) -> tuple[np.ndarray, Any, str]:
    """Difference map, :class:`~napari_bulbseg.metrics.SliceMetrics` and label text of slice
    ``z`` (``truth`` and ``pred`` are that slice's 2D masks)."""
    from ..metrics import slice_metrics
    from ..postprocess import difference_map

    truth = np.asarray(truth) > 0
    m = slice_metrics(truth, pred, index=z)
    text = T.LBL_SLICE.format(z=z, dice=m.dice, iou=m.iou, fp=m.fp, fn=m.fn)
    return difference_map(truth, pred), m, text


def stack_job(
    truth: np.ndarray, pred: np.ndarray, slices: list[int]
) -> Generator[None, None, tuple[np.ndarray, Any]]:
    """Worker body: the whole stack's difference map and metrics over ``slices`` (or None)."""
    from ..metrics import stack_metrics
    from ..postprocess import difference_map

    diff = difference_map(truth, pred)
    yield
    return diff, (stack_metrics(truth, pred, slices=slices) if slices else None)


def summary_text(sm: Any) -> str:
    """One line for a :class:`~napari_bulbseg.metrics.StackMetrics` summary."""
    m = sm.summary
    return T.LBL_SUMMARY.format(
        n=len(sm.slices),
        dice=m.dice,
        iou=m.iou,
        err=100 * m.pixel_error,
        hits=m.hits,
        misses=m.misses,
        fps=m.false_positives,
    )


def summary_slices(done: np.ndarray | None, reviewed: Iterable[int], vs_corrections: bool) -> list:
    """Slices in the stack summary: the predicted ones; against the corrections, only the
    reviewed ones (the others are copies of the prediction and would look perfect)."""
    if done is None:
        return []
    slices = [int(z) for z in np.flatnonzero(done)]
    reviewed = set(reviewed)
    if vs_corrections and reviewed:
        return [z for z in slices if z in reviewed]
    return slices
