"""Read dispatch: a path (file or folder of slices) → a :class:`~.stack.Stack`."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from . import memory
from .checks import _sniff
from .pairs import IMAGE_SUFFIXES, slice_files
from .raster import _read_raster_stack
from .stack import LazyStack, Stack
from .tiff_read import _read_tiff


def _read_folder(folder: Path, lazy: bool | None) -> Stack:
    files = slice_files(folder)
    if not files:
        raise InputError(
            f"{folder} contains no images ({', '.join(IMAGE_SUFFIXES)})",
            "pick a folder of slices or a single image file",
        )
    first = read_stack(files[0], lazy=False)
    if first.n_slices != 1:
        raise InputError(
            f"{files[0]} holds {first.n_slices} slices; a folder stack needs one 2D image per file",
            "open the multi-slice file directly instead of its folder",
        )
    plane_shape = first.shape[1:]
    shape = (len(files), *plane_shape)
    nbytes = math.prod(shape) * first.dtype.itemsize
    if lazy is None:
        lazy = nbytes > memory._lazy_threshold()

    def read_one(i: int) -> np.ndarray:
        st = read_stack(files[i], lazy=False)
        if st.shape[1:] != plane_shape or st.n_slices != 1:
            raise InputError(
                f"{files[i]} has shape {st.shape[1:]} but {files[0].name} has {plane_shape}",
                "all slices in a folder must have the same size and channels",
            )
        if st.dtype != first.dtype:  # lazy or not: never cast a slice silently
            raise InputError(
                f"{files[i]} has pixel type {st.dtype} but {files[0].name} has {first.dtype}",
                "convert the slices to one pixel type",
            )
        return st.data[0]

    notes = (
        f"{len(files)} files stacked as slices in natural name order",
        *first.notes,
    )
    common = dict(
        axes=first.axes,
        source_axes="I" + first.source_axes,
        pixel_size=first.pixel_size,
        z_spacing=first.z_spacing,
        unit=first.unit,
        path=folder,
        rgb=first.rgb,
        notes=notes,
    )
    if lazy:
        data: Any = LazyStack(shape, first.dtype, read_one, None, f"{len(files)} files")
        return Stack(data=data, lazy=True, **common)
    data = np.empty(shape, first.dtype)
    data[0] = first.data[0]
    for i in range(1, len(files)):
        data[i] = read_one(i)
    return Stack(data=data, lazy=False, **common)


def read_stack(path: str | os.PathLike, lazy: bool | None = None) -> Stack:
    """Read a TIFF, PNG/JPEG or folder of slices as a canonical :class:`Stack`.

    Parameters
    ----------
    path
        A file, or a folder whose image files are the slices (natural name order).
    lazy
        ``None`` decides by size (see the ``napari_bulbseg.io`` docstring), ``True`` always
        reads on demand, ``False`` always loads into memory.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p} does not exist", "check the path")
    if p.is_dir():
        return _read_folder(p, lazy)
    kind = _sniff(p)
    if kind == "tiff":
        return _read_tiff(p, lazy)
    return _read_raster_stack(p, kind)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One 2D image as ``(Y, X)`` or ``(Y, X, C)`` (for dataset pairs); InputError for stacks."""
    return read_image_rgb(path)[0]


def read_image_rgb(path: str | os.PathLike) -> tuple[np.ndarray, bool]:
    """:func:`read_image` and whether its channel axis is colour (``Stack.rgb``)."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{p} is a folder, not an image", "pass one image file")
    stack = read_stack(p, lazy=False)
    if stack.n_slices != 1:
        raise InputError(
            f"{p} holds {stack.n_slices} slices (axes {stack.source_axes}), expected one 2D image",
            "use read_stack for stacks, or save one slice per file",
        )
    return np.asarray(stack.data[0]), bool(stack.rgb)
