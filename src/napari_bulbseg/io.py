"""Stacks in and out: TIFF (ImageJ, OME, plain), PNG/JPEG, folders of slices, image–mask pairs.

Everything read becomes a :class:`Stack` in the canonical layout ``(Z, Y, X)`` or
``(Z, Y, X, C)``. The rules, decided from the file's axes metadata (tifffile's
``series[0].axes``), never from the array's shape:

Axes
    ``Y`` and ``X`` are the image plane. ``S`` (TIFF samples per pixel) and ``C`` (channels)
    become the last axis, ``C`` before ``S`` when both exist. Every other axis (``T``, ``Z`` and
    tifffile's other named axes) is a *slice* axis; several are flattened in file order into the
    one slice axis, so for ``TZ`` slice ``t * nZ + z`` (``Stack.source_axes`` keeps the file's
    axes). ``Q`` (unknown) and ``I`` (a plain sequence of pages) are ambiguous: when it is the only
    slice axis it is taken as slices (and ``Stack.notes`` says so); ambiguous axes together with
    any other slice axis raise :class:`~napari_bulbseg.errors.InputError`, asking for a file saved
    with axes metadata, rather than guess.
Colour
    ``rgb`` is true when the channel axis is the TIFF's samples (``S``) with 3 or 4 samples and an
    RGB / YCbCr photometric interpretation, or for a PNG/JPEG with 3 or 4 channels. A ``C``
    channel axis (fluorescence channels in ImageJ / OME files) is never colour. PNG/JPEG alpha that
    is fully opaque is dropped (RGBA → RGB, grey+alpha → grey); TIFF alpha is kept.
Pixel size
    From OME ``PhysicalSizeX/Y/Z`` (+ units), else ImageJ resolution tags + ``unit`` + ``spacing``,
    else this module's own JSON metadata, else resolution tags in cm/mm/µm (inch resolutions are
    screen DPI, not a microscope calibration, and are ignored). PNG/JPEG carry none.
Laziness
    ``lazy=None`` reads lazily when the uncompressed stack is larger than
    ``min(LAZY_MAX_BYTES, available memory / 4)``. A lazy stack's ``data`` is a
    :class:`LazyStack` that reads only the planes asked for: memory-mapped when the TIFF data is
    uncompressed and contiguous, else page by page through tifffile.
Writing
    :func:`write_tiff` and :func:`write_mask` are atomic (temporary file in the same folder,
    fsync, ``os.replace``); a failed write leaves an existing file untouched.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import re
import struct
import threading
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from .atomic import atomic_write
from .errors import InputError

__all__ = [
    "IMAGE_SUFFIXES",
    "LAZY_MAX_BYTES",
    "LazyStack",
    "Stack",
    "file_stem",
    "image_files",
    "image_stem_of_mask",
    "is_mask_name",
    "list_pairs",
    "mask_foreground",
    "pair_masks",
    "prediction_names",
    "prob_files",
    "read_image",
    "read_mask",
    "read_stack",
    "to_binary_mask",
    "write_mask",
    "write_tiff",
]

#: stacks larger than this (uncompressed) open lazily when ``lazy=None`` ...
LAZY_MAX_BYTES = 2 * 1024**3
#: ... as do stacks larger than this fraction of the available memory
LAZY_MEMORY_FRACTION = 0.25
#: file suffixes taken as images in folders of slices and image/mask folders
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
#: name endings of a ground-truth mask kept beside its image (``stack.tif`` + ``stack_mask.tif``)
MASK_SUFFIXES = ("_mask", "_masks", "-mask", "_gt", "_labels")
#: folders holding ground-truth masks, beside an image or beside its ``images/`` folder
MASK_FOLDERS = ("masks", "labels")
#: what ``bulbseg predict`` writes for image ``<stem>``: ``<stem>_prob.tif``, ``<stem>_mask.tif``
PROB_SUFFIX = "_prob"
PRED_MASK_SUFFIX = "_mask"
#: name endings of a predicted mask (ours, or another tool's) after the image's stem
PRED_SUFFIXES = ("_mask", "_pred", "_prediction")


def is_mask_name(path: str | os.PathLike) -> bool:
    """True for files named like a ground-truth mask (``*_mask.tif``, see ``MASK_SUFFIXES``)
    or kept in a mask folder (``masks/``, ``labels/``)."""
    path = Path(path)
    stem = file_stem(path).lower()
    return stem.endswith(MASK_SUFFIXES) or path.parent.name.lower() in MASK_FOLDERS


def image_stem_of_mask(path: str | os.PathLike) -> str:
    """The stem of the image a mask file belongs to: its stem without one ground-truth
    (``MASK_SUFFIXES``) or prediction (``PRED_SUFFIXES``) ending — ``x_gt.tif`` and
    ``x_mask.tif`` both give ``x``; a name without such an ending is kept."""
    stem = file_stem(Path(path))
    for suf in sorted(set(MASK_SUFFIXES) | set(PRED_SUFFIXES), key=len, reverse=True):
        if stem.lower().endswith(suf) and len(stem) > len(suf):
            return stem[: -len(suf)]
    return stem


def pair_masks(
    preds: Sequence[Path], truths: Sequence[Path]
) -> tuple[list[tuple[str, Path, Path]], list[Path]]:
    """Pair predicted masks with ground-truth masks by name: ``(name, truth, pred)`` triples in
    natural order, and the truths without a prediction.

    Exact stems match first; then the stems without a mask ending (:func:`image_stem_of_mask`),
    so ``x_mask.tif`` (predicted) pairs with ``x.tif``, ``x_gt.tif`` or ``x_mask.tif`` (truth).
    """
    by_key: dict[str, Path] = {}
    for p in preds:
        by_key.setdefault(file_stem(p), p)
    for p in preds:
        by_key.setdefault(image_stem_of_mask(p), p)
    pairs, missing = [], []
    for t in truths:
        keys = (file_stem(t), image_stem_of_mask(t))
        match = next((by_key[k] for k in keys if k in by_key), None)
        if match is None:
            missing.append(t)
        else:
            pairs.append((image_stem_of_mask(t), t, match))
    pairs.sort(key=lambda x: _natural_key(x[0]))
    return pairs, missing


def prediction_names(path: str | os.PathLike, write_prob: bool = True) -> list[str]:
    """The files ``bulbseg predict`` writes for image ``path``: probabilities, then the mask."""
    stem = file_stem(Path(path))
    mask = f"{stem}{PRED_MASK_SUFFIX}.tif"
    return [f"{stem}{PROB_SUFFIX}.tif", mask] if write_prob else [mask]


def prob_files(folder: str | os.PathLike) -> list[Path]:
    """The probability maps ``bulbseg predict`` wrote into ``folder`` (``*_prob.tif``)."""
    return sorted(Path(folder).glob(f"*{PROB_SUFFIX}.tif"), key=lambda p: _natural_key(p.name))


def mask_partner_candidates(
    path: str | os.PathLike, suffixes: Sequence[str] = (".tif", ".tiff")
) -> list[Path]:
    """Where the ground-truth mask of image ``path`` is looked for, in order of preference."""
    path = Path(path)
    stem = file_stem(path)
    found = [path.with_name(stem + s + ext) for s in MASK_SUFFIXES for ext in suffixes]
    for folder in MASK_FOLDERS:
        for base in (path.parent.parent, path.parent):
            found += [base / folder / (stem + ext) for ext in suffixes]
            found += [base / folder / (stem + "_mask" + ext) for ext in suffixes]
    return found


def mask_partner_folders(path: str | os.PathLike) -> list[Path]:
    """The folders :func:`mask_partner_candidates` looks in for image ``path``."""
    return list(dict.fromkeys(c.parent for c in mask_partner_candidates(path)))


_TIFF_SUFFIXES = (".tif", ".tiff")
_AMBIGUOUS_AXES = "QI"
_CHANNEL_AXES = "CS"
_WRITE_ORDER = "TZCYXS"
_IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
#: length units in micrometres, for converting between the units files declare
_UNIT_IN_UM = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "nm": 1e-3, "pm": 1e-6, "Å": 1e-4}
_UNIT_ALIASES = {
    "micron": "µm",
    "microns": "µm",
    "um": "µm",
    "μm": "µm",  # Greek mu
    "\\u00b5m": "µm",  # ImageJ escapes non-ASCII in its description
    "micrometer": "µm",
    "micrometre": "µm",
    "nanometer": "nm",
    "millimeter": "mm",
    "angstrom": "Å",
    "pixel": "",
    "pixels": "",
    "px": "",
    "": "",
}
_DECODE_ERRORS = (
    ValueError,
    RuntimeError,
    OSError,
    EOFError,
    IndexError,
    KeyError,
    struct.error,
    zlib.error,
    MemoryError,
)


# --------------------------------------------------------------------------------------------
# Stack and LazyStack


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


# --------------------------------------------------------------------------------------------
# small helpers


def _natural_key(s: str) -> tuple:
    parts = re.split(r"(\d+)", s.lower())
    return (tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), s)


def _available_memory() -> int:
    """Bytes of memory available to this process (cgroup limit respected where readable)."""
    avail = None
    try:
        import psutil  # optional

        avail = int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or unusable
        with contextlib.suppress(ValueError, OSError, AttributeError):
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if avail is None:
        avail = 8 * 1024**3
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            avail = min(avail, max(int(limit) - used, 0))
    return avail


def _lazy_threshold() -> int:
    return int(min(LAZY_MAX_BYTES, _available_memory() * LAZY_MEMORY_FRACTION))


def _gib(n: float) -> str:
    return f"{n / 1024**3:.3g} GiB" if n >= 1024**3 else f"{n / 1024**2:.3g} MiB"


def _normalize_unit(unit: Any) -> str:
    u = str(unit or "").strip()
    return _UNIT_ALIASES.get(u.lower(), u)


def _convert_length(value: float, unit: str, to: str) -> float | None:
    if unit == to:
        return value
    if unit in _UNIT_IN_UM and to in _UNIT_IN_UM:
        return value * _UNIT_IN_UM[unit] / _UNIT_IN_UM[to]
    return None


def _check_regular_file(path: Path) -> None:
    """Refuse pipes, sockets and devices: reading one can block forever."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise InputError(
            f"Cannot read {path}: {e.strerror or e}", "check the path and its permissions"
        ) from e
    if not stat.S_ISREG(mode):
        raise InputError(
            f"{path} is not a regular file (a pipe, socket or device)",
            "save the image to a file and open that file",
        )


