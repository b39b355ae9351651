"""Segment dock details a user meets: bioimage.io export, cancelling, the restore offer's time."""

from __future__ import annotations

import datetime as dt
import json
import threading

import numpy as np
import pytest

pytest.importorskip("napari")

from conftest import open_dock
from napari_bulbseg import io

pytestmark = pytest.mark.gui


def _open_phantom(viewer, tmp_path, n=3, shape=(64, 64)):
    from napari_bulbseg.phantom import bulb_phantom

    image, _mask = bulb_phantom(n_slices=n, shape=shape, seed=3)
    path = io.write_tiff(tmp_path / "bulbs.tif", image, pixel_size=(0.8, 0.8))
    viewer.open(str(path), plugin="napari-bulbseg")
    return viewer.layers["bulbs"]


def _folder_model(seg, folder):
    from napari_bulbseg._widgets._models import FOLDER

    seg.model.value = next(c for c in seg.model.choices if c.kind == FOLDER)
    seg.folder.value = folder
    seg.tile.value, seg.overlap.value = 64, 8


# --------------------------------------------------------------------------- export


def test_export_button_writes_a_valid_bioimageio_package(
    make_napari_viewer, qtbot, tmp_path, tiny_model_dir, bulbseg_home, monkeypatch
):
    pytest.importorskip("bioimageio.spec")
    from napari_bulbseg._widgets import _export
    from napari_bulbseg._widgets import _text as T
    from napari_bulbseg.bioimageio import read_package, validate_package

    monkeypatch.setenv("BIOIMAGEIO_CACHE_PATH", str(tmp_path / "bioimageio-cache"))
    asked = []
    target = tmp_path / "out" / "tiny-package.zip"

    def choose(parent, suggested):
        asked.append(suggested)
        return str(target)

    monkeypatch.setattr(_export, "ask_package_path", choose)
    warnings = []
    monkeypatch.setattr(_export, "show_warning", warnings.append)
    viewer = make_napari_viewer()
    seg = open_dock(viewer, "Segment")

    # the folder choice without a model folder: told so, and no file dialog
    _folder_model(seg, tmp_path / "no-such-model")
    seg.export_btn.native.click()
    assert warnings and T.MSG_NO_FOLDER in warnings[0] and asked == []

    _folder_model(seg, tiny_model_dir)
    seg.export_btn.native.click()
    assert asked == ["tiny-model.zip"] and not seg.export_btn.enabled
    qtbot.waitUntil(lambda: not seg.exporter.running, timeout=120000)
    assert len(warnings) == 1, warnings
    assert seg.export_btn.enabled
    assert str(target) in seg.status.value and "exported" in seg.status.value
    assert str(validate_package(target).format_version).startswith("0.5")
    card, _weights = read_package(target)
    assert card.name == "tiny"


def test_export_failure_is_one_warning_with_the_engine_message(
    make_napari_viewer, qtbot, tmp_path, tiny_model_dir, bulbseg_home, monkeypatch
):
    from napari_bulbseg._widgets import _export

    (tmp_path / "taken.zip").mkdir()  # a folder where the package should go
    monkeypatch.setattr(_export, "ask_package_path", lambda p, s: str(tmp_path / "taken.zip"))
    warnings = []
    monkeypatch.setattr(_export, "show_warning", warnings.append)
    viewer = make_napari_viewer()
    seg = open_dock(viewer, "Segment")
    _folder_model(seg, tiny_model_dir)
    seg.export_btn.native.click()
    qtbot.waitUntil(lambda: not seg.exporter.running, timeout=60000)
    assert len(warnings) == 1 and "is a folder" in warnings[0]
    assert seg.status.value == warnings[0] and seg.export_btn.enabled


# --------------------------------------------------------------------------- cancel


