"""Intensity normalisation and channel conversion, shared by training and prediction.

The model card stores the :class:`Normalization` a model was trained with; prediction reads it
back from the card, so the two can never differ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import InputError, ModelError

#: images with more pixels than this estimate percentiles from a regular subsample
_PERCENTILE_SAMPLE_PIXELS = 1 << 20
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
METHODS = ("percentile", "minmax", "none")
#: which way objects go: "bright" on a dark background (fluorescence), "dark" on a bright one
#: (brightfield, stained tissue: inverted before scaling), "auto" (decided per image)
POLARITIES = ("bright", "dark", "auto")
#: how an image's channels are brought to a model's input channels; "adapted" (a model whose
#: first layer was widened to the images' channels by fine-tuning) takes them as "native"
CHANNEL_POLICIES = ("native", "luminance", "replicate", "adapted")


@dataclass(frozen=True)
class Normalization:
    """Per-image, per-channel intensity scaling: ``low``/``high`` percentiles map to 0/1.

    ``polarity``: ``"bright"`` objects (no change), ``"dark"`` objects (the channel is inverted
    before scaling) or ``"auto"``: inverted when the image looks like a bright background (its
    median is nearer the ``high`` percentile than the ``low`` one: :func:`is_bright_background`).
    ``noise_floor``: the percentile range is at least ``noise_floor`` × the image's noise
    (:func:`noise_sigma`), so an empty, constant or pure-noise image is not stretched into
    objects; 0 (the default, and what cards without the field mean) turns the floor off.
    """

    method: str = "percentile"
    low: float = 1.0
    high: float = 99.8
    polarity: str = "bright"
    noise_floor: float = 0.0

    def __post_init__(self) -> None:
        for name in ("low", "high", "noise_floor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise ModelError(
                    f"Normalisation setting {name}={v!r} is not a number",
                    "use percentiles such as low=1, high=99.8 and a noise_floor such as 0 or 10",
                )
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ModelError(
                f"Unknown normalisation method {self.method!r}",
                f"use one of {', '.join(METHODS)}",
            )
        if not 0.0 <= self.low < self.high <= 100.0:
            raise ModelError(
                f"Invalid normalisation percentiles low={self.low}, high={self.high}",
                "they must satisfy 0 <= low < high <= 100",
            )
        if not isinstance(self.polarity, str) or self.polarity not in POLARITIES:
            raise ModelError(
                f"Unknown normalisation polarity {self.polarity!r}",
                f"use one of {', '.join(POLARITIES)} (objects brighter or darker than the "
                "background, or detected per image)",
            )
        if not (np.isfinite(self.noise_floor) and 0.0 <= self.noise_floor <= 1e6):
            raise ModelError(
                f"Invalid normalisation noise_floor={self.noise_floor!r}",
                "use a finite number >= 0 (0 = no floor; e.g. 10 = at least 10 noise sigmas)",
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalization:
        keys = ("method", "low", "high", "polarity", "noise_floor")
        return cls(**{k: d[k] for k in keys if k in d})


def noise_sigma(x: np.ndarray) -> float:
    """A robust estimate of a 2D plane's pixel noise (standard deviation).

    The median absolute difference of horizontally neighbouring pixels, / (0.6745 √2): flat
    background dominates the median, so objects and edges barely move it.
    """
    a = np.asarray(x)
    a = a.astype(_work_dtype(a.dtype), copy=False)
    if a.ndim != 2 or a.shape[1] < 2:
        return 0.0
    d = np.abs(np.diff(a, axis=1))
    d = d[np.isfinite(d)]
    if d.size == 0:
        return 0.0
    return float(np.median(d)) / (0.6745 * np.sqrt(2.0))


def is_bright_background(sample: np.ndarray, low: float = 1.0, high: float = 99.8) -> bool:
    """True when a plane's median is nearer its ``high`` percentile than its ``low`` one."""
    lo, med, hi = np.percentile(sample, [low, 50.0, high])
    return bool((med - lo) > (hi - med))


def _subsample(x: np.ndarray) -> np.ndarray:
    """A regular subsample of a 2D plane small enough for fast percentiles."""
    n = x.shape[0] * x.shape[1]
    step = max(1, int(np.ceil(np.sqrt(n / _PERCENTILE_SAMPLE_PIXELS))))
    return x[::step, ::step]


def _work_dtype(dtype: np.dtype) -> type:
    """float64 for float types wider than float32 (their values may lie outside float32's
    range, e.g. 1e40, or below its resolution, e.g. 1e-42), else float32."""
    dtype = np.dtype(dtype)
    return np.float64 if dtype.kind == "f" and dtype.itemsize > 4 else np.float32


