"""Loss values on hand-computed cases, and focal loss against the torchvision formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_bulbseg.errors import InputError
from napari_bulbseg.losses import LOSS_NAMES, make_loss


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, 1, -1)


def reference_focal(x: np.ndarray, y: np.ndarray, alpha: float, gamma: float) -> float:
    """torchvision.ops.sigmoid_focal_loss (reduction='mean') written out in float64 numpy:
    FL = -alpha_t (1 - p_t)^gamma log(p_t)."""
    x = x.astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-x))
    p_t = np.where(y == 1, p, 1 - p)
    log_p_t = np.where(y == 1, -np.logaddexp(0, -x), -np.logaddexp(0, x))  # stable log(p_t)
    loss = -((1 - p_t) ** gamma) * log_p_t
    if alpha >= 0:
        loss *= np.where(y == 1, alpha, 1 - alpha)
    return float(loss.mean())


def test_bce_hand_computed():
    bce = make_loss("bce")
    # logit 0 → p = 0.5 → -log(0.5) = ln 2, whatever the target
    assert float(bce(t([0.0, 0.0]), t([1.0, 0.0]))) == pytest.approx(math.log(2), rel=1e-6)
    # logit ln 3 → p = 0.75: target 1 costs -ln 0.75, target 0 costs -ln 0.25
    v = float(bce(t([math.log(3)] * 2), t([1.0, 0.0])))
    assert v == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2, rel=1e-6)


def test_valid_mask_excludes_pixels():
    bce = make_loss("bce")
    # the second pixel is badly wrong but marked invalid (padding): only ln 2 remains
    v = float(bce(t([0.0, -20.0]), t([1.0, 1.0]), t([1.0, 0.0])))
    assert v == pytest.approx(math.log(2), rel=1e-6)
    dice = make_loss("dice", smooth=0.0)
    assert float(dice(t([20.0, -20.0]), t([1.0, 1.0]), t([1.0, 0.0]))) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (0.5, 0.0), (-1.0, 2.0), (0.8, 1.5)])
def test_focal_matches_reference_formula(alpha, gamma):
    rng = np.random.default_rng(3)
    x = rng.normal(0, 4, size=(2, 1, 8, 8)).astype(np.float32)
    y = (rng.random((2, 1, 8, 8)) < 0.3).astype(np.float32)
    got = float(
        make_loss("focal", alpha=alpha, gamma=gamma)(torch.from_numpy(x), torch.from_numpy(y))
    )
    assert got == pytest.approx(reference_focal(x, y, alpha, gamma), rel=1e-5)


def test_focal_without_weighting_is_bce():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(0, 3, (1, 1, 5, 5)).astype(np.float32))
    y = torch.from_numpy((rng.random((1, 1, 5, 5)) < 0.5).astype(np.float32))
    focal = float(make_loss("focal", alpha=-1, gamma=0)(x, y))
    assert focal == pytest.approx(float(make_loss("bce")(x, y)), rel=1e-6)


def test_dice_hand_computed():
    # p = 0.5 everywhere, one foreground of two pixels: 1 - (2·0.5 + s) / (1 + 1 + s)
    assert float(make_loss("dice", smooth=0.0)(t([0.0, 0.0]), t([1.0, 0.0]))) == pytest.approx(0.5)
    assert float(make_loss("dice", smooth=1.0)(t([0.0, 0.0]), t([1.0, 0.0]))) == pytest.approx(
        1 - 2 / 3
    )
    # confident and right → ~0; confident and wrong → ~1; no foreground anywhere → 0 (smooth)
    assert float(make_loss("dice")(t([30.0, -30.0]), t([1.0, 0.0]))) == pytest.approx(0, abs=1e-6)
    assert float(make_loss("dice", smooth=0)(t([-30.0, 30.0]), t([1.0, 0.0]))) == pytest.approx(1)
    assert float(make_loss("dice")(t([-30.0, -30.0]), t([0.0, 0.0]))) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("first", ["focal", "bce"])
def test_weighted_sums(first):
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(0, 2, (2, 1, 6, 6)).astype(np.float32))
    y = torch.from_numpy((rng.random((2, 1, 6, 6)) < 0.4).astype(np.float32))
    a = float(make_loss(first)(x, y))
    d = float(make_loss("dice")(x, y))
    assert float(make_loss(f"{first}+dice")(x, y)) == pytest.approx(a + d, rel=1e-6)
    assert float(make_loss(f"{first}+dice", weights=(2.0, 0.5))(x, y)) == pytest.approx(
        2 * a + 0.5 * d, rel=1e-6
    )


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_extreme_logits_give_finite_loss_and_gradients(name):
    x = torch.tensor([[[[-200.0, 200.0, 0.0, 88.0]]]], requires_grad=True)
    y = torch.tensor([[[[1.0, 0.0, 1.0, 1.0]]]])
    loss = make_loss(name)(x, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()


def test_unknown_loss_and_parameter_are_input_errors():
    with pytest.raises(InputError) as e:
        make_loss("hinge")
    for n in LOSS_NAMES:
        assert n in str(e.value)
    with pytest.raises(InputError, match="smooth"):
        make_loss("focal", smooth=1.0)
