"""Which models a user can pick: the bundled default, registry versions, or a folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from . import _text as T

if TYPE_CHECKING:
    import torch

    from ..model import LoadedModel
    from ..registry import Registry, VersionInfo

BUNDLED, VERSION, FOLDER = "bundled", "version", "folder"


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model menu."""

    label: str
    kind: str
    version: str | None = None


def get_registry() -> Registry:
    """The user's model registry (``$NAPARI_BULBSEG_HOME/models`` or the user data dir)."""
    from ..registry import Registry

    return Registry()


def _label(v: VersionInfo) -> str:
    name = T.MODEL_BUNDLED if v.id == "bundled" else f"Version {v.id}"
    dice = v.val_dice
    extra = f" · val Dice {dice:.3f}" if dice is not None else ""
    return f"{name}{extra}{' (current)' if v.current else ''}"


def model_choices() -> list[ModelChoice]:
    """The current model first, then other registry versions (newest first), then a folder."""
    choices: list[ModelChoice] = []
    try:
        versions = [v for v in get_registry().list_versions() if v.ok]
        versions.sort(key=lambda v: (not v.current, v.id == "bundled", [-ord(c) for c in v.id]))
        kinds = {True: BUNDLED, False: VERSION}
        choices = [ModelChoice(_label(v), kinds[v.id == "bundled"], v.id) for v in versions]
    except Exception:  # an unreadable registry must not hide the folder choice
        pass
    choices.append(ModelChoice(T.MODEL_FOLDER, FOLDER))
    return choices


def chosen_folder(choice: ModelChoice, folder: str | Path | None) -> Path | None:
    """The model folder of a :data:`FOLDER` choice (None for other choices).

    Raises :class:`InputError` when the folder choice has no existing folder.
    """
    if choice.kind != FOLDER:
        return None
    if not folder or str(folder) in ("", ".") or not Path(folder).exists():
        raise InputError(T.MSG_NO_FOLDER, "")
    return Path(folder)


def load_choice(
    choice: ModelChoice, folder: str | Path | None, device: str | torch.device
) -> tuple[LoadedModel, str]:
    """Load the chosen model onto ``device``; returns ``(LoadedModel, label)``."""
    from ..model import load_model

    registry = get_registry()
    if choice.kind in (VERSION, BUNDLED):
        path = registry.resolve(choice.version)
        return load_model(path, device=device), (
            "bundled" if choice.kind == BUNDLED else choice.version
        )
    path = chosen_folder(choice, folder)  # a folder the user picked: never read as a version id
    return load_model(path, device=device), path.name
