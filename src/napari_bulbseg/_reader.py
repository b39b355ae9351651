"""npe2 reader: an image stack as an Image layer, plus its mask partner as a Labels layer.

A thin wrapper over :func:`napari_bulbseg.io.read_stack`: TIFF (ImageJ, OME), PNG, JPEG and BMP
files, and folders of 2D slices (natural name order: 2 before 10). Big files stay lazy, the
physical pixel size becomes the layer scale, and an image's ground truth — ``NAME_mask.tif``
beside it, or ``masks/NAME.png`` inside or next to its folder — is offered as a Labels layer
(uint8 0/1, never a bool Image). For a folder, every slice needs its mask for the Labels layer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from napari.utils.notifications import show_error, show_info

from .errors import BulbsegError, InputError
from .io import (
    IMAGE_SUFFIXES,
    is_mask_name,
    mask_partner_candidates,
    slice_files,
)

LayerData = tuple[Any, dict[str, Any], str]
SUFFIXES = IMAGE_SUFFIXES
GT_SUFFIX = " ground truth"


def napari_get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """Return :func:`read_images` for image files or folders of slices, else ``None``."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths:
        return None
    for p in paths:
        if Path(p).is_dir():
            if not slice_files(Path(p)):
                return None
        elif not str(p).lower().endswith(SUFFIXES):
            return None
    return read_images


__all__ = ["find_mask_partner", "is_mask_name", "napari_get_reader", "read_images"]


def find_mask_partner(path: str | Path) -> Path | None:
    """The ground-truth mask belonging to image ``path``, if one exists on disk."""
    path = Path(path)
    for c in mask_partner_candidates(path, SUFFIXES):
        if c.is_file() and c.resolve() != path.resolve():
            return c
    return None


def _scale(stack: Any, two_d: bool) -> tuple[float, ...] | None:
    if stack.pixel_size is None and stack.z_spacing is None:
        return None
    scale = tuple(float(v) for v in stack.scale)
    return scale[1:] if two_d else scale


def image_layer_data(path: str | Path) -> LayerData:
    """Read one stack (file or folder) as napari Image layer data (lazy when big; 2D for one)."""
    from . import io

    stack = io.read_stack(path)
    two_d = stack.n_slices == 1
    data = stack.plane(0) if two_d else stack.data
    if stack.notes:
        show_info(f"{Path(path).name}: " + "; ".join(stack.notes))
    meta: dict[str, Any] = {
        "name": Path(path).name if Path(path).is_dir() else Path(path).stem,
        "rgb": bool(stack.rgb),
        "metadata": {
            "bulbseg_path": str(Path(path).resolve()),
            "bulbseg_source_axes": stack.source_axes,
            "bulbseg_unit": stack.unit,
            "bulbseg_lazy": bool(stack.lazy),
        },
    }
    scale = _scale(stack, two_d)
    if scale is not None:
        meta["scale"] = scale
        meta["units"] = stack.unit or "pixel"
    return data, meta, "image"


def mask_layer_data(path: str | Path, name: str, scale: Any = None, units: Any = None) -> LayerData:
    """Read a binary mask stack as napari Labels layer data."""
    from . import io

    try:
        mask = io.read_mask(path)
    except InputError:  # instance labels rather than a binary mask: show them as they are
        stack = io.read_stack(path, lazy=False)
        mask = np.asarray(stack.data)
        mask = mask[0] if mask.shape[0] == 1 else mask
        if mask.dtype.kind not in "iu":
            raise
    meta: dict[str, Any] = {"name": name, "metadata": {"bulbseg_path": str(path)}, "opacity": 0.5}
    meta.update(_geometry({"scale": scale, "units": units}))
    return mask, meta, "labels"


def _geometry(meta: dict[str, Any]) -> dict[str, Any]:
    """The scale and units of an image's layer metadata, for its ground-truth layer: napari
    warns, and ignores every unit, when an image in µm meets a mask in pixels."""
    return {k: meta[k] for k in ("scale", "units") if meta.get(k) is not None}


def _units_safe(meta: dict[str, Any]) -> dict[str, Any]:
    """Give napari a unit it can parse (``µm`` → ``um``); an unknown one is not passed on (napari
    would refuse the layer) but kept in the layer metadata (``bulbseg_unit``) and reported."""
    unit = meta.get("units")
    if unit is None:
        return meta
    ascii_unit = unit.replace("µ", "u").replace("μ", "u")
    try:
        import pint

        pint.get_application_registry().Unit(ascii_unit)
        meta["units"] = ascii_unit
    except Exception:
        meta.pop("units", None)
        meta.setdefault("metadata", {})["bulbseg_unit"] = unit
        show_info(
            f"{meta.get('name', 'image')}: the file's unit {unit!r} is not one napari knows, so "
            f"the scale is shown without a unit (it is in {unit}; kept in the layer metadata "
            "as bulbseg_unit)"
        )
    return meta


def folder_masks(folder: Path) -> np.ndarray | None:
    """The (Z, Y, X) ground truth of a folder of slices: every slice's mask partner, stacked."""
    from . import io

    partners = [find_mask_partner(f) for f in slice_files(folder)]
    if not partners or any(p is None for p in partners):
        found = sum(p is not None for p in partners)
        if found:
            show_info(
                f"{folder.name}: {found} of {len(partners)} slices have a mask; the ground truth "
                "is shown only when every slice has one"
            )
        return None
    planes = [io.read_mask(p) for p in partners]
    if len({pl.shape for pl in planes}) != 1:
        raise InputError(
            f"The masks of {folder} differ in size", "every mask must have its slice's size"
        )
    return np.stack(planes).astype(np.uint8, copy=False)


def read_images(path: str | list[str]) -> list[LayerData]:
    """Read image file(s) or folder(s) of slices; mask partners come along as Labels layers."""
    paths = [Path(path)] if isinstance(path, str | Path) else [Path(p) for p in path]
    layers: list[LayerData] = []
    try:
        for p in paths:
            if p.is_dir():
                data, meta, kind = image_layer_data(p)
                layers.append((data, _units_safe(meta), kind))
                gt = folder_masks(p)
                if gt is not None:
                    gt = gt[0] if np.ndim(data) == 2 + bool(meta.get("rgb")) else gt
                    gt_meta = {"name": meta["name"] + GT_SUFFIX, "opacity": 0.5}
                    layers.append((gt, {**gt_meta, **_geometry(meta)}, "labels"))
                continue
            if is_mask_name(p):
                layers.append(mask_layer_data(p, p.stem))
                continue
            data, meta, kind = image_layer_data(p)
            layers.append((data, _units_safe(meta), kind))
            partner = find_mask_partner(p)
            if partner is not None and not any(Path(q) == partner for q in paths):
                gt_name = p.stem + GT_SUFFIX
                layers.append(mask_layer_data(partner, gt_name, **_geometry(meta)))
    except BulbsegError as e:
        show_error(str(e))
        return []
    return layers
