"""Autosaved corrections on disk — Qt-free: a per-image folder in the user's napari-bulbseg folder.

Layout (``<home>/corrections/<image-stem>-<key>/``)::

    corrections.tif   the corrections stack, 0/255 (written atomically by io.write_mask)
    state.json        image name, source path, shape, reviewed slices, time of the save

``<home>`` is :func:`napari_bulbseg.home.user_home`. The key hashes the image's source path (or
its layer name) and shape, so reopening the same file finds its edits. The widgets' autosave
(debounced, in a worker) is in ``_widgets/_autosave.py``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from .home import user_home

STATE = "state.json"
MASK = "corrections.tif"


def image_key(name: str, shape: tuple[int, ...], source: str | None = None) -> str:
    """Folder name for an image: readable stem + hash of its source (or name) and shape."""
    ident = f"{source or name}|{tuple(int(s) for s in shape)}"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).stem if source else name)[:40]
    return f"{stem}-{hashlib.sha1(ident.encode()).hexdigest()[:10]}"


class CorrectionStore:
    """Saved corrections and reviewed flags of one image."""

    def __init__(self, name: str, shape: tuple[int, ...], source: str | None = None) -> None:
        self.name, self.shape, self.source = name, tuple(int(s) for s in shape), source
        self.folder = user_home() / "corrections" / image_key(name, self.shape, source)

    @property
    def mask_path(self) -> Path:
        return self.folder / MASK

    def exists(self) -> bool:
        return (self.folder / STATE).is_file() and self.mask_path.is_file()

    def info(self) -> dict[str, Any]:
        """The saved state (name, shape, reviewed, saved_at); empty when unreadable."""
        try:
            return json.loads((self.folder / STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def save(self, mask: np.ndarray, reviewed: set[int]) -> Path:
        """Write the mask (atomic) then the state JSON (atomic)."""
        from .atomic import write_text_atomic
        from .io import write_mask

        self.folder.mkdir(parents=True, exist_ok=True)
        write_mask(self.mask_path, (np.asarray(mask) > 0).astype(np.uint8))
        state = {
            "name": self.name,
            "source": self.source,
            "shape": list(self.shape),
            "reviewed": sorted(int(z) for z in reviewed),
            "saved_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        write_text_atomic(self.folder / STATE, json.dumps(state, indent=1))
        return self.mask_path

    def load(self) -> tuple[np.ndarray, set[int]]:
        """The saved mask, shaped like the image, and the reviewed slices."""
        from .io import read_mask

        mask = read_mask(self.mask_path)
        if mask.ndim == 2 and len(self.shape) == 3:
            mask = mask[None]
        return mask.reshape(self.shape), {int(z) for z in self.info().get("reviewed", [])}
