"""Tile layouts and blending windows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from napari_bulbseg.errors import InputError
from napari_bulbseg.tiling import (
    BLEND_MODES,
    blend_window,
    effective_tile,
    make_grid,
    n_tiles,
    tile_starts,
    window_1d,
)


def _check_cover(length: int, tile: int, overlap: int, starts: list[int]) -> None:
    size = min(tile, length)
    assert starts[0] == 0
    assert starts[-1] + size == length  # last tile flush with the end
    assert all(0 <= s <= length - size for s in starts)
    assert starts == sorted(set(starts))
    for a, b in itertools.pairwise(starts):
        assert a + size - b >= overlap  # shared pixels between neighbours
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + size] = True
    assert covered.all()


@pytest.mark.parametrize(
    "length,tile,overlap",
    [(1, 512, 32), (7, 4, 1), (512, 512, 32), (513, 512, 32), (2048, 512, 32), (1000, 100, 99)],
)
def test_tile_starts_cover(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    _check_cover(length, tile, overlap, starts)
    assert len(starts) == n_tiles(length, tile, overlap)


def test_tile_starts_exhaustive_small():
    for length in range(1, 80):
        for tile in range(2, 30, 3):
            for overlap in range(0, tile, 2):
                for align in (1, 4):
                    starts = tile_starts(length, tile, overlap, align)
                    _check_cover(length, tile, overlap, starts)
                    if length > tile and align <= tile - overlap:
                        assert all(s % align == 0 for s in starts[:-1])


def test_tile_starts_known_values():
    assert tile_starts(2048, 512, 32) == [0, 384, 768, 1152, 1536]
    assert tile_starts(100, 100, 10) == [0]
    assert tile_starts(10, 100, 10) == [0]


def test_effective_tile_shrinks_without_more_tiles():
    # the brief's example: 2048 px, tiles of at most 512 sharing 32 → 5 tiles of 440 px
    t = effective_tile(2048, 512, 32, multiple=8)
    assert t == 440
    assert n_tiles(2048, t, 32) == n_tiles(2048, 512, 32) == 5
    assert effective_tile(300, 512, 32, 8) == 300  # one tile covers it
    for length in range(513, 3000, 97):
        t = effective_tile(length, 512, 64, 8)
        assert t % 8 == 0 and t <= 512
        assert n_tiles(length, t, 64) == n_tiles(length, 512, 64)


def test_make_grid_aligned_and_covering():
    grid = make_grid((2048, 1000), 512, 64, multiple=8)
    assert grid.tile == (464, 376)
    assert all(y % 8 == 0 for y in grid.ys) and all(x % 8 == 0 for x in grid.xs)
    _check_cover(2048, grid.tile[0], 64, list(grid.ys))
    _check_cover(1000, grid.tile[1], 64, list(grid.xs))
    assert len(grid) == len(list(grid)) == len(grid.ys) * len(grid.xs)
    assert grid.interior(0, 0) == (False, True, False, True)
    assert grid.interior(grid.ys[-1], grid.xs[1]) == (True, False, True, True)


@pytest.mark.parametrize("bad", [(0, 0), (10, 10), (10, 11), (-1, 0)])
def test_bad_tile_overlap(bad):
    tile, overlap = bad
    with pytest.raises(InputError):
        tile_starts(100, tile, overlap)


def test_gaussian_matches_monai_shape():
    w = blend_window(64, 64, "gaussian")
    assert w.dtype == np.float32 and w.shape == (64, 64)
    assert np.isclose(w.max(), 1.0)
    # separable, symmetric, sigma = 0.125 * size, floor at 1e-3
    c = np.argmax(w[32])
    assert c in (31, 32)
    np.testing.assert_allclose(w, w[::-1, ::-1], atol=1e-6)
    expected = np.exp(-0.5 * ((np.arange(64) - 31.5) / 8.0) ** 2)
    expected = np.maximum(expected / expected.max(), 1e-3)
    np.testing.assert_allclose(w[31] / w[31].max(), expected, rtol=1e-5)


@pytest.mark.parametrize("mode", ["cosine", "linear"])
def test_ramps_partition_of_unity(mode):
    # two neighbours overlapping by exactly `overlap` px: weights sum to 1 across the seam
    overlap, n = 24, 100
    for trim in (0, 4, 12):
        a = window_1d(n, mode, overlap=overlap, trim=trim, interior=(False, True))
        b = window_1d(n, mode, overlap=overlap, trim=trim, interior=(True, False))
        total = np.zeros(2 * n - overlap)
        total[:n] += a
        total[n - overlap :] += b
        np.testing.assert_allclose(total, 1.0, atol=1e-12)
        assert (a[n - trim :] == 0).all() and (b[:trim] == 0).all()


def test_border_sides_keep_full_weight():
    for mode in BLEND_MODES:
        w = blend_window(40, 40, mode, overlap=16, trim=4, interior=(False, True, False, True))
        assert w[0, 0] == pytest.approx(1.0)  # top-left touches the image border
        assert w[-1, -1] == 0.0  # bottom-right is trimmed
        full = blend_window(40, 40, mode, overlap=16, trim=0, interior=(False,) * 4)
        assert np.all(full >= (1e-3 if mode == "gaussian" else 1.0) - 1e-7)


def test_trim_bounds_and_mode_checked():
    with pytest.raises(InputError):
        window_1d(50, "cosine", overlap=8, trim=5)
    with pytest.raises(InputError):
        blend_window(8, 8, "hann")
