"""Object scale: the median object diameter of a mask, and resizing images and masks.

A model is trained with its images rescaled so that the median object has the card's
``diameter`` (px); prediction rescales the user's image by ``trained / diameter`` before the
U-Net and brings the probabilities back to the input's exact shape (see ``inference``).

What a prediction runs at when the user gives no diameter is the card's ``default_diameter``
(:func:`requested_diameter`): ``"auto-slice"`` for the bundled model and every model trained or
fine-tuned with a diameter (each slice's objects measured and brought to the trained size),
``"auto"`` (once per stack), a number of px, or none (the image's own scale).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError

#: objects smaller than this (pixels) are ignored when measuring the median diameter (noise)
MIN_OBJECT_PIXELS = 9
#: ``auto``: an object narrower than this fraction of the trained diameter (in the first pass, at
#: the trained scale) is a speck and does not count towards the typical diameter
SPECK_FRACTION = 1.0 / 3.0
#: prediction never rescales by more than this factor either way
MAX_ZOOM = 8.0
#: what a user types for "no rescaling: the image's own scale"
NATIVE = "none"
#: what a user types for "measure every slice on its own" (``auto`` measures a stack once)
AUTO_PER_SLICE = "auto-slice"
#: the words a diameter may be besides a number
DIAMETER_WORDS = ("auto", AUTO_PER_SLICE, NATIVE)
_VALID = (
    f"give a number of pixels, 'auto' (measure it once per stack), '{AUTO_PER_SLICE}' (measure "
    f"every slice) or '{NATIVE}' (the image's own scale)"
)


def requested_diameter(value: object, default: object = None) -> float | str:
    """The diameter a prediction runs at, from the user's ``value`` and the model card's
    ``default_diameter``: ``"auto"`` (measured once per stack), ``"auto-slice"`` (measured on
    every slice), a number of pixels (not yet checked against an image), or :data:`NATIVE` (the
    image's own scale). ``value`` None or empty means "the model's default";
    a default of None means the image's own scale. Anything else is refused with what is valid.
    """
    for v in (value, default):
        if v is None or (isinstance(v, str) and not v.strip()):
            continue
        if isinstance(v, str):
            word = v.strip().lower()
            if word in DIAMETER_WORDS:
                return word
            try:
                v = float(word)
            except ValueError:
                raise InputError(f"Object diameter {v!r} is not a number", _VALID) from None
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise InputError(f"Object diameter {v!r} is not a number", _VALID)
        return float(v)
    return NATIVE


def object_diameters(mask: np.ndarray, min_pixels: int = MIN_OBJECT_PIXELS) -> np.ndarray:
    """Equivalent diameters ``2 sqrt(area / pi)`` (px) of a binary mask's connected objects."""
    m = np.asarray(mask) > 0
    if m.ndim != 2:
        raise InputError(f"Expected a 2D mask, got shape {m.shape}", "pass one slice at a time")
    labels, n = ndi.label(m)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas >= min_pixels]
    return 2.0 * np.sqrt(areas / math.pi)


def typical_diameter(diameters: np.ndarray, speck_below: float = 0.0) -> float | None:
    """The median of object diameters, specks left out; None when there are none.

    A speck is an object narrower than ``speck_below`` px; when every object is one, the
    median of all is returned (the objects really are that small). ``auto`` passes a third of
    the trained diameter (:data:`SPECK_FRACTION`): a model at its trained scale draws real
    objects around that size, so a few large objects among many tiny false positives — a bulb
    in a nuclei model's first pass — are measured as the large objects, while a field of
    nuclei keeps them all (and one huge merged blob among them does not move the median)."""
    d = np.asarray(diameters, dtype=np.float64)
    if d.size == 0:
        return None
    kept = d[d >= speck_below]
    return float(np.median(kept if kept.size else d))


def median_diameter(mask: np.ndarray, min_pixels: int = MIN_OBJECT_PIXELS) -> float | None:
    """The median equivalent diameter (px) of a mask's objects, or None when it has none."""
    d = object_diameters(mask, min_pixels)
    return float(np.median(d)) if d.size else None


def check_diameter(diameter: float, shape: tuple[int, ...]) -> float:
    """Validate a user's object diameter (px) against an image's ``(…, Y, X)`` shape.

    Valid: a finite number > 0 and no larger than the image's shorter side.
    """
    side = int(min(shape[-2:]))
    try:
        d = float(diameter)
    except (TypeError, ValueError):
        d = math.nan
    if isinstance(diameter, bool) or not math.isfinite(d) or d <= 0 or d > side:
        raise InputError(
            f"Object diameter {diameter!r} is not valid for an image of {shape[-2]}×{shape[-1]} px",
            f"give a number of pixels greater than 0 and at most {side} (the image's shorter "
            f"side), 'auto' or '{NATIVE}' (the image's own scale)",
        )
    return d


def zoom_factor(trained: float | None, diameter: float | None) -> float:
    """The factor that brings objects of ``diameter`` px to the ``trained`` px (1 = none)."""
    if trained is None or diameter is None:
        return 1.0
    return float(np.clip(trained / diameter, 1.0 / MAX_ZOOM, MAX_ZOOM))


def resized_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """``(Y, X)`` scaled by ``factor``, at least 1 px each."""
    return (max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor)))


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Linear resize of a ``(C, Y, X)`` (or ``(Y, X)``) float image to ``shape`` (Y, X)."""
    import torch
    import torch.nn.functional as F

    img = np.asarray(image, dtype=np.float32)
    squeeze = img.ndim == 2
    x = torch.from_numpy(np.ascontiguousarray(img[None] if squeeze else img))[None]
    if tuple(x.shape[-2:]) == tuple(shape):
        return img.copy()
    out = F.interpolate(x, size=tuple(int(s) for s in shape), mode="bilinear", align_corners=False)
    out = out[0].numpy()
    return out[0] if squeeze else out


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a binary ``(Y, X)`` mask to ``shape``: linear interpolation, then ``>= 0.5``."""
    m = np.asarray(mask, dtype=np.float32)
    if m.shape == tuple(shape):
        return (m > 0).astype(np.uint8)
    return (resize_image((m > 0).astype(np.float32), shape) >= 0.5).astype(np.uint8)


def back_to_shape(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Probabilities ``(Y', X')`` computed on a rescaled image, brought back to ``shape``
    (linear interpolation; the exact input shape, whatever the rounding of the rescale)."""
    if prob.shape == tuple(shape):
        return prob
    return np.clip(resize_image(prob.astype(np.float32), shape), 0.0, 1.0)
