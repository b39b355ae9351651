"""The user's napari-bulbseg folder: one rule for the registry and the autosaved corrections."""

from __future__ import annotations

import os
from pathlib import Path

#: set it to move everything the package keeps for the user (tests point it at a temp folder)
ENV_HOME = "NAPARI_BULBSEG_HOME"


def user_home() -> Path:
    """``$NAPARI_BULBSEG_HOME`` (``~`` expanded) if set, else the platform's user data folder
    for napari-bulbseg. ``models/`` (the registry) and ``corrections/`` (autosave) live in it."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-bulbseg", appauthor=False))