@pytest.mark.parametrize("phase", ["device", "load"])
def test_cancel_while_the_model_loads_says_cancelled(
    make_napari_viewer, qtbot, tmp_path, tiny_model_dir, bulbseg_home, monkeypatch, phase
):
    """Cancel pressed while the device is chosen or the weights load: nothing is predicted."""
    import napari_bulbseg.inference as inference
    from napari_bulbseg._widgets import _segment
    from napari_bulbseg._widgets import _text as T
    from napari_bulbseg._widgets._session import get_session

    entered, release = threading.Event(), threading.Event()
    target = (inference, "select_device") if phase == "device" else (_segment, "load_choice")
    real = getattr(*target)

    def slow(*args, **kwargs):
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(*target, slow)
    viewer = make_napari_viewer()
    _open_phantom(viewer, tmp_path)
    seg = open_dock(viewer, "Segment")
    _folder_model(seg, tiny_model_dir)
    seg.run_btn.native.click()
    qtbot.waitUntil(entered.is_set, timeout=30000)
    assert seg.status.value == T.MSG_LOADING
    seg.cancel_btn.native.click()
    release.set()
    qtbot.waitUntil(lambda: not seg.running, timeout=30000)
    assert seg.status.value == T.MSG_LOAD_CANCELLED
    assert get_session(viewer).pred_layer is None
    assert seg.run_btn.enabled and not seg.cancel_btn.enabled


# --------------------------------------------------------------------------- restore offer


def test_restore_offer_shows_a_readable_local_time(make_napari_viewer, tmp_path, bulbseg_home):
    from napari_bulbseg._widgets._corrections import store_for

    viewer = make_napari_viewer()
    image = _open_phantom(viewer, tmp_path)
    store = store_for(image)
    store.save(np.zeros(image.data.shape, np.uint8), {0, 2})
    state = json.loads((store.folder / "state.json").read_text())
    state["saved_at"] = "2025-03-02T14:03:00"  # local time, as older versions wrote it
    (store.folder / "state.json").write_text(json.dumps(state))

    rw = open_dock(viewer, "Review & correct")
    assert not rw.restore_btn.native.isHidden()  # the offer is shown
    text = rw.restore_lbl.value
    assert "2 Mar 2025 14:03" in text and "2 reviewed" in text
    assert "T14" not in text and "2025-03-02" not in text


def test_saved_when_today_yesterday_and_zones():
    from napari_bulbseg._widgets._autosave import saved_when

    now = dt.datetime(2026, 12, 4, 18, 30)
    assert saved_when("2026-12-04T14:03:09", now) == "today 14:03"
    assert saved_when("2026-12-03T23:59:00", now) == "yesterday 23:59"
    assert saved_when("2026-11-30T08:05:00", now) == "30 Nov 2026 08:05"
    assert saved_when("not a time", now) == "at an unknown time"
    assert saved_when(None, now) == "at an unknown time"
    # a time with a zone is shown in local time
    utc = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.timezone.utc)
    local = utc.astimezone().replace(tzinfo=None)
    assert saved_when(utc.isoformat(), now).endswith(f"{local:%H:%M}")


# --------------------------------------------------------------------------- object size


def _scaled_model(tmp_path, diameter=20.0, default=None):
    import torch

    from napari_bulbseg.model import ModelCard, UNet, UNetConfig, save_model

    torch.manual_seed(0)
    card = ModelCard(name="s", diameter=diameter, default_diameter=default)
    return save_model(tmp_path / "scaled", UNet(UNetConfig(1, 1, 8, 3)), card)


def test_empty_object_size_uses_the_models_default(
    make_napari_viewer, qtbot, tmp_path, bulbseg_home
):
    """Empty field: the card's default_diameter (here 40 px for a model trained at 20), said
    in the field's placeholder and the status, stored in the layers' metadata."""
    from napari_bulbseg._widgets._session import get_session

    viewer = make_napari_viewer()
    _open_phantom(viewer, tmp_path, n=2, shape=(64, 64))
    seg = open_dock(viewer, "Segment")
    s = get_session(viewer)
    _folder_model(seg, _scaled_model(tmp_path, default=40.0))
    assert seg.diameter.value == "" and seg.diameter.native.placeholderText() == "model default"
    seg.run_btn.native.click()
    qtbot.waitUntil(lambda: not seg.running and s.done is not None and s.done.all(), timeout=30000)
    assert "diameter 40 px" in seg.status.value
    assert s.pred_layer.metadata["bulbseg_diameter_px"] == 40.0
    assert s.pred_layer.metadata["bulbseg_zoom"] == pytest.approx(0.5)
    # "none" overrides the default: the image's own scale, no diameter recorded
    seg.diameter.value = "none"
    seg.run_btn.native.click()
    qtbot.waitUntil(lambda: not seg.running, timeout=30000)
    assert "diameter 40 px" not in seg.status.value
    assert "bulbseg_diameter_px" not in s.pred_layer.metadata  # no stale figure left behind


