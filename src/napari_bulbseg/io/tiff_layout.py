"""TIFF axes → the canonical layout: which axes are slices, the image plane and channels
(the rules in the package docstring), and whether the channels are colour."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

_AMBIGUOUS_AXES = "QI"
_CHANNEL_AXES = "CS"


@dataclass(frozen=True)
class _Layout:
    """How the file's full (unsqueezed) axes map onto the canonical layout."""

    full_axes: str
    full_shape: tuple[int, ...]
    slice_axes: tuple[int, ...]
    y: int
    x: int
    chan_axes: tuple[int, ...]

    @property
    def n_slices(self) -> int:
        return math.prod(self.full_shape[i] for i in self.slice_axes)

    @property
    def n_channels(self) -> int:
        return math.prod(self.full_shape[i] for i in self.chan_axes)

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        yx = (self.full_shape[self.y], self.full_shape[self.x])
        c = (self.n_channels,) if self.n_channels > 1 else ()
        return (self.n_slices, *yx, *c)

    @property
    def source_axes(self) -> str:
        return "".join(
            a
            for i, a in enumerate(self.full_axes)
            if self.full_shape[i] > 1 or i in (self.y, self.x)
        )

    def canonical(self, full: np.ndarray) -> np.ndarray:
        order = (*self.slice_axes, self.y, self.x, *self.chan_axes)
        return np.ascontiguousarray(full.transpose(order).reshape(self.canonical_shape))

    def plane_key(self, i: int) -> tuple:
        sizes = [self.full_shape[a] for a in self.slice_axes]
        idx = np.unravel_index(i, sizes) if sizes else ()
        key: list[Any] = [slice(None)] * len(self.full_axes)
        for a, j in zip(self.slice_axes, idx):
            key[a] = int(j)
        return tuple(key)

    def finish_plane(self, sub: np.ndarray) -> np.ndarray:
        """``sub`` holds the non-slice axes in file order; return (Y, X) or (Y, X, C)."""
        remaining = [a for a in range(len(self.full_axes)) if a not in self.slice_axes]
        order = [remaining.index(a) for a in (self.y, self.x, *self.chan_axes)]
        return np.ascontiguousarray(sub.transpose(order).reshape(self.canonical_shape[1:]))


def _layout_for(axes: str, shape: tuple[int, ...], path: Path) -> tuple[_Layout, list[str]]:
    notes: list[str] = []
    if any(int(n) == 0 for n in shape):
        raise InputError(
            f"{path} holds no pixels (shape {tuple(int(n) for n in shape)}: a dimension of size "
            "0, e.g. a stack of 0 slices)",
            "the file was written empty; export the image again",
        )
    if "Y" not in axes or "X" not in axes:
        raise InputError(
            f"{path}: cannot find the image plane in axes {axes!r} (shape {shape})",
            "save the file with Y and X axes (ImageJ hyperstack or OME-TIFF)",
        )
    chan = tuple(i for i, a in enumerate(axes) if a in _CHANNEL_AXES)
    chan = tuple(sorted(chan, key=lambda i: axes[i] != "C"))  # C before S
    slices = tuple(i for i, a in enumerate(axes) if a not in "YX" and a not in _CHANNEL_AXES)
    real = [i for i in slices if shape[i] > 1]
    ambiguous = [i for i in real if axes[i] in _AMBIGUOUS_AXES]
    if ambiguous and len(real) > 1:
        dims = " × ".join(f"{axes[i]}={shape[i]}" for i in real)
        raise InputError(
            f"{path}: the file has {len(real)} stacked dimensions ({dims}, full shape {shape}) "
            "but no metadata saying which is time, depth or channel",
            "save it as an ImageJ hyperstack or OME-TIFF with axes metadata "
            "(e.g. tifffile.imwrite(..., imagej=True, metadata={'axes': 'TZCYX'}))",
        )
    if ambiguous:
        i = ambiguous[0]
        notes.append(
            f"axis {axes[i]!r} of length {shape[i]} has no name in the file; "
            "it was taken as the slice (Z) axis"
        )
    if len(real) > 1:
        names = "".join(axes[i] for i in real)
        notes.append(f"axes {names} flattened into {math.prod(shape[i] for i in real)} slices")
    if len([i for i in chan if shape[i] > 1]) > 1:
        notes.append("channel and sample axes merged into one channel axis")
    return _Layout(axes, tuple(shape), slices, axes.index("Y"), axes.index("X"), chan), notes


def _is_rgb_tiff(layout: _Layout, page: Any, dtype: np.dtype) -> bool:
    if layout.n_channels not in (3, 4):
        return False
    s_axes = [i for i in layout.chan_axes if layout.full_axes[i] == "S"]
    if not s_axes or layout.full_shape[s_axes[0]] != layout.n_channels:
        return False
    photometric = int(getattr(page, "photometric", 1))
    return photometric in (2, 6) and dtype.kind in "ui"  # RGB, YCbCr
