"""PNG, JPEG and BMP: one 2D image per file, no pixel size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from .checks import _DECODE_ERRORS, _check_dtype
from .stack import Stack


def _is_cmyk(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.mode == "CMYK"
    except Exception:  # not readable by Pillow: keep what imageio read
        return False


def _read_raster(path: Path, notes: list[str] | None = None) -> np.ndarray:
    """PNG/JPEG/BMP → (Y, X) or (Y, X, C); fully opaque alpha dropped."""
    try:
        try:
            import imageio.v3 as iio

            arr = np.asarray(iio.imread(path))
        except ImportError:  # pragma: no cover - imageio ships with scikit-image
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
    except (*_DECODE_ERRORS, SyntaxError) as e:
        raise InputError(
            f"Could not decode {path}: {e}", "the file is damaged; re-export or re-copy it"
        ) from e
    except Exception as e:  # e.g. PIL.Image.DecompressionBombError
        raise InputError(f"Could not read {path}: {e}", "re-export it as TIFF") from e
    if arr.ndim == 3 and arr.shape[-1] == 4 and _is_cmyk(path):
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))  # Pillow undoes Adobe's inverted CMYK
        if notes is not None:
            notes.append("CMYK image converted to RGB")
    if arr.ndim == 3 and arr.shape[-1] in (2, 4):
        top = np.iinfo(arr.dtype).max if arr.dtype.kind in "ui" else 1.0
        if np.all(arr[..., -1] == top):
            arr = arr[..., :-1]
            if notes is not None:
                notes.append("fully opaque alpha channel dropped")
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise InputError(f"{path}: unexpected image shape {arr.shape}", "save a single 2D image")
    _check_dtype(arr.dtype, path)
    return arr


def _read_raster_stack(path: Path, kind: str) -> Stack:
    notes: list[str] = []
    arr = _read_raster(path, notes)
    rgb = arr.ndim == 3 and arr.shape[-1] in (3, 4)
    return Stack(
        data=arr[None],
        axes="ZYXC" if arr.ndim == 3 else "ZYX",
        source_axes="YXS" if arr.ndim == 3 else "YX",
        pixel_size=None,
        z_spacing=None,
        unit="",
        path=path,
        lazy=False,
        rgb=rgb,
        notes=(f"{kind.upper()} files carry no pixel size", *notes),
    )