def _sniff(path: Path) -> str:
    """'tiff', 'png', 'jpeg', 'bmp' from the first bytes; InputError for empty or unknown."""
    _check_regular_file(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as e:
        raise InputError(
            f"Cannot read {path}: {e.strerror or e}", "check the path and its permissions"
        ) from e
    if size == 0:
        raise InputError(
            f"{path} is empty (0 bytes)", "the file was not written completely; re-export it"
        )
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"BM"):
        return "bmp"
    raise InputError(
        f"{path} is not a TIFF, PNG or JPEG image (it starts with {head[:4]!r})",
        "save the image as TIFF (preferred) or PNG",
    )


def _check_dtype(dtype: np.dtype, path: Any) -> None:
    if dtype.kind not in "biuf":
        raise InputError(
            f"{path} has unsupported pixel type {dtype}",
            "convert it to an integer or float32 image (e.g. in Fiji: Image > Type)",
        )


@contextlib.contextmanager
def _capture_tifffile_log(notes: list[str]) -> Iterator[None]:
    """Collect tifffile's logged warnings (instead of printing them) into ``notes``."""

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(record.getMessage())

    logger = logging.getLogger("tifffile")
    handler = _Collect(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


# --------------------------------------------------------------------------------------------
# TIFF: axes → canonical layout


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


# --------------------------------------------------------------------------------------------
# TIFF: pixel size


def _pixel_size_tiff(
    tif: tifffile.TiffFile,
) -> tuple[tuple[float, float] | None, float | None, str]:
    page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
    if tif.is_ome and tif.ome_metadata:
        found = _pixel_size_ome(tif.ome_metadata)
        if found is not None:
            return found
    if tif.is_imagej:
        meta = tif.imagej_metadata or {}
        unit = _normalize_unit(meta.get("unit", ""))
        res = _resolution(page)
        spacing = meta.get("spacing")
        z = float(spacing) if isinstance(spacing, (int, float)) and spacing > 0 else None
        if res is not None and unit:
            return (1.0 / res[1], 1.0 / res[0]), z, unit
        if z is not None and unit:
            return None, z, unit
    for meta in tif.shaped_metadata or ():
        if isinstance(meta, dict) and "pixel_size" in meta:
            with contextlib.suppress(TypeError, ValueError):
                py, px = (float(v) for v in meta["pixel_size"])
                z = meta.get("z_spacing")
                return (py, px), (float(z) if z else None), _normalize_unit(meta.get("unit"))
    res = _resolution(page)
    unit_code = int(getattr(page, "resolutionunit", 1) or 1)
    per_unit_um = {3: 1e4, 4: 1e3, 5: 1.0}.get(unit_code)  # cm, mm, µm; inch = screen DPI
    if res is not None and per_unit_um is not None:
        return (per_unit_um / res[1], per_unit_um / res[0]), None, "µm"
    return None, None, ""


def _resolution(page: Any) -> tuple[float, float] | None:
    """(x, y) pixels per unit from the resolution tags, None when absent, zero or 1:1."""
    try:
        xr = page.tags["XResolution"].value
        yr = page.tags["YResolution"].value
        x = xr[0] / xr[1] if isinstance(xr, tuple) else float(xr)
        y = yr[0] / yr[1] if isinstance(yr, tuple) else float(yr)
    except (KeyError, ZeroDivisionError, TypeError, IndexError):
        return None
    if not (x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y)) or (x == 1 and y == 1):
        return None
    return x, y


