"""Segmentation losses on logits: BCE, focal, soft Dice and their weighted sums.

Every loss is called as ``loss(logits, target, valid=None)`` with tensors of the same shape
``(N, 1, Y, X)``; ``target`` holds 0/1 and ``valid`` (optional, 0/1) marks the pixels that count
(padding added around an image smaller than a patch does not). Each returns a scalar tensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .options import LOSS_NAMES


def _masked_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return values.mean()
    return (values * valid).sum() / valid.sum().clamp_min(1.0)


class BCELoss(nn.Module):
    """Binary cross-entropy on logits, averaged over the valid pixels."""

    def __init__(self, pos_weight: float | None = None) -> None:
        super().__init__()
        self.pos_weight = pos_weight

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        pw = None
        if self.pos_weight is not None:
            pw = torch.as_tensor(self.pos_weight, dtype=logits.dtype, device=logits.device)
        ce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw, reduction="none")
        return _masked_mean(ce, valid)


class FocalLoss(nn.Module):
    """Sigmoid focal loss (Lin et al. 2017), the formula of ``torchvision.ops.sigmoid_focal_loss``.

    ``loss = alpha_t * (1 - p_t) ** gamma * BCE``, with ``alpha_t = alpha`` on foreground and
    ``1 - alpha`` on background; ``alpha < 0`` disables the weighting. Averaged over pixels.
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        if gamma < 0:
            raise InputError(f"Focal loss gamma={gamma} is negative", "use gamma >= 0 (2 is usual)")
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        p = torch.sigmoid(logits)
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p_t = p * target + (1 - p) * (1 - target)
        loss = ce * ((1 - p_t) ** self.gamma)
        if self.alpha >= 0:
            alpha_t = self.alpha * target + (1 - self.alpha) * (1 - target)
            loss = alpha_t * loss
        return _masked_mean(loss, valid)


class DiceLoss(nn.Module):
    """Soft Dice loss ``1 - (2 Σpt + s) / (Σp + Σt + s)``, pooled over the whole batch.

    Pooling over the batch (rather than averaging per image) keeps the loss well defined for
    patches without foreground; ``smooth`` (``s``) keeps it finite when both sums are 0.
    """

    def __init__(self, smooth: float = 1.0) -> None:
        super().__init__()
        if smooth < 0:
            raise InputError(f"Dice smooth={smooth} is negative", "use smooth >= 0 (1 is usual)")
        self.smooth = float(smooth)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        p = torch.sigmoid(logits)
        t = target
        if valid is not None:
            p = p * valid
            t = t * valid
        inter = (p * t).sum()
        denom = p.sum() + t.sum()
        return 1 - (2 * inter + self.smooth) / (denom + self.smooth)


class SumLoss(nn.Module):
    """``w1 * first + w2 * second``."""

    def __init__(self, first: nn.Module, second: nn.Module, w1: float, w2: float) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.w1, self.w2 = float(w1), float(w2)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.w1 * self.first(logits, target, valid) + self.w2 * self.second(
            logits, target, valid
        )


def _take(params: dict[str, Any], allowed: tuple[str, ...], name: str) -> dict[str, Any]:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise InputError(
            f"Unknown parameter(s) {', '.join(unknown)} for loss {name!r}",
            f"{name!r} takes {', '.join(allowed) if allowed else 'no parameters'}",
        )
    return params


def make_loss(name: str, **params: Any) -> nn.Module:
    """Build a loss by name: ``bce`` (pos_weight), ``focal`` (alpha, gamma), ``dice`` (smooth),
    ``focal+dice`` / ``bce+dice`` (the parameters of both parts plus ``weights=(w1, w2)``,
    default ``(1, 1)``). All take logits."""
    key = str(name).strip().lower().replace(" ", "")
    if key == "bce":
        return BCELoss(**_take(params, ("pos_weight",), key))
    if key == "focal":
        return FocalLoss(**_take(params, ("alpha", "gamma"), key))
    if key == "dice":
        return DiceLoss(**_take(params, ("smooth",), key))
    if key in ("focal+dice", "bce+dice"):
        first_keys = ("alpha", "gamma") if key == "focal+dice" else ("pos_weight",)
        p = _take(params, (*first_keys, "smooth", "weights"), key)
        w1, w2 = p.pop("weights", (1.0, 1.0))
        first_cls = FocalLoss if key == "focal+dice" else BCELoss
        first = first_cls(**{k: v for k, v in p.items() if k in first_keys})
        second = DiceLoss(**{k: v for k, v in p.items() if k == "smooth"})
        return SumLoss(first, second, w1, w2)
    raise InputError(f"Unknown loss {name!r}", f"use one of {', '.join(LOSS_NAMES)}")
