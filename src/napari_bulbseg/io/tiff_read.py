"""Reading a TIFF into a :class:`~.stack.Stack`: in memory, memory-mapped, or page by page,
with truncated and damaged files refused in words."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from ..errors import InputError
from . import memory
from .checks import _DECODE_ERRORS, _check_dtype
from .memory import _gib
from .stack import LazyStack, Stack
from .tiff_layout import _is_rgb_tiff, _Layout, _layout_for
from .tiff_meta import _pixel_size_tiff


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
        avail = memory._available_memory()
        if plane_bytes > avail:
            raise InputError(
                f"{path} declares image planes of {shape[1]} × {shape[2]} pixels "
                f"({_gib(plane_bytes)} each), more than the available memory ({_gib(avail)})",
                "the file header is probably corrupt; re-export the file",
            )
        if lazy is None:
            lazy = nbytes > memory._lazy_threshold()
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
