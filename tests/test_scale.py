"""Object scale: diameters from masks, the rescaled prediction path, ``auto``, bad diameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _helpers import ThresholdNet, threshold_model
from napari_bulbseg.errors import InputError
from napari_bulbseg.inference import PredictOptions, iter_predict, predict, predict_slice
from napari_bulbseg.model import LoadedModel, ModelCard
from napari_bulbseg.scale import (
    back_to_shape,
    check_diameter,
    median_diameter,
    resize_image,
    resized_shape,
    zoom_factor,
)

OPTS = PredictOptions(device="cpu", tile=256, overlap=32)


def _loaded(diameter: float | None = 30.0) -> LoadedModel:
    return threshold_model(diameter)


def _discs(shape: tuple[int, int], diameter: float, spacing: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = rng.normal(100, 2, size=shape).astype(np.float32)
    r = diameter / 2
    for cy in np.arange(spacing / 2, shape[0] - r, spacing):
        for cx in np.arange(spacing / 2, shape[1] - r, spacing):
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1000
    return img


def test_median_diameter_of_discs() -> None:
    img = _discs((200, 200), 20, 50)
    d = median_diameter(img > 500)
    assert d == pytest.approx(20, rel=0.05)
    assert median_diameter(np.zeros((10, 10), bool)) is None


@pytest.mark.parametrize("diameter", [12.0, 20.0, 45.0])
def test_auto_finds_disc_diameter(diameter: float) -> None:
    img = _discs((300, 300), diameter, diameter * 2.5)
    scales = []
    prob = drain_scale(_loaded(), img, scales)
    assert scales[0].diameter == pytest.approx(diameter, rel=0.15)
    assert scales[0].zoom == pytest.approx(30 / scales[0].diameter)
    assert prob.shape == (1, 300, 300)
    dice = _dice(prob[0] >= 0.5, img > 500)
    assert dice > 0.9


def drain_scale(loaded, img, scales):
    gen = iter_predict(loaded, img[None], OPTS, diameter="auto", on_scale=scales.append)
    msgs = []
    try:
        while True:
            msgs.append(next(gen).message)
    except StopIteration as stop:
        assert any("diameter auto" in m for m in msgs)
        return np.asarray(stop.value, dtype=np.float32)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


class _Halving(ThresholdNet):
    """A stand-in that cuts every object wider than 1.5× the trained 30 px (in its own input's
    pixels) in two: the way a U-Net fragments objects far from its trained size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from scipy import ndimage as ndi

        m = (x[:, 0] > 0.5).numpy()
        for k in range(m.shape[0]):
            labels, _ = ndi.label(m[k])
            for i, sl in enumerate(ndi.find_objects(labels), start=1):
                if 2 * math.sqrt(np.count_nonzero(labels[sl] == i) / math.pi) > 45:
                    cx = (sl[1].start + sl[1].stop) // 2
                    m[k, sl[0], cx - 1 : cx + 2] = False
        return self.scale * (torch.from_numpy(m[:, None].astype(np.float32)) - 0.5)


@pytest.mark.parametrize("diameter", [20.0, 80.0])
def test_auto_measures_again_at_the_corrected_scale(diameter: float) -> None:
    """Objects fragmented at the trained scale (80 px discs cut in halves: 57 px measured) are
    measured again at the zoom that first figure asks for, where they are whole."""
    img = _discs((400, 400), diameter, max(2.5 * diameter, 130.0))
    loaded = LoadedModel(_Halving().eval(), ModelCard(diameter=30.0))
    scales = []
    opts = PredictOptions(device="cpu", tile=512, overlap=32)  # one tile: no cut seams
    gen = iter_predict(loaded, img[None], opts, diameter="auto", on_scale=scales.append)
    events = []
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        prob = np.asarray(stop.value, dtype=np.float32)
    assert scales[0].diameter == pytest.approx(diameter, rel=0.15)
    assert _dice(prob[0] >= 0.5, img > 500) > 0.95  # predicted whole, at the measured scale
    # only the final pass finishes the slice
    assert [z for ev in events for z in ev.finished] == [0]


def test_auto_on_empty_image_keeps_trained_scale() -> None:
    img = np.random.default_rng(1).normal(100, 2, size=(128, 160)).astype(np.float32)
    img[:] = 100.0  # constant: nothing above threshold
    scales = []
    list(iter_predict(_loaded(), img[None], OPTS, diameter="auto", on_scale=scales.append))
    assert scales[0].diameter is None and scales[0].zoom == 1.0
    assert "no objects found" in scales[0].message


@pytest.mark.parametrize("diameter", [17.0, 55.0])
def test_rescaled_prediction_has_exact_shape_and_matches_manual_resize(diameter: float) -> None:
    rng = np.random.default_rng(2)
    img = rng.normal(0, 1, size=(517, 333)).astype(np.float32)
    loaded = _loaded()
    prob = predict(loaded, img[None], OPTS, diameter=diameter)
    assert prob.shape == (1, 517, 333)
    # manual: normalise (the card's, plain percentiles), resize, predict, resize back
    from napari_bulbseg.normalize import prepare_image

    x = prepare_image(img, 1, loaded.card.norm)
    shape = resized_shape(img.shape, zoom_factor(30.0, diameter))
    xs = resize_image(x, shape)
    with torch.no_grad():
        p = torch.sigmoid(loaded.model(torch.from_numpy(xs)[None]))[0, 0].numpy()
    manual = back_to_shape(p, img.shape)
    # float16 storage of the probabilities bounds the difference
    assert np.max(np.abs(prob[0].astype(np.float32) - manual)) < 2e-3


def test_no_diameter_is_the_old_path() -> None:
    img = _discs((100, 120), 20, 50)
    loaded = _loaded()
    a = predict_slice(loaded, img, OPTS)
    b = predict_slice(loaded, img, OPTS, diameter=None)
    np.testing.assert_array_equal(a, b)
    c = predict_slice(loaded, img, OPTS, diameter=30.0)  # trained scale: zoom 1
    np.testing.assert_allclose(a, c, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -3, math.nan, math.inf, 1000, "big", True])
def test_bad_diameter_is_a_clear_error(bad) -> None:
    img = np.zeros((64, 80), np.float32)
    with pytest.raises(InputError) as e:
        iter_predict(_loaded(), img[None], OPTS, diameter=bad)
    assert "64" in str(e.value) or "number" in str(e.value)


def test_check_diameter_names_the_range() -> None:
    with pytest.raises(InputError, match="at most 64"):
        check_diameter(65, (64, 80))
    assert check_diameter(64, (64, 80)) == 64.0


def test_diameter_needs_a_model_that_records_its_scale() -> None:
    img = np.zeros((64, 80), np.float32)
    with pytest.raises(InputError, match="does not record"):
        iter_predict(_loaded(None), img[None], OPTS, diameter=20)
    # auto on such a model: no rescaling, no error
    out = predict(_loaded(None), img[None], OPTS, diameter="auto")
    assert out.shape == (1, 64, 80)
