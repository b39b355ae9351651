"""Normalisation that does not invent objects, polarity, and the card fields that carry them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from napari_bulbseg.errors import ModelError
from napari_bulbseg.model import ModelCard, load_model
from napari_bulbseg.normalize import (
    Normalization,
    is_bright_background,
    noise_sigma,
    normalize_channel,
    prepare_image,
)

NEW = Normalization("percentile", 1.0, 99.8, polarity="auto", noise_floor=20.0)
OLD = Normalization("percentile", 1.0, 99.8)


def _nuclei(seed: int = 0, shape=(200, 240), bg=100.0, fg=400.0, noise=4.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.full(shape, bg, np.float32)
    for cy, cx in rng.uniform(20, min(shape) - 20, size=(12, 2)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 100] = fg
    return img + rng.normal(0, noise, size=shape).astype(np.float32)


def test_constant_image_maps_to_zero() -> None:
    for norm in (OLD, NEW):
        out = normalize_channel(np.full((50, 60), 1234, np.uint16), norm)
        assert np.all(out == 0)


def test_pure_noise_is_not_stretched_into_objects() -> None:
    noise = np.random.default_rng(3).normal(150, 4, size=(256, 256)).astype(np.float32)
    old = normalize_channel(noise, OLD)
    new = normalize_channel(noise, NEW)
    # without the floor noise spans 0..1 like real objects; with it, it stays well below 0.5
    assert np.percentile(old, 99.8) == pytest.approx(1.0, abs=1e-3)
    assert np.percentile(new, 99.8) < 0.4
    assert noise_sigma(noise) == pytest.approx(4.0, rel=0.1)


def test_real_contrast_is_untouched_by_the_floor() -> None:
    img = _nuclei()
    np.testing.assert_allclose(normalize_channel(img, NEW), normalize_channel(img, OLD), atol=1e-6)


def test_one_saturated_pixel_does_not_change_the_scaling() -> None:
    img = _nuclei()
    hot = img.copy()
    hot[5, 5] = 65535
    a, b = normalize_channel(img, NEW), normalize_channel(hot, NEW)
    mask = np.ones(img.shape, bool)
    mask[5, 5] = False
    assert np.max(np.abs(a[mask] - b[mask])) < 0.02
    # a constant image with one saturated pixel is still empty
    flat = np.full((64, 64), 100, np.float32)
    flat[3, 3] = 4095
    assert np.count_nonzero(normalize_channel(flat, NEW) > 0.5) <= 1


def test_empty_slice_of_a_stack_stays_empty() -> None:
    stack = np.stack([_nuclei(1), np.random.default_rng(2).normal(100, 4, (200, 240))])
    full = prepare_image(stack[0].astype(np.float32), 1, NEW)
    empty = prepare_image(stack[1].astype(np.float32), 1, NEW)
    assert np.mean(full[0] > 0.5) > 0.02
    assert np.mean(empty[0] > 0.5) == 0.0


def test_polarity_round_trip() -> None:
    img = _nuclei()
    inverted = 500.0 - img  # dark nuclei on a bright background
    assert not is_bright_background(img) and is_bright_background(inverted)
    bright = normalize_channel(img, NEW)
    np.testing.assert_allclose(normalize_channel(inverted, NEW), bright, atol=1e-4)
    dark = Normalization(polarity="dark")
    np.testing.assert_allclose(
        normalize_channel(inverted, dark), normalize_channel(img, OLD), atol=1e-4
    )
    # "bright" (the default, and old cards) never inverts
    assert normalize_channel(inverted, OLD)[100, 120] != pytest.approx(bright[100, 120])


def test_rgb_bright_background_through_luminance() -> None:
    grey = 500.0 - _nuclei()
    rgb = np.stack([grey, grey * 0.8, grey * 0.9, np.full_like(grey, 255)], axis=-1)
    x = prepare_image(rgb, 1, NEW)
    assert x.shape == (1, 200, 240)
    assert np.mean(x[0] > 0.5) < 0.3  # nuclei (minority) bright after inversion


@pytest.mark.parametrize(
    "field, value",
    [("polarity", "up"), ("polarity", 1), ("noise_floor", -1), ("noise_floor", math.nan),
     ("noise_floor", "10"), ("noise_floor", True)],
)  # fmt: skip
def test_bad_normalisation_fields_are_model_errors(field, value) -> None:
    with pytest.raises(ModelError):
        Normalization.from_dict({"method": "percentile", field: value})


@pytest.mark.parametrize("value", [0, -5, "30", math.inf, True, [30]])
def test_bad_card_diameter_is_a_model_error(value) -> None:
    d = ModelCard().to_dict()
    d["diameter"] = value
    with pytest.raises(ModelError, match="diameter"):
        ModelCard.from_dict(json.loads(json.dumps(d, allow_nan=True)))


def test_old_card_loads_and_behaves_as_before(tiny_model_dir: Path) -> None:
    card_path = tiny_model_dir / "model.json"
    d = json.loads(card_path.read_text())
    d["format_version"] = 1
    d.pop("diameter", None)
    d["normalization"] = {"method": "percentile", "low": 1.0, "high": 99.8}
    card_path.write_text(json.dumps(d))
    loaded = load_model(tiny_model_dir)
    assert loaded.card.diameter is None
    assert loaded.card.norm == OLD
    assert loaded.card.norm.polarity == "bright" and loaded.card.norm.noise_floor == 0.0
