"""The npe2 reader's layer data, without a viewer (the napari GUI tests are test_napari_*.py)."""

from __future__ import annotations

import numpy as np

from napari_bulbseg import _reader, io


def test_unknown_unit_is_kept_and_reported(tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr(_reader, "show_info", shown.append)
    path = io.write_tiff(
        tmp_path / "odd.tif", np.zeros((2, 16, 16), np.uint16), pixel_size=0.5, unit="bananas"
    )
    ((_, meta, kind),) = _reader.read_images(str(path))
    assert kind == "image" and "units" not in meta  # napari would refuse the layer
    assert meta["scale"] == (1.0, 0.5, 0.5)
    assert meta["metadata"]["bulbseg_unit"] == "bananas"
    assert len(shown) == 1 and "'bananas'" in shown[0] and "odd" in shown[0]


def test_known_unit_reaches_napari_silently(tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr(_reader, "show_info", shown.append)
    path = io.write_tiff(
        tmp_path / "um.tif", np.zeros((2, 16, 16), np.uint16), pixel_size=0.5, unit="µm"
    )
    ((_, meta, _),) = _reader.read_images(str(path))
    assert meta["units"] == "um" and shown == []
