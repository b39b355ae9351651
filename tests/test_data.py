"""Samples, content keys, the fixed split, patch sampling and augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_bulbseg.data import (
    Augment,
    PatchSampler,
    Split,
    center_crop,
    make_sample,
    prepare_sample,
    samples_from_folders,
    samples_from_slices,
    split_train_val,
)
from napari_bulbseg.errors import InputError
from napari_bulbseg.normalize import Normalization, prepare_image


def disc_sample(seed: int, shape=(48, 48)):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx = rng.integers(7, shape[0] - 7), rng.integers(7, shape[1] - 7)
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < 36).astype(np.uint8)
    image = (100.0 + 800.0 * mask + rng.normal(0, 20, shape)).astype(np.uint16)
    return make_sample(image, mask, source=f"disc {seed}")


def write_pair(folder, name, image, mask):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / "images" / f"{name}.tif", image)
    tifffile.imwrite(folder / "masks" / f"{name}.tif", (mask * 255).astype(np.uint8))


def test_keys_depend_on_content_not_on_names_or_places(tmp_path):
    samples = [disc_sample(i) for i in range(3)]
    for s, name in zip(samples, ["a", "b", "c"]):
        write_pair(tmp_path / "one", name, s.image, s.mask)
    for s, name in zip(samples, ["zz", "yy", "xx"]):
        write_pair(tmp_path / "two", name, s.image, s.mask)
    one = samples_from_folders(tmp_path / "one")
    two = samples_from_folders(tmp_path / "two" / "images", tmp_path / "two" / "masks")
    assert {s.key for s in one} == {s.key for s in two} == {s.key for s in samples}
    assert all(s.mask.dtype == np.uint8 and set(np.unique(s.mask)) <= {0, 1} for s in one)
    # one changed pixel (image or mask) changes the key
    img = samples[0].image.copy()
    img[0, 0] += 1
    assert make_sample(img, samples[0].mask).key != samples[0].key
    m = samples[0].mask.copy()
    m[0, 0] ^= 1
    assert make_sample(samples[0].image, m).key != samples[0].key


def test_samples_from_slices_copies_and_validates():
    stack = np.stack([disc_sample(i).image for i in range(4)])
    masks = np.stack([disc_sample(i).mask for i in range(4)]).astype(bool)
    got = samples_from_slices(stack, masks, [1, 3])
    assert [s.source for s in got] == ["slice 1", "slice 3"]
    assert got[0].key == disc_sample(1).key
    stack[1] = 0  # later edits of the stack do not change a sample
    assert got[0].image.max() > 0
    with pytest.raises(InputError, match="outside"):
        samples_from_slices(stack, masks, [4])
    with pytest.raises(InputError, match="binary"):
        make_sample(stack[0], np.full(stack[0].shape, 7, np.uint8))
    with pytest.raises(InputError, match="shape"):
        make_sample(stack[0], masks[0][:-1])


def test_split_is_stable_and_keeps_parent_sides():
    samples = [disc_sample(i) for i in range(40)]
    _train, val, split = split_train_val(samples, 0.25, salt="s")
    assert 4 <= len(val) <= 18  # ~10 expected
    again = split_train_val(list(reversed(samples)), 0.25, salt="s")[2]
    assert set(again.val) == set(split.val)
    # adding new samples never moves old ones
    more = samples + [disc_sample(i) for i in range(40, 60)]
    bigger = split_train_val(more, 0.25, salt="s")[2]
    assert set(split.val) <= set(bigger.val)
    assert set(split.train) <= set(bigger.train)
    # a parent's placement wins over the hash (here: every side flipped) and its salt is used
    parent = Split(train=list(split.val), val=list(split.train), salt="s")
    _tr, va, child = split_train_val(samples, 0.25, salt="other", parent=parent)
    assert set(child.val) == set(split.train)
    assert child.salt == "s"
    assert {s.key for s in va} == set(split.train)


def test_split_small_sets_and_explicit_val():
    two = [disc_sample(0), disc_sample(1)]
    for frac in (0.0, 0.2, 0.99):
        train, val, _ = split_train_val(two, frac)
        assert len(train) == 1 and len(val) == 1
    train, val, _ = split_train_val([disc_sample(0)], 0.5)
    assert len(train) + len(val) == 1
    # duplicates count once
    train, val, _ = split_train_val([*two, disc_sample(0)], 0.2)
    assert len(train) + len(val) == 2
    explicit = [disc_sample(9)]
    train, val, split = split_train_val(two, 0.5, val_samples=explicit)
    assert [s.key for s in val] == [explicit[0].key]
    assert len(train) == 2 and split.method == "explicit"
    assert Split.from_dict(split.to_dict()).to_dict() == split.to_dict()


def test_prepare_sample_is_the_prediction_normalisation():
    s = disc_sample(3)
    norm = Normalization("percentile", 1.0, 99.8)
    p = prepare_sample(s, 1, norm)
    np.testing.assert_array_equal(p.image, prepare_image(s.image, 1, norm))
    cropped = prepare_sample(s, 1, norm, crop=20)
    assert cropped.image.shape == (1, 20, 20) and cropped.mask.shape == (20, 20)
    # the crop is taken from the image normalised as a whole
    np.testing.assert_array_equal(cropped.image, p.image[:, 14:34, 14:34])
    assert center_crop(np.zeros((10, 30)), (4, 50)).shape == (4, 30)


def test_patches_are_deterministic_and_foreground_aware():
    prepared = [prepare_sample(disc_sample(i, (96, 96)), 1, Normalization()) for i in range(3)]
    a = PatchSampler(prepared, 16, foreground_fraction=1.0, augment=Augment())
    b = PatchSampler(prepared, 16, foreground_fraction=1.0, augment=Augment())
    xa, ya, va = a.batch(8, np.random.default_rng(5))
    xb, yb, _vb = b.batch(8, np.random.default_rng(5))
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    assert xa.shape == (8, 1, 16, 16) and ya.shape == va.shape == (8, 1, 16, 16)
    # centred on foreground: every patch holds some of the (small) disc
    assert all(ya[i].sum() > 0 for i in range(8))
    none = PatchSampler(prepared, 16, foreground_fraction=0.0)
    y0 = none.batch(64, np.random.default_rng(0))[1]
    assert np.mean([y.sum() > 0 for y in y0]) < 0.5  # discs cover ~1% of each image


def test_small_images_are_padded_with_background_and_marked_invalid():
    s = disc_sample(1, (20, 24))
    p = prepare_sample(s, 1, Normalization())
    sampler = PatchSampler([p], 32, foreground_fraction=0.0)
    x, y, v = sampler.batch(1, np.random.default_rng(0))
    assert x.shape == (1, 1, 32, 32)
    assert v.sum() == 20 * 24
    assert y[v == 0].sum() == 0
    assert y.sum() == s.mask.sum()  # all of the real mask is inside the patch
    # reflect padding: the padded image mirrors the real one, no constant border
    np.testing.assert_allclose(x[0, 0, 6:26, 4:28], p.image[0])


def test_augmentation_keeps_image_and_mask_aligned():
    rng = np.random.default_rng(0)
    mask = (rng.random((1, 16, 16)) < 0.3).astype(np.float32)
    img = mask[None, 0].copy()  # image == mask, so any misalignment shows
    aug = Augment(scale=0.0, gamma=0.0, noise=0.0)
    seen = set()
    for seed in range(12):
        x, y, _v = aug(img, mask, np.ones_like(mask), np.random.default_rng(seed))
        np.testing.assert_array_equal(x, y)
        seen.add(x.tobytes())
    assert len(seen) > 3  # flips and rotations really happen
    x, _, _ = Augment(noise=0.0)(img * 0.5 + 0.25, mask, np.ones_like(mask), rng)
    assert 0.1 < x.min() and x.max() < 0.9  # "mild" intensity changes


def test_training_reads_channels_as_prediction_does(tmp_path):
    """A 4-channel hyperstack (not colour) trains a 4-channel model, as predict reads it."""
    from napari_bulbseg import io
    from napari_bulbseg.inference import _as_source

    rng = np.random.default_rng(3)
    mask = disc_sample(0).mask
    chans = rng.integers(0, 1000, (4, *mask.shape)).astype(np.uint16)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    io.write_tiff(tmp_path / "images" / "a.tif", chans, axes="CYX")
    io.write_mask(tmp_path / "masks" / "a.tif", mask)
    (sample,) = samples_from_folders(tmp_path)
    stack = io.read_stack(tmp_path / "images" / "a.tif")
    assert not stack.rgb and sample.rgb is False
    assert sample.channels == 4  # not "RGBA counted as 3"
    norm = Normalization()
    prep = prepare_sample(sample, sample.channels, norm)
    source = _as_source(stack)
    expected = prepare_image(source.plane(0), 4, norm, rgb=source.rgb)
    assert prep.image.shape == (4, *mask.shape)
    np.testing.assert_array_equal(prep.image, expected)
    # the same from the slices of an open stack
    (from_slices,) = samples_from_slices(stack, mask[None])
    assert from_slices.rgb is False and from_slices.channels == 4
    # colour and unknown images keep the RGBA rule
    rgba = np.moveaxis(chans, 0, -1).astype(np.uint8)
    assert make_sample(rgba, mask).channels == 3
    assert make_sample(rgba, mask, rgb=True).channels == 3
