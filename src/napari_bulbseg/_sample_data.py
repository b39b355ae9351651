"""npe2 sample data: a small BBBC039 nuclei stack and a synthetic olfactory-bulb stack,
each with its ground truth as a Labels layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._reader import GT_SUFFIX

LayerData = tuple[Any, dict[str, Any], str]
SAMPLE_DIR = Path(__file__).parent / "sample"


def bbbc039_sample() -> list[LayerData]:
    """Three BBBC039 validation images (U2OS nuclei, CC0) and their foreground masks."""
    from ._reader import image_layer_data, mask_layer_data

    data, meta, kind = image_layer_data(SAMPLE_DIR / "bbbc039_sample.tif")
    meta["name"] = "bbbc039"
    gt = mask_layer_data(SAMPLE_DIR / "bbbc039_sample_mask.tif", "bbbc039" + GT_SUFFIX)
    return [(data, meta, kind), gt]


def bulb_phantom_sample(
    n_slices: int = 12, shape: tuple[int, int] = (256, 256), seed: int = 0
) -> list[LayerData]:
    """A synthetic stack of one or two bright-ringed "bulbs" per slice, with exact masks."""
    from .phantom import bulb_phantom

    image, mask = bulb_phantom(n_slices=n_slices, shape=shape, seed=seed)
    return [
        (image, {"name": "bulb phantom", "metadata": {"bulbseg_sample": "bulb_phantom"}}, "image"),
        (mask.astype("uint8"), {"name": "bulb phantom" + GT_SUFFIX, "opacity": 0.5}, "labels"),
    ]
