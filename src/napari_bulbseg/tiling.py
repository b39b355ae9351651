"""Tile layouts and blending windows for sliding-window prediction (numpy only).

A slice is covered by equal-sized tiles that share at least ``overlap`` pixels with their
neighbours; the last tile of each row and column is flush with the image's end. Tile outputs
are combined as a weighted average, the weights given by :func:`blend_window`:

- ``"gaussian"``: MONAI's importance map (``sigma = 0.125 * tile``), largest in the centre;
- ``"cosine"`` / ``"linear"``: 1 in the tile, ramping down to 0 over the overlap margin;
- ``"constant"``: a plain average of the tiles covering a pixel.

Two refinements matter for exactness. A side of a tile that lies on the *image border* keeps
full weight up to the edge (``interior`` flags): there is no neighbour to share with, so a
down-weighted border would only amplify rounding. And ``trim`` pixels along each *interior* side
get weight 0: those are the pixels that a U-Net predicts worst, because their receptive field
runs off the tile (zero padding where the whole image has real content). Trimming ``overlap / 2``
("crop" blending) keeps every output pixel at least ``overlap / 2`` pixels from a tile's interior
edge, which is what makes tiled prediction match one whole-image forward pass.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .errors import InputError

BLEND_MODES = ("gaussian", "cosine", "linear", "constant")
#: smallest weight of the gaussian window (MONAI clamps its importance map the same way)
_GAUSSIAN_FLOOR = 1e-3


def _check_tile(tile: int, overlap: int) -> None:
    if not isinstance(tile, (int, np.integer)) or tile < 1:
        raise InputError(f"Invalid tile size {tile!r}", "use a positive number of pixels, e.g. 512")
    if not isinstance(overlap, (int, np.integer)) or overlap < 0:
        raise InputError(f"Invalid tile overlap {overlap!r}", "use 0 or more pixels")
    if overlap >= tile:
        raise InputError(
            f"The tile overlap ({overlap} px) must be smaller than the tile ({tile} px)",
            "use a larger tile or a smaller overlap",
        )


def n_tiles(length: int, tile: int, overlap: int) -> int:
    """How many tiles of ``tile`` px sharing ``overlap`` px it takes to cover ``length`` px."""
    _check_tile(tile, overlap)
    if length <= tile:
        return 1
    return math.ceil((length - overlap) / (tile - overlap))


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles covering ``[0, length)``.

    Tiles have size ``min(tile, length)``; neighbours share at least ``overlap`` pixels; the first
    tile starts at 0 and the last is flush with the end. Starts in between are spread evenly and
    rounded down to multiples of ``align`` (so that a U-Net's pooling grid in every tile lines up
    with the whole image's; the last start is ``length - tile``, aligned when both are). Alignment
    is given up when ``tile - overlap < align``.
    """
    if length < 1:
        raise InputError(f"Cannot tile an empty axis (length {length})", "check the image shape")
    if align < 1:
        raise InputError(f"Invalid tile alignment {align!r}", "use 1 or more")
    _check_tile(tile, overlap)
    if length <= tile:
        return [0]
    last = length - tile
    if align > tile - overlap:
        align = 1  # aligned starts cannot step by less than ``align``: give alignment up
    n = n_tiles(length, tile, overlap)
    while True:
        inner = {(k * last // (n - 1)) // align * align for k in range(1, n - 1)}
        starts = sorted({0, last} | inner)
        if all(b - a <= tile - overlap for a, b in itertools.pairwise(starts)):
            return starts
        n += 1  # rounding to ``align`` opened a gap narrower than ``overlap``: one more tile


def effective_tile(length: int, max_tile: int, overlap: int, multiple: int = 1) -> int:
    """The tile size (≤ ``max_tile`` where possible) that covers ``length`` with the fewest tiles
    and the least redundant computation.

    With ``n = ceil((L - O) / (T - O))`` tiles needed anyway, shrinking each to
    ``ceil((L + (n - 1) O) / n)`` (rounded up to ``multiple``) keeps ``n`` and the overlap while
    computing fewer pixels: e.g. L = 2048, T = 512, O = 64 gives 5 tiles of 464 px instead of
    5 of 512. Returns ``length`` itself when one tile covers the axis.
    """
    _check_tile(max_tile, overlap)
    if length <= max_tile:
        return length
    n = n_tiles(length, max_tile, overlap)
    t = math.ceil((length + (n - 1) * overlap) / n)
    t = math.ceil(t / multiple) * multiple
    return min(t, length)


@dataclass(frozen=True)
class TileGrid:
    """Equal-sized tiles covering a ``shape = (H, W)`` plane; iterate for ``(y0, x0)`` starts."""

    shape: tuple[int, int]
    tile: tuple[int, int]
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for y0 in self.ys:
            for x0 in self.xs:
                yield y0, x0

    def interior(self, y0: int, x0: int) -> tuple[bool, bool, bool, bool]:
        """Which sides (top, bottom, left, right) of the tile at ``(y0, x0)`` face another tile
        rather than the image border."""
        th, tw = self.tile
        h, w = self.shape
        return (y0 > 0, y0 + th < h, x0 > 0, x0 + tw < w)


def make_grid(shape: tuple[int, int], max_tile: int, overlap: int, multiple: int = 1) -> TileGrid:
    """Tile a plane of ``shape`` with the least wasted compute (see :func:`effective_tile`)."""
    h, w = (int(s) for s in shape)
    th = effective_tile(h, max_tile, overlap, multiple)
    tw = effective_tile(w, max_tile, overlap, multiple)
    ys = tile_starts(h, th, min(overlap, th - 1), multiple)
    xs = tile_starts(w, tw, min(overlap, tw - 1), multiple)
    return TileGrid((h, w), (th, tw), tuple(ys), tuple(xs))


def _ramp(r: int, mode: str) -> np.ndarray:
    """``r`` weights rising from ~0 to ~1; a ramp and its mirror image sum to exactly 1."""
    t = (np.arange(r, dtype=np.float64) + 0.5) / r
    return t if mode == "linear" else 0.5 - 0.5 * np.cos(np.pi * t)


def window_1d(
    n: int,
    mode: str = "gaussian",
    *,
    overlap: int = 0,
    trim: int = 0,
    interior: tuple[bool, bool] = (True, True),
    sigma_scale: float = 0.125,
) -> np.ndarray:
    """One axis of :func:`blend_window`: ``n`` float64 weights (``interior`` = (start, end))."""
    if mode not in BLEND_MODES:
        raise InputError(f"Unknown blending mode {mode!r}", f"use one of {', '.join(BLEND_MODES)}")
    if trim < 0 or 2 * trim > overlap:
        raise InputError(
            f"Invalid trim {trim} for an overlap of {overlap} px",
            "trim must be between 0 and half the overlap, or neighbouring tiles leave a gap",
        )
    lo, hi = interior
    w = np.ones(n, dtype=np.float64)
    if mode == "gaussian":
        c = (n - 1) / 2.0
        sigma = max(sigma_scale * n, 1e-6)
        g = np.exp(-0.5 * ((np.arange(n) - c) / sigma) ** 2)
        g = np.maximum(g / g.max(), _GAUSSIAN_FLOOR)
        half = np.arange(n) < c
        w = np.where(half, g if lo else 1.0, g if hi else 1.0)
    elif mode in ("cosine", "linear"):
        r = min(overlap - 2 * trim, max(n // 2 - trim, 0))
        if r > 0:
            ramp = _ramp(r, mode)
            if lo:
                w[trim : trim + r] = np.minimum(w[trim : trim + r], ramp)
            if hi:
                end = n - trim
                w[end - r : end] = np.minimum(w[end - r : end], ramp[::-1])
    if trim:
        if lo:
            w[:trim] = 0.0
        if hi:
            w[n - trim :] = 0.0
    return w


def blend_window(
    h: int,
    w: int,
    mode: str = "gaussian",
    *,
    overlap: int = 0,
    trim: int = 0,
    interior: tuple[bool, bool, bool, bool] = (True, True, True, True),
    sigma_scale: float = 0.125,
) -> np.ndarray:
    """Blending weights of an ``h × w`` tile, float32, separable.

    Parameters
    ----------
    mode
        ``"gaussian"`` (MONAI's importance map, ``sigma = sigma_scale * size``), ``"cosine"`` or
        ``"linear"`` (ramp over the ``overlap`` margin), ``"constant"``.
    overlap
        Pixels shared with a neighbour; the width of the cosine/linear ramp plus both trims.
    trim
        Pixels along each interior side given weight 0 (at most ``overlap // 2``).
    interior
        (top, bottom, left, right): ``False`` where the side lies on the image border, which then
        keeps full weight up to the edge.
    """
    top, bottom, left, right = interior
    kw = {"overlap": overlap, "trim": trim, "sigma_scale": sigma_scale}
    wy = window_1d(h, mode, interior=(top, bottom), **kw)
    wx = window_1d(w, mode, interior=(left, right), **kw)
    return np.outer(wy, wx).astype(np.float32)
