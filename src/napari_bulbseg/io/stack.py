"""The canonical stack every reader returns, and the lazy array behind a lazy one."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError


@dataclass
class Stack:
    """An image stack in canonical layout, with what the file said about it."""

    data: Any  # np.ndarray or LazyStack, (Z, Y, X) or (Z, Y, X, C)
    axes: str  # "ZYX" or "ZYXC"
    source_axes: str  # the axes as the file declared them, e.g. "TZCYX", "YXS"
    pixel_size: tuple[float, float] | None  # (y, x) in `unit`
    z_spacing: float | None
    unit: str  # e.g. "µm"; "" when unknown
    path: Path | None
    lazy: bool
    rgb: bool  # last axis is RGB(A) colour
    #: human-readable remarks on how the file was interpreted (assumed axes, dropped alpha…)
    notes: tuple[str, ...] = field(default=())

    @property
    def n_slices(self) -> int:
        return int(self.data.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

    @property
    def scale(self) -> tuple[float, float, float]:
        """(z, y, x) scale for napari; 1.0 where unknown."""
        py, px = self.pixel_size if self.pixel_size is not None else (1.0, 1.0)
        return (self.z_spacing if self.z_spacing is not None else 1.0, py, px)

    def plane(self, i: int) -> np.ndarray:
        """Slice ``i`` as ``(Y, X)`` or ``(Y, X, C)``, read from disk if the stack is lazy."""
        n = self.n_slices
        if not -n <= i < n:
            raise IndexError(f"slice {i} out of range for a stack of {n} slices")
        return np.asarray(self.data[i])

    def close(self) -> None:
        """Release the file a lazy stack keeps open (no-op for in-memory stacks)."""
        if isinstance(self.data, LazyStack):
            self.data.close()


class LazyStack:
    """Array-like canonical stack that reads only the planes it is asked for.

    Supports ``shape``, ``dtype``, ``ndim``, ``len()``, ``np.asarray()`` (reads everything) and
    indexing whose first element is an int, a slice, a sequence of ints or a boolean mask; the
    rest of the index is applied to the planes read.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: np.dtype,
        read_plane: Callable[[int], np.ndarray],
        close: Callable[[], None] | None = None,
        description: str = "",
    ) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._read_plane = read_plane
        self._close = close
        self.description = description
        #: number of planes read so far (diagnostics)
        self.planes_read = 0

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyStack(shape={self.shape}, dtype={self.dtype}, {self.description})"

    def plane(self, i: int) -> np.ndarray:
        n = self.shape[0]
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"slice index out of range for a stack of {n} slices")
        out = np.asarray(self._read_plane(i))
        self.planes_read += 1
        if out.shape != self.shape[1:]:
            raise InputError(
                f"Slice {i} has shape {out.shape}, expected {self.shape[1:]}",
                "all slices of a stack must have the same size",
            )
        return out.astype(self.dtype, copy=False)

    def _planes(self, indices: Sequence[int]) -> np.ndarray:
        out = np.empty((len(indices), *self.shape[1:]), dtype=self.dtype)
        for k, i in enumerate(indices):
            out[k] = self.plane(i)
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            pos = next(j for j, k in enumerate(key) if k is Ellipsis)
            n_fill = self.ndim - (len(key) - 1 - sum(k is None for k in key))
            key = key[:pos] + (slice(None),) * max(n_fill, 0) + key[pos + 1 :]
        if not key:
            key = (slice(None),)
        first, rest = key[0], key[1:]
        if isinstance(first, (int, np.integer)):
            return self.plane(int(first))[rest] if rest else self.plane(int(first))
        if isinstance(first, slice):
            planes = self._planes(range(*first.indices(self.shape[0])))
        elif first is None:
            raise TypeError("LazyStack does not support np.newaxis as the first index")
        else:
            idx = np.asarray(first)
            if idx.dtype == bool:
                if idx.shape != (self.shape[0],):
                    raise IndexError("boolean index must match the number of slices")
                idx = np.flatnonzero(idx)
            if idx.dtype.kind not in "iu" or idx.ndim != 1:
                raise IndexError(f"unsupported index {first!r} for the slice axis")
            planes = self._planes([int(i) for i in idx])
        return planes[(slice(None), *rest)] if rest else planes

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._planes(range(self.shape[0]))
        return out if dtype is None else out.astype(dtype, copy=False)

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None