def test_object_size_field_rescales_inside_and_says_so(
    make_napari_viewer, qtbot, tmp_path, bulbseg_home
):
    from napari_bulbseg._widgets._session import get_session
    from napari_bulbseg.inference import PredictOptions, predict
    from napari_bulbseg.model import load_model

    viewer = make_napari_viewer()
    image = _open_phantom(viewer, tmp_path, n=3, shape=(70, 61))  # odd sizes on purpose
    seg = open_dock(viewer, "Segment")
    s = get_session(viewer)
    model_dir = _scaled_model(tmp_path)
    _folder_model(seg, model_dir)
    seg.diameter.value = "40"  # objects twice the trained 20 px: the U-Net sees a 0.5× image
    seg.run_btn.native.click()
    qtbot.waitUntil(lambda: not seg.running and s.done is not None and s.done.all(), timeout=30000)
    assert s.prob.shape == image.data.shape  # back at the image's exact size
    assert "40" in seg.status.value  # the scale used is said
    assert s.pred_layer.metadata["bulbseg_diameter_px"] == 40.0
    assert s.pred_layer.metadata["bulbseg_zoom"] == pytest.approx(0.5)
    # the same as the engine's own rescaled prediction (one job, every slice)
    want = predict(load_model(model_dir), np.asarray(image.data),
                   PredictOptions(tile=64, overlap=8, device="cpu"), diameter=40.0)  # fmt: skip
    np.testing.assert_allclose(s.prob.astype(np.float32), want, atol=2e-3)

    # a bad value: the engine's one-line message, nothing predicted
    seg.diameter.value = "abc"
    seg.run_btn.native.click()
    qtbot.waitUntil(lambda: not seg.running, timeout=30000)
    assert "not a number" in seg.status.value


# --------------------------------------------------------------------------- layer order


def test_prediction_layer_comes_first_and_the_probabilities_a_turn_later(
    make_napari_viewer, qtbot, tmp_path, bulbseg_home
):
    """napari needs 0.1–0.3 s per new layer: the watched prediction layer is made at once, the
    hidden probability layer on a later event-loop turn — showing the session's own cache,
    hidden, with the scale metadata, and without stealing the selection."""
    from napari_bulbseg._widgets._session import get_session

    viewer = make_napari_viewer()
    image = _open_phantom(viewer, tmp_path)
    seg = open_dock(viewer, "Segment")
    _folder_model(seg, _scaled_model(tmp_path))  # trained at 20 px
    seg.diameter.value = "40"
    s = get_session(viewer)
    at_start = []
    s.events.prediction_started.connect(
        lambda: at_start.append((s.pred_layer is not None, s.prob_layer is not None))
    )
    seg.run_btn.native.click()
    qtbot.waitUntil(lambda: bool(at_start), timeout=30000)  # after the model has loaded
    assert at_start == [(True, False)]
    qtbot.waitUntil(lambda: not seg.running and s.prob_layer is not None, timeout=30000)
    prob = s.prob_layer
    assert prob.data is s.prob and not prob.visible
    assert prob.metadata["bulbseg_diameter_px"] == pytest.approx(40.0)
    assert prob.metadata["bulbseg_zoom"] == s.pred_layer.metadata["bulbseg_zoom"]
    assert viewer.layers.selection.active is image
    # a second prediction reuses both layers and adds none
    names = [layer.name for layer in viewer.layers]
    seg.run_btn.native.click()
    qtbot.waitUntil(lambda: not seg.running, timeout=30000)
    qtbot.wait(300)
    assert [layer.name for layer in viewer.layers] == names
    assert s.prob_layer is prob and prob.data is s.prob


def test_a_superseded_cache_gets_no_probability_layer(
    make_napari_viewer, qtbot, tmp_path, bulbseg_home
):
    """When a new prediction replaces the cache before the deferred layer is made, only the
    new prediction's probability layer appears (none showing a stale cache)."""
    from napari_bulbseg._widgets._session import get_session

    viewer = make_napari_viewer()
    first = _open_phantom(viewer, tmp_path)
    second = viewer.add_image(np.zeros((2, 48, 40), np.float32), name="other")
    s = get_session(viewer)
    s.begin_prediction(first)
    _, prob = s.begin_prediction(second)
    qtbot.wait(600)
    probs = [layer.name for layer in viewer.layers if layer.name.endswith("probability")]
    assert probs == [second.name + " probability"]
    assert viewer.layers[probs[0]].data is prob
