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
from .io import mask_foreground

__all__ = [
    "DIFF_COLORS",
    "DIFF_FN",
    "DIFF_FP",
    "DIFF_NAMES",
    "DIFF_TN",
    "DIFF_TP",
    "STRUCTURE",
    "PostProcess",
    "as_bool_mask",
    "count_objects",
    "difference_map",
    "fill_holes",
    "label_objects",
    "label_sizes",
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

    @classmethod
    def from_card(cls, card: Any, **overrides: Any) -> PostProcess:
        """The post-processing a model card recommends, with ``overrides`` on top.

        The card's ``postprocess`` defaults with its ``threshold`` (which wins over a
        ``threshold`` key inside ``postprocess``); then each override that is not ``None``
        (``None`` = not given, e.g. an unset command-line option). InputError for an invalid
        value or an unknown setting.
        """
        d = {k: v for k, v in dict(card.postprocess or {}).items() if k != "threshold"}
        d["threshold"] = card.threshold
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(d)


def _check_prob_dtype(dtype: np.dtype) -> None:
    if dtype not in (np.float16, np.float32, np.float64, np.uint8):
        raise InputError(f"Probabilities of type {dtype} are not supported", f"use {_PROB_DTYPES}")


def to_float_prob(prob: Any) -> np.ndarray:
    """Probabilities as floats in [0, 1]: float16/32/64 as they are, uint8 as float32 ``/ 255``."""
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


def as_bool_mask(mask: Any, name: str = "mask") -> np.ndarray:
    """A mask as a boolean array, by the one mask rule (:func:`napari_bulbseg.io.mask_foreground`)
    with instance labels allowed: 0/1, 0/255 and integer labels (label > 0 is foreground) work;
    float arrays holding fractions or NaN (probabilities) and non-numbers raise InputError."""
    return mask_foreground(mask, f"The {name}", labels=True)


def _check_2d(arr: np.ndarray, name: str) -> None:
    if arr.ndim != 2:
        raise InputError(
            f"Expected one 2D slice for the {name}, got an array of shape {arr.shape}",
            "pass a single (Y, X) plane, e.g. stack[z]",
        )


def _check_same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise InputError(
            f"{what}: shapes differ, {a.shape} vs {b.shape}",
            "compare a mask with a prediction of the same image (same slices, same size)",
        )


def _bbox(mask: np.ndarray) -> tuple[slice, slice] | None:
    """Slices of the bounding box of the foreground of a 2D mask, or None when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def label_objects(mask2d: Any) -> tuple[np.ndarray, int]:
    """Label the 8-connected objects of a 2D mask: ``(labels int32, n_objects)``.

    Labels are numbered in raster order of each object's first pixel (top row, then left).
    """
    m = as_bool_mask(mask2d)
    _check_2d(m, "mask")
    labels, n = ndi.label(m, structure=STRUCTURE)
    return labels, int(n)


#: up to this many labels, sizes are counted by sorting rather than with np.bincount
_FEW_LABELS = 64


def label_sizes(labels: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """Pixel count of each label ``0..n`` among the pixels where ``mask`` is True.

    Only foreground pixels are counted (index 0 stays 0 when ``mask`` excludes background).
    np.bincount slows down badly when millions of values hit a handful of bins, which is the
    usual case for bulbs, so few labels are counted from a sorted copy instead.
    """
    values = labels[mask]
    if n > _FEW_LABELS:
        return np.bincount(values, minlength=n + 1)
    sizes = np.zeros(n + 1, dtype=np.intp)
    present, counts = np.unique(values, return_counts=True)
    sizes[present] = counts
    return sizes


def _fill_holes_inplace(m: np.ndarray) -> None:
    """Fill holes of a 2D boolean mask in place (same result as ``ndi.binary_fill_holes``).

    Works on the foreground's bounding box padded by one background pixel: background that
    cannot reach the pad through 4-connected background is a hole. One labelling of the
    background is several times faster than ``binary_fill_holes``' iterated dilation.
    """
    box = _bbox(m)
    if box is None:
        return
    crop = m[box]
    background = np.pad(~crop, 1, constant_values=True)
    labels, n = ndi.label(background, structure=_BACKGROUND_STRUCTURE)
    if n <= 1:  # only the outside: no holes
        return
    # foreground has label 0 and holes have labels other than the outside's: both become True
    np.not_equal(labels[1:-1, 1:-1], labels[0, 0], out=crop)


def fill_holes(mask2d: Any) -> np.ndarray:
    """A copy of a 2D mask with enclosed background (4-connected holes) filled; boolean."""
    m = as_bool_mask(mask2d).copy()
    _check_2d(m, "mask")
    _fill_holes_inplace(m)
    return m


def _filter_objects_inplace(m: np.ndarray, min_size: int, keep_largest: int) -> None:
    """Remove objects below ``min_size`` pixels, then keep the ``keep_largest`` largest."""
    labels, n = ndi.label(m, structure=STRUCTURE)
    if n == 0:
        return
    sizes = label_sizes(labels, m, n)
    keep = sizes >= max(min_size, 1)
    keep[0] = False
    if keep_largest and np.count_nonzero(keep) > keep_largest:
        # stable sort: equal sizes keep label (raster) order, so the first-seen object wins
        order = np.argsort(-sizes[1:], kind="stable") + 1
        winners = order[keep[order]][:keep_largest]
        keep[:] = False
        keep[winners] = True
    kept = np.flatnonzero(keep)
    if kept.size == n:
        return
    if kept.size <= 4:  # a few equality tests beat a gather over the whole image
        m[...] = False
        for lab in kept:
            m |= labels == lab
    else:
        m[...] = keep[labels]


def postprocess_slice(prob2d: Any, spec: PostProcess) -> np.ndarray:
    """Threshold one 2D probability slice and apply the object steps of ``spec``; uint8 {0, 1}."""
    arr = np.asarray(prob2d)
    _check_2d(arr, "probabilities")
    m = threshold_prob(arr, spec.threshold)
    if spec.needs_labels:
        box = _bbox(m)
        if box is not None:
            crop = m[box]  # all work happens inside the foreground's bounding box
            if spec.fill_holes:
                _fill_holes_inplace(crop)
            if spec.min_size > 1 or spec.keep_largest > 0:
                _filter_objects_inplace(crop, spec.min_size, spec.keep_largest)
    return m.view(np.uint8)


def postprocess_stack(prob: Any, spec: PostProcess, out: np.ndarray | None = None) -> np.ndarray:
    """Post-process every slice of a ``(Z, Y, X)`` probability stack; uint8 {0, 1} ``(Z, Y, X)``.

    ``prob`` may be any array-like that yields one plane per ``prob[z]`` (a memmap, a lazy
    stack); a 2D array is treated as one slice. ``out`` (e.g. a memmap) receives the result;
    it must be uint8 with shape ``(Z, Y, X)``.
    """
    shape = tuple(getattr(prob, "shape", np.shape(prob)))
    if len(shape) == 2:
        prob = np.asarray(prob)[np.newaxis]
        shape = (1, *shape)
    if len(shape) != 3:
        raise InputError(
            f"Expected a (Z, Y, X) probability stack, got shape {shape}",
            "pass one probability value per pixel and slice",
        )
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif tuple(out.shape) != shape or out.dtype != np.uint8:
        raise InputError(
            f"Output array has shape {tuple(out.shape)} and type {out.dtype}",
            f"it must be uint8 with shape {shape}",
        )
    for z in range(shape[0]):
        out[z] = postprocess_slice(prob[z], spec)
    return out


def count_objects(mask2d: Any) -> int:
    """Number of 8-connected objects in a 2D mask."""
    return label_objects(mask2d)[1]


def object_prior_violations(mask: Any, expected_max: int) -> list[int]:
    """Indices of the slices of a ``(Z, Y, X)`` mask holding more than ``expected_max`` objects.

    For olfactory bulbs ``expected_max = 2``: a third object is almost always a false positive.
    """
    if isinstance(expected_max, bool) or not isinstance(expected_max, (int, np.integer)):
        raise InputError(f"expected_max must be a whole number, got {expected_max!r}", "e.g. 2")
    if expected_max < 0:
        raise InputError(f"expected_max must be >= 0, got {expected_max}", "e.g. 2")
    arr = np.asarray(mask)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3:
        raise InputError(
            f"Expected a (Z, Y, X) mask, got shape {arr.shape}", "pass a stack of 2D masks"
        )
    return [z for z in range(arr.shape[0]) if count_objects(arr[z]) > expected_max]


def difference_map(truth: Any, pred: Any) -> np.ndarray:
    """Per-pixel agreement of two masks of the same shape, as uint8 codes.

    ``DIFF_TN`` (0) background in both, ``DIFF_TP`` (1) foreground in both, ``DIFF_FP`` (2)
    predicted but not true, ``DIFF_FN`` (3) true but missed. Colours: :data:`DIFF_COLORS`.
    """
    t = as_bool_mask(truth, "ground-truth mask")
    p = as_bool_mask(pred, "prediction")
    _check_same_shape(t, p, "Cannot compare the masks")
    t8 = t.view(np.uint8)
    p8 = p.view(np.uint8)
    # (2p + 3t) & 3 maps (t, p) = (0,0)->0 TN, (1,1)->1 TP, (0,1)->2 FP, (1,0)->3 FN
    code = np.left_shift(p8, 1)
    code += t8
    code += np.left_shift(t8, 1)
    code &= 3
    return code
