"""What prediction runs at when the user gives no diameter: the card's ``default_diameter``;
``auto`` measured robustly (specks left out, no rescaling near the trained size); a fine-tune
trains its whole set at one zoom and tells prediction to use it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _helpers import threshold_model, tiny_config
from napari_bulbseg.data import make_sample
from napari_bulbseg.errors import InputError, ModelError
from napari_bulbseg.events import drain
from napari_bulbseg.inference import (
    PredictOptions,
    auto_scale_of,
    effective_diameter,
    iter_predict,
    predict,
)
from napari_bulbseg.model import (
    CARD_NAME,
    LoadedModel,
    ModelCard,
    bundled_model_dir,
    load_model,
    save_model,
)
from napari_bulbseg.scale import NATIVE, requested_diameter, typical_diameter
from napari_bulbseg.training import TrainRun, evaluate_model

OPTS = PredictOptions(device="cpu", tile=256, overlap=32)


def _unet():
    from napari_bulbseg.model import UNet, UNetConfig

    return UNet(UNetConfig(1, 1, 4, 2))


def _loaded(default=None, diameter: float | None = 30.0) -> LoadedModel:
    return threshold_model(diameter, default)


def _disc_image(shape, centres_radii, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, bool)
    for cy, cx, r in centres_radii:
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img = rng.normal(100, 2, size=shape).astype(np.float32)
    img[mask] = 1000
    return img, mask


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("value", "default", "want"),
    [
        (None, None, NATIVE),  # an older card: the image's own scale, as before
        (None, "auto", "auto"),
        ("", 42.0, 42.0),
        ("  ", "auto", "auto"),
        ("none", "auto", NATIVE),  # the user can always ask for no rescaling
        ("AUTO", 42.0, "auto"),
        ("auto-slice", None, "auto-slice"),
        ("17", "auto", 17.0),
        (17, None, 17.0),
    ],
)
def test_requested_diameter(value, default, want) -> None:
    assert requested_diameter(value, default) == want


@pytest.mark.parametrize("value", ["big", True, [3]])
def test_requested_diameter_refuses_what_is_not_a_diameter(value) -> None:
    with pytest.raises(InputError) as e:
        requested_diameter(value, "auto")
    assert "'auto'" in e.value.hint and NATIVE in e.value.hint


def test_typical_diameter_leaves_specks_out() -> None:
    # two bulbs among many specks: the median of all would be a speck's
    assert typical_diameter(np.array([70.0, 64.0] + [5.0] * 8), 10.0) == pytest.approx(67.0)
    # a field of nuclei with one huge merged blob: the blob does not move the median
    nuclei = np.array([17.0, 18.0, 16.0, 19.0, 17.5, 186.0])
    assert typical_diameter(nuclei, 10.0) == pytest.approx(17.75)
    # every object below the speck size: they really are that small
    assert typical_diameter(np.array([6.0, 7.0, 8.0]), 10.0) == pytest.approx(7.0)
    assert typical_diameter(np.zeros(0), 10.0) is None


# --------------------------------------------------------------------------- the card


def test_bundled_model_measures_every_slice_by_default() -> None:
    card = load_model(bundled_model_dir()).card
    assert card.default_diameter == "auto-slice" and card.diameter == 30.0


@pytest.mark.parametrize("bad", ["big", -3, 0, True, [30]])
def test_bad_default_diameter_is_a_model_error(tmp_path, bad) -> None:
    folder = save_model(tmp_path / "m", _unet(), ModelCard(diameter=30.0))
    d = json.loads((folder / CARD_NAME).read_text())
    d["default_diameter"] = bad
    (folder / CARD_NAME).write_text(json.dumps(d))
    with pytest.raises(ModelError, match="default_diameter"):
        load_model(folder)


def test_default_diameter_needs_a_trained_diameter(tmp_path) -> None:
    folder = save_model(tmp_path / "m", _unet(), ModelCard(diameter=30.0))
    d = json.loads((folder / CARD_NAME).read_text())
    d.update(diameter=None, default_diameter=50)
    (folder / CARD_NAME).write_text(json.dumps(d))
    with pytest.raises(ModelError, match="no trained diameter"):
        load_model(folder)


def test_format_2_card_reads_as_before(tmp_path) -> None:
    folder = save_model(tmp_path / "m", _unet(), ModelCard(diameter=30.0, default_diameter=60.0))
    d = json.loads((folder / CARD_NAME).read_text())
    assert d["format_version"] == 3 and d["default_diameter"] == 60.0
    del d["default_diameter"]
    d["format_version"] = 2
    (folder / CARD_NAME).write_text(json.dumps(d))
    card = load_model(folder).card
    assert card.default_diameter is None
    assert effective_diameter(LoadedModel(_unet(), card), None) is None  # own scale


# --------------------------------------------------------------------------- prediction


def test_no_diameter_means_the_cards_default() -> None:
    img, _ = _disc_image((200, 240), [(60, 60, 25), (140, 170, 25)])
    by_default = predict(_loaded(default=50.0), img[None], OPTS)
    explicit = predict(_loaded(), img[None], OPTS, diameter=50.0)
    native = predict(_loaded(default=50.0), img[None], OPTS, diameter="none")
    own = predict(_loaded(), img[None], OPTS)
    np.testing.assert_array_equal(by_default, explicit)
    np.testing.assert_array_equal(native, own)
    assert not np.array_equal(by_default, own)  # the default really rescaled


def test_auto_measures_large_objects_among_specks() -> None:
    rng = np.random.default_rng(3)
    specks = [(rng.uniform(10, 290), rng.uniform(10, 290), 2.5) for _ in range(12)]
    img, _ = _disc_image((300, 300), [(90, 90, 35), (200, 210, 32), *specks])
    scale = auto_scale_of(_loaded(), img)
    assert scale.diameter == pytest.approx(67, rel=0.15)  # the two discs, not the specks
    assert scale.zoom == pytest.approx(30 / scale.diameter)


def test_auto_near_the_trained_size_does_not_rescale() -> None:
    img, _ = _disc_image((256, 256), [(60, 60, 16), (60, 180, 16), (180, 60, 16), (180, 180, 16)])
    scales = []
    gen = iter_predict(_loaded(), img[None], OPTS, diameter="auto", on_scale=scales.append)
    events = []
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        prob = np.asarray(stop.value)
    (scale,) = scales
    assert scale.diameter == pytest.approx(32, rel=0.1) and scale.zoom == 1.0
    assert "no rescaling" in scale.message
    # the measuring pass is the result: the same as predicting at the image's own scale
    np.testing.assert_array_equal(prob, predict(_loaded(), img[None], OPTS, diameter="none"))
    assert [z for ev in events for z in ev.finished] == [0]


# --------------------------------------------------------------------------- fine-tuning


def _bulbs(n: int, radii: list[float], seed: int) -> list:
    out = []
    for i in range(n):
        r = radii[i % len(radii)]
        img, mask = _disc_image((128, 128), [(64, 64, r)], seed=seed + i)
        out.append(make_sample(img, mask, source=f"slice {i}"))
    return out


def test_auto_slice_measures_every_slice_on_its_own() -> None:
    """A bulb's sections grow and shrink through a stack: each slice is brought to the
    trained size on its own, and gives what predicting it alone with ``auto`` gives."""
    big, _ = _disc_image((240, 240), [(70, 70, 30), (170, 170, 30)], seed=1)
    small, _ = _disc_image((240, 240), [(60, 60, 8), (60, 180, 8), (180, 60, 8)], seed=2)
    stack = np.stack([big, small])
    scales: list = []
    events = []
    gen = iter_predict(_loaded(), stack, OPTS, diameter="auto-slice", on_scale=scales.append)
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        prob = np.asarray(stop.value)
    for z in range(2):
        alone = predict(_loaded(), stack[z][None], OPTS, diameter="auto")[0]
        np.testing.assert_array_equal(prob[z], alone)
    per = [auto_scale_of(_loaded(), stack[z]) for z in range(2)]
    assert per[0].diameter == pytest.approx(60, rel=0.15)
    assert per[1].diameter == pytest.approx(16, rel=0.15)
    (summary,) = scales  # one summary, after the slices
    assert "per slice" in summary.message and summary.diameter is not None
    assert [z for ev in events for z in ev.finished] == [0, 1]
    fractions = [ev.fraction for ev in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_fine_tune_card_asks_prediction_to_measure_every_slice() -> None:
    """Training brings every slice's objects to the base's diameter, so the new card asks
    prediction to do the same per slice; both models are judged that way."""
    base = LoadedModel(
        _unet().eval(), ModelCard(diameter=30.0, default_diameter="auto", threshold=0.5)
    )
    train_s = _bulbs(4, [18.0, 24.0, 30.0, 36.0], seed=10)
    val_s = _bulbs(2, [24.0, 30.0], seed=20)
    cfg = tiny_config(epochs=1, steps_per_epoch=2, require_improvement=False, start="base")
    result = drain(TrainRun(cfg, train_s, val_samples=val_s, base=base).events())
    card = result.card
    assert card.diameter == 30.0 and card.default_diameter == "auto-slice"
    assert effective_diameter(LoadedModel(result.model, card), None) == "auto-slice"
    compared = card.metrics["val"]["compared"]
    base_at = evaluate_model(base, val_s, diameter="auto-slice")
    assert compared["base_dice"] == pytest.approx(base_at["dice"], abs=1e-6)
    assert compared["diameter"] == "auto-slice"
    # a model trained without a diameter keeps predicting at the image's own scale
    plain = drain(TrainRun(tiny_config(epochs=1), train_s, val_samples=val_s).events())
    assert plain.card.default_diameter is None
