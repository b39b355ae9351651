"""Pixel and object metrics comparing a predicted mask with the ground truth.

Masks: any non-zero value is foreground (``bool``, ``{0, 1}`` and ``{0, 255}`` all work).
Objects are 8-connected components, exactly as in :mod:`napari_bulbseg.postprocess`.

Every ratio whose denominator is zero is defined as **1** ("nothing to find, nothing found
wrongly"), so no metric is ever NaN:

============================  =====  =====  =========  ======  ===========
slice                         dice   iou    precision  recall  pixel_error
============================  =====  =====  =========  ======  ===========
truth empty, pred empty       1      1      1          1       0
truth empty, pred not empty   0      0      0          1       fp / N
truth not empty, pred empty   0      0      1          0       fn / N
============================  =====  =====  =========  ======  ===========

Stack summaries come in two flavours: :attr:`StackMetrics.summary` pools the pixel and object
counts of all chosen slices and computes each ratio once (the headline: a slice with a
thousand bulb pixels weighs a thousand times more than one with a single pixel), and
:attr:`StackMetrics.mean` averages the per-slice ratios (every slice weighs the same; empty
slices, which score 1, pull it up).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .atomic import atomic_write
from .errors import InputError
from .postprocess import STRUCTURE, as_bool_mask, label_sizes, threshold_prob

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_THRESHOLDS",
    "MeanMetrics",
    "SliceMetrics",
    "StackMetrics",
    "best_threshold",
    "match_objects",
    "pooled_counts",
    "pooled_pixel_metrics",
    "slice_metrics",
    "stack_metrics",
    "threshold_sweep",
    "write_metrics_csv",
]

#: dense overlap tables (np.bincount) up to this many cells; np.unique for fewer objects
#: (faster when few pairs share millions of pixels) or more cells
_DENSE_OVERLAP_CELLS = 1 << 22
_FEW_OBJECTS = 64


#: thresholds swept on a validation set (training, the Threshold widget, benchmarks)
DEFAULT_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


# ------------------------------------------------------------------ pooled pixel counts of
# probabilities: how training validates, picks its threshold and scores a model


def pooled_counts(prob: np.ndarray, mask: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """``(tp, fp, fn)`` of ``prob >= threshold`` (the rule of ``postprocess``) against ``mask``."""
    pred = threshold_prob(prob, threshold)
    truth = mask.astype(bool)
    tp = int(np.count_nonzero(pred & truth))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(truth)) - tp


def dice_from_counts(tp: int, fp: int, fn: int) -> float:
    """Dice of pixel counts; 1 when there is nothing to find and nothing found."""
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2.0 * tp / denom


def pooled_pixel_metrics(
    probs: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float
) -> dict[str, float]:
    """Dice, IoU, precision, recall and pixel error of ``prob >= threshold`` with the counts of
    all images pooled (each ratio computed once), plus ``n_pixels``."""
    tp = fp = fn = n = 0
    for p, m in zip(probs, masks, strict=True):
        a, b, c = pooled_counts(p, m, threshold)
        tp, fp, fn, n = tp + a, fp + b, fn + c, n + m.size
    return {
        "dice": dice_from_counts(tp, fp, fn),
        "iou": tp / (tp + fp + fn) if tp + fp + fn else 1.0,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "pixel_error": (fp + fn) / n if n else 0.0,
        "n_pixels": int(n),
    }


def threshold_sweep(
    probs: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> list[list[float]]:
    """Pooled Dice (over all pixels of all images) of ``prob >= t`` for each threshold ``t``.

    Returns ``[[t, dice], ...]`` in threshold order.
    """
    if len(probs) != len(masks) or not probs:
        raise InputError("threshold_sweep needs matching, non-empty probs and masks", "")
    totals = np.zeros((len(thresholds), 3), dtype=np.int64)
    for p, m in zip(probs, masks, strict=True):
        if p.shape != m.shape:
            raise InputError(f"Probability shape {p.shape} ≠ mask shape {m.shape}", "")
        for i, t in enumerate(thresholds):
            totals[i] += pooled_counts(p, m, t)
    return [
        [float(t), dice_from_counts(*map(int, c))] for t, c in zip(thresholds, totals, strict=True)
    ]


def best_threshold(curve: Sequence[Sequence[float]]) -> tuple[float, float]:
    """The Dice-optimal ``(threshold, dice)``; ties go to the threshold nearest 0.5."""
    if not curve:
        raise InputError("Empty threshold curve", "")
    t, d = max(curve, key=lambda td: (round(td[1], 12), -abs(td[0] - 0.5)))
    return float(t), float(d)


def _ratio(num: float, den: float) -> float:
    """``num / den``, with the empty case ``0 / 0`` defined as 1."""
    return 1.0 if den == 0 else float(num) / float(den)


@dataclass(frozen=True)
class SliceMetrics:
    """Pixel and object agreement for one slice (or pooled over slices, then ``index == -1``).

    ``tp``/``fp``/``fn``/``tn`` count pixels; ``n_true``/``n_pred`` count objects; ``hits`` are
    true objects matched by a predicted one, ``misses`` true objects left unmatched,
    ``false_positives`` predicted objects matching no true object.
    """

    index: int
    dice: float
    iou: float
    pixel_error: float
    precision: float
    recall: float
    tp: int
    fp: int
    fn: int
    tn: int
    n_true: int
    n_pred: int
    hits: int
    misses: int
    false_positives: int

    @classmethod
    def from_counts(
        cls,
        index: int,
        tp: int,
        fp: int,
        fn: int,
        tn: int,
        n_true: int = 0,
        n_pred: int = 0,
        hits: int = 0,
    ) -> SliceMetrics:
        """Build the ratios from pixel and object counts with the empty-case rule (0/0 = 1)."""
        n = tp + fp + fn + tn
        return cls(
            index=int(index),
            dice=_ratio(2 * tp, 2 * tp + fp + fn),
            iou=_ratio(tp, tp + fp + fn),
            pixel_error=0.0 if n == 0 else (fp + fn) / n,
            precision=_ratio(tp, tp + fp),
            recall=_ratio(tp, tp + fn),
            tp=int(tp),
            fp=int(fp),
            fn=int(fn),
            tn=int(tn),
            n_true=int(n_true),
            n_pred=int(n_pred),
            hits=int(hits),
            misses=int(n_true - hits),
            false_positives=int(n_pred - hits),
        )


@dataclass(frozen=True)
class MeanMetrics:
    """Per-slice ratios averaged over ``n_slices`` slices, each slice weighing the same."""

    dice: float
    iou: float
    pixel_error: float
    precision: float
    recall: float
    n_slices: int


@dataclass(frozen=True)
class StackMetrics:
    """Metrics of a stack: per slice, pooled (:attr:`summary`, the headline) and averaged."""

    per_slice: list[SliceMetrics]
    summary: SliceMetrics
    mean: MeanMetrics
    slices: list[int]

    @classmethod
    def from_slices(cls, per_slice: Sequence[SliceMetrics]) -> StackMetrics:
        """Pool and average already computed slice metrics (e.g. images of different sizes)."""
        per_slice = list(per_slice)
        if not per_slice:
            raise InputError("No slices to evaluate", "choose at least one slice")
        return cls(
            per_slice=per_slice,
            summary=_pooled(per_slice),
            mean=_mean(per_slice),
            slices=[m.index for m in per_slice],
        )


def _check_match_iou(match_iou: float) -> float:
    v = float(match_iou)
    if not 0.0 <= v < 1.0:
        raise InputError(
            f"Object matching IoU threshold {match_iou} is outside [0, 1)",
            "use 0.5 (the usual rule) or a value between 0 and 1",
        )
    return v


def _pair(truth: Any, pred: Any, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    t = as_bool_mask(truth, "ground-truth mask")
    p = as_bool_mask(pred, "prediction")
    if t.shape != p.shape:
        raise InputError(
            f"Ground truth and prediction have different shapes: {t.shape} vs {p.shape}",
            "compare a mask with the prediction of the same image (same slices, same size)",
        )
    if t.ndim != ndim:
        raise InputError(
            f"Expected {ndim}D masks, got shape {t.shape}",
            "pass one (Y, X) slice" if ndim == 2 else "pass (Z, Y, X) stacks",
        )
    return t, p


def _count_matches(
    lt: np.ndarray,
    nt: int,
    lp: np.ndarray,
    n_p: int,
    t: np.ndarray,
    p: np.ndarray,
    both: np.ndarray,
    match_iou: float,
) -> int:
    """Number of one-to-one matches with IoU > match_iou between labelled objects."""
    if nt == 0 or n_p == 0:
        return 0
    # sparse overlap table: one entry per (true, predicted) pair that shares pixels
    code = lt[both].astype(np.int64) * (n_p + 1) + lp[both]
    if nt + n_p > _FEW_OBJECTS and (nt + 1) * (n_p + 1) <= _DENSE_OVERLAP_CELLS:
        counts = np.bincount(code, minlength=(nt + 1) * (n_p + 1))
        pairs = np.flatnonzero(counts)
        inter = counts[pairs]
    else:
        pairs, inter = np.unique(code, return_counts=True)
    if pairs.size == 0:
        return 0
    ti, pj = np.divmod(pairs, n_p + 1)
    union = label_sizes(lt, t, nt)[ti] + label_sizes(lp, p, n_p)[pj] - inter
    iou = inter / union
    ok = iou > match_iou
    if not ok.any():
        return 0
    if match_iou >= 0.5:
        # IoU > 0.5 means the pair shares more than half of each object: matches are unique
        return int(np.count_nonzero(ok))
    # below 0.5 an object may qualify with several: maximise the number of matches first,
    # then their total IoU, separately in each connected group of competing pairs
    return _assign(ti[ok], pj[ok], iou[ok])


def _assign(ti: np.ndarray, pj: np.ndarray, iou: np.ndarray) -> int:
    """Size of the best one-to-one matching among candidate pairs ``(ti, pj)`` scored ``iou``."""
    rows, r_idx = np.unique(ti, return_inverse=True)
    cols, c_idx = np.unique(pj, return_inverse=True)
    n_r = rows.size
    graph = coo_matrix(
        (np.ones(ti.size), (r_idx, n_r + c_idx)), shape=(n_r + cols.size,) * 2
    ).tocsr()
    _, group = connected_components(graph, directed=False)
    edge_group = group[r_idx]
    edges_per_group = np.bincount(edge_group)
    matches = int(np.count_nonzero(edges_per_group == 1))  # a lone pair simply matches
    for g in np.flatnonzero(edges_per_group > 1):
        sel = edge_group == g
        gr, gr_idx = np.unique(r_idx[sel], return_inverse=True)
        gc, gc_idx = np.unique(c_idx[sel], return_inverse=True)
        # the bonus outweighs any sum of IoUs, so more matches always win
        weight = np.zeros((gr.size, gc.size))
        weight[gr_idx, gc_idx] = min(gr.size, gc.size) + 1.0 + iou[sel]
        r, c = linear_sum_assignment(weight, maximize=True)
        matches += int(np.count_nonzero(weight[r, c] > 0))
    return matches


def _object_counts(
    t: np.ndarray, p: np.ndarray, both: np.ndarray, match_iou: float
) -> tuple[int, int, int]:
    """``(n_true, n_pred, hits)`` for two 2D boolean masks."""
    lt, nt = ndi.label(t, structure=STRUCTURE)
    lp, n_p = ndi.label(p, structure=STRUCTURE)
    hits = _count_matches(lt, int(nt), lp, int(n_p), t, p, both, match_iou)
    return int(nt), int(n_p), hits


def match_objects(truth2d: Any, pred2d: Any, match_iou: float = 0.5) -> tuple[int, int, int]:
    """Match 8-connected objects one-to-one when their IoU > ``match_iou``.

    Returns ``(hits, misses, false_positives)``: true objects matched, true objects unmatched,
    predicted objects unmatched. A true object split in two halves of equal size matches
    neither (each half has IoU 0.5, not > 0.5); two true objects merged into one prediction match
    at most one of them.
    """
    thr = _check_match_iou(match_iou)
    t, p = _pair(truth2d, pred2d, 2)
    nt, n_p, hits = _object_counts(t, p, t & p, thr)
    return hits, nt - hits, n_p - hits


def slice_metrics(
    truth2d: Any, pred2d: Any, index: int = 0, match_iou: float = 0.5
) -> SliceMetrics:
    """Pixel and object metrics of one 2D slice; see the module docstring for empty slices."""
    thr = _check_match_iou(match_iou)
    t, p = _pair(truth2d, pred2d, 2)
    both = t & p
    tp = int(np.count_nonzero(both))
    n_t = int(np.count_nonzero(t))
    n_p = int(np.count_nonzero(p))
    fp, fn = n_p - tp, n_t - tp
    tn = t.size - tp - fp - fn
    if n_t == 0 and n_p == 0:
        objects = (0, 0, 0)
    else:
        objects = _object_counts(t, p, both, thr)
    return SliceMetrics.from_counts(index, tp, fp, fn, tn, *objects)


def _stack_shape(a: Any) -> tuple[int, ...]:
    return tuple(getattr(a, "shape", np.shape(a)))


def stack_metrics(
    truth: Any, pred: Any, slices: Iterable[int] | None = None, match_iou: float = 0.5
) -> StackMetrics:
    """Metrics of ``(Z, Y, X)`` stacks over ``slices`` (default: all); a 2D pair is one slice.

    ``truth`` and ``pred`` may be lazy (anything returning a plane for ``a[z]``).
    """
    thr = _check_match_iou(match_iou)
    ts, ps = _stack_shape(truth), _stack_shape(pred)
    if ts != ps:
        raise InputError(
            f"Ground truth and prediction have different shapes: {ts} vs {ps}",
            "compare a mask stack with the prediction of the same stack",
        )
    if len(ts) == 2:
        truth, pred = np.asarray(truth)[np.newaxis], np.asarray(pred)[np.newaxis]
        ts = (1, *ts)
    if len(ts) != 3:
        raise InputError(f"Expected (Z, Y, X) mask stacks, got shape {ts}", "pass 3D stacks")
    n_z = ts[0]
    chosen = list(range(n_z)) if slices is None else [_check_index(z, n_z) for z in slices]
    if not chosen:
        raise InputError("No slices to evaluate", "choose at least one slice")
    per_slice = [slice_metrics(truth[z], pred[z], index=z, match_iou=thr) for z in chosen]
    return StackMetrics.from_slices(per_slice)


def _check_index(z: Any, n_z: int) -> int:
    if isinstance(z, bool) or not isinstance(z, (int, np.integer)) or not 0 <= z < n_z:
        raise InputError(
            f"Slice index {z!r} is not in the stack", f"use whole numbers from 0 to {n_z - 1}"
        )
    return int(z)


def _pooled(per_slice: Sequence[SliceMetrics]) -> SliceMetrics:
    def total(name: str) -> int:
        return sum(getattr(m, name) for m in per_slice)

    return SliceMetrics.from_counts(
        -1,
        total("tp"),
        total("fp"),
        total("fn"),
        total("tn"),
        total("n_true"),
        total("n_pred"),
        total("hits"),
    )


def _mean(per_slice: Sequence[SliceMetrics]) -> MeanMetrics:
    def avg(name: str) -> float:
        return float(np.mean([getattr(m, name) for m in per_slice]))

    return MeanMetrics(
        dice=avg("dice"),
        iou=avg("iou"),
        pixel_error=avg("pixel_error"),
        precision=avg("precision"),
        recall=avg("recall"),
        n_slices=len(per_slice),
    )


#: column order of :func:`write_metrics_csv`; the first column holds the slice index, or
#: ``pooled`` / ``mean`` for the two summary rows
CSV_COLUMNS: tuple[str, ...] = ("slice", *[f.name for f in fields(SliceMetrics)][1:])


def _csv_rows(metrics: StackMetrics) -> list[list[str]]:
    def fmt(v: Any) -> str:
        return repr(float(v)) if isinstance(v, float) else str(v)

    rows = []
    for m in [*metrics.per_slice, metrics.summary]:
        label = "pooled" if m is metrics.summary else str(m.index)
        rows.append([label, *(fmt(getattr(m, c)) for c in CSV_COLUMNS[1:])])
    mean = {f.name: fmt(getattr(metrics.mean, f.name)) for f in fields(MeanMetrics)}
    rows.append(["mean", *(mean.get(c, "") for c in CSV_COLUMNS[1:])])
    return rows


def write_metrics_csv(path: str | os.PathLike[str], metrics: StackMetrics) -> Path:
    """Write one row per slice, then a ``pooled`` and a ``mean`` row, atomically; returns the path.

    The ``mean`` row leaves the count columns empty (averaged counts mean nothing).
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder", "give a file name for the CSV, e.g. metrics.csv")
    rows = _csv_rows(metrics)
    with atomic_write(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
    return path
