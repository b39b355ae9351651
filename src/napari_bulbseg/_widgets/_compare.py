"""What the Review panel shows, computed without Qt: difference maps, metrics and their text."""

from __future__ import annotations

from collections.abc import Generator, Iterable
from typing import TYPE_CHECKING

import numpy as np

from . import _text as T

if TYPE_CHECKING:
    from ..metrics import SliceMetrics, StackMetrics


def slice_pixels(
    truth: np.ndarray, pred: np.ndarray, z: int
) -> tuple[np.ndarray, SliceMetrics, str]:
    """Difference map, pixel-only :class:`~napari_bulbseg.metrics.SliceMetrics` (object counts
    left at 0) and label text of slice ``z`` — no object labelling, so it is quick enough for
    the GUI thread at any image size; :func:`slice_objects_job` adds the objects."""
    from ..metrics import SliceMetrics
    from ..postprocess import difference_map

    t, p = np.asarray(truth) > 0, np.asarray(pred) > 0
    tp = int(np.count_nonzero(t & p))
    fp, fn = int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp
    m = SliceMetrics.from_counts(z, tp, fp, fn, t.size - tp - fp - fn, 0, 0, 0)
    text = T.LBL_SLICE.format(z=z, dice=m.dice, iou=m.iou, fp=m.fp, fn=m.fn)
    return difference_map(t, p), m, text


def slice_objects_job(
    truth: np.ndarray, pred: np.ndarray, z: int
) -> Generator[None, None, SliceMetrics]:
    """Worker body: the full metrics of slice ``z`` (object matching labels both masks)."""
    from ..metrics import slice_metrics

    yield
    return slice_metrics(np.asarray(truth) > 0, pred, index=z)


def stack_job(
    truth: np.ndarray, pred: np.ndarray, slices: list[int]
) -> Generator[None, None, tuple[np.ndarray, StackMetrics | None]]:
    """Worker body: the whole stack's difference map and metrics over ``slices`` (or None)."""
    from ..metrics import stack_metrics
    from ..postprocess import difference_map

    diff = difference_map(truth, pred)
    yield
    return diff, (stack_metrics(truth, pred, slices=slices) if slices else None)


def summary_text(sm: StackMetrics) -> str:
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
