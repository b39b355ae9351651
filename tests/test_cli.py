"""The `bulbseg` command line end to end, on real BBBC039 files where available."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_bulbseg.cli import main
from napari_bulbseg.io import read_mask
from napari_bulbseg.model import bundled_model_dir
from napari_bulbseg.outputs import MANIFEST


def _copy_pairs(shared_data: Path, dest: Path, n: int = 2) -> tuple[Path, Path, list[str]]:
    val = shared_data / "bbbc039" / "val"
    stems = sorted(p.stem for p in (val / "images").glob("*.tif"))[:n]
    images, masks = dest / "images", dest / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for s in stems:
        shutil.copy(val / "images" / f"{s}.tif", images / f"{s}.tif")
        shutil.copy(val / "masks" / f"{s}.png", masks / f"{s}.png")
    return images, masks, stems


def test_predict_and_evaluate_on_real_files(tmp_path, shared_data, tiny_model_dir, capsys):
    # a folder name with a space and non-ASCII characters must work
    images, masks, stems = _copy_pairs(shared_data, tmp_path / "données brutes")
    out = tmp_path / "sortie prédite"
    rc = main(
        [
            "predict",
            str(images),
            "-o",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--threshold",
            "0.5",
            "--tile",
            "256",
            "--overlap",
            "32",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    for s in stems:
        src = tifffile.imread(images / f"{s}.tif")
        prob = tifffile.imread(out / f"{s}_prob.tif")
        mask = tifffile.imread(out / f"{s}_mask.tif")
        assert prob.squeeze().shape == src.shape == mask.squeeze().shape  # never shrinks
        assert set(np.unique(mask)) <= {0, 255}
        assert 0.0 <= float(prob.min()) and float(prob.max()) <= 1.0
        # the mask is the probability thresholded at 0.5 (no object priors asked for)
        np.testing.assert_array_equal(mask.squeeze() > 0, prob.squeeze() >= 0.5)
    # no temporary files left behind; the manifest says which files this run wrote
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}_prob.tif" for s in stems] + [f"{s}_mask.tif" for s in stems] + [MANIFEST]
    )

    # evaluate the truth against itself: perfect scores; against the prediction: a real table
    csv_path = tmp_path / "metrics.csv"
    assert (
        main(["evaluate", "--pred", str(masks), "--truth", str(masks), "--csv", str(csv_path)]) == 0
    )
    rows = list(csv.DictReader(csv_path.open(encoding="utf-8")))
    assert len(rows) >= len(stems)
    pooled = [r for r in rows if "pool" in "".join(r.values()).lower()]
    assert pooled and float(pooled[0]["dice"]) == pytest.approx(1.0)

    assert main(["evaluate", "--pred", str(out), "--truth", str(masks)]) == 0
    printed = capsys.readouterr().out
    assert "pooled" in printed and stems[0][:30] in printed


def test_predict_object_priors(tmp_path, tiny_model_dir, capsys):
    # an untrained model's mask at a low threshold is noisy; keep-largest 2 leaves <= 2 objects
    from skimage.measure import label

    rng = np.random.default_rng(0)
    img = rng.integers(0, 4000, size=(2, 96, 120)).astype(np.uint16)
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, img, imagej=True, metadata={"axes": "ZYX"})
    out = tmp_path / "out"
    rc = main(
        [
            "predict",
            str(src),
            "-o",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--threshold",
            "0.45",
            "--keep-largest",
            "2",
            "--no-prob",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    mask = tifffile.imread(out / "stack_mask.tif")
    assert mask.shape == img.shape
    assert not (out / "stack_prob.tif").exists()
    for z in range(mask.shape[0]):
        assert label(mask[z] > 0, connectivity=2).max() <= 2


def test_info(tiny_model_dir, capsys):
    assert main(["info", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "base_channels" in out and "sha256" in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["predict", "/no/such/file.tif", "-o", "x"], "No such file"),
        (["info", "/no/such/model"], "No model at"),
        (["evaluate", "--pred", "/no/where", "--truth", "/no/where"], "No such file"),
    ],
)
def test_errors_are_one_line(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bulbseg: error:") and fragment in lines[0]
    assert "Traceback" not in err


def test_demo_with_a_given_model(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--model", str(tiny_model_dir), "--device", "cpu"]) == 0
    for name in ("probabilities.tif", "mask.tif", "metrics.csv", "overview.png"):
        assert (out / name).stat().st_size > 0
    mask = read_mask(out / "mask.tif")
    assert mask.shape == (3, 520, 696)
    assert "pooled" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not (bundled_model_dir() / "model.json").exists(), reason="no bundled model")
def test_demo_with_bundled_model_is_accurate(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--device", "cpu"]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open(encoding="utf-8")))
    pooled = next(r for r in rows if "pool" in "".join(r.values()).lower())
    # the bundled model reaches Dice >= 0.95 on BBBC039 validation; the sample is 3 such images
    assert float(pooled["dice"]) > 0.9


def test_train_help_lists_every_loss(capsys):
    from napari_bulbseg.losses import LOSS_NAMES

    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "one of " + ", ".join(LOSS_NAMES) in out and "bce+dice" in out


def test_evaluate_pairs_gt_named_truth_with_predicted_masks(tmp_path, capsys):
    """Truth ``x_gt.tif`` (a ground-truth ending the reader knows) pairs with ``x_mask.tif``."""
    from napari_bulbseg.io import write_mask

    m = np.zeros((16, 16), np.uint8)
    m[4:10, 4:10] = 1
    write_mask(tmp_path / "truth" / "x_gt.tif", m)
    write_mask(tmp_path / "pred" / "x_mask.tif", m)
    rc = main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "1.0000" in out.out and "no prediction" not in out.err


def test_predict_says_when_t_and_z_are_read_as_one_run_of_slices(tmp_path, tiny_model_dir, capsys):
    """A 5-D OME-TIFF (T, C=1, Z, Y, X) is predicted slice by slice, and the user is told."""
    data = np.random.default_rng(0).integers(0, 4000, (2, 1, 3, 32, 32), dtype=np.uint16)
    path = tmp_path / "timelapse.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "TCZYX"})
    out = tmp_path / "out"
    rc = main(["predict", str(path), "-o", str(out), "--model", str(tiny_model_dir),
               "--device", "cpu"])  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    assert "timelapse.ome.tif: axes" in err and "6 slices" in err
    assert read_mask(out / "timelapse_mask.tif").shape[0] == 6