def _is_constant(scale: float, lo: float, hi: float) -> bool:
    """Whether a percentile range ``scale`` is no contrast at all: zero, not finite, or float
    rounding relative to the values themselves (scale-free, so 1e-41 steps still count)."""
    return not np.isfinite(scale) or scale <= 1e-12 * max(abs(float(lo)), abs(float(hi)))


#: rows of a wide (float64) channel scaled at once (bounds the float64 temporaries)
_WIDE_CHUNK_PIXELS = 1 << 20


def _normalize_wide(src: np.ndarray, norm: Normalization, out: np.ndarray) -> np.ndarray:
    """:func:`normalize_channel` for a float64 channel: the range and the scaling are computed
    in float64, so only the result (in [0, 1] for percentile / minmax) is cast to float32."""
    finite = np.isfinite(src)
    all_finite = bool(finite.all())
    rows = max(1, _WIDE_CHUNK_PIXELS // max(1, src.shape[-1]))

    def scaled(sign: float, lo: float, inv: float) -> np.ndarray:
        for y in range(0, src.shape[0], rows):
            block = src[y : y + rows].astype(np.float64)
            if sign < 0:
                np.negative(block, out=block)
            if inv != 1.0 or lo != 0.0:
                block -= lo
                block *= inv
            with np.errstate(over="ignore", invalid="ignore"):
                out[y : y + rows] = block
        bad = ~finite if not all_finite else None
        if norm.method == "none":  # values beyond float32's range cannot be passed on
            bad = ~np.isfinite(out) if bad is None else bad | ~np.isfinite(out)
        if bad is not None:
            out[bad] = 0.0
        return out

    if norm.method == "none":
        return scaled(1.0, 0.0, 1.0)

    def finite_sample(sign: float) -> np.ndarray:
        sample = _subsample(src).astype(np.float64) * sign
        if not all_finite:
            sample = sample[np.isfinite(sample)]
            if sample.size == 0:
                sample = src[finite].astype(np.float64) * sign
            if sample.size == 0:
                raise InputError(
                    "The image has no finite pixel values (all NaN or infinite)",
                    "check the file or the step that produced it",
                )
        return sample

    sign = 1.0
    sample = finite_sample(sign)
    if norm.polarity == "dark" or (
        norm.polarity == "auto" and is_bright_background(sample, norm.low, norm.high)
    ):
        sign = -1.0
        sample = -sample
    if norm.method == "percentile":
        lo, hi = (float(v) for v in np.percentile(sample, [norm.low, norm.high]))
    else:
        lo, hi = float(np.min(sample)), float(np.max(sample))
    scale = hi - lo
    if norm.noise_floor > 0:
        scale = max(scale, norm.noise_floor * noise_sigma(sign * _subsample(src)))
    del sample
    if _is_constant(scale, lo, hi):
        out[...] = 0.0
        return out
    return scaled(sign, lo, 1.0 / scale)


def normalize_channel(
    x: np.ndarray, norm: Normalization, out: np.ndarray | None = None
) -> np.ndarray:
    """Normalise one 2D channel to float32; non-finite pixels become 0 (background).

    Works in one float32 buffer (``out``, or a new one; the input is never modified), so a
    slice costs 4 bytes per pixel plus a transient 1-byte mask, whatever its dtype. A float64
    channel is scaled in float64 (row blocks) before the cast, so values beyond float32's
    range (1e40) or below its resolution (1e-42) normalise as the same image scaled to 0..1.
    """
    src = np.asarray(x)
    if out is None:
        out = np.empty(src.shape, dtype=np.float32)
    elif out.shape != src.shape or out.dtype != np.float32:
        raise InputError(
            f"Output buffer {out.shape} {out.dtype} does not fit a {src.shape} channel",
            "pass a float32 array of the channel's shape",
        )
    if _work_dtype(src.dtype) is np.float64 and src.ndim == 2:
        return _normalize_wide(src, norm, out)
    out[...] = src
    all_finite = bool(np.isfinite(out).all())
    if norm.method == "none":
        if not all_finite:
            out[~np.isfinite(out)] = 0.0
        return out

    def finite_sample() -> np.ndarray:
        sample = _subsample(out)
        if not all_finite:
            sample = sample[np.isfinite(sample)]
            if sample.size == 0:
                sample = out[np.isfinite(out)]
            if sample.size == 0:
                raise InputError(
                    "The image has no finite pixel values (all NaN or infinite)",
                    "check the file or the step that produced it",
                )
        return sample

    sample = finite_sample()
    if norm.polarity == "dark" or (
        norm.polarity == "auto" and is_bright_background(sample, norm.low, norm.high)
    ):
        np.negative(out, out=out)  # objects darker than the background: invert first
        sample = finite_sample()
    if norm.method == "percentile":
        lo, hi = np.percentile(sample, [norm.low, norm.high])
    else:
        lo, hi = float(np.min(sample)), float(np.max(sample))
    scale = float(hi - lo)
    if norm.noise_floor > 0:
        scale = max(scale, norm.noise_floor * noise_sigma(_subsample(out)))
    del sample
    non_finite = None if all_finite else ~np.isfinite(out)
    if _is_constant(scale, lo, hi):
        # constant (or nearly) image: nothing to segment, map to zeros rather than divide by 0
        out[...] = 0.0
    elif 1.0 / scale > 1e30 and src.ndim == 2:  # e.g. float32 values of 1e-38: 1/scale overflows
        return _normalize_wide(src, norm, out)
    else:
        np.subtract(out, np.float32(lo), out=out)
        np.multiply(out, np.float32(1.0 / scale), out=out)
    if non_finite is not None:
        out[non_finite] = 0.0
    return out


def convert_channels(
    image: np.ndarray, in_channels: int, policy: str = "native", rgb: bool | None = None
) -> np.ndarray:
    """Bring a ``(Y, X)`` or ``(Y, X, C)`` image to a model's input channels as ``(C, Y, X)``.

    ``luminance``: an RGB(A) image feeds a 1-channel model through its luminance (alpha dropped).
    ``replicate``: a grey image feeds a 3-channel model by repeating it. ``native``: the image's
    channels must match the model's, except that RGBA drops alpha and the two rules above apply
    when they are the only way to make the counts match.

    ``rgb`` says whether the channel axis is colour (``Stack.rgb``). ``None`` (unknown) treats
    3 or 4 channels as RGB(A); ``False`` (e.g. fluorescence channels of an ImageJ hyperstack)
    never drops a 4th channel as alpha nor mixes channels into a luminance: their count must
    match the model's.
    """
    return _convert(image, in_channels, policy, rgb, cast=True)


def _convert(
    image: np.ndarray, in_channels: int, policy: str, rgb: bool | None, cast: bool
) -> np.ndarray:
    """:func:`convert_channels`; ``cast=False`` leaves channels passed through in their dtype
    (views of ``image``, no copy) for :func:`prepare_image` to cast once while normalising."""
    if policy not in CHANNEL_POLICIES:
        raise ModelError(f"Unknown channel policy {policy!r}", f"use one of {CHANNEL_POLICIES}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, (int, np.integer)):
        raise ModelError(f"Invalid model input channels {in_channels!r}", "re-export the model")
    if policy == "adapted":
        policy = "native"
    img = np.asarray(image)
    if img.ndim == 2:
        chans = img[None]
    elif img.ndim == 3:
        chans = np.moveaxis(img, -1, 0)
    else:
        raise InputError(
            f"Expected a 2D image (Y, X) or (Y, X, C), got shape {img.shape}",
            "pass one slice at a time",
        )
    c = chans.shape[0]
    colour = rgb is not False and c in (3, 4)
    if c == 4 and in_channels != 4 and colour:
        chans, c = chans[:3], 3  # RGBA: alpha carries no signal for segmentation
    if c == in_channels:
        return chans.astype(np.float32, copy=False) if cast else chans
    if in_channels == 1 and c > 1 and not colour:
        raise ModelError(
            f"The model takes 1 channel but the image has {c} channels that are not RGB colour",
            "pick one channel of the image (split channels in napari, or save one channel) "
            f"or fine-tune a {c}-channel model",
        )
    work = np.float32 if cast else _work_dtype(chans.dtype)
    if in_channels == 1 and c == 3:
        luma = _LUMA.astype(work)
        return np.tensordot(luma, chans.astype(work), axes=1)[None].astype(work, copy=False)
    if in_channels == 3 and c == 1:
        return np.repeat(chans.astype(work, copy=False), 3, axis=0)
    if in_channels == 1 and c > 1:
        raise ModelError(
            f"The model takes 1 channel but the image has {c}",
            "pick one channel of the image (split channels in napari) or fine-tune a "
            f"{c}-channel model",
        )
    raise ModelError(
        f"The model takes {in_channels} channel(s) but the image has {c}",
        "use a model trained for this kind of image, or fine-tune one on it",
    )


def prepare_image(
    image: np.ndarray,
    in_channels: int,
    norm: Normalization,
    policy: str = "native",
    rgb: bool | None = None,
) -> np.ndarray:
    """Channel conversion then normalisation: the exact model input ``(C, Y, X)`` float32.

    ``rgb``: whether the image's channel axis is colour (see :func:`convert_channels`).
    """
    chans = _convert(image, in_channels, policy, rgb, cast=False)
    out = np.empty(chans.shape, dtype=np.float32)
    for c in range(chans.shape[0]):
        normalize_channel(chans[c], norm, out=out[c])
    return out
