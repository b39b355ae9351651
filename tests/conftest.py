"""Shared fixtures: a tiny saved model, an isolated user data dir, the shared data folder."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A seeded, untrained UNet(UNetConfig(1, 1, 8, 3)) saved as a model folder."""
    import torch

    from napari_bulbseg.model import ModelCard, UNet, UNetConfig, save_model

    torch.manual_seed(0)
    model = UNet(UNetConfig(1, 1, 8, 3))
    return save_model(tmp_path / "tiny-model", model, ModelCard(name="tiny"))


@pytest.fixture
def bulbseg_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point NAPARI_BULBSEG_HOME (registry, autosaved corrections) at a fresh temp folder."""
    home = tmp_path / "bulbseg-home"
    home.mkdir()
    monkeypatch.setenv("NAPARI_BULBSEG_HOME", str(home))
    return home


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the repository; skips the test when it is absent."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path
