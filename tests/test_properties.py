"""Property-based tests (hypothesis, derandomized): io round trips, post-processing laws, metrics.

Examples are small and few, so the whole file runs in a few seconds; ``derandomize=True`` makes
every run try the same examples (a failure reproduces).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_bulbseg import io
from napari_bulbseg.metrics import SliceMetrics, slice_metrics, stack_metrics
from napari_bulbseg.postprocess import (
    DIFF_FN,
    DIFF_FP,
    DIFF_TN,
    DIFF_TP,
    PostProcess,
    count_objects,
    difference_map,
    fill_holes,
    label_objects,
    postprocess_slice,
    threshold_prob,
)

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

side = st.integers(1, 12)
masks2d = hnp.arrays(bool, st.tuples(side, side))


@st.composite
def mask_pairs(draw, max_side: int = 12) -> tuple[np.ndarray, np.ndarray]:
    shape = draw(st.tuples(st.integers(1, max_side), st.integers(1, max_side)))
    return draw(hnp.arrays(bool, shape)), draw(hnp.arrays(bool, shape))


@st.composite
def prob_maps(draw) -> np.ndarray:
    """Smooth-ish probability maps with several blobs, as float32, float16 or uint8."""
    shape = draw(st.tuples(st.integers(1, 16), st.integers(1, 16)))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    p = rng.random(shape)
    if min(shape) > 2 and draw(st.booleans()):
        from scipy import ndimage as ndi

        p = ndi.uniform_filter(p, 3)
    dtype = draw(st.sampled_from(["float32", "float16", "uint8"]))
    return np.rint(p * 255).astype(np.uint8) if dtype == "uint8" else p.astype(dtype)


thresholds = st.floats(0.01, 1.0, allow_nan=False)


# ---------------------------------------------------------------------------------------- io

IO_DTYPES = ["uint8", "uint16", "int16", "float32", "float64", "int8", "uint32"]


@SETTINGS
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9)),
    dtype=st.sampled_from(IO_DTYPES),
    name=st.sampled_from(["a.tif", "a b ß.tiff", "x.ome.tif"]),
    compression=st.sampled_from([None, "zlib"]),
    lazy=st.booleans(),
    seed=st.integers(0, 1000),
    pixel=st.one_of(st.none(), st.floats(0.01, 50.0)),
)
def test_write_read_stack_round_trip(shape, dtype, name, compression, lazy, seed, pixel):
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        arr = (rng.standard_normal(shape) * 1000).astype(dt)
    else:
        info = np.iinfo(dt)
        arr = rng.integers(info.min, info.max, shape, dtype=dt, endpoint=True)
    with tempfile.TemporaryDirectory() as d:
        p = io.write_tiff(
            Path(d) / name, arr, axes="ZYX", compression=compression, pixel_size=pixel
        )
        st_ = io.read_stack(p, lazy=lazy)
        try:
            assert st_.shape == shape and st_.axes == "ZYX" and st_.dtype == dt
            np.testing.assert_array_equal(np.asarray(st_.data), arr)
            for z in range(shape[0]):
                np.testing.assert_array_equal(st_.plane(z), arr[z])
            if pixel is not None:
                assert st_.pixel_size == pytest.approx((pixel, pixel), rel=1e-5)
        finally:
            st_.close()
        assert [q.name for q in Path(d).iterdir()] == [Path(p).name]  # no temp file left


@SETTINGS
@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.sampled_from([3, 4])),
    seed=st.integers(0, 1000),
)
def test_rgb_round_trip(shape, seed):
    arr = np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8, endpoint=True)
    with tempfile.TemporaryDirectory() as d:
        p = io.write_tiff(Path(d) / "c.tif", arr, axes="YXC")
        s = io.read_stack(p)
        assert s.rgb and s.shape == (1, *shape)
        np.testing.assert_array_equal(s.data[0], arr)


@SETTINGS
@given(
    mask=hnp.arrays(bool, st.tuples(st.integers(1, 3), st.integers(1, 10), st.integers(1, 10))),
    suffix=st.sampled_from([".tif", ".png"]),
    encoding=st.sampled_from(["bool", "01", "0255"]),
)
def test_mask_round_trip(mask, suffix, encoding):
    if suffix == ".png":
        mask = mask[:1]
    data = {"bool": mask, "01": mask.astype(np.uint8), "0255": mask.astype(np.uint8) * 255}
    with tempfile.TemporaryDirectory() as d:
        p = io.write_mask(Path(d) / f"m{suffix}", data[encoding])
        back = io.read_mask(p)
    assert back.dtype == np.uint8 and set(np.unique(back)) <= {0, 1}
    np.testing.assert_array_equal(back.reshape(mask.shape), mask.astype(np.uint8))


@SETTINGS
@given(values=hnp.arrays(np.uint8, st.tuples(st.integers(1, 6), st.integers(1, 6))))
def test_to_binary_mask_accepts_exactly_the_documented_encodings(values):
    present = set(np.unique(values).tolist())
    if present <= {0, 1, 255}:
        np.testing.assert_array_equal(io.to_binary_mask(values), (values != 0).astype(np.uint8))
    else:
        with pytest.raises(io.InputError, match="not a binary mask"):
            io.to_binary_mask(values)


# ---------------------------------------------------------------------------- post-processing

specs = st.builds(
    PostProcess,
    threshold=thresholds,
    min_size=st.integers(0, 6),
    fill_holes=st.booleans(),
    keep_largest=st.integers(0, 3),
)


@SETTINGS
@given(prob=prob_maps(), spec=specs)
def test_postprocess_is_idempotent(prob, spec):
    once = postprocess_slice(prob, spec)
    assert once.dtype == np.uint8 and set(np.unique(once)) <= {0, 1}
    twice = postprocess_slice(once.astype(np.float32), spec)
    np.testing.assert_array_equal(twice, once)


@SETTINGS
@given(
    prob=prob_maps(),
    t=st.lists(thresholds, min_size=2, max_size=2),
    min_size=st.integers(0, 5),
    fill=st.booleans(),
)
def test_mask_shrinks_as_the_threshold_rises(prob, t, min_size, fill):
    lo, hi = sorted(t)
    a = postprocess_slice(prob, PostProcess(lo, min_size=min_size, fill_holes=fill))
    b = postprocess_slice(prob, PostProcess(hi, min_size=min_size, fill_holes=fill))
    assert not (b & ~a).any()  # mask(hi) ⊆ mask(lo)


@SETTINGS
@given(prob=prob_maps(), t=thresholds, n=st.integers(1, 4), min_size=st.integers(0, 4))
def test_keep_largest_keeps_at_most_n_objects_and_the_biggest(prob, t, n, min_size):
    base = postprocess_slice(prob, PostProcess(t, min_size=min_size))
    kept = postprocess_slice(prob, PostProcess(t, min_size=min_size, keep_largest=n))
    assert count_objects(kept) == min(n, count_objects(base))
    assert not (kept & ~base).any()
    sizes = lambda m: sorted(np.bincount(label_objects(m)[0].ravel())[1:].tolist())  # noqa: E731
    assert sizes(kept) == sizes(base)[::-1][:n][::-1]  # the n largest sizes survive


@SETTINGS
@given(prob=prob_maps(), t=thresholds, min_size=st.integers(0, 8))
def test_min_size_removes_only_small_objects(prob, t, min_size):
    raw = threshold_prob(prob, t)
    out = postprocess_slice(prob, PostProcess(t, min_size=min_size)).astype(bool)
    labels, n = label_objects(raw)
    for lab in range(1, n + 1):
        obj = labels == lab
        if obj.sum() >= min_size:
            assert out[obj].all()  # big objects kept whole
        else:
            assert not out[obj].any()  # small objects removed entirely
    assert not (out & ~raw).any()


@SETTINGS
@given(mask=masks2d)
def test_fill_holes_is_a_superset_and_idempotent(mask):
    filled = fill_holes(mask)
    assert not (mask & ~filled).any()
    np.testing.assert_array_equal(fill_holes(filled), filled)
    # only enclosed background changes: the border of the image is never filled in
    border = np.ones_like(mask)
    border[1:-1, 1:-1] = False
    np.testing.assert_array_equal(filled[border], mask[border])


# ---------------------------------------------------------------------------------- metrics


def _finite(m) -> bool:
    return all(
        math.isfinite(getattr(m, f.name))
        for f in fields(m)
        if isinstance(getattr(m, f.name), float)
    )


@SETTINGS
@given(pair=mask_pairs())
def test_metrics_laws(pair):
    t, p = pair
    m = slice_metrics(t, p)
    r = slice_metrics(p, t)
    assert _finite(m) and _finite(r)  # no NaN, ever (empty cases defined)
    for name in ("dice", "iou", "pixel_error", "precision", "recall"):
        assert 0.0 <= getattr(m, name) <= 1.0
    assert m.dice == pytest.approx(r.dice) and m.iou == pytest.approx(r.iou)  # symmetric
    assert m.pixel_error == pytest.approx(r.pixel_error)
    assert m.precision == pytest.approx(r.recall) and m.recall == pytest.approx(r.precision)
    assert m.dice == pytest.approx(2 * m.iou / (1 + m.iou))
    assert m.tp + m.fp + m.fn + m.tn == t.size
    assert m.hits == r.hits and m.misses == r.false_positives
    d = difference_map(t, p)
    counts = {c: int((d == c).sum()) for c in (DIFF_TN, DIFF_TP, DIFF_FP, DIFF_FN)}
    assert counts == {DIFF_TN: m.tn, DIFF_TP: m.tp, DIFF_FP: m.fp, DIFF_FN: m.fn}


@SETTINGS
@given(pair=mask_pairs(), match_iou=st.sampled_from([0.0, 0.3, 0.5, 0.9]))
def test_pooled_equals_per_slice_for_one_slice(pair, match_iou):
    t, p = pair
    sm = stack_metrics(t[None], p[None], match_iou=match_iou)
    one = slice_metrics(t, p, match_iou=match_iou)
    assert sm.per_slice == [one]
    for f in fields(SliceMetrics):
        if f.name != "index":
            assert getattr(sm.summary, f.name) == pytest.approx(getattr(one, f.name)), f.name
    assert sm.mean.dice == pytest.approx(one.dice) and _finite(sm.summary)


@SETTINGS
@given(
    stack=hnp.arrays(bool, st.tuples(st.integers(1, 4), st.integers(1, 8), st.integers(1, 8))),
    seed=st.integers(0, 100),
)
def test_pooled_metrics_are_bounded_and_never_nan(stack, seed):
    pred = np.random.default_rng(seed).random(stack.shape) > 0.5
    sm = stack_metrics(stack, pred)
    assert _finite(sm.summary) and all(_finite(m) for m in sm.per_slice)
    for name in ("dice", "iou", "pixel_error", "precision", "recall"):
        assert 0.0 <= getattr(sm.summary, name) <= 1.0
        assert 0.0 <= getattr(sm.mean, name) <= 1.0
    assert sm.summary.tp == sum(m.tp for m in sm.per_slice)
