"""``bulbseg predict --diameter N|auto``: shape kept, value printed and in the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_bulbseg.cli import main
from napari_bulbseg.outputs import MANIFEST


@pytest.fixture
def scaled_model_dir(tmp_path: Path) -> Path:
    """A seeded, untrained small U-Net whose card says it was trained at 30 px."""
    import torch

    from napari_bulbseg.model import ModelCard, UNet, UNetConfig, save_model

    torch.manual_seed(0)
    return save_model(
        tmp_path / "scaled", UNet(UNetConfig(1, 1, 8, 3)), ModelCard(name="s", diameter=30.0)
    )


def _stack(tmp_path: Path) -> Path:
    img = np.random.default_rng(0).integers(0, 4000, size=(1, 101, 77)).astype(np.uint16)
    src = tmp_path / "img.tif"
    tifffile.imwrite(src, img, imagej=True, metadata={"axes": "ZYX"})
    return src


@pytest.mark.parametrize("diameter", ["15", "auto"])
def test_predict_with_diameter(tmp_path, scaled_model_dir, capsys, diameter):
    out = tmp_path / "out"
    args = ["predict", str(_stack(tmp_path)), "-o", str(out), "--model", str(scaled_model_dir)]
    rc = main([*args, "--device", "cpu", "--diameter", diameter])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert tifffile.imread(out / "img_mask.tif").shape[-2:] == (101, 77)
    assert tifffile.imread(out / "img_prob.tif").shape[-2:] == (101, 77)
    assert "diameter" in err
    entry = json.loads((out / MANIFEST).read_text())["files"]["img_mask.tif"]
    assert "diameter_px" in entry
    if diameter == "15":
        assert entry["diameter_px"] == 15.0 and "zoom ×2" in err


@pytest.mark.parametrize("bad", ["0", "-2", "nan", "500", "wide"])
def test_bad_diameter_is_one_clear_error(tmp_path, scaled_model_dir, capsys, bad):
    out = tmp_path / "out"
    args = ["predict", str(_stack(tmp_path)), "-o", str(out), "--model", str(scaled_model_dir)]
    rc = main([*args, "--device", "cpu", "--diameter", bad])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    assert "diameter" in err.lower() and ("77" in err or "number" in err)
    assert not (out / "img_mask.tif").exists()
