"""A PNG overview of a segmented stack (image, prediction outline, error map), without Qt."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .normalize import Normalization, normalize_channel
from .postprocess import DIFF_COLORS, DIFF_FN, DIFF_FP, DIFF_TP


def _rgb(code: int) -> tuple[int, int, int]:
    r, g, b, _ = DIFF_COLORS[code]
    return (round(255 * r), round(255 * g), round(255 * b))


#: colours of the error map, the same as the napari difference layer's
TP_RGB = _rgb(DIFF_TP)
FP_RGB = _rgb(DIFF_FP)
FN_RGB = _rgb(DIFF_FN)
OUTLINE_RGB = (255, 220, 0)


def _gray(plane: np.ndarray) -> np.ndarray:
    if plane.ndim == 3:
        plane = plane[..., :3].astype(np.float32).mean(axis=-1)
    g = np.clip(normalize_channel(plane, Normalization()), 0, 1)
    return (g * 255).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def overview_image(
    image: np.ndarray, mask: np.ndarray, diff: np.ndarray | None = None, max_slices: int = 4
) -> np.ndarray:
    """An RGB montage: per slice, the image with the prediction outlined, then the error map."""
    image = np.asarray(image)
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4) and mask.ndim == 2):
        image = image[None]
    mask = mask[None] if mask.ndim == 2 else mask
    if diff is not None and diff.ndim == 2:
        diff = diff[None]
    rows = []
    for z in range(min(max_slices, mask.shape[0])):
        g = _gray(np.asarray(image[z]))
        left = np.repeat(g[..., None], 3, axis=-1)
        left[_outline(mask[z])] = OUTLINE_RGB
        panels = [left]
        if diff is not None:
            right = np.repeat((g // 3)[..., None], 3, axis=-1)
            for code, rgb in ((DIFF_TP, TP_RGB), (DIFF_FP, FP_RGB), (DIFF_FN, FN_RGB)):
                right[diff[z] == code] = rgb
            panels.append(right)
        sep = np.full((g.shape[0], 6, 3), 255, np.uint8)
        rows.append(
            np.concatenate(
                [p for pair in zip(panels, [sep] * len(panels)) for p in pair][:-1], axis=1
            )
        )
        rows.append(np.full((6, rows[-1].shape[1], 3), 255, np.uint8))
    return np.concatenate(rows[:-1], axis=0)


def save_overview(
    path: str | os.PathLike, image: np.ndarray, mask: np.ndarray, diff: np.ndarray | None = None
) -> Path:
    """Write :func:`overview_image` as a PNG (atomically) and return its path."""
    from PIL import Image, ImageDraw

    rgb = overview_image(image, mask, diff)
    legend_h = 22
    canvas = np.full((rgb.shape[0] + legend_h, rgb.shape[1], 3), 255, np.uint8)
    canvas[legend_h:] = rgb
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    x = 4
    items = [("prediction outline", OUTLINE_RGB)]
    if diff is not None:
        items += [("true positive", TP_RGB), ("false positive", FP_RGB), ("false negative", FN_RGB)]
    for text, col in items:
        draw.rectangle([x, 5, x + 12, 17], fill=col, outline=(0, 0, 0))
        draw.text((x + 16, 5), text, fill=(0, 0, 0))
        x += 16 + 7 * len(text) + 14
    with atomic_write(path) as fh:
        img.save(fh, format="PNG")
    return Path(path)
