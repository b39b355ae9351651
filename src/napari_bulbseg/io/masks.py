"""The one rule for what a mask may hold, and reading mask files by it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .reading import read_stack


def mask_foreground(values: Any, what: str = "mask", labels: bool = False) -> np.ndarray:
    """The one rule for what a mask may hold; returns its foreground as a bool array.

    - ``bool``: as it is.
    - numbers: 0 is background, and the other values allowed are 1 and 255 (0/1 and 0/255 masks
      both work). Float masks holding anything else (fractions, NaN) look like probabilities and
      are refused; with ``labels=True`` integer masks may hold instance labels (any non-zero
      label is foreground), otherwise they are refused too.
    - anything else (strings, objects): refused.

    Mask files and training masks follow it with ``labels=False`` (:func:`to_binary_mask`,
    :func:`read_mask`); arrays given to metrics and post-processing, where a Labels layer may
    hold instance labels, with ``labels=True`` (``postprocess.as_bool_mask``). InputError names
    ``what`` (e.g. ``"The prediction"`` or a file path), the values found, and what to do.
    """
    arr = np.asarray(values)
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "uif":
        raise InputError(
            f"{what} has type {arr.dtype}, not a number type",
            "use a uint8 mask with 0 for background and 1 (or 255) for foreground",
        )
    fg = arr != 0
    if arr.dtype.kind != "f" and labels:
        return fg
    if arr.dtype == np.uint8:
        ok = not np.any(np.bincount(arr.ravel(), minlength=256)[2:255])
    else:
        ok = not np.any(fg & (arr != 1) & (arr != 255))  # NaN is unequal to all: not ok
    if ok:
        return fg
    present = np.unique(arr)
    shown = ", ".join(f"{v:g}" for v in present[:6]) + (", …" if len(present) > 6 else "")
    found = f"it holds {len(present)} distinct values ({shown}; dtype {arr.dtype})"
    if arr.dtype.kind == "f":
        raise InputError(
            f"{what} is not a binary mask: {found}; it looks like probabilities, not a mask",
            "threshold probabilities first (e.g. prob >= 0.5) and pass or save the binary mask",
        )
    raise InputError(
        f"{what} is not a binary mask: {found}",
        "pass a binary mask (0/1 or 0/255); for instance labels use labels > 0",
    )


def to_binary_mask(values: Any, what: str = "mask") -> np.ndarray:
    """Validate a mask and return it as uint8 ``{0, 1}`` (same shape).

    The rule of :func:`mask_foreground` with ``labels=False``: bool, or numbers holding only
    0, 1 and 255; any nonzero becomes 1. Anything else raises InputError.
    """
    return mask_foreground(values, what).astype(np.uint8)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A binary mask as uint8 ``{0, 1}``: ``(Y, X)`` for one image, ``(Z, Y, X)`` for a stack.

    Accepts ``{0, 1}``, ``{0, 255}``, ``{0, 1, 255}`` and bool; grey-as-RGB masks (all channels
    equal) are reduced to one channel; anything else raises InputError.
    """
    p = Path(path)
    stack = read_stack(p, lazy=False)
    data = np.asarray(stack.data)
    if data.ndim == 4:
        if not all(np.array_equal(data[..., 0], data[..., c]) for c in range(1, data.shape[-1])):
            raise InputError(
                f"{p} is a colour ({data.shape[-1]}-channel) image, not a binary mask",
                "save the mask as a single-channel 0/255 image",
            )
        data = data[..., 0]
    mask = to_binary_mask(data, what=str(p))
    return mask[0] if mask.shape[0] == 1 else mask
