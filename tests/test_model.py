"""U-Net shape guarantees, model card validation and safe save/load."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_bulbseg.errors import ModelError
from napari_bulbseg.model import (
    CARD_NAME,
    WEIGHTS_NAME,
    ModelCard,
    UNet,
    UNetConfig,
    adapt_input_channels,
    load_model,
    read_card,
    save_model,
)


@pytest.fixture
def small():
    torch.manual_seed(0)
    return UNet(UNetConfig(1, 1, 4, 3)).eval()


@pytest.mark.parametrize("shape", [(1, 1, 517, 333), (2, 1, 7, 9), (1, 1, 1, 1), (1, 1, 64, 64)])
def test_output_has_input_size(small, shape):
    with torch.inference_mode():
        y = small(torch.randn(shape))
    assert y.shape == (shape[0], 1, *shape[2:])


def test_padding_is_reflection_then_crop(small):
    # 61x61 is not a multiple of 4: the model reflect-pads to 64x64 and crops the logits back
    x = torch.randn(1, 1, 61, 61)
    padded = torch.nn.functional.pad(x, (0, 3, 0, 3), mode="reflect")
    with torch.inference_mode():
        a = small(x)
        b = small(padded)[..., :61, :61]
    assert torch.allclose(a, b, atol=1e-6)


def test_save_load_roundtrip(tmp_path, small):
    card = ModelCard(name="nuclei", threshold=0.37, description="t")
    out = save_model(tmp_path / "m", small, card)
    loaded = load_model(out)
    assert loaded.card.name == "nuclei" and loaded.card.threshold == pytest.approx(0.37)
    assert loaded.card.architecture["base_channels"] == 4
    x = torch.randn(1, 1, 32, 40)
    with torch.inference_mode():
        assert torch.equal(small(x), loaded.model(x))
    # the card records the weights' real hash
    import hashlib

    assert (
        loaded.card.weights["sha256"]
        == hashlib.sha256((out / WEIGHTS_NAME).read_bytes()).hexdigest()
    )


def test_save_never_changes_the_process_umask(tmp_path, small, monkeypatch):
    """Setting the umask (even to restore it) is seen by every thread: saving only reads it."""
    import os

    from napari_bulbseg.atomic import current_umask

    calls = []
    monkeypatch.setattr(os, "umask", lambda m: calls.append(m) or 0o022)
    out = save_model(tmp_path / "m", small, ModelCard(name="m"))
    assert calls == []
    assert out.stat().st_mode & 0o777 == 0o777 & ~current_umask()


def test_float16_weights_are_smaller_and_close(tmp_path, small):
    a = save_model(tmp_path / "a", small, ModelCard())
    b = save_model(tmp_path / "b", small, ModelCard(), dtype="float16")
    assert (b / WEIGHTS_NAME).stat().st_size < 0.6 * (a / WEIGHTS_NAME).stat().st_size
    x = torch.randn(1, 1, 32, 32)
    with torch.inference_mode():
        diff = (torch.sigmoid(load_model(a).model(x)) - torch.sigmoid(load_model(b).model(x))).abs()
    assert float(diff.max()) < 1e-2


def test_never_overwrites(tmp_path, small):
    save_model(tmp_path / "m", small, ModelCard())
    with pytest.raises(ModelError, match="never overwritten"):
        save_model(tmp_path / "m", small, ModelCard())


def test_interrupted_save_leaves_nothing(tmp_path, small, monkeypatch):
    import napari_bulbseg.model as mm

    calls = []

    def boom(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        Path(path).write_bytes(data)

    monkeypatch.setattr(mm, "_fsync_write", boom)
    with pytest.raises(OSError):
        save_model(tmp_path / "m", small, ModelCard())
    assert list(tmp_path.iterdir()) == []


def _saved(tmp_path, small):
    return save_model(tmp_path / "m", small, ModelCard())


def test_hash_mismatch(tmp_path, small):
    d = _saved(tmp_path, small)
    w = d / WEIGHTS_NAME
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="do not match their card"):
        load_model(d)


def test_truncated_weights_with_matching_hash(tmp_path, small):
    d = _saved(tmp_path, small)
    w = d / WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[:100])
    card = json.loads((d / CARD_NAME).read_text())
    import hashlib

    card["weights"]["sha256"] = hashlib.sha256(w.read_bytes()).hexdigest()
    (d / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(ModelError, match="unreadable"):
        load_model(d)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda c: c.update(format_version=99), "newer than"),
        (lambda c: c.update(format="something-else"), "not a napari-bulbseg model card"),
        (lambda c: c["architecture"].update(base_channels=8), "do not fit"),
        (lambda c: c.update(threshold=1.5), "outside"),
        (lambda c: c["architecture"].update(depth=0), "Invalid U-Net"),
        (lambda c: c["weights"].pop("sha256"), "no weights hash"),
    ],
)
def test_bad_cards(tmp_path, small, mutate, match):
    d = _saved(tmp_path, small)
    card = json.loads((d / CARD_NAME).read_text())
    mutate(card)
    (d / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(ModelError, match=match):
        load_model(d)


def test_invalid_json_and_missing_card(tmp_path, small):
    d = _saved(tmp_path, small)
    (d / CARD_NAME).write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        read_card(d)
    (d / CARD_NAME).unlink()
    with pytest.raises(ModelError, match="No model card"):
        load_model(d)
    with pytest.raises(ModelError, match="No model at"):
        load_model(tmp_path / "nowhere")


class _Payload:
    def __reduce__(self):
        import os

        return (os.mkdir, (self.target,))


def test_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "PWNED"
    payload = _Payload()
    payload.target = str(marker)
    for name in ("model.pt", "model.pth", "model.ckpt"):
        p = tmp_path / name
        p.write_bytes(pickle.dumps(payload))
        with pytest.raises(ModelError, match="not opened"):
            load_model(p)
    # a pickle disguised as the safetensors file inside a model folder is refused too
    d = tmp_path / "disguised"
    d.mkdir()
    (d / WEIGHTS_NAME).write_bytes(pickle.dumps(payload))
    card = ModelCard()
    import hashlib

    card.weights = {
        "file": WEIGHTS_NAME,
        "sha256": hashlib.sha256((d / WEIGHTS_NAME).read_bytes()).hexdigest(),
    }
    (d / CARD_NAME).write_text(card.to_json())
    with pytest.raises(ModelError):
        load_model(d)
    assert not marker.exists()


def test_adapt_input_channels_preserves_grey_output(small):
    rgb = adapt_input_channels(small, 3).eval()
    assert rgb.config.in_channels == 3
    x = torch.randn(1, 1, 24, 24)
    with torch.inference_mode():
        a = small(x)
        b = rgb(x.repeat(1, 3, 1, 1))
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)