def _pixel_size_ome(xml: str) -> tuple[tuple[float, float] | None, float | None, str] | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next(
        (el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"), None
    )
    if pixels is None:
        return None

    def get(name: str) -> tuple[float | None, str]:
        v = pixels.get(f"PhysicalSize{name}")
        unit = _normalize_unit(pixels.get(f"PhysicalSize{name}Unit", "µm"))
        try:
            f = float(v) if v is not None else None
        except ValueError:
            f = None
        return (f if f is not None and f > 0 else None), unit

    (x, ux), (y, uy), (z, uz) = get("X"), get("Y"), get("Z")
    if x is None and y is None and z is None:
        return None
    unit = ux if x is not None else uy if y is not None else uz
    if x is not None and y is not None and ux != uy:
        x, y, unit = _convert_length(x, ux, "µm"), _convert_length(y, uy, "µm"), "µm"
    x = x if x is not None else y
    y = y if y is not None else x
    if z is not None:
        z = _convert_length(z, uz, unit)
    size = (y, x) if x is not None and y is not None else None
    return size, z, unit


# --------------------------------------------------------------------------------------------
# TIFF reading


class _PagedArray:
    """Index a series page by page: leading axes enumerate pages, the rest is one page."""

    def __init__(
        self,
        pages: Sequence[Any],
        n_lead: int,
        full_shape: tuple[int, ...],
        dtype: np.dtype,
        lock: threading.Lock,
        path: Path,
    ) -> None:
        self.pages = pages
        self.n_lead = n_lead
        self.lead_shape = full_shape[:n_lead]
        self.page_shape = full_shape[n_lead:]
        self.dtype = dtype
        self.lock = lock
        self.path = path

    def read_page(self, k: int) -> np.ndarray:
        page = self.pages[k]
        if page is None:  # a plane the file declares but does not contain
            return np.zeros(self.page_shape, self.dtype)
        try:
            with self.lock:
                data = page.asarray()
        except _DECODE_ERRORS as e:
            raise _decode_error(self.path, e, k) from e
        return np.asarray(data).reshape(self.page_shape)

    def __getitem__(self, key: tuple) -> np.ndarray:
        lead, tail = key[: self.n_lead], key[self.n_lead :]
        ranges = [[k] if isinstance(k, int) else range(n) for k, n in zip(lead, self.lead_shape)]
        kept = [len(r) for k, r in zip(lead, ranges) if not isinstance(k, int)]
        out = None
        for combo_i, combo in enumerate(itertools.product(*ranges)):
            plane = self.read_page(
                int(np.ravel_multi_index(combo, self.lead_shape)) if combo else 0
            )
            plane = plane[tail]
            if out is None:
                out = np.empty((math.prod(kept), *plane.shape), plane.dtype)
            out[combo_i] = plane
        return out.reshape((*kept, *out.shape[1:]))


def _decode_error(path: Path, e: BaseException, page: int | None = None) -> InputError:
    where = f" (page {page})" if page is not None else ""
    if isinstance(e, MemoryError):
        return InputError(
            f"Not enough memory to read {path}{where}", "open it lazily (lazy=True) or free memory"
        )
    return InputError(
        f"Could not decode the image data of {path}{where}: {e}",
        "the file is damaged (truncated or corrupt compressed data); re-export or re-copy it",
    )


def _check_extents(series: Any, path: Path, file_size: int, all_pages: bool) -> None:
    """Raise InputError when the declared image data lie beyond the end of the file."""
    if series.dataoffset is not None:
        end = int(series.dataoffset) + int(series.nbytes)
        if end > file_size:
            raise InputError(
                f"{path} is truncated: its image data end at byte {end:,} but the file has "
                f"only {file_size:,} bytes",
                "the copy or export was interrupted; copy or export the file again",
            )
        return
    pages = series.pages
    idx = range(len(pages)) if all_pages else sorted({0, len(pages) - 1})
    for k in idx:
        page = pages[k]
        if page is None:
            continue
        ends = [int(o) + int(c) for o, c in zip(page.dataoffsets, page.databytecounts) if c]
        if ends and max(ends) > file_size:
            raise InputError(
                f"{path} is truncated: page {k} needs data up to byte {max(ends):,} but the "
                f"file has only {file_size:,} bytes",
                "the copy or export was interrupted; copy or export the file again",
            )


def _read_tiff(path: Path, lazy: bool | None) -> Stack:
    notes: list[str] = []
    file_size = path.stat().st_size
    try:
        with _capture_tifffile_log(notes):
            tif = tifffile.TiffFile(path)
    except _DECODE_ERRORS as e:
        raise InputError(
            f"{path} is not a readable TIFF: {e}",
            "the file is damaged or truncated; re-export it (TIFF from Fiji / tifffile)",
        ) from e
    keep_open = False
    try:
        with _capture_tifffile_log(notes):
            try:
                if not tif.series:
                    raise InputError(f"{path} contains no images", "check the file")
                series = tif.series[0]
                if len(tif.series) > 1:
                    notes.append(f"the file holds {len(tif.series)} image series; read the first")
                full_axes = series.get_axes(False)
                full_shape = tuple(int(s) for s in series.get_shape(False))
                dtype = np.dtype(series.dtype)
                keyframe = series.keyframe
            except _DECODE_ERRORS as e:
                raise InputError(
                    f"{path}: cannot read the TIFF structure: {e}",
                    "the file is damaged or truncated; re-export it",
                ) from e
        _check_dtype(dtype, path)
        layout, axis_notes = _layout_for(full_axes, full_shape, path)
        notes.extend(axis_notes)
        shape = layout.canonical_shape
        nbytes = math.prod(shape) * dtype.itemsize
        plane_bytes = math.prod(shape[1:]) * dtype.itemsize
        avail = _available_memory()
        if plane_bytes > avail:
            raise InputError(
                f"{path} declares image planes of {shape[1]} × {shape[2]} pixels "
                f"({_gib(plane_bytes)} each), more than the available memory ({_gib(avail)})",
                "the file header is probably corrupt; re-export the file",
            )
        if lazy is None:
            lazy = nbytes > _lazy_threshold()
        elif not lazy and nbytes > avail:
            raise InputError(
                f"{path} needs {_gib(nbytes)} in memory but only {_gib(avail)} is available",
                "open it lazily (lazy=True, the default decides by size)",
            )
        try:
            _check_extents(series, path, file_size, all_pages=not lazy)
        except (IndexError, TypeError) as e:
            raise InputError(
                f"{path} is truncated or its page table is damaged ({e})",
                "copy or export the file again",
            ) from e
        pixel_size, z_spacing, unit = _pixel_size_tiff(tif)
        rgb = _is_rgb_tiff(layout, keyframe, dtype)
        common = dict(
            axes="ZYXC" if len(shape) == 4 else "ZYX",
            source_axes=layout.source_axes,
            pixel_size=pixel_size,
            z_spacing=z_spacing,
            unit=unit,
            path=path,
            rgb=rgb,
        )
        if not lazy:
            try:
                with _capture_tifffile_log(notes):
                    full = np.asarray(series.asarray()).reshape(full_shape)
            except _DECODE_ERRORS as e:
                raise _decode_error(path, e) from e
            data = layout.canonical(full)
            return Stack(data=data, lazy=False, notes=tuple(notes), **common)
        data = _lazy_tiff(tif, series, layout, dtype, path, notes)
        keep_open = True
        return Stack(data=data, lazy=True, notes=tuple(notes), **common)
    finally:
        if not keep_open:
            tif.close()


def _lazy_tiff(
    tif: tifffile.TiffFile,
    series: Any,
    layout: _Layout,
    dtype: np.dtype,
    path: Path,
    notes: list[str],
) -> LazyStack:
    native = dtype.newbyteorder("=")
    if series.dataoffset is not None:
        try:
            mm = tifffile.memmap(path, series=0, mode="r")
        except (ValueError, OSError):
            mm = None
        if mm is not None:
            full = mm.reshape(layout.full_shape)
            tif.close()

            def read_mm(i: int) -> np.ndarray:
                return layout.finish_plane(np.asarray(full[layout.plane_key(i)])).astype(native)

            return LazyStack(layout.canonical_shape, native, read_mm, None, "memory-mapped")
    pages = series.pages
    n_pages = len(pages)
    page_size = series.keyframe.size
    n_lead = next(
        (
            k
            for k in range(len(layout.full_shape) + 1)
            if math.prod(layout.full_shape[:k]) == n_pages
            and math.prod(layout.full_shape[k:]) == page_size
        ),
        None,
    )
    if n_lead is None:
        tif.close()
        raise InputError(
            f"{path}: the file has {n_pages} pages, which do not match its declared shape "
            f"{layout.full_shape}",
            "the file is truncated or its metadata is wrong; re-export it",
        )
    paged = _PagedArray(pages, n_lead, layout.full_shape, dtype, threading.Lock(), path)

    def read_paged(i: int) -> np.ndarray:
        return layout.finish_plane(paged[layout.plane_key(i)]).astype(native)

    return LazyStack(layout.canonical_shape, native, read_paged, tif.close, "read page by page")


# --------------------------------------------------------------------------------------------
# PNG / JPEG and folders


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


def image_files(folder: Path) -> list[Path]:
    """The image files in ``folder`` (hidden files skipped), in natural order (2 before 10)."""
    try:
        entries = list(folder.iterdir())
    except OSError as e:
        raise InputError(f"Cannot list {folder}: {e.strerror or e}", "check the folder") from e
    files = [
        p
        for p in entries
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    return sorted(files, key=lambda p: _natural_key(p.name))


def slice_files(folder: Path) -> list[Path]:
    """The image files of ``folder`` that are slices: the ground-truth masks of its images
    (``stack_mask.png`` beside ``stack.png``) are not, nor are files in its subfolders."""
    files = image_files(folder)
    truths = {c for f in files for c in mask_partner_candidates(f, IMAGE_SUFFIXES) if c != f}
    return [f for f in files if f not in truths]


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
        lazy = nbytes > _lazy_threshold()

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


# --------------------------------------------------------------------------------------------
# public reading API


def read_stack(path: str | os.PathLike, lazy: bool | None = None) -> Stack:
    """Read a TIFF, PNG/JPEG or folder of slices as a canonical :class:`Stack`.

    Parameters
    ----------
    path
        A file, or a folder whose image files are the slices (natural name order).
    lazy
        ``None`` decides by size (see the module docstring), ``True`` always reads on demand,
        ``False`` always loads into memory.
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


def file_stem(p: Path) -> str:
    """A file's name without its extension; ``x.ome.tif`` gives ``x``."""
    name = p.name
    low = name.lower()
    for suf in (".ome.tiff", ".ome.tif"):
        if low.endswith(suf):
            return name[: -len(suf)]
    return p.stem


def list_pairs(
    images_dir: str | os.PathLike, masks_dir: str | os.PathLike | None = None
) -> list[tuple[Path, Path]]:
    """(image, mask) paths matched by file stem (extensions may differ), natural order.

    ``list_pairs(root)`` uses ``root/images`` and ``root/masks``. Unmatched files on either side
    raise InputError listing a few of them.
    """
    if masks_dir is None:
        root = Path(images_dir)
        img_dir, msk_dir = root / "images", root / "masks"
        if not img_dir.is_dir() or not msk_dir.is_dir():
            raise InputError(
                f"{root} has no images/ and masks/ subfolders",
                "pass the images and masks folders explicitly, or arrange the dataset as "
                "root/images and root/masks with matching file names",
            )
    else:
        img_dir, msk_dir = Path(images_dir), Path(masks_dir)
    for d in (img_dir, msk_dir):
        if not d.is_dir():
            raise InputError(f"{d} is not a folder", "check the path")

    def by_stem(folder: Path) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for f in image_files(folder):
            s = file_stem(f)
            if s in out:
                raise InputError(
                    f"{folder} has two files for {s!r}: {out[s].name} and {f.name}",
                    "keep one file per image name",
                )
            out[s] = f
        return out

    images, masks = by_stem(img_dir), by_stem(msk_dir)
    if not images:
        raise InputError(f"{img_dir} contains no images", f"supported: {', '.join(IMAGE_SUFFIXES)}")
    no_mask = sorted(set(images) - set(masks), key=_natural_key)
    no_image = sorted(set(masks) - set(images), key=_natural_key)
    if no_mask or no_image:
        parts = []
        if no_mask:
            parts.append(
                f"{len(no_mask)} image(s) without a mask in {msk_dir}: " + ", ".join(no_mask[:5])
            )
        if no_image:
            parts.append(
                f"{len(no_image)} mask(s) without an image in {img_dir}: " + ", ".join(no_image[:5])
            )
        raise InputError(
            "Images and masks do not pair up — " + "; ".join(parts),
            "each image needs a mask with the same file name (the extension may differ)",
        )
    return [(images[s], masks[s]) for s in sorted(images, key=_natural_key)]


# --------------------------------------------------------------------------------------------
# writing


def _is_ome_name(path: Path) -> bool:
    return path.name.lower().endswith((".ome.tif", ".ome.tiff"))


def write_tiff(
    path: str | os.PathLike,
    array: Any,
    *,
    axes: str | None = None,
    pixel_size: float | tuple[float, float] | None = None,
    unit: str = "µm",
    compression: str | None = "zlib",
    z_spacing: float | None = None,
    rgb: bool | None = None,
) -> Path:
    """Write ``array`` atomically as a TIFF that reads back with the same axes and pixel size.

    Parameters
    ----------
    array
        An array or a :class:`Stack` (whose axes, pixel size, z spacing and rgb flag are used
        unless given here). Default axes: ``YX``, ``ZYX``, ``ZYXC`` by dimension.
    axes
        Letters from ``TZCYXS`` (``S`` = colour samples).
    pixel_size
        ``(y, x)`` or one number for both, in ``unit``.
    rgb
        Write the channel axis as colour; ``None``: a 3/4-channel uint8 ``C`` axis is colour.

    Files named ``*.ome.tif`` are written as OME-TIFF; otherwise an ImageJ hyperstack when
    ImageJ supports the dtype (uint8, uint16, float32; colour only as 3 × uint8), else a TIFF
    with tifffile's JSON metadata. Bool is written as uint8 0/255.
    """
    p = Path(path)
    if isinstance(array, Stack):
        st = array
        axes = axes or st.axes
        pixel_size = pixel_size if pixel_size is not None else st.pixel_size
        z_spacing = z_spacing if z_spacing is not None else st.z_spacing
        unit = st.unit if pixel_size is st.pixel_size and st.unit else unit
        rgb = st.rgb if rgb is None else rgb
        array = st.data
    arr = np.asarray(array)
    if not p.name.lower().endswith(_TIFF_SUFFIXES):
        raise InputError(f"{p}: write_tiff writes TIFF files", "name the file *.tif or *.tiff")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * np.uint8(255)
    if arr.dtype.kind not in "iuf":
        raise InputError(
            f"Cannot write pixel type {arr.dtype} to {p}",
            "convert to an integer or float32 array first",
        )
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if axes is None:
        axes = {2: "YX", 3: "ZYX", 4: "ZYXC"}.get(arr.ndim)
        if axes is None:
            raise InputError(
                f"Cannot guess the axes of a {arr.ndim}D array {arr.shape}", "pass axes=..."
            )
    axes = axes.upper()
    if (
        len(axes) != arr.ndim
        or len(set(axes)) != len(axes)
        or set(axes) - set(_WRITE_ORDER)
        or "Y" not in axes
        or "X" not in axes
    ):
        raise InputError(
            f"axes {axes!r} do not fit an array of shape {arr.shape}",
            "give one distinct letter from TZCYXS per dimension, including Y and X",
        )
    if "S" not in axes and "C" in axes:
        n_c = arr.shape[axes.index("C")]
        if rgb or (rgb is None and n_c in (3, 4) and arr.dtype == np.uint8):
            axes = axes.replace("C", "S")
    is_rgb = "S" in axes
    if is_rgb and arr.shape[axes.index("S")] not in (3, 4):
        raise InputError(
            f"A colour image needs 3 or 4 samples, got {arr.shape[axes.index('S')]}",
            "write it as channels (axis C) instead",
        )
    order = sorted(range(len(axes)), key=lambda i: _WRITE_ORDER.index(axes[i]))
    arr = np.ascontiguousarray(arr.transpose(order))
    axes = "".join(axes[i] for i in order)

    if pixel_size is not None:
        try:
            py, px = (
                (float(pixel_size), float(pixel_size))
                if np.isscalar(pixel_size)
                else map(float, pixel_size)
            )
        except (TypeError, ValueError) as e:
            raise InputError(f"Invalid pixel size {pixel_size!r}", "pass (y, x) numbers") from e
        if not (py > 0 and px > 0 and math.isfinite(py) and math.isfinite(px)):
            raise InputError(f"Invalid pixel size {pixel_size!r}", "pass positive numbers (y, x)")
    else:
        py = px = None
    unit = _normalize_unit(unit)
    comp = None if compression in (None, "none", "") else compression
    kwargs: dict[str, Any] = dict(
        photometric="rgb" if is_rgb else "minisblack",
        compression=comp,
    )
    if is_rgb:
        kwargs["planarconfig"] = "contig"
    ome = _is_ome_name(p)
    imagej = (
        not ome
        and arr.dtype in _IMAGEJ_DTYPES
        and (not is_rgb or (arr.dtype == np.uint8 and arr.shape[-1] == 3))
    )
    if not is_rgb and not ome and axes.endswith("X") and arr.shape[-1] == 1:
        # An image one pixel wide: tifffile would take the trailing length-1 axis for TIFF
        # samples and write a (…, 1, Y) page, transposed. An explicit single sample keeps Y, X.
        arr = arr[..., np.newaxis]
        axes += "S"
    if ome:
        meta: dict[str, Any] = {"axes": axes}
        if py is not None:
            meta.update(
                PhysicalSizeX=px,
                PhysicalSizeY=py,
                PhysicalSizeXUnit=unit or "pixel",
                PhysicalSizeYUnit=unit or "pixel",
            )
        if z_spacing:
            meta.update(PhysicalSizeZ=float(z_spacing), PhysicalSizeZUnit=unit or "pixel")
        kwargs.update(ome=True, metadata=meta)
    elif imagej:
        meta = {"axes": axes}
        if unit:
            meta["unit"] = "um" if unit == "µm" else unit
        if z_spacing:
            meta["spacing"] = float(z_spacing)
        kwargs.update(imagej=True, metadata=meta)
        if py is not None:
            kwargs["resolution"] = (1.0 / px, 1.0 / py)
    else:
        meta = {"axes": axes}
        if py is not None:
            meta.update(pixel_size=[py, px], unit=unit)
            if unit in _UNIT_IN_UM:
                cm = _UNIT_IN_UM[unit] / 1e4
                kwargs.update(
                    resolution=(1.0 / (px * cm), 1.0 / (py * cm)), resolutionunit="CENTIMETER"
                )
        if z_spacing:
            meta["z_spacing"] = float(z_spacing)
        kwargs.update(metadata=meta, ome=False)
    with atomic_write(p) as fh:
        try:
            tifffile.imwrite(fh, arr, **kwargs)
        except (ValueError, TypeError, KeyError) as e:
            raise InputError(f"Cannot write {p}: {e}", "check the compression and axes") from e
    return p


def write_mask(path: str | os.PathLike, mask: Any, **kw: Any) -> Path:
    """Write a binary mask atomically as 0/255 uint8: compressed TIFF, or PNG for a 2D ``.png``.

    ``mask`` may be bool or hold ``{0,1}``, ``{0,255}``, ``{0,1,255}``; ``kw`` go to
    :func:`write_tiff` (``pixel_size``, ``unit``, ``compression``...).
    """
    p = Path(path)
    m = to_binary_mask(mask, what="mask") * np.uint8(255)
    if m.ndim not in (2, 3):
        raise InputError(
            f"A mask must be 2D or a 3D stack, got shape {m.shape}", "pass (Y, X) or (Z, Y, X)"
        )
    if p.suffix.lower() == ".png":
        if m.ndim != 2 and m.shape[0] != 1:
            raise InputError(
                f"{p}: PNG holds one 2D mask, got {m.shape}", "write a .tif for stacks"
            )
        from PIL import Image

        with atomic_write(p) as fh:
            Image.fromarray(m.reshape(m.shape[-2:])).save(fh, format="PNG")
        return p
    kw.setdefault("axes", "YX" if m.ndim == 2 else "ZYX")
    kw["rgb"] = False
    return write_tiff(p, m, **kw)
