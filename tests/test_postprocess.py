"""Thresholding, object priors and the difference map."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import label as sk_label
from skimage.morphology import remove_small_objects

from napari_bulbseg.errors import InputError
from napari_bulbseg.postprocess import (
    DIFF_COLORS,
    DIFF_FN,
    DIFF_FP,
    DIFF_TN,
    DIFF_TP,
    PostProcess,
    as_bool_mask,
    count_objects,
    difference_map,
    fill_holes,
    label_objects,
    label_sizes,
    object_prior_violations,
    postprocess_slice,
    postprocess_stack,
    threshold_prob,
    to_float_prob,
)

# every non-negative finite float16 up to 1.0
ALL_F16 = np.arange(0, 0x3C01, dtype=np.uint16).view(np.float16)
THRESHOLDS = [1e-6, 0.001, 0.1, 0.25, 0.3, 0.5, 0.6, 0.7, 0.9, 0.999, 1.0, 128 / 255, 0.3000488]


def random_blobs(rng: np.random.Generator, shape=(64, 64), p=0.3, sigma=1.5) -> np.ndarray:
    field = ndi.gaussian_filter(rng.random(shape), sigma)
    return field > np.quantile(field, 1 - p)


# --- PostProcess ---------------------------------------------------------------------------


def test_postprocess_round_trips_through_dict():
    spec = PostProcess(threshold=0.4, min_size=10, fill_holes=True, keep_largest=2)
    assert spec.to_dict() == {
        "threshold": 0.4,
        "min_size": 10,
        "fill_holes": True,
        "keep_largest": 2,
    }
    assert PostProcess.from_dict(spec.to_dict()) == spec


def test_postprocess_normalises_numpy_scalars():
    spec = PostProcess(threshold=np.float32(0.5), min_size=np.int64(3))
    assert type(spec.threshold) is float and type(spec.min_size) is int


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 0.0},
        {"threshold": -0.1},
        {"threshold": 1.5},
        {"threshold": float("nan")},
        {"threshold": "0.5"},
        {"min_size": -1},
        {"min_size": 2.5},
        {"keep_largest": -2},
        {"keep_largest": True},
        {"fill_holes": "yes"},
    ],
)
def test_postprocess_rejects_bad_values(kwargs):
    with pytest.raises(InputError):
        PostProcess(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(InputError, match="thresh"):
        PostProcess.from_dict({"thresh": 0.5})


# --- thresholds ----------------------------------------------------------------------------


def test_from_card_is_the_card_rule_with_overrides():
    from napari_bulbseg.model import ModelCard

    card = ModelCard(name="c", threshold=0.3, postprocess={"threshold": 0.9, "min_size": 5})
    before = dict(card.postprocess)
    assert PostProcess.from_card(card) == PostProcess(threshold=0.3, min_size=5)
    # None means "not given"; 0 and False are real values
    got = PostProcess.from_card(card, threshold=None, min_size=0, fill_holes=True)
    assert got == PostProcess(threshold=0.3, min_size=0, fill_holes=True)
    assert PostProcess.from_card(card, threshold=0.6).threshold == 0.6
    assert card.postprocess == before
    with pytest.raises(InputError, match="Unknown post-processing"):
        PostProcess.from_card(card, smooth=2)
    with pytest.raises(InputError, match="outside"):
        PostProcess.from_card(card, threshold=1.5)


def test_to_float_prob():
    u8 = np.array([0, 51, 255], dtype=np.uint8)
    f = to_float_prob(u8)
    assert f.dtype == np.float32
    np.testing.assert_allclose(f, [0.0, 0.2, 1.0], rtol=1e-7)
    f16 = np.array([0.25], dtype=np.float16)
    assert to_float_prob(f16) is f16
    with pytest.raises(InputError):
        to_float_prob(np.array([1], dtype=np.int32))


def test_threshold_is_greater_or_equal():
    p = np.array([[0.49, 0.5, 0.51]], dtype=np.float32)
    assert postprocess_slice(p, PostProcess(0.5)).tolist() == [[0, 1, 1]]


@pytest.mark.parametrize("t", THRESHOLDS)
def test_float16_threshold_is_exact_for_every_value(t):
    expected = ALL_F16.astype(np.float64) >= t
    np.testing.assert_array_equal(threshold_prob(ALL_F16, t), expected)
    np.testing.assert_array_equal(threshold_prob(ALL_F16.astype(np.float32), t), expected)
    np.testing.assert_array_equal(threshold_prob(ALL_F16.astype(np.float64), t), expected)


def test_float32_threshold_not_rounded_to_float32():
    t = 0.1  # float32(0.1) is slightly above 0.1
    below = np.nextafter(np.float32(0.1), np.float32(0))
    p = np.array([below, np.float32(0.1)], dtype=np.float32)
    expected = p.astype(np.float64) >= t
    assert expected.tolist() == [False, True]
    np.testing.assert_array_equal(threshold_prob(p, t), expected)


@pytest.mark.parametrize("t", THRESHOLDS)
def test_uint8_threshold_agrees_with_float_paths(t):
    u8 = np.arange(256, dtype=np.uint8)
    as_float = to_float_prob(u8)
    expected = as_float.astype(np.float64) >= t
    np.testing.assert_array_equal(threshold_prob(u8, t), expected)
    np.testing.assert_array_equal(threshold_prob(as_float, t), expected)
    # the documented shortcut: uint8 >= ceil(t * 255)
    assert int(np.argmax(expected)) == math.ceil(t * 255)


def test_values_exactly_at_threshold_agree_across_dtypes():
    u8 = np.array([127, 128, 129], dtype=np.uint8)
    t = 128 / 255
    f32 = to_float_prob(u8)
    f16 = f32.astype(np.float16)
    at_t16 = float(f16[1])  # a threshold exactly equal to a float16 value
    assert threshold_prob(u8, t).tolist() == [False, True, True]
    assert threshold_prob(f32, t).tolist() == [False, True, True]
    assert threshold_prob(f16, at_t16).tolist() == [False, True, True]
    assert threshold_prob(f16.astype(np.float32), at_t16).tolist() == [False, True, True]


def test_nan_and_negative_probabilities_are_background():
    for dtype in (np.float16, np.float32):
        p = np.array([np.nan, -0.0, -0.5, -np.inf, np.inf, 0.7], dtype=dtype)
        assert threshold_prob(p, 0.5).tolist() == [False, False, False, False, True, True]


def test_threshold_of_strided_float16_view():
    rng = np.random.default_rng(3)
    p = rng.random((20, 30)).astype(np.float16)
    view = p[::2, 1::3]
    np.testing.assert_array_equal(threshold_prob(view, 0.4), view.astype(np.float32) >= 0.4)


def test_postprocess_slice_dtypes_agree_on_random_maps():
    rng = np.random.default_rng(4)
    u8 = rng.integers(0, 256, size=(40, 50), dtype=np.uint8)
    f32 = to_float_prob(u8)
    spec = PostProcess(threshold=0.5, min_size=3, fill_holes=True, keep_largest=3)
    ref = postprocess_slice(f32, spec)
    assert ref.dtype == np.uint8 and set(np.unique(ref)) <= {0, 1}
    np.testing.assert_array_equal(postprocess_slice(u8, spec), ref)
    np.testing.assert_array_equal(postprocess_slice(f32.astype(np.float64), spec), ref)


# --- object steps --------------------------------------------------------------------------


def test_min_size_removes_small_objects_hand_case():
    m = np.zeros((6, 6), dtype=np.float32)
    m[0, 0] = 1  # 1 px
    m[2:4, 2:4] = 1  # 4 px
    m[5, 5] = 1  # 1 px, not touching the square
    out = postprocess_slice(m, PostProcess(0.5, min_size=2))
    expected = np.zeros((6, 6), np.uint8)
    expected[2:4, 2:4] = 1
    np.testing.assert_array_equal(out, expected)


def test_diagonal_pixels_form_one_object():
    m = np.eye(4, dtype=np.float32)  # 4 pixels touching only at corners
    assert count_objects(m) == 1
    assert postprocess_slice(m, PostProcess(0.5, min_size=4)).sum() == 4
    assert postprocess_slice(m, PostProcess(0.5, min_size=5)).sum() == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_size_matches_skimage(seed):
    rng = np.random.default_rng(seed)
    m = random_blobs(rng, (80, 90), p=0.25, sigma=1.0)
    for min_size in (2, 5, 20):
        ours = postprocess_slice(m.astype(np.float32), PostProcess(0.5, min_size=min_size))
        # skimage removes objects with size <= max_size; we remove size < min_size
        ref = remove_small_objects(m, max_size=min_size - 1, connectivity=2)
        assert ours.sum() < m.sum()  # the case really removes something
        np.testing.assert_array_equal(ours.astype(bool), ref)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_count_objects_matches_skimage_label(seed):
    rng = np.random.default_rng(seed)
    m = random_blobs(rng, (70, 60), p=0.3, sigma=1.0)
    n = sk_label(m, connectivity=2).max()
    assert n > 3
    assert count_objects(m.astype(np.uint8)) == n
    assert count_objects(m.astype(np.uint8) * 255) == n


def test_keep_largest_keeps_the_biggest():
    m = np.zeros((10, 20), dtype=np.float32)
    m[0:2, 0:2] = 1  # 4 px
    m[5:9, 0:3] = 1  # 12 px
    m[0:3, 10:13] = 1  # 9 px
    m[6:9, 15:20] = 1  # 15 px
    out = postprocess_slice(m, PostProcess(0.5, keep_largest=2))
    expected = np.zeros_like(m, dtype=np.uint8)
    expected[5:9, 0:3] = 1
    expected[6:9, 15:20] = 1
    np.testing.assert_array_equal(out, expected)
    assert postprocess_slice(m, PostProcess(0.5, keep_largest=10)).sum() == m.sum()


def test_keep_largest_ties_go_to_the_first_in_raster_order():
    m = np.zeros((8, 8), dtype=np.float32)
    m[6:8, 0:2] = 1  # 4 px, starts on row 6
    m[0:2, 6:8] = 1  # 4 px, starts on row 0: first in raster order
    m[3:5, 3:5] = 1  # 4 px, starts on row 3
    out = postprocess_slice(m, PostProcess(0.5, keep_largest=2))
    expected = np.zeros((8, 8), np.uint8)
    expected[0:2, 6:8] = 1
    expected[3:5, 3:5] = 1
    np.testing.assert_array_equal(out, expected)


def test_keep_largest_with_many_survivors_uses_lookup_path():
    # more than 4 kept objects exercises the lookup-table branch
    m = np.zeros((5, 40), dtype=np.float32)
    for k in range(8):
        m[0 : 1 + (k % 3), 5 * k : 5 * k + 2] = 1
    m[4, 0] = 1  # a 1-px speck to remove
    out = postprocess_slice(m, PostProcess(0.5, min_size=2, keep_largest=6))
    ref_sizes = sorted(np.bincount(sk_label(out, connectivity=2).ravel())[1:].tolist())
    # sizes 2,4,6,2,4,6,2,4: the six largest are 6,6,4,4,4 and the first 2 in raster order
    assert ref_sizes == [2, 4, 4, 4, 6, 6]
    assert out[0, 0:2].all() and not out[0, 15:17].any() and not out[0, 30:32].any()
    assert out[4, 0] == 0


@pytest.mark.parametrize("n_blobs", [3, 200])  # both counting paths (sort and bincount)
def test_label_sizes_matches_bincount(n_blobs):
    rng = np.random.default_rng(n_blobs)
    m = np.zeros((100, 100), dtype=bool)
    ys, xs = rng.integers(0, 50, n_blobs) * 2, rng.integers(0, 50, n_blobs) * 2
    m[ys, xs] = True  # isolated pixels on an even grid ...
    m[ys[0] : ys[0] + 2, :] = True  # ... plus one long bar
    labels, n = label_objects(m)
    assert (n > 64) == (n_blobs > 64)
    sizes = label_sizes(labels, m, n)
    expected = np.bincount(labels.ravel(), minlength=n + 1)
    expected[0] = 0
    np.testing.assert_array_equal(sizes, expected)


def test_min_size_then_keep_largest():
    m = np.zeros((10, 10), dtype=np.float32)
    m[0, 0] = 1  # 1 px
    m[4:6, 4:6] = 1  # 4 px
    out = postprocess_slice(m, PostProcess(0.5, min_size=5, keep_largest=1))
    assert out.sum() == 0


def test_fill_holes_hand_case():
    ring = np.zeros((7, 7), dtype=np.float32)
    ring[1:6, 1:6] = 1
    ring[2:5, 2:5] = 0  # 3x3 hole
    ring[3, 3] = 1  # island inside the hole
    out = postprocess_slice(ring, PostProcess(0.5, fill_holes=True))
    expected = np.zeros((7, 7), np.uint8)
    expected[1:6, 1:6] = 1
    np.testing.assert_array_equal(out, expected)
    # a gap through the ring: the inside reaches the border, no hole
    open_ring = ring.copy()
    open_ring[3, 1] = 0
    out = postprocess_slice(open_ring, PostProcess(0.5, fill_holes=True))
    np.testing.assert_array_equal(out, open_ring.astype(np.uint8))


def test_hole_leaking_diagonally_is_still_a_hole():
    # background connected to the outside only through a corner is a hole (4-connected
    # background is the complement of 8-connected objects)
    m2 = np.ones((4, 4), dtype=bool)
    m2[1, 1] = False
    m2[2, 2] = False
    m2[3, 3] = False  # (1,1)-(2,2)-(3,3) diagonal chain to the border: still holes
    np.testing.assert_array_equal(fill_holes(m2), ndi.binary_fill_holes(m2))
    assert fill_holes(m2)[1, 1] and fill_holes(m2)[2, 2] and not fill_holes(m2)[3, 3]


@pytest.mark.parametrize("seed", range(6))
def test_fill_holes_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    m = random_blobs(rng, (60, 70), p=0.6, sigma=1.2)
    ref = ndi.binary_fill_holes(m)
    assert (ref != m).any()  # the case has holes
    np.testing.assert_array_equal(fill_holes(m), ref)
    spec = PostProcess(0.5, fill_holes=True)
    np.testing.assert_array_equal(postprocess_slice(m.astype(np.float16), spec), ref)


def test_fill_holes_of_empty_and_full_masks():
    assert not fill_holes(np.zeros((4, 4))).any()
    assert fill_holes(np.ones((4, 4))).all()


def test_threshold_only_returns_plain_threshold():
    rng = np.random.default_rng(5)
    p = rng.random((30, 30)).astype(np.float32)
    np.testing.assert_array_equal(postprocess_slice(p, PostProcess(0.7)), (p >= 0.7))


def test_postprocess_slice_rejects_3d():
    with pytest.raises(InputError):
        postprocess_slice(np.zeros((2, 4, 4), np.float32), PostProcess())


# --- stacks --------------------------------------------------------------------------------


def test_postprocess_stack_matches_slices_and_fills_out(tmp_path):
    rng = np.random.default_rng(6)
    prob = ndi.gaussian_filter(rng.random((3, 40, 40)), (0, 2, 2)).astype(np.float16)
    prob = ((prob - prob.min()) / (prob.max() - prob.min())).astype(np.float16)
    spec = PostProcess(0.5, min_size=4, keep_largest=2, fill_holes=True)
    out = np.lib.format.open_memmap(tmp_path / "m.npy", mode="w+", dtype=np.uint8, shape=prob.shape)
    result = postprocess_stack(prob, spec, out=out)
    assert result is out
    for z in range(3):
        np.testing.assert_array_equal(out[z], postprocess_slice(prob[z], spec))
    assert 0 < out.sum() < out.size


def test_postprocess_stack_2d_becomes_one_slice():
    p = np.array([[0.2, 0.8]], dtype=np.float32)
    out = postprocess_stack(p, PostProcess())
    assert out.shape == (1, 1, 2) and out.tolist() == [[[0, 1]]]


def test_postprocess_stack_rejects_bad_out():
    p = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(InputError):
        postprocess_stack(p, PostProcess(), out=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(InputError):
        postprocess_stack(p, PostProcess(), out=np.zeros((2, 4, 5), np.uint8))
    with pytest.raises(InputError):
        postprocess_stack(np.zeros((2, 2, 4, 4), np.float32), PostProcess())


def test_object_prior_violations():
    m = np.zeros((3, 6, 6), np.uint8)
    m[0, 0, 0] = m[0, 5, 5] = 1  # 2 objects
    m[1, 0, 0] = m[1, 5, 5] = m[1, 0, 5] = 1  # 3 objects
    m[2, 0:2, 0:2] = 1  # 1 object
    assert object_prior_violations(m, 2) == [1]
    assert object_prior_violations(m, 1) == [0, 1]
    assert object_prior_violations(m, 3) == []
    assert object_prior_violations(m[1], 2) == [0]
    with pytest.raises(InputError):
        object_prior_violations(m, -1)


# --- difference map ------------------------------------------------------------------------


def test_difference_map_codes():
    truth = np.array([[0, 1], [0, 1]], dtype=np.uint8)
    pred = np.array([[0, 1], [255, 0]], dtype=np.uint8)  # 0/255 accepted
    diff = difference_map(truth, pred)
    assert diff.dtype == np.uint8
    assert diff.tolist() == [[DIFF_TN, DIFF_TP], [DIFF_FP, DIFF_FN]]
    assert (DIFF_TN, DIFF_TP, DIFF_FP, DIFF_FN) == (0, 1, 2, 3)
    # bool and 3D inputs
    diff3 = difference_map(truth.astype(bool)[None], pred.astype(bool)[None])
    assert diff3.shape == (1, 2, 2) and diff3[0].tolist() == diff.tolist()


def test_difference_map_shape_mismatch():
    with pytest.raises(InputError):
        difference_map(np.zeros((2, 2)), np.zeros((2, 3)))


def test_difference_colors():
    assert set(DIFF_COLORS) == {DIFF_TN, DIFF_TP, DIFF_FP, DIFF_FN}
    assert DIFF_COLORS[DIFF_TN][3] == 0  # transparent
    fp, fn, tp = (np.array(DIFF_COLORS[c][:3]) for c in (DIFF_FP, DIFF_FN, DIFF_TP))
    assert np.abs(fp - fn).sum() > 1.5  # clearly different hues
    assert DIFF_COLORS[DIFF_TP][3] < DIFF_COLORS[DIFF_FP][3]  # TP muted
    assert np.ptp(tp) < 0.1  # grey


@pytest.mark.parametrize(
    "values",
    [
        np.array([[0, 1], [1, 0]], np.uint8),
        np.array([[0, 255], [0, 0]], np.uint16),
        np.array([[0.0, 1.0], [255.0, 0.0]], np.float32),
        np.array([[True, False], [False, True]]),
    ],
)
def test_one_mask_rule_for_files_and_arrays(values):
    """as_bool_mask is io's mask rule (with instance labels allowed): same answers, same words."""
    from napari_bulbseg import io

    np.testing.assert_array_equal(as_bool_mask(values), io.to_binary_mask(values).astype(bool))


@pytest.mark.parametrize(
    "bad, words",
    [
        (
            np.full((3, 3), 0.3, np.float32),
            ("not a binary mask", "0.3", "looks like probabilities"),
        ),
        (np.array([[0.0, np.nan]]), ("not a binary mask", "nan", "looks like probabilities")),
        (np.array([["a"]]), ("not a number type",)),
    ],
)
def test_one_mask_rule_refuses_alike(bad, words):
    from napari_bulbseg import io

    with pytest.raises(InputError) as a:
        as_bool_mask(bad, "prediction")
    with pytest.raises(InputError) as b:
        io.to_binary_mask(bad, "The prediction")
    assert str(a.value) == str(b.value)
    assert all(w in str(a.value) for w in words)
    # integer instance labels: foreground for metrics, refused as a mask file
    labels = np.array([[0, 2], [7, 0]], np.int32)
    np.testing.assert_array_equal(as_bool_mask(labels), labels > 0)
    with pytest.raises(InputError, match="labels > 0"):
        io.to_binary_mask(labels)
