"""Test data and configurations shared by several test files (import: ``from _helpers import``).

Not a test module: pytest collects only ``test_*.py``. Subprocess children of the tests import it
too (with ``tests/`` on ``sys.path``), so it must not depend on pytest fixtures.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from napari_bulbseg.data import Sample, make_sample
from napari_bulbseg.model import LoadedModel, ModelCard
from napari_bulbseg.training import TrainConfig


class ThresholdNet(nn.Module):
    """A stand-in 'network': foreground where the normalised input is above 0.5 (for tests of
    the prediction path's scale handling, where a trained U-Net would only add noise)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x[:, :1] - 0.5)


def threshold_model(diameter: float | None = 30.0, default: Any = None) -> LoadedModel:
    """:class:`ThresholdNet` with a card trained at ``diameter`` px and ``default_diameter``."""
    card = ModelCard(diameter=diameter, default_diameter=default)
    return LoadedModel(ThresholdNet().eval(), card)


def discs(n: int, seed: int = 0, shape=(64, 64), rgb: bool = False) -> list[Sample]:
    """Bright discs (1–3 per image, radius 5–10) on a noisy dark background, with exact masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = []
    for _ in range(n):
        mask = np.zeros(shape, bool)
        for _ in range(rng.integers(1, 4)):
            r = rng.uniform(5, 10)
            cy, cx = rng.uniform(r, shape[0] - r), rng.uniform(r, shape[1] - r)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img = 200 + 1500 * mask * rng.uniform(0.6, 1.0) + rng.normal(0, 60, shape)
        img = np.clip(img, 0, 4095).astype(np.uint16)
        if rgb:  # H&E-like: dark purple nuclei on a pink background
            base = np.array([230, 180, 210], float)
            dark = np.array([90, 40, 140], float)
            f = (img.astype(float) / 4095)[..., None]
            img = np.clip(base * (1 - f) + dark * f, 0, 255).astype(np.uint8)
        out.append(make_sample(img, mask))
    return out


def tiny_config(**kw: Any) -> TrainConfig:
    """A configuration small enough for a unit test (a few steps of a small U-Net)."""
    defaults: dict[str, Any] = dict(
        epochs=1,
        steps_per_epoch=2,
        batch_size=2,
        patch_size=32,
        lr=5e-3,
        base_channels=4,
        depth=2,
        val_fraction=0.3,
        early_stopping_patience=0,
        num_threads=1,
        thresholds=(0.25, 0.5, 0.75),
    )
    defaults.update(kw)
    return TrainConfig(**defaults)
