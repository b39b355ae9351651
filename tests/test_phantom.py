"""Synthetic bulb stacks: determinism, exact masks, object counts."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_bulbseg.errors import InputError
from napari_bulbseg.phantom import bulb_phantom
from napari_bulbseg.postprocess import count_objects


@pytest.fixture(scope="module")
def default_phantom():
    return bulb_phantom()


def test_shapes_and_types(default_phantom):
    image, mask = default_phantom
    assert image.shape == mask.shape == (8, 256, 256)
    assert image.dtype == np.uint16 and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1}


def test_deterministic_per_seed(default_phantom):
    image, mask = default_phantom
    image2, mask2 = bulb_phantom()
    np.testing.assert_array_equal(image, image2)
    np.testing.assert_array_equal(mask, mask2)
    image3, mask3 = bulb_phantom(seed=1)
    assert not np.array_equal(mask, mask3)
    assert not np.array_equal(image, image3)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("n_slices", [3, 4, 7, 12])
def test_slices_with_zero_one_and_two_bulbs(seed, n_slices):
    _, mask = bulb_phantom(n_slices, (64, 64), seed)
    counts = [count_objects(m) for m in mask]
    assert set(counts) == {0, 1, 2}


@pytest.mark.parametrize("max_objects", [0, 1, 3])
def test_max_objects(max_objects):
    for seed in range(4):
        _, mask = bulb_phantom(10, (48, 120), seed, max_objects=max_objects)
        counts = [count_objects(m) for m in mask]
        assert max(counts) <= max_objects
        if max_objects:
            assert max(counts) >= min(max_objects, 2)


def test_bulbs_are_smooth_in_z(default_phantom):
    _, mask = default_phantom
    area = mask.sum(axis=(1, 2)).astype(float)
    present = area > 0
    # a bulb present in a slice is present in a contiguous run of slices (no flicker)
    runs = np.flatnonzero(np.diff(present.astype(int)))
    assert len(runs) <= 2
    # consecutive slices overlap strongly where both hold bulbs
    for z in range(len(mask) - 1):
        a, b = mask[z].astype(bool), mask[z + 1].astype(bool)
        if a.any() and b.any() and count_objects(a) == count_objects(b):
            assert (a & b).sum() / (a | b).sum() > 0.5


def test_mask_is_the_ellipse_including_the_bright_rim(default_phantom):
    image, mask = default_phantom
    img = image.astype(float)
    z = int(np.argmax(mask.sum(axis=(1, 2))))
    m = mask[z].astype(bool)
    edge = m & ~ndi.binary_erosion(m)  # the outermost mask pixels lie on the rim
    outside = ndi.binary_dilation(m, iterations=6) & ~ndi.binary_dilation(m, iterations=2)
    interior = ndi.binary_erosion(m, iterations=8)
    rim_level = np.median(img[z][edge])
    assert rim_level > 2.5 * np.median(img[z][outside])  # the rim is bright ...
    assert rim_level > 1.5 * np.median(img[z][interior])  # ... brighter than the interior
    assert np.median(img[z][interior]) > 1.5 * np.median(img[z][outside])  # interior above bg
    assert np.std(img[z][interior]) > 0  # textured, not flat


def test_background_is_textured_noise(default_phantom):
    image, mask = default_phantom
    bg = image[0].astype(float)
    assert mask[0].sum() == 0
    assert bg.std() > 20  # noise
    assert bg.min() >= 0


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_dtypes(dtype):
    image, _ = bulb_phantom(3, (48, 48), 2, dtype=dtype)
    assert image.dtype == dtype
    assert image.max() > 0
    if dtype == np.uint8:
        assert image.max() <= 255 and image.max() > 150  # uses the range, rim not all clipped
        assert np.mean(image == 255) < 0.01


def test_single_slice_and_two_slices():
    _, mask = bulb_phantom(1, (64, 64), 0)
    assert mask.shape == (1, 64, 64) and count_objects(mask[0]) == 2
    _, mask = bulb_phantom(2, (64, 64), 0)
    assert [count_objects(m) for m in mask] == [0, 2]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_slices": 0},
        {"shape": (16, 64)},
        {"max_objects": -1},
        {"max_objects": 10, "shape": (64, 64)},
        {"dtype": np.int32},
    ],
)
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(InputError):
        bulb_phantom(**kwargs)


def test_membrane_phantom_is_an_em_like_stack_with_interiors_as_foreground():
    from napari_bulbseg.phantom import membrane_phantom

    img, mask = membrane_phantom(4, (96, 128), seed=3)
    assert img.shape == mask.shape == (4, 96, 128) and img.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1}
    fg = mask.mean()
    assert 0.6 < fg < 0.92  # interiors are the majority, membranes thin
    assert img[mask == 0].mean() < img[mask == 1].mean() - 30  # membranes are dark
    again, mask2 = membrane_phantom(4, (96, 128), seed=3)
    assert np.array_equal(img, again) and np.array_equal(mask, mask2)
    assert not np.array_equal(mask[0], mask[1])  # the cells drift through the stack
    other, _ = membrane_phantom(4, (96, 128), seed=4)
    assert not np.array_equal(img, other)


@pytest.mark.parametrize(
    "kw", [{"n_slices": 0}, {"shape": (16, 64)}, {"cell_size": 2.0}, {"cell_size": float("nan")}]
)
def test_membrane_phantom_refuses_bad_settings(kw):
    from napari_bulbseg.errors import InputError
    from napari_bulbseg.phantom import membrane_phantom

    with pytest.raises(InputError):
        membrane_phantom(**kw)
