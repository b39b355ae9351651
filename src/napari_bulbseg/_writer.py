"""npe2 writer: a Labels layer to TIFF — binary masks as 0/255, label images as they are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from napari.utils.notifications import show_error

from .errors import BulbsegError


def _pixel_size(meta: dict[str, Any]) -> tuple[float, float] | None:
    scale = meta.get("scale")
    if scale is None or len(scale) < 2:
        return None
    y, x = (float(s) for s in scale[-2:])
    return None if (y, x) == (1.0, 1.0) else (y, x)


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write a Labels layer to ``path`` (atomic); returns the written path, or [] on error."""
    from . import io

    arr = np.asarray(data)
    target = Path(path)
    if target.suffix.lower() not in (".tif", ".tiff"):
        target = target.with_suffix(".tif")
    kw: dict[str, Any] = {}
    pixel_size = _pixel_size(meta)
    if pixel_size is not None:
        kw["pixel_size"] = pixel_size
    try:
        if arr.size and int(arr.max()) <= 1 and int(arr.min()) >= 0:
            out = io.write_mask(target, arr.astype(np.uint8), **kw)
        else:
            out = io.write_tiff(target, arr, **kw)
    except (BulbsegError, OSError) as e:
        show_error(f"Could not save {target.name}: {e}")
        return []
    return [str(out)]
