"""Small helpers between napari layers and the engine's (Z, Y, X) stacks."""

from __future__ import annotations

from typing import Any

import numpy as np
from napari.layers import Image, Labels, Layer
from napari.utils.colormaps import DirectLabelColormap

from ..errors import InputError
from . import _text as T

PRED_RGBA = (1.0, 0.75, 0.0, 1.0)  # amber
CORR_RGBA = (0.2, 0.55, 1.0, 1.0)  # blue
TRANSPARENT = (0.0, 0.0, 0.0, 0.0)


def binary_colormap(rgba: tuple[float, float, float, float]) -> DirectLabelColormap:
    """0 transparent, 1 ``rgba``; any other label drawn in the same colour."""
    return DirectLabelColormap(color_dict={None: rgba, 0: TRANSPARENT, 1: rgba})


def diff_colormap() -> DirectLabelColormap:
    """The difference-map colours of :data:`napari_bulbseg.postprocess.DIFF_COLORS`."""
    from ..postprocess import DIFF_COLORS

    colors: dict[int | None, Any] = {None: TRANSPARENT}
    colors.update({int(k): tuple(v) for k, v in DIFF_COLORS.items()})
    return DirectLabelColormap(color_dict=colors)


def spatial_ndim(layer: Layer) -> int:
    """Number of non-channel axes of a layer's data."""
    return int(layer.ndim)


def as_stack(layer: Layer) -> Any:
    """The layer's data as a (Z, Y, X) / (Z, Y, X, C) array-like; a 2D image becomes Z = 1.

    For numpy data the result is a view, so writes go through to the layer.
    """
    nd = spatial_ndim(layer)
    if nd not in (2, 3):
        raise InputError(T.MSG_BAD_NDIM.format(name=layer.name, ndim=nd), "")
    data = layer.data
    if nd == 3:
        return data
    return np.asarray(data)[None]


def n_slices(layer: Layer) -> int:
    return 1 if spatial_ndim(layer) == 2 else int(layer.data.shape[0])


def current_index(viewer: Any, layer: Layer) -> int:
    """Index of the slice of ``layer`` shown in ``viewer`` (0 for 2D layers)."""
    if spatial_ndim(layer) == 2:
        return 0
    z = layer.world_to_data(viewer.dims.point)[0]
    return int(np.clip(round(float(z)), 0, layer.data.shape[0] - 1))


def upsert_labels(viewer: Any, name: str, data: np.ndarray, like: Layer, **kw: Any) -> Labels:
    """Replace the data of Labels layer ``name`` or add it, aligned with layer ``like``."""
    if name in viewer.layers and isinstance(viewer.layers[name], Labels):
        layer = viewer.layers[name]
        layer.data = data
        for k, v in kw.items():
            setattr(layer, k, v)
        return layer
    return viewer.add_labels(data, name=name, **_geometry(like, data.ndim), **kw)


def upsert_image(viewer: Any, name: str, data: np.ndarray, like: Layer, **kw: Any) -> Image:
    """Replace the data of Image layer ``name`` or add it, aligned with layer ``like``."""
    if name in viewer.layers and isinstance(viewer.layers[name], Image):
        layer = viewer.layers[name]
        layer.data = data
        return layer
    return viewer.add_image(data, name=name, **_geometry(like, data.ndim), **kw)


def _geometry(like: Layer, ndim: int) -> dict[str, tuple[Any, ...]]:
    """Scale, translation and units of ``like``'s last ``ndim`` axes.

    The units matter as much as the scale: napari drops all units from the canvas (and warns)
    when an image in µm meets a layer in pixels.
    """
    return {
        "scale": tuple(like.scale)[-ndim:],
        "translate": tuple(like.translate)[-ndim:],
        "units": tuple(like.units)[-ndim:],
    }


def write_slice(layer: Labels, z: int, mask: np.ndarray, displayed: bool) -> None:
    """Overwrite slice ``z`` of a program-owned Labels layer; redraw it when it is on screen.

    On screen, the slice is re-coloured and uploaded through the path napari's own painting
    takes (no undo history, no full re-slice); anything unusual falls back to ``refresh()``.
    """
    stack = layer.data if layer.ndim == 3 else layer.data[None]
    stack[z] = mask
    if displayed:
        box = (slice(0, mask.shape[0]), slice(0, mask.shape[1]))
        if not _partial_refresh(layer, z, box):
            layer.refresh()


def _partial_refresh(layer: Labels, z: int, box: tuple[slice, slice]) -> bool:
    """Redraw ``box`` of displayed slice ``z`` like ``Labels.data_setitem`` does (no history)."""
    try:
        nd = layer.ndim
        if (
            layer.contour != 0
            or not isinstance(layer.data, np.ndarray)
            or list(layer._slice_input.displayed) != [nd - 2, nd - 1]
        ):
            return False
        raw = layer._slice.image.raw
        plane = layer.data[z] if nd == 3 else layer.data
        # the slice on screen must be a view of plane z (numpy data is sliced without copying)
        if raw.shape != plane.shape or not np.may_share_memory(raw, plane):
            return False
        layer._slice.image.view[box] = layer.colormap._data_to_texture(raw[box])
        zs = (slice(z, z + 1),) if nd == 3 else ()
        layer._accumulate_updated_slice((*zs, *box))
        layer._partial_labels_refresh()
    except Exception:  # napari internals changed: the public path is always correct
        return False
    return True
