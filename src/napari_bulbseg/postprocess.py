"""Turn foreground probabilities into masks, apply object priors, and map errors.

Rules shared with :mod:`napari_bulbseg.metrics`:

- **Threshold**: a pixel is foreground when its stored probability ``p >= threshold``, compared
  exactly (no rounding of the threshold to the array's precision). ``uint8`` probabilities hold
  ``p * 255``; they are compared as ``to_float_prob(p) >= threshold``, which for ordinary
  thresholds is the same as ``p_uint8 >= ceil(threshold * 255)``. So a ``float32`` map, its
  ``float16`` copy and its ``uint8`` copy threshold identically wherever they hold the same value.
  NaN and negative probabilities are never foreground.
- **Objects** are connected components with **8-connectivity** (pixels touching by an edge or a
  corner belong to the same object). Holes are background regions that cannot reach the image
  border through edge-adjacent (4-connected) background pixels, the complementary rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError

__all__ = [
    "DIFF_COLORS",
    "DIFF_FN",
    "DIFF_FP",
    "DIFF_NAMES",
    "DIFF_TN",
    "DIFF_TP",
    "STRUCTURE",
    "PostProcess",
    "count_objects",
    "difference_map",
    "fill_holes",
    "label_objects",
    "object_prior_violations",
    "postprocess_slice",
    "postprocess_stack",
    "threshold_prob",
    "to_float_prob",
]

#: 8-connectivity: the structuring element used for every object labelling in the package
STRUCTURE = np.ones((3, 3), dtype=bool)
#: 4-connectivity for the background when looking for holes (complement of 8-connectivity)
_BACKGROUND_STRUCTURE = ndi.generate_binary_structure(2, 1)

#: difference-map codes
DIFF_TN, DIFF_TP, DIFF_FP, DIFF_FN = 0, 1, 2, 3
DIFF_NAMES: dict[int, str] = {
    DIFF_TN: "true negative",
    DIFF_TP: "true positive",
    DIFF_FP: "false positive",
    DIFF_FN: "false negative",
}
#: RGBA (0..1) per difference code: false positives magenta, false negatives green, the two
#: colours that stay distinct for the common colour-vision deficiencies; true positives a muted
#: translucent grey so errors stand out; true negatives transparent.
DIFF_COLORS: dict[int, tuple[float, float, float, float]] = {
    DIFF_TN: (0.0, 0.0, 0.0, 0.0),
    DIFF_TP: (0.6, 0.6, 0.6, 0.35),
    DIFF_FP: (1.0, 0.0, 1.0, 1.0),
    DIFF_FN: (0.0, 0.9, 0.3, 1.0),
}
# (truth, pred) -> code, indexed by truth + 2 * pred
_DIFF_LUT = np.array([DIFF_TN, DIFF_FN, DIFF_FP, DIFF_TP], dtype=np.uint8)

_FLOAT16_INF_BITS = 0x7C00
_PROB_DTYPES = "float16, float32, float64 or uint8 (p * 255)"


@dataclass(frozen=True)
class PostProcess:
    """How probabilities become a mask.

    Parameters
    ----------
    threshold
        Foreground when ``p >= threshold``; ``0 < threshold <= 1``.
    min_size
        Objects with fewer pixels are removed (``0`` or ``1`` keeps everything).
    fill_holes
        Fill background regions enclosed by an object.
    keep_largest
        Keep only this many largest objects per slice (``0`` keeps all). Ties in size are broken
        by raster order: the object whose first pixel comes first (top row, then left) wins.

    Steps run in this order: threshold, fill holes, remove small objects, keep largest.
    """

    threshold: float = 0.5
    min_size: int = 0
    fill_holes: bool = False
    keep_largest: int = 0

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating, np.integer)):
            raise InputError(
                f"Threshold must be a number, got {t!r}", "use a value in (0, 1], e.g. 0.5"
            )
        if not 0.0 < float(t) <= 1.0:
            raise InputError(
                f"Threshold {t} is outside (0, 1]",
                "use a probability such as 0.5; 0 would mark every pixel as foreground",
            )
        for name in ("min_size", "keep_largest"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise InputError(
                    f"{name} must be a whole number >= 0, got {v!r}", "0 switches this step off"
                )
        if not isinstance(self.fill_holes, (bool, np.bool_)):
            raise InputError(
                f"fill_holes must be True or False, got {self.fill_holes!r}", "use True or False"
            )
        # normalise numpy scalars so to_dict() is JSON-serialisable
        object.__setattr__(self, "threshold", float(t))
        object.__setattr__(self, "min_size", int(self.min_size))
        object.__setattr__(self, "keep_largest", int(self.keep_largest))
        object.__setattr__(self, "fill_holes", bool(self.fill_holes))

    @property
    def needs_labels(self) -> bool:
        """Whether any step beyond the threshold is switched on."""
        return self.fill_holes or self.min_size > 1 or self.keep_largest > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PostProcess:
        unknown = set(d) - {"threshold", "min_size", "fill_holes", "keep_largest"}
        if unknown:
            raise InputError(
                f"Unknown post-processing setting(s): {', '.join(sorted(unknown))}",
                "valid keys are threshold, min_size, fill_holes, keep_largest",
            )
        return cls(**d)


def _check_prob_dtype(dtype: np.dtype) -> None:
    if dtype not in (np.float16, np.float32, np.float64, np.uint8):
        raise InputError(f"Probabilities of type {dtype} are not supported", f"use {_PROB_DTYPES}")


def to_float_prob(prob: Any) -> np.ndarray:
    """Probabilities as floats in [0, 1]: float16/32/64 returned as is, uint8 as float32 ``/ 255``."""
    arr = np.asarray(prob)
    _check_prob_dtype(arr.dtype)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    return arr


def _smallest_at_least(t: float, dtype: type) -> np.floating:
    """The smallest value of float ``dtype`` that is ``>= t`` (so ``p >= t`` exactly)."""
    c = dtype(t)
    if float(c) < t:
        c = np.nextafter(c, dtype(np.inf))
    return c


def _uint8_cutoff(t: float) -> int:
    """Smallest uint8 ``v`` with ``to_float_prob(v) >= t`` (256 when none)."""
    values = to_float_prob(np.arange(256, dtype=np.uint8))
    hits = np.flatnonzero(values >= _smallest_at_least(t, np.float32))
    return int(hits[0]) if hits.size else 256


def threshold_prob(prob: Any, threshold: float) -> np.ndarray:
    """Boolean ``prob >= threshold`` with the exact, dtype-independent rule of this module."""
    arr = np.asarray(prob)
    _check_prob_dtype(arr.dtype)
    t = PostProcess(threshold=threshold).threshold  # validates 0 < t <= 1
    if arr.dtype == np.uint8:
        return arr >= _uint8_cutoff(t)
    if arr.dtype == np.float16:
        # For non-negative float16 the bit pattern orders like the value, and an integer
        # comparison is ~10x faster than numpy's float16 one. Subtracting the cutoff's bits makes
        # everything below the cutoff wrap round to large values, so one comparison keeps exactly
        # [cutoff, +inf] and drops negatives, -0.0 and NaN.
        cut = int(_smallest_at_least(t, np.float16).view(np.uint16))
        shifted = np.subtract(arr.view(np.uint16), np.uint16(cut))
        return np.less(shifted, np.uint16(_FLOAT16_INF_BITS - cut + 1))
    if arr.dtype == np.float32:
        return arr >= _smallest_at_least(t, np.float32)
    return arr >= t
