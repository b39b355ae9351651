"""Synthetic "olfactory bulb" stacks with exact masks, for tests, demos and benchmarks.

Each bulb is an ellipse with a moderately bright, textured interior ringed by a bright rim of
tissue, on a textured background (a smooth random field plus Poisson and Gaussian noise), with a
few small bright specks outside the bulbs that a good segmentation must ignore. Through the
stack a bulb appears, grows, shrinks and disappears like the cross-section of an ellipsoid, while
its centre drifts and it slowly rotates.

The mask of a bulb is the whole ellipse **including its rim**: the pixels whose centre lies in
the outer ellipse. Bulbs sit side by side in separate vertical bands of the image with a gap of
several pixels, so each bulb is exactly one 8-connected object in the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError

__all__ = ["bulb_phantom", "membrane_phantom"]

_DTYPES = (np.uint8, np.uint16, np.float32)
# photon levels (uint16 / float32 scale); uint8 images are scaled by _UINT8_GAIN
_BACKGROUND = 300.0
_BACKGROUND_TEXTURE = 80.0
_INTERIOR = 900.0
_INTERIOR_TEXTURE = 200.0
_RIM = 2200.0
_SPECK = 1400.0
_READ_NOISE = 25.0
_UINT8_GAIN = 0.09
_MIN_SEMI_AXIS = 4.0
_GAP = 3.0  # minimum pixels between a bulb and its band's edge


@dataclass(frozen=True)
class _Bulb:
    z_start: int
    z_end: int  # inclusive
    cy: float  # centre at the bulb's middle slice
    cx: float
    drift_y: float  # centre drift per slice
    drift_x: float
    a: float  # largest semi-axes (at the middle slice), a along the rotated x axis
    b: float
    angle: float  # radians at the middle slice
    spin: float  # radians per slice


def _z_ranges(n_slices: int, max_objects: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Slice ranges of the bulbs, chosen so that (for n >= 3) some slice has each count 0..2."""
    ranges = []
    if max_objects >= 1 and n_slices >= 2:
        # first bulb: from slice s0 >= 1 (slice 0 is empty) to the end or near it
        s0 = int(rng.integers(1, max(2, n_slices // 4 + 1)))
        e0 = n_slices - 1 - int(rng.integers(0, max(1, n_slices // 8 + 1)))
        ranges.append((s0, max(s0, e0)))
    elif max_objects >= 1:
        ranges.append((0, 0))
    if max_objects >= 2:
        s0, e0 = ranges[0]
        if n_slices >= 3:
            # second bulb starts after the first (so slice s0 holds one bulb) and overlaps it
            s1 = min(e0, s0 + 1 + int(rng.integers(0, max(1, (e0 - s0) // 3 + 1))))
            s1 = max(s1, s0 + 1)
            e1 = max(s1, e0 - int(rng.integers(0, max(1, (e0 - s1) // 3 + 1))))
        else:
            s1, e1 = s0, e0
        ranges.append((s1, e1))
    # further bulbs only after the first slice holding two, so that slice keeps exactly two
    first_free = ranges[1][0] + 1 if len(ranges) == 2 else n_slices
    for _ in range(2, max_objects):
        if first_free >= n_slices:
            break
        s = int(rng.integers(first_free, n_slices))
        e = int(rng.integers(s, n_slices))
        ranges.append((s, e))
    return ranges


def _make_bulbs(
    n_slices: int, shape: tuple[int, int], max_objects: int, rng: np.random.Generator
) -> list[_Bulb]:
    h, w = shape
    band = w / max(max_objects, 1)
    bulbs = []
    for k, (zs, ze) in enumerate(_z_ranges(n_slices, max_objects, rng)):
        length = ze - zs + 1
        # the largest radius that fits the band (any rotation) and the image height, with drift
        max_drift = 0.03 * min(band, h) * length / max(n_slices, 1)
        r_max_y = h / 2 - _GAP - max_drift
        r_max = min(band / 2 - _GAP - max_drift, r_max_y)
        a = rng.uniform(0.7, 1.0) * r_max
        b = a * rng.uniform(0.6, 0.9)
        per_slice = max_drift / max(length, 1)
        # vertical offset only as far as the bulb still keeps _GAP from the image edge
        offset_y = rng.uniform(-0.5, 0.5) * max(0.0, r_max_y - max(a, _MIN_SEMI_AXIS))
        bulbs.append(
            _Bulb(
                z_start=zs,
                z_end=ze,
                cy=h / 2 + offset_y,
                cx=band * (k + 0.5),
                drift_y=rng.uniform(-per_slice, per_slice),
                drift_x=rng.uniform(-per_slice, per_slice),
                a=a,
                b=b,
                angle=rng.uniform(0, np.pi),
                spin=rng.uniform(-0.08, 0.08),
            )
        )
    return bulbs


def _bulb_in_slice(bulb: _Bulb, z: int) -> tuple[float, float, float, float, float] | None:
    """``(cy, cx, a, b, angle)`` of a bulb's cross-section at slice ``z``, or None if absent."""
    if not bulb.z_start <= z <= bulb.z_end:
        return None
    mid = (bulb.z_start + bulb.z_end) / 2
    half = (bulb.z_end - bulb.z_start) / 2 + 1.0
    scale = np.sqrt(max(0.0, 1.0 - ((z - mid) / half) ** 2))  # ellipsoid cross-section
    scale = max(scale, 0.45)
    a = max(bulb.a * scale, _MIN_SEMI_AXIS)
    b = max(bulb.b * scale, _MIN_SEMI_AXIS)
    dz = z - mid
    return (
        bulb.cy + bulb.drift_y * dz,
        bulb.cx + bulb.drift_x * dz,
        a,
        b,
        bulb.angle + bulb.spin * dz,
    )


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple) -> np.ndarray:
    """Gaussian-smoothed noise with unit standard deviation."""
    field = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    std = float(field.std())
    return field / std if std > 0 else field


def bulb_phantom(
    n_slices: int = 8,
    shape: tuple[int, int] = (256, 256),
    seed: int = 0,
    max_objects: int = 2,
    dtype: type | np.dtype = np.uint16,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic bulb stack and its exact mask: ``(image (Z,Y,X) dtype, mask (Z,Y,X) uint8)``.

    Parameters
    ----------
    n_slices
        Number of Z slices (>= 1).
    shape
        ``(Y, X)`` size of each slice; each side at least 32 pixels.
    seed
        Same seed, same stack.
    max_objects
        At most this many bulbs per slice (0 gives background only). With ``max_objects >= 2``
        and ``n_slices >= 3`` the stack always holds slices with 0, 1 and 2 bulbs; bulbs beyond
        the second appear only after the first two-bulb slice (in short stacks, not at all).
    dtype
        ``uint16`` (photon counts), ``uint8`` (scaled to fit) or ``float32`` (photon counts).
    """
    if isinstance(n_slices, bool) or not isinstance(n_slices, (int, np.integer)) or n_slices < 1:
        raise InputError(f"n_slices must be a whole number >= 1, got {n_slices!r}", "e.g. 8")
    if isinstance(max_objects, bool) or not isinstance(max_objects, (int, np.integer)):
        raise InputError(f"max_objects must be a whole number, got {max_objects!r}", "e.g. 2")
    if max_objects < 0:
        raise InputError(f"max_objects must be >= 0, got {max_objects}", "e.g. 2")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) < 32:
        raise InputError(f"Phantom slice shape {shape} is too small", "use (Y, X) of at least 32")
    if max_objects > 0 and shape[1] / max_objects < 2 * (_MIN_SEMI_AXIS + _GAP + 2):
        raise InputError(
            f"{max_objects} bulbs do not fit side by side in {shape[1]} pixels",
            "use fewer objects or a wider image",
        )
    dt = np.dtype(dtype)
    if dt not in _DTYPES:
        raise InputError(f"Unsupported phantom dtype {dt}", "use uint8, uint16 or float32")

    rng = np.random.default_rng(seed)
    n_slices, max_objects = int(n_slices), int(max_objects)
    bulbs = _make_bulbs(n_slices, shape, max_objects, rng)
    h, w = shape
    full = (n_slices, h, w)
    z_sigma = 1.5 if n_slices > 1 else 0
    background = _BACKGROUND + _BACKGROUND_TEXTURE * _smooth_field(rng, full, (z_sigma, 12, 12))
    texture = _smooth_field(rng, full, (z_sigma * 0.5, 2.5, 2.5))
    expected = np.empty(full, dtype=np.float32)
    mask = np.zeros(full, dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for z in range(n_slices):
        plane = background[z].copy()
        for bulb in bulbs:
            geom = _bulb_in_slice(bulb, z)
            if geom is None:
                continue
            cy, cx, a, b, angle = geom
            c, s = np.cos(angle), np.sin(angle)
            u = (xx - cx) * c + (yy - cy) * s
            v = -(xx - cx) * s + (yy - cy) * c
            r2 = (u / a) ** 2 + (v / b) ** 2  # 1 on the outer edge of the rim
            inside = r2 <= 1.0
            rim_width = max(2.0, 0.15 * min(a, b))
            inner = (u / (a - rim_width)) ** 2 + (v / (b - rim_width)) ** 2 <= 1.0
            interior = _INTERIOR + _INTERIOR_TEXTURE * texture[z]
            plane = np.where(
                inside, np.where(inner, interior, _RIM * (1 + 0.1 * texture[z])), plane
            )
            mask[z][inside] = 1
        _add_specks(plane, mask[z], rng)
        expected[z] = plane
    image = rng.poisson(np.clip(expected, 0, None)).astype(np.float32)
    image += rng.normal(0.0, _READ_NOISE, size=full).astype(np.float32)
    if dt == np.uint8:
        image = np.clip(np.rint(image * _UINT8_GAIN), 0, 255)
    elif dt == np.uint16:
        image = np.clip(np.rint(image), 0, 65535)
    return image.astype(dt), mask


def _add_specks(plane: np.ndarray, mask2d: np.ndarray, rng: np.random.Generator) -> None:
    """A few small bright blobs (radius 1-2 px) in the background, clear of every bulb."""
    h, w = plane.shape
    clear = ~ndi.binary_dilation(mask2d.astype(bool), iterations=4)
    for _ in range(int(rng.integers(1, 5))):
        y, x = int(rng.integers(3, h - 3)), int(rng.integers(3, w - 3))
        r = int(rng.integers(1, 3))
        window = (slice(y - r, y + r + 1), slice(x - r, x + r + 1))
        if clear[window].all():
            plane[window] = _SPECK


def membrane_phantom(
    n_slices: int = 10,
    shape: tuple[int, int] = (256, 256),
    seed: int = 0,
    cell_size: float = 40.0,
) -> tuple[np.ndarray, np.ndarray]:
    """An EM-like stack: cells packed edge to edge, separated by thin dark membranes;
    ``(image (Z,Y,X) uint8, mask (Z,Y,X) uint8)`` with the cell **interiors** as foreground
    (about three quarters of the pixels) and the membranes as background.

    The cells are the Voronoi regions of random points (about ``cell_size`` px apart) that
    drift from slice to slice; a membrane is the band of pixels about as near to a second point
    as to their own (2–5 px wide, varying along it). Interiors are mid-grey with a smooth
    texture, small dark organelles (part of the foreground, as in EM labels) and grain; the
    image is blurred and noisy like a serial-section EM micrograph. Nothing in it resembles a
    fluorescence nucleus: a model trained on nuclei is a poor start here.
    """
    if n_slices < 1:
        raise InputError(f"n_slices must be >= 1 (got {n_slices})", "")
    if min(shape) < 32:
        raise InputError(f"The phantom needs at least 32×32 pixels (got {shape})", "")
    if not cell_size >= 8:
        raise InputError(f"cell_size must be >= 8 px (got {cell_size})", "")
    rng = np.random.default_rng(seed)
    h, w = shape
    n_cells = max(4, round(h * w / cell_size**2))
    pts = rng.uniform((-8, -8), (h + 8, w + 8), size=(n_cells, 2))
    drift = rng.normal(0, 1.5, size=(n_cells, 2))
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    images, masks = [], []
    for _z in range(n_slices):
        d = np.sqrt((yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2)
        d2 = np.partition(d, 1, axis=-1)[..., :2]
        width = 2.0 + 3.0 * (0.5 + 0.5 * _smooth_field(rng, shape, (12, 12)).clip(-1, 1))
        membrane = (d2[..., 1] - d2[..., 0]) < width
        interior = ~membrane
        img = 150.0 + 18.0 * _smooth_field(rng, shape, (6, 6))
        organelles = _smooth_field(rng, shape, (2.5, 2.5)) > 1.2
        img[organelles & interior] -= 70.0
        img[membrane] = 45.0 + 15.0 * rng.random()
        img = ndi.gaussian_filter(img, 1.0) + rng.normal(0, 14.0, shape)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
        masks.append(interior.astype(np.uint8))
        pts = pts + drift + rng.normal(0, 0.7, size=pts.shape)
    return np.stack(images), np.stack(masks)
