"""`bulbseg predict` never overwrites what it did not write, nor writes where truth is read."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile

from napari_bulbseg._reader import find_mask_partner
from napari_bulbseg.cli import main
from napari_bulbseg.io import read_mask, write_mask
from napari_bulbseg.outputs import MANIFEST


def _predict(capsys, *argv):
    rc = main(["predict", *map(str, argv), "--device", "cpu"])
    return rc, capsys.readouterr().err


@pytest.fixture
def stack_with_truth(tmp_path):
    """``data/stack.tif`` and its hand-drawn ``data/stack_mask.tif``, as the user guide shows."""
    d = tmp_path / "data"
    d.mkdir()
    rng = np.random.default_rng(0)
    tifffile.imwrite(d / "stack.tif", rng.integers(0, 4000, (2, 64, 80), dtype=np.uint16))
    truth = np.zeros((2, 64, 80), np.uint8)
    truth[:, 10:30, 20:50] = 1
    write_mask(d / "stack_mask.tif", truth)
    return d, truth


def test_predict_into_the_image_folder_keeps_the_ground_truth(
    capsys, stack_with_truth, tiny_model_dir
):
    d, truth = stack_with_truth
    before = (d / "stack_mask.tif").read_bytes()
    rc, err = _predict(capsys, d, "-o", d, "--model", tiny_model_dir)
    assert rc == 2
    assert "ground truth" in err and "-o predictions/" in err
    assert (d / "stack_mask.tif").read_bytes() == before  # byte for byte
    assert not (d / "stack_prob.tif").exists() and not (d / MANIFEST).exists()
    np.testing.assert_array_equal(read_mask(d / "stack_mask.tif"), truth)


@pytest.mark.parametrize("folder", ["masks", "labels"])
def test_predict_into_a_masks_folder_is_refused(capsys, tmp_path, tiny_model_dir, folder):
    images = tmp_path / "images"
    images.mkdir()
    tifffile.imwrite(images / "a.tif", np.zeros((32, 32), np.uint16))
    out = tmp_path / folder  # masks/ beside images/: where a.tif's truth is looked for
    rc, err = _predict(capsys, images, "-o", out, "--model", tiny_model_dir)
    assert rc == 2 and "ground truth" in err
    assert find_mask_partner(images / "a.tif") is None  # nothing was written there


def test_existing_file_not_written_by_us_is_never_replaced(capsys, tmp_path, tiny_model_dir):
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, np.zeros((40, 40), np.uint16))
    out = tmp_path / "out"
    out.mkdir()
    (out / "stack_mask.tif").write_bytes(b"somebody's mask")
    rc, err = _predict(capsys, src, "-o", out, "--model", tiny_model_dir)
    assert rc == 2 and "was not written by bulbseg" in err
    assert (out / "stack_mask.tif").read_bytes() == b"somebody's mask"
    assert not (out / "stack_prob.tif").exists()  # refused before any work


def test_rerun_replaces_own_outputs_but_not_edited_ones(capsys, tmp_path, tiny_model_dir):
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, np.zeros((40, 40), np.uint16))
    out = tmp_path / "out"
    argv = (src, "-o", out, "--model", tiny_model_dir)
    assert _predict(capsys, *argv)[0] == 0
    assert {p.name for p in out.iterdir()} == {"stack_mask.tif", "stack_prob.tif", MANIFEST}
    assert _predict(capsys, *argv)[0] == 0  # our own, unchanged outputs: replaced

    # the user edits the predicted mask and saves it over the file: it is theirs now
    edited = np.ones((40, 40), np.uint8)
    write_mask(out / "stack_mask.tif", edited)
    st = os.stat(out / "stack_mask.tif")
    os.utime(out / "stack_mask.tif", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    rc, err = _predict(capsys, *argv)
    assert rc == 2 and "stack_mask.tif" in err
    np.testing.assert_array_equal(read_mask(out / "stack_mask.tif"), edited)


def test_output_folder_holding_an_image_of_the_same_name_is_refused(
    capsys, tmp_path, tiny_model_dir
):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    tifffile.imwrite(a / "x.tif", np.zeros((32, 32), np.uint16))
    tifffile.imwrite(b / "x.tif", np.ones((32, 32), np.uint16))
    rc, err = _predict(capsys, a / "x.tif", "-o", b, "--model", tiny_model_dir)
    assert rc == 2 and "holds an image named x" in err
    assert sorted(p.name for p in b.iterdir()) == ["x.tif"]


def test_demo_does_not_replace_a_foreign_file(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "mask.tif").write_bytes(b"mine")
    rc = main(["demo", "-o", str(out), "--model", str(tiny_model_dir), "--device", "cpu"])
    assert rc == 2 and "was not written by bulbseg" in capsys.readouterr().err
    assert (out / "mask.tif").read_bytes() == b"mine"


def test_a_folders_ground_truth_masks_are_not_predicted(capsys, stack_with_truth, tmp_path):
    from napari_bulbseg.model import bundled_model_dir

    d, _ = stack_with_truth
    out = tmp_path / "pred"
    rc, err = _predict(capsys, d, "-o", out, "--model", bundled_model_dir(), "--no-prob")
    assert rc == 0, err
    assert "skipping 1 ground-truth mask" in err
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "stack_mask.tif"]
