"""Pixel size and z spacing from a TIFF's metadata (OME, ImageJ, our JSON, resolution tags),
and the length units files declare."""

from __future__ import annotations

import contextlib
import math
import xml.etree.ElementTree as ET
from typing import Any

import tifffile

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


def _normalize_unit(unit: Any) -> str:
    u = str(unit or "").strip()
    return _UNIT_ALIASES.get(u.lower(), u)


def _convert_length(value: float, unit: str, to: str) -> float | None:
    if unit == to:
        return value
    if unit in _UNIT_IN_UM and to in _UNIT_IN_UM:
        return value * _UNIT_IN_UM[unit] / _UNIT_IN_UM[to]
    return None


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
