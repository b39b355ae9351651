"""Pixel and object metrics, stack aggregation and the CSV report."""

from __future__ import annotations

import csv
import itertools
import math
import os
from dataclasses import fields

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import label as sk_label

from napari_bulbseg import metrics as metrics_mod
from napari_bulbseg.errors import InputError
from napari_bulbseg.metrics import (
    CSV_COLUMNS,
    SliceMetrics,
    StackMetrics,
    match_objects,
    slice_metrics,
    stack_metrics,
    write_metrics_csv,
)

RATIOS = ("dice", "iou", "pixel_error", "precision", "recall")


def box(shape, *boxes) -> np.ndarray:
    m = np.zeros(shape, dtype=np.uint8)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = 1
    return m


def all_finite(m) -> bool:
    return all(math.isfinite(getattr(m, f.name)) for f in fields(m))


# --- pixel metrics -------------------------------------------------------------------------


def test_hand_computed_4x4():
    truth = box((4, 4), (0, 2, 0, 2))  # 4 px
    pred = box((4, 4), (0, 2, 1, 3))  # 4 px, 2 shared
    m = slice_metrics(truth, pred, index=7)
    assert (m.index, m.tp, m.fp, m.fn, m.tn) == (7, 2, 2, 2, 10)
    assert m.dice == pytest.approx(0.5)
    assert m.iou == pytest.approx(1 / 3)
    assert m.precision == pytest.approx(0.5)
    assert m.recall == pytest.approx(0.5)
    assert m.pixel_error == pytest.approx(0.25)
    # one object each, IoU 1/3: no match at 0.5, a match at 0.3
    assert (m.n_true, m.n_pred, m.hits, m.misses, m.false_positives) == (1, 1, 0, 1, 1)
    assert slice_metrics(truth, pred, match_iou=0.3).hits == 1


def test_asymmetric_precision_and_recall():
    truth = box((4, 4), (0, 4, 0, 2))  # 8 px
    pred = box((4, 4), (0, 2, 0, 2))  # 4 px, all inside the truth
    m = slice_metrics(truth, pred)
    assert (m.tp, m.fp, m.fn) == (4, 0, 4)
    assert m.precision == 1.0
    assert m.recall == pytest.approx(0.5)
    assert m.dice == pytest.approx(8 / 12)
    assert m.iou == pytest.approx(0.5)
    assert m.hits == 0  # IoU exactly 0.5 is not > 0.5


@pytest.mark.parametrize("seed", range(4))
def test_pixel_metrics_match_direct_formulas(seed):
    rng = np.random.default_rng(seed)
    t = rng.random((30, 40)) < 0.3
    p = rng.random((30, 40)) < 0.4
    m = slice_metrics(t, p)
    inter, a, b = (t & p).sum(), t.sum(), p.sum()
    assert m.dice == pytest.approx(2 * inter / (a + b))
    assert m.iou == pytest.approx(inter / (t | p).sum())
    assert m.pixel_error == pytest.approx((t != p).mean())
    assert m.precision == pytest.approx(inter / b)
    assert m.recall == pytest.approx(inter / a)
    assert m.n_true == sk_label(t, connectivity=2).max()
    assert m.n_pred == sk_label(p, connectivity=2).max()
    assert m.tp + m.fp + m.fn + m.tn == t.size


def test_nonzero_is_foreground():
    truth = box((4, 4), (0, 2, 0, 2))
    pred = box((4, 4), (0, 2, 1, 3))
    ref = slice_metrics(truth, pred)
    assert slice_metrics(truth * 255, pred * 255) == ref
    assert slice_metrics(truth.astype(bool), pred.astype(np.float32)) == ref


