"""The npe2 manifest, reader, writer and sample data (no viewer needed)."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_bulbseg import io
from napari_bulbseg._reader import find_mask_partner, napari_get_reader
from napari_bulbseg._writer import write_labels


def _manifest():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    return pm.get_manifest("napari-bulbseg")


def test_manifest_validates_and_every_python_name_imports():
    mf = _manifest()
    names = [c.python_name for c in mf.contributions.commands]
    assert len(names) == 8
    for name in names:
        module, attr = name.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
    widgets = {w.display_name for w in mf.contributions.widgets}
    assert widgets == {"Segment", "Threshold & objects", "Review & correct", "Fine-tune"}
    menu = [m.command for m in mf.contributions.menus["napari/layers/segment"]]
    assert len(menu) == 4 and all(c.endswith("_widget") for c in menu)


def test_npe2_validate_cli():
    from npe2 import PluginManifest

    mf = _manifest()
    # round-trip through the schema: the same check `npe2 validate` runs
    PluginManifest.model_validate(mf.model_dump())


def test_reader_takes_images_and_folders_of_slices(tmp_path):
    assert napari_get_reader(str(tmp_path / "a.txt")) is None
    assert napari_get_reader(str(tmp_path / "a.tif")) is not None
    for name in ("a.png", "b.JPG", "c.jpeg", "d.bmp"):
        assert napari_get_reader(str(tmp_path / name)) is not None
    assert napari_get_reader([str(tmp_path / "a.tif"), str(tmp_path / "b.TIFF")]) is not None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert napari_get_reader(str(empty)) is None  # no slices: let another reader try
    io.write_mask(tmp_path / "f" / "s1.png", np.eye(8, dtype=bool))
    assert napari_get_reader(str(tmp_path / "f")) is not None


def test_reader_writer_round_trip_with_mask_partner_and_scale(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4000, (3, 40, 50), dtype=np.uint16)
    mask = np.zeros((3, 40, 50), np.uint8)
    mask[:, 10:20, 5:30] = 1
    img_path = io.write_tiff(tmp_path / "stack.tif", image, pixel_size=(0.5, 0.25))
    io.write_mask(tmp_path / "stack_mask.tif", mask)
    assert find_mask_partner(img_path) == tmp_path / "stack_mask.tif"

    layers = napari_get_reader(str(img_path))(str(img_path))
    assert [lt for _, _, lt in layers] == ["image", "labels"]
    (data, meta, _), (gt, gt_meta, _) = layers
    np.testing.assert_array_equal(np.asarray(data), image)
    assert tuple(meta["scale"])[1:] == pytest.approx((0.5, 0.25))
    assert gt_meta["name"] == "stack ground truth"
    np.testing.assert_array_equal(gt, mask)

    # writer: Labels → 0/255 TIFF that reads back as the same {0,1} mask and pixel size
    edited = gt.copy()
    edited[1, 0:5, 0:5] = 1
    out = write_labels(str(tmp_path / "edited.tif"), edited, {"scale": meta["scale"]})
    assert out == [str(tmp_path / "edited.tif")]
    np.testing.assert_array_equal(io.read_mask(out[0]), edited)
    assert io.read_stack(out[0]).pixel_size == pytest.approx((0.5, 0.25))


def test_masks_folder_partner_and_instance_labels(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    img = io.write_tiff(tmp_path / "images" / "a.tif", np.ones((20, 20), np.uint16))
    labels = np.zeros((20, 20), np.uint16)
    labels[2:5, 2:5], labels[10:15, 10:15] = 1, 7
    io.write_tiff(tmp_path / "masks" / "a.tif", labels)
    assert find_mask_partner(img) == tmp_path / "masks" / "a.tif"
    layers = napari_get_reader(str(img))(str(img))
    assert layers[0][0].shape == (20, 20)  # a single image opens as 2D
    # instance labels are not a binary mask: shown as labels, values kept
    assert set(np.unique(layers[1][0])) == {0, 1, 7}


def test_writer_keeps_label_images(tmp_path):
    labels = np.zeros((2, 8, 8), np.uint16)
    labels[0, 1:3, 1:3] = 5
    (out,) = write_labels(str(tmp_path / "lab.tiff"), labels, {})
    np.testing.assert_array_equal(np.asarray(io.read_stack(out).data), labels)


def test_sample_data():
    from napari_bulbseg._sample_data import bbbc039_sample, bulb_phantom_sample

    (img, _, kind), (gt, _, gkind) = bbbc039_sample()
    assert (kind, gkind) == ("image", "labels")
    assert img.shape == gt.shape and img.ndim == 3
    assert set(np.unique(gt)) == {0, 1}
    (img, _, _), (gt, _, _) = bulb_phantom_sample(n_slices=3, shape=(64, 64))
    assert img.shape[:3] == gt.shape == (3, 64, 64)
    assert gt.any() and set(np.unique(gt)) <= {0, 1}


def test_reader_reports_bad_file_without_traceback(tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr("napari_bulbseg._reader.show_error", shown.append)
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"not a tiff at all")
    assert napari_get_reader(str(bad))(str(bad)) == []
    assert shown and "broken.tif" in shown[0]


def test_sample_files_exist():
    from napari_bulbseg._sample_data import SAMPLE_DIR

    assert (SAMPLE_DIR / "bbbc039_sample.tif").is_file()
    assert Path(SAMPLE_DIR / "bbbc039_sample_mask.tif").is_file()


def test_ome_tiff_finds_its_mask_partner(tmp_path):
    """``x.ome.tif`` pairs with ``x_mask.tif`` (its stem is ``x``, not ``x.ome``)."""
    from napari_bulbseg._reader import find_mask_partner, is_mask_name

    img = tmp_path / "cells.ome.tif"
    img.write_bytes(b"")
    assert find_mask_partner(img) is None
    partner = tmp_path / "cells_mask.tif"
    partner.write_bytes(b"")
    assert find_mask_partner(img) == partner
    assert is_mask_name(tmp_path / "cells_mask.ome.tif") and not is_mask_name(img)
