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


#: the plugin's dock widgets, by their manifest display names
DOCKS = ("Segment", "Threshold & objects", "Review & correct", "Fine-tune")


def open_dock(viewer, name: str):
    """Open one of our docks the way napari does (npe2 contribution + viewer injection).

    Returns the widget inside the dock; a dock already open is returned, not duplicated.
    """
    if name not in DOCKS:
        raise ValueError(f"unknown dock {name!r}")
    _, widget = viewer.window.add_plugin_dock_widget("napari-bulbseg", name)
    return widget


def menu_action(menu, *path: str):
    """The QAction at ``path`` (texts without the ``&&`` Qt escapes) inside a Qt menu."""
    for i, text in enumerate(path):
        found = None
        for action in menu.actions():
            if action.text().replace("&&", "&") == text:
                found = action
                break
        if found is None:
            have = [a.text() for a in menu.actions()]
            raise LookupError(f"no menu entry {text!r} in {have}")
        if i == len(path) - 1:
            return found
        menu = found.menu()
        if menu is None:
            raise LookupError(f"menu entry {text!r} has no submenu")
    raise LookupError("empty menu path")