def test_shape_mismatch_and_bad_inputs():
    with pytest.raises(InputError):
        slice_metrics(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(InputError):
        slice_metrics(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(InputError):
        slice_metrics(np.zeros((4, 4)), np.zeros((4, 4)), match_iou=1.0)
    with pytest.raises(InputError):
        match_objects(np.zeros((4, 4)), np.zeros((4, 4)), match_iou=-0.1)
    with pytest.raises(InputError):
        stack_metrics(np.zeros((2, 4, 4)), np.zeros((3, 4, 4)))


# --- empty slices --------------------------------------------------------------------------


def test_both_empty_is_perfect_not_nan():
    z = np.zeros((5, 5), np.uint8)
    m = slice_metrics(z, z)
    assert all_finite(m)
    assert (m.dice, m.iou, m.precision, m.recall, m.pixel_error) == (1, 1, 1, 1, 0)
    assert (m.n_true, m.n_pred, m.hits, m.misses, m.false_positives) == (0, 0, 0, 0, 0)


def test_empty_truth_with_prediction():
    z = np.zeros((5, 5), np.uint8)
    p = box((5, 5), (0, 1, 0, 2))
    m = slice_metrics(z, p)
    assert all_finite(m)
    assert (m.dice, m.iou, m.precision, m.recall) == (0, 0, 0, 1)
    assert m.pixel_error == pytest.approx(2 / 25)
    assert (m.n_true, m.n_pred, m.hits, m.misses, m.false_positives) == (0, 1, 0, 0, 1)


def test_truth_with_empty_prediction():
    z = np.zeros((5, 5), np.uint8)
    t = box((5, 5), (0, 1, 0, 2), (3, 5, 3, 5))
    m = slice_metrics(t, z)
    assert all_finite(m)
    assert (m.dice, m.iou, m.precision, m.recall) == (0, 0, 1, 0)
    assert (m.n_true, m.n_pred, m.hits, m.misses, m.false_positives) == (2, 0, 0, 2, 0)


def test_all_empty_stack_has_no_nan():
    z = np.zeros((3, 6, 6), np.uint8)
    sm = stack_metrics(z, z)
    for m in [*sm.per_slice, sm.summary]:
        assert all_finite(m)
    assert sm.summary.dice == 1 and sm.mean.dice == 1
    assert all(math.isfinite(getattr(sm.mean, f)) for f in RATIOS)


# --- object matching -----------------------------------------------------------------------


def test_split_object():
    truth = box((4, 5), (0, 4, 0, 5))  # one 20-px object
    pred = box((4, 5), (0, 4, 0, 2), (0, 4, 3, 5))  # split into two 8-px halves, IoU 0.4 each
    assert match_objects(truth, pred) == (0, 1, 2)
    # with a lower threshold one half matches, the other stays a false positive
    assert match_objects(truth, pred, match_iou=0.3) == (1, 0, 1)


def test_merged_objects():
    truth = box((4, 6), (0, 4, 0, 4), (0, 4, 5, 6))  # 16 px and 4 px, one column apart
    pred = box((4, 6), (0, 4, 0, 6))  # one 24-px object covering both
    # IoU 16/24 for the big one (a hit), 4/24 for the small one (a miss)
    assert match_objects(truth, pred) == (1, 1, 0)
    m = slice_metrics(truth, pred)
    assert (m.n_true, m.n_pred, m.hits, m.misses, m.false_positives) == (2, 1, 1, 1, 0)


def test_diagonal_touching_is_one_object_in_metrics_too():
    truth = np.eye(3, dtype=np.uint8)
    assert slice_metrics(truth, truth).n_true == 1


def test_speck_beside_a_perfect_object_is_a_false_positive():
    truth = box((10, 10), (2, 6, 2, 6))
    pred = truth.copy()
    pred[9, 9] = 1
    m = slice_metrics(truth, pred)
    assert (m.hits, m.misses, m.false_positives) == (1, 0, 1)
    assert m.dice > 0.95  # pixel metrics barely notice what object metrics flag


def test_low_threshold_prefers_more_matches():
    # T0 overlaps P0 best, but matching T0-P1 and T1-P0 gives two matches instead of one
    ti = np.array([1, 1, 2])
    pj = np.array([1, 2, 1])
    iou = np.array([0.45, 0.3, 0.3])
    assert metrics_mod._assign(ti, pj, iou) == 2


def brute_force_matches(truth, pred, thr) -> int:
    lt, nt = ndi.label(truth, np.ones((3, 3)))
    lp, n_p = ndi.label(pred, np.ones((3, 3)))
    iou = np.zeros((nt, n_p))
    for i in range(nt):
        for j in range(n_p):
            a, b = lt == i + 1, lp == j + 1
            iou[i, j] = (a & b).sum() / (a | b).sum()
    best = 0
    small, big = sorted([nt, n_p])
    for perm in itertools.permutations(range(big), small):
        pairs = zip(range(small), perm) if nt <= n_p else zip(perm, range(small))
        best = max(best, sum(iou[i, j] > thr for i, j in pairs))
    return best


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("thr", [0.5, 0.1, 0.0])
def test_matching_agrees_with_brute_force(seed, thr):
    rng = np.random.default_rng(seed)

    def field():
        f = ndi.gaussian_filter(rng.random((24, 24)), 2.0)
        return (f - f.mean()) / f.std()

    # a prediction correlated with the truth (shifted, noisy) gives IoUs on both sides of 0.5
    f = field()
    g = np.roll(f, 1, axis=1) + 0.7 * field()
    truth, pred = f > np.quantile(f, 0.6), g > np.quantile(g, 0.6)
    nt, n_p = ndi.label(truth, np.ones((3, 3)))[1], ndi.label(pred, np.ones((3, 3)))[1]
    assert 2 <= max(nt, n_p) <= 6  # small enough for brute force, big enough to matter
    hits, misses, fps = match_objects(truth, pred, match_iou=thr)
    assert hits == brute_force_matches(truth, pred, thr)
    assert hits + misses == nt and hits + fps == n_p


# --- stacks --------------------------------------------------------------------------------


def crafted_stack():
    truth = np.zeros((3, 20, 20), np.uint8)
    pred = np.zeros_like(truth)
    truth[0, 0:10, 0:10] = pred[0, 0:10, 0:10] = 1  # 100 px, perfect
    truth[1, 5, 5] = 1  # 1 px truth ...
    pred[1, 15, 15] = 1  # ... predicted elsewhere: Dice 0
    # slice 2 empty in both: Dice 1
    return truth, pred


def test_pooled_and_mean_differ():
    truth, pred = crafted_stack()
    sm = stack_metrics(truth, pred)
    assert [m.dice for m in sm.per_slice] == [1.0, 0.0, 1.0]
    assert sm.mean.dice == pytest.approx(2 / 3)
    assert sm.summary.dice == pytest.approx(200 / 202)
    assert sm.summary.index == -1
    assert (sm.summary.tp, sm.summary.fp, sm.summary.fn) == (100, 1, 1)
    assert sm.summary.tn == 3 * 400 - 102
    assert (sm.summary.n_true, sm.summary.hits, sm.summary.false_positives) == (2, 1, 1)
    assert sm.summary.pixel_error == pytest.approx(2 / 1200)
    assert sm.mean.n_slices == 3 and sm.slices == [0, 1, 2]


def test_pooled_equals_metrics_of_concatenated_slices():
    rng = np.random.default_rng(9)
    truth = rng.random((4, 16, 16)) < 0.3
    pred = rng.random((4, 16, 16)) < 0.3
    sm = stack_metrics(truth, pred)
    flat = slice_metrics(truth.reshape(-1, 16), pred.reshape(-1, 16))
    for name in (*RATIOS, "tp", "fp", "fn", "tn"):
        assert getattr(sm.summary, name) == pytest.approx(getattr(flat, name))


def test_slice_selection():
    truth, pred = crafted_stack()
    sm = stack_metrics(truth, pred, slices=[1, 0])
    assert sm.slices == [1, 0]
    assert [m.index for m in sm.per_slice] == [1, 0]
    assert sm.summary.dice == pytest.approx(200 / 202)
    assert sm.mean.dice == pytest.approx(0.5)
    for bad in ([3], [-1], [], [0.5]):
        with pytest.raises(InputError):
            stack_metrics(truth, pred, slices=bad)


def test_lazy_stack_and_2d_input():
    truth, pred = crafted_stack()

    class Lazy:
        shape = truth.shape

        def __getitem__(self, z):
            return truth[z]

    assert stack_metrics(Lazy(), pred).summary == stack_metrics(truth, pred).summary
    sm2 = stack_metrics(truth[0], pred[0])
    assert sm2.slices == [0] and sm2.summary.dice == 1.0


# --- CSV -----------------------------------------------------------------------------------


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_write_metrics_csv(tmp_path):
    truth, pred = crafted_stack()
    sm = stack_metrics(truth, pred)
    path = write_metrics_csv(tmp_path / "sub" / "metrics.csv", sm)
    rows = read_csv(path)
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r[0] for r in rows[1:]] == ["0", "1", "2", "pooled", "mean"]
    pooled = dict(zip(CSV_COLUMNS, rows[4]))
    assert float(pooled["dice"]) == sm.summary.dice
    assert int(pooled["tp"]) == 100
    mean = dict(zip(CSV_COLUMNS, rows[5]))
    assert float(mean["dice"]) == pytest.approx(2 / 3)
    assert mean["tp"] == "" and mean["hits"] == ""
    assert float(dict(zip(CSV_COLUMNS, rows[2]))["dice"]) == 0.0
    assert os.listdir(path.parent) == ["metrics.csv"]  # no temp files left


def test_write_metrics_csv_is_atomic(tmp_path, monkeypatch):
    truth, pred = crafted_stack()
    sm = stack_metrics(truth, pred)
    path = tmp_path / "metrics.csv"
    path.write_text("old")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(metrics_mod.os, "replace", failing_replace)
    with pytest.raises(InputError, match="left unchanged"):
        write_metrics_csv(path, sm)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["metrics.csv"]


def test_stack_metrics_from_slices_of_different_sizes():
    a = slice_metrics(box((4, 4), (0, 2, 0, 2)), box((4, 4), (0, 2, 0, 2)), index=0)
    b = slice_metrics(box((2, 3), (0, 1, 0, 1)), np.zeros((2, 3)), index=1)
    sm = StackMetrics.from_slices([a, b])
    assert sm.slices == [0, 1]
    assert (sm.summary.tp, sm.summary.fn, sm.summary.tn) == (4, 1, 12 + 5)
    assert sm.summary.dice == pytest.approx(8 / 9)
    assert sm.mean.dice == pytest.approx(0.5)
    with pytest.raises(InputError):
        StackMetrics.from_slices([])


def test_slice_metrics_from_counts_rule():
    m = SliceMetrics.from_counts(0, tp=0, fp=0, fn=0, tn=0)
    assert (m.dice, m.pixel_error) == (1.0, 0.0)
