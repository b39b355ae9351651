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


_CHILD = """
import sys, time
from napari_bulbseg import inference
from napari_bulbseg.cli import main
real = inference._forward
def slow(net, x, amp):
    print("predicting", flush=True)
    time.sleep(0.5)
    return real(net, x, amp)
inference._forward = slow
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_stops_predict_like_ctrl_c(tmp_path, tiny_model_dir):
    """SIGTERM (timeout, SLURM, dask) leaves no temp file and no probability map without mask."""
    import signal
    import subprocess
    import sys

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "b"):
        tifffile.imwrite(inputs / f"{name}.tif", np.zeros((3, 48, 48), np.uint16))
    out = tmp_path / "out"
    argv = ["predict", str(inputs), "-o", str(out), "--model", str(tiny_model_dir)]
    argv += ["--device", "cpu", "--batch-size", "1", "--tile", "64", "--overlap", "8"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "predicting"  # inside the first forward pass
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.endswith(".tmp")]
    for n in names:
        if n.endswith("_prob.tif"):
            assert n.replace("_prob", "_mask") in names


def test_stale_temp_files_of_ours_are_removed_on_the_next_run(capsys, tmp_path, tiny_model_dir):
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, np.zeros((40, 40), np.uint16))
    out = tmp_path / "out"
    out.mkdir()
    ours = out / ".stack_prob.tif.ab12cd34.tmp"  # left by a killed run
    theirs = out / ".notes.txt.ab12cd34.tmp"  # somebody else's
    fresh = out / ".stack_mask.tif.zz99yy88.tmp"  # maybe another run writing right now
    for p in (ours, theirs, fresh):
        p.write_bytes(b"x")
    for p in (ours, theirs):
        os.utime(p, (1_000_000_000, 1_000_000_000))
    assert _predict(capsys, src, "-o", out, "--model", tiny_model_dir)[0] == 0
    assert not ours.exists() and theirs.exists() and fresh.exists()
