"""Writing stacks and masks, atomically: OME-TIFF, ImageJ hyperstack, plain TIFF, PNG masks.

:func:`write_tiff` checks the pixels and axes, puts the axes in TIFF order, then asks one small
function per output format for tifffile's arguments (:func:`_ome_options`,
:func:`_imagej_options`, :func:`_plain_options`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from ..atomic import atomic_write
from ..errors import InputError
from .masks import to_binary_mask
from .stack import Stack
from .tiff_meta import _UNIT_IN_UM, _normalize_unit

_TIFF_SUFFIXES = (".tif", ".tiff")
_WRITE_ORDER = "TZCYXS"
_IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


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
        array, axes, pixel_size, z_spacing, unit, rgb = _stack_defaults(
            array, axes, pixel_size, z_spacing, unit, rgb
        )
    arr = np.asarray(array)
    if not p.name.lower().endswith(_TIFF_SUFFIXES):
        raise InputError(f"{p}: write_tiff writes TIFF files", "name the file *.tif or *.tiff")
    arr = _writable_pixels(arr, p)
    arr, axes = _tiff_order(arr, _checked_axes(arr, axes, rgb))
    size = _pixel_size_yx(pixel_size)
    unit = _normalize_unit(unit)
    is_rgb = "S" in axes
    ome = _is_ome_name(p)
    if not is_rgb and not ome and axes.endswith("X") and arr.shape[-1] == 1:
        # An image one pixel wide: tifffile would take the trailing length-1 axis for TIFF
        # samples and write a (…, 1, Y) page, transposed. An explicit single sample keeps Y, X.
        arr = arr[..., np.newaxis]
        axes += "S"
    kwargs: dict[str, Any] = dict(
        photometric="rgb" if is_rgb else "minisblack",
        compression=None if compression in (None, "none", "") else compression,
    )
    if is_rgb:
        kwargs["planarconfig"] = "contig"
    if ome:
        kwargs.update(_ome_options(axes, size, unit, z_spacing))
    elif _imagej_can_hold(arr, is_rgb):
        kwargs.update(_imagej_options(axes, size, unit, z_spacing))
    else:
        kwargs.update(_plain_options(axes, size, unit, z_spacing))
    with atomic_write(p) as fh:
        try:
            tifffile.imwrite(fh, arr, **kwargs)
        except (ValueError, TypeError, KeyError) as e:
            raise InputError(f"Cannot write {p}: {e}", "check the compression and axes") from e
    return p


def _stack_defaults(
    st: Stack,
    axes: str | None,
    pixel_size: Any,
    z_spacing: float | None,
    unit: str,
    rgb: bool | None,
) -> tuple[Any, str, Any, float | None, str, bool]:
    """:func:`write_tiff`'s arguments with what ``st`` says filled in where they were not given."""
    axes = axes or st.axes
    pixel_size = pixel_size if pixel_size is not None else st.pixel_size
    z_spacing = z_spacing if z_spacing is not None else st.z_spacing
    unit = st.unit if pixel_size is st.pixel_size and st.unit else unit
    rgb = st.rgb if rgb is None else rgb
    return st.data, axes, pixel_size, z_spacing, unit, rgb


def _writable_pixels(arr: np.ndarray, p: Path) -> np.ndarray:
    """Bool as uint8 0/255, native byte order; InputError for types TIFF cannot hold."""
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * np.uint8(255)
    if arr.dtype.kind not in "iuf":
        raise InputError(
            f"Cannot write pixel type {arr.dtype} to {p}",
            "convert to an integer or float32 array first",
        )
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _checked_axes(arr: np.ndarray, axes: str | None, rgb: bool | None) -> str:
    """The axes to write: the default for the dimension, validated, ``C`` → ``S`` for colour."""
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
    if "S" in axes and arr.shape[axes.index("S")] not in (3, 4):
        raise InputError(
            f"A colour image needs 3 or 4 samples, got {arr.shape[axes.index('S')]}",
            "write it as channels (axis C) instead",
        )
    return axes


def _tiff_order(arr: np.ndarray, axes: str) -> tuple[np.ndarray, str]:
    """``arr`` transposed (contiguous) so its axes follow ``TZCYXS``, and those axes."""
    order = sorted(range(len(axes)), key=lambda i: _WRITE_ORDER.index(axes[i]))
    return np.ascontiguousarray(arr.transpose(order)), "".join(axes[i] for i in order)


def _pixel_size_yx(pixel_size: Any) -> tuple[float, float] | None:
    """``(y, x)`` from one number or a pair; InputError unless both are positive and finite."""
    if pixel_size is None:
        return None
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
    return py, px


def _imagej_can_hold(arr: np.ndarray, is_rgb: bool) -> bool:
    """ImageJ hyperstacks hold uint8, uint16 and float32; colour only as 3 × uint8."""
    return arr.dtype in _IMAGEJ_DTYPES and (
        not is_rgb or (arr.dtype == np.uint8 and arr.shape[-1] == 3)
    )


def _ome_options(
    axes: str, size: tuple[float, float] | None, unit: str, z_spacing: float | None
) -> dict[str, Any]:
    """tifffile arguments for an OME-TIFF: pixel size and z spacing in the OME XML."""
    meta: dict[str, Any] = {"axes": axes}
    if size is not None:
        py, px = size
        meta.update(
            PhysicalSizeX=px,
            PhysicalSizeY=py,
            PhysicalSizeXUnit=unit or "pixel",
            PhysicalSizeYUnit=unit or "pixel",
        )
    if z_spacing:
        meta.update(PhysicalSizeZ=float(z_spacing), PhysicalSizeZUnit=unit or "pixel")
    return dict(ome=True, metadata=meta)


def _imagej_options(
    axes: str, size: tuple[float, float] | None, unit: str, z_spacing: float | None
) -> dict[str, Any]:
    """tifffile arguments for an ImageJ hyperstack: resolution tags, ``unit`` and ``spacing``."""
    meta: dict[str, Any] = {"axes": axes}
    if unit:
        meta["unit"] = "um" if unit == "µm" else unit
    if z_spacing:
        meta["spacing"] = float(z_spacing)
    out: dict[str, Any] = dict(imagej=True, metadata=meta)
    if size is not None:
        py, px = size
        out["resolution"] = (1.0 / px, 1.0 / py)
    return out


def _plain_options(
    axes: str, size: tuple[float, float] | None, unit: str, z_spacing: float | None
) -> dict[str, Any]:
    """tifffile arguments for a plain TIFF: our JSON metadata, and resolution tags in cm."""
    meta: dict[str, Any] = {"axes": axes}
    out: dict[str, Any] = {}
    if size is not None:
        py, px = size
        meta.update(pixel_size=[py, px], unit=unit)
        if unit in _UNIT_IN_UM:
            cm = _UNIT_IN_UM[unit] / 1e4
            out.update(resolution=(1.0 / (px * cm), 1.0 / (py * cm)), resolutionunit="CENTIMETER")
    if z_spacing:
        meta["z_spacing"] = float(z_spacing)
    out.update(metadata=meta, ome=False)
    return out


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
