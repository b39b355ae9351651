"""Normalisation and channel conversion: one code path for training and prediction."""

import numpy as np
import pytest

from napari_bulbseg.errors import InputError, ModelError
from napari_bulbseg.normalize import (
    Normalization,
    convert_channels,
    normalize_channel,
    prepare_image,
)


def test_percentiles_map_to_unit_range():
    rng = np.random.default_rng(0)
    x = rng.integers(110, 4095, size=(64, 80)).astype(np.uint16)  # 12-bit content in uint16
    y = normalize_channel(x, Normalization(low=1, high=99))
    assert y.dtype == np.float32
    assert np.percentile(y, 1) == pytest.approx(0, abs=1e-3)
    assert np.percentile(y, 99) == pytest.approx(1, abs=1e-3)


def test_12bit_data_is_not_divided_by_65535():
    x = np.full((16, 16), 200, np.uint16)
    x[4:8, 4:8] = 4000
    y = normalize_channel(x, Normalization(method="minmax"))
    assert y.max() == pytest.approx(1.0) and y.min() == pytest.approx(0.0)


def test_constant_image_gives_zeros_not_nan():
    y = normalize_channel(np.full((8, 8), 7.0), Normalization())
    assert np.all(y == 0) and np.isfinite(y).all()


def test_nan_pixels_become_background_and_do_not_poison_percentiles():
    x = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    x[0, 0] = np.nan
    x[0, 1] = np.inf
    y = normalize_channel(x, Normalization(method="minmax"))
    assert np.isfinite(y).all() and y[0, 0] == 0 and y[0, 1] == 0
    assert y.max() == pytest.approx(1.0)


def test_all_nan_is_a_clear_error():
    with pytest.raises(InputError, match="no finite"):
        normalize_channel(np.full((4, 4), np.nan, np.float32), Normalization())


def test_large_images_subsample_consistently():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2048, 2048)).astype(np.float32)
    y = normalize_channel(x, Normalization())
    # subsampled percentiles stay close to the exact ones
    lo, hi = np.percentile(x, [1, 99.8])
    exact = (x - lo) / (hi - lo)
    assert np.abs(y - exact).max() < 0.02


def test_channel_rules():
    rgb = np.zeros((5, 6, 3), np.uint8)
    rgb[..., 1] = 100
    grey = convert_channels(rgb, 1)
    assert grey.shape == (1, 5, 6) and grey[0, 0, 0] == pytest.approx(58.7, abs=0.01)
    rgba = np.concatenate([rgb, np.full((5, 6, 1), 255, np.uint8)], axis=-1)
    assert convert_channels(rgba, 3).shape == (3, 5, 6)
    assert convert_channels(np.ones((5, 6)), 3).shape == (3, 5, 6)
    with pytest.raises(ModelError, match="1 channel but the image has 2"):
        convert_channels(np.ones((5, 6, 2)), 1)
    with pytest.raises(InputError):
        convert_channels(np.ones((2, 5, 6, 3)), 1)


def test_prepare_image_matches_manual():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 1000, size=(32, 32)).astype(np.uint16)
    norm = Normalization(low=2, high=98)
    got = prepare_image(x, 1, norm)
    lo, hi = np.percentile(x.astype(np.float32), [2, 98])
    np.testing.assert_allclose(got[0], (x - lo) / (hi - lo), rtol=1e-5, atol=1e-5)


def test_invalid_settings_are_rejected():
    with pytest.raises(ModelError):
        Normalization(low=50, high=10)
    with pytest.raises(ModelError):
        Normalization(method="zscore-ish")
    assert Normalization.from_dict(Normalization(low=3).to_dict()) == Normalization(low=3)
