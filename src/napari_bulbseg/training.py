"""Training and fine-tuning as one generator: progress events in, a validated model version out.

``iter_train(config, samples, ...)`` yields :class:`~napari_bulbseg.events.TrainProgress`
events — ``kind="step"`` after each optimiser step (loss, lr, elapsed, eta), ``"validate"``
while a validation pass runs, ``"epoch"`` after it (val_loss, val_dice) — and returns a
:class:`TrainResult`. ``train(...)`` drains it.

Safety rules:

- Nothing is written until training has finished *and* validation produced finite metrics.
  Closing the generator, raising the ``cancel`` flag, or any exception (including a non-finite
  loss, a :class:`~napari_bulbseg.errors.TrainingError`) leaves the registry, the current model
  and ``output_dir`` untouched. The final write happens after the last ``yield``.
- Validation uses exactly the prediction path: ``normalize.prepare_image`` on the whole image,
  the U-Net on the whole image (it pads internally), sigmoid.
- The best weights (by pooled validation Dice) are kept in memory and are what is saved.
- The decision threshold is chosen on the validation set (pooled Dice sweep) and stored in the
  card with the whole curve.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .data import (
    Augment,
    PatchSampler,
    Prepared,
    Sample,
    Split,
    prepare_sample,
    split_train_val,
)
from .devices import select_device
from .errors import CancelledError, InputError, ModelError, TrainingError
from .events import TrainProgress, drain
from .losses import LOSS_NAMES, make_loss
from .model import LoadedModel, ModelCard, UNet, UNetConfig, adapt_input_channels, save_model
from .model import software_versions as _software_versions
from .normalize import Normalization, prepare_image
from .postprocess import threshold_prob

if TYPE_CHECKING:
    from .registry import Registry

OPTIMIZERS = ("adam", "adamw")
CHANNEL_MODES = ("adapt", "convert")
#: thresholds swept on the validation set
DEFAULT_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))
#: with fewer validation images than this, the best-epoch choice and the threshold sweep are
#: noise (measured in docs/benchmarks.md, fine-tuning): keep the last weights and threshold 0.5
MIN_VAL_IMAGES_FOR_SELECTION = 3


@dataclass
class TrainConfig:
    """Everything that defines a training run; stored in the new model's card.

    ``epochs`` × ``steps_per_epoch`` optimiser steps at most, each on ``batch_size`` random
    patches of ``patch_size``²; validation after every epoch. ``time_budget_s`` ends training
    early (after a final validation) once exceeded. ``early_stopping_patience`` epochs without
    a better validation Dice stop training (0 = never); ``plateau_patience`` / ``plateau_factor``
    drive ``ReduceLROnPlateau`` on validation Dice. ``channel_mode`` decides what happens when a
    model's input channels differ from the images': ``"adapt"`` widens the first layer
    (1-channel model → RGB images), ``"convert"`` feeds the luminance instead. ``freeze_bn``:
    keep BatchNorm running statistics fixed (``"auto"`` = when fine-tuning a model).
    ``base_channels`` / ``depth`` / ``normalization`` only apply when training from scratch.
    ``diameter``: rescale every image so its median object (from the mask) is this many pixels
    across, and record it in the card (fine-tuning uses the base model's diameter instead);
    ``scale_range``: random zoom ``(low, high)`` of each patch on top (scale augmentation).
    """

    epochs: int = 20
    steps_per_epoch: int = 50
    time_budget_s: float | None = None
    batch_size: int = 4
    patch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    loss: str = "focal+dice"
    loss_params: dict[str, Any] = field(default_factory=dict)
    val_fraction: float = 0.2
    seed: int = 0
    early_stopping_patience: int = 5
    plateau_patience: int = 2
    plateau_factor: float = 0.5
    min_lr: float = 1e-6
    center_crop: int | None = None
    augment: bool = True
    foreground_fraction: float = 0.5
    device: str = "cpu"
    num_threads: int | None = None
    weights_dtype: str = "float32"
    channel_mode: str = "adapt"
    freeze_bn: bool | str = "auto"
    base_channels: int = 16
    depth: int = 4
    normalization: dict[str, Any] | None = None
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    diameter: float | None = None
    scale_range: tuple[float, float] | None = None

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first invalid setting."""

        def bad(name: str, hint: str) -> InputError:
            return InputError(f"Invalid training setting {name}={getattr(self, name)!r}", hint)

        for name in ("epochs", "steps_per_epoch", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "it must be an integer >= 1")
        if not isinstance(self.patch_size, int) or self.patch_size < 8:
            raise bad("patch_size", "use an integer >= 8, e.g. 256")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", "use a small positive learning rate, e.g. 1e-3")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"use one of {', '.join(OPTIMIZERS)}")
        if self.loss not in LOSS_NAMES:
            raise bad("loss", f"use one of {', '.join(LOSS_NAMES)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise bad("val_fraction", "use a fraction in [0, 1), e.g. 0.2")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise bad("foreground_fraction", "use a fraction in [0, 1], e.g. 0.5")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise bad("time_budget_s", "use a positive number of seconds or None")
        if self.channel_mode not in CHANNEL_MODES:
            raise bad("channel_mode", f"use one of {', '.join(CHANNEL_MODES)}")
        if self.weights_dtype not in ("float32", "float16"):
            raise bad("weights_dtype", "use float32 or float16")
        if self.freeze_bn not in (True, False, "auto"):
            raise bad("freeze_bn", "use True, False or 'auto'")
        if not 0.0 < self.plateau_factor < 1.0:
            raise bad("plateau_factor", "use a factor in (0, 1), e.g. 0.5")
        if self.early_stopping_patience < 0 or self.plateau_patience < 0:
            raise InputError("Patience settings must be >= 0", "use 0 to disable early stopping")
        if not self.thresholds or not all(0.0 < t < 1.0 for t in self.thresholds):
            raise bad("thresholds", "give thresholds strictly between 0 and 1")
        if self.diameter is not None and (
            isinstance(self.diameter, bool)
            or not isinstance(self.diameter, (int, float))
            or not 0.0 < self.diameter <= 1e4
        ):
            raise bad("diameter", "give the target object diameter in pixels (> 0), or None")
        if self.scale_range is not None:
            sr = self.scale_range
            if (
                len(sr) != 2
                or not all(isinstance(v, (int, float)) for v in sr)
                or not (0.1 <= sr[0] <= sr[1] <= 10.0)
            ):
                raise bad("scale_range", "give (low, high) zoom factors, e.g. (0.7, 1.4), or None")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["thresholds"] = list(self.thresholds)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "thresholds" in kw:
            kw["thresholds"] = tuple(kw["thresholds"])
        if kw.get("scale_range") is not None:
            kw["scale_range"] = tuple(kw["scale_range"])
        return cls(**kw)


@dataclass
class TrainResult:
    """The trained model (best validation weights, eval mode), its card and where it went."""

    model: UNet
    card: ModelCard
    #: folder written (``output_dir`` or the registry's version folder); None if not saved
    path: Path | None
    #: registry version id, when saved into a registry
    version_id: str | None
    #: one dict per validated epoch: epoch, steps, loss, val_loss, val_dice, lr, elapsed_s
    history: list[dict[str, Any]]
    #: "completed", "early_stopping" or "time_budget"
    stop_reason: str
    best_epoch: int

    @property
    def threshold(self) -> float:
        return self.card.threshold

    @property
    def val_dice(self) -> float:
        return float(self.card.metrics["val"]["dice"])

    def summary(self) -> str:
        """One line for a terminal: where it went, validation Dice, threshold, why it stopped."""
        where = self.version_id or (str(self.path) if self.path else "not saved")
        return (
            f"{self.card.name} → {where}: validation Dice {self.val_dice:.4f} at threshold "
            f"{self.threshold:.2f} (best epoch {self.best_epoch}, {self.stop_reason})"
        )


# --------------------------------------------------------------------------- helpers


def pooled_counts(prob: np.ndarray, mask: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """``(tp, fp, fn)`` of ``prob >= threshold`` (the rule of ``postprocess``) against ``mask``."""
    pred = threshold_prob(prob, threshold)
    truth = mask.astype(bool)
    tp = int(np.count_nonzero(pred & truth))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(truth)) - tp


def _dice(tp: int, fp: int, fn: int) -> float:
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2.0 * tp / denom


def threshold_sweep(
    probs: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> list[list[float]]:
    """Pooled Dice (over all pixels of all images) of ``prob >= t`` for each threshold ``t``.

    Returns ``[[t, dice], ...]`` in threshold order.
    """
    if len(probs) != len(masks) or not probs:
        raise InputError("threshold_sweep needs matching, non-empty probs and masks", "")
    totals = np.zeros((len(thresholds), 3), dtype=np.int64)
    for p, m in zip(probs, masks, strict=True):
        if p.shape != m.shape:
            raise InputError(f"Probability shape {p.shape} ≠ mask shape {m.shape}", "")
        for i, t in enumerate(thresholds):
            totals[i] += pooled_counts(p, m, t)
    return [[float(t), _dice(*map(int, c))] for t, c in zip(thresholds, totals, strict=True)]


def best_threshold(curve: Sequence[Sequence[float]]) -> tuple[float, float]:
    """The Dice-optimal ``(threshold, dice)``; ties go to the threshold nearest 0.5."""
    if not curve:
        raise InputError("Empty threshold curve", "")
    t, d = max(curve, key=lambda td: (round(td[1], 12), -abs(td[0] - 0.5)))
    return float(t), float(d)


def _set_bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _keys_digest(keys: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def _is_cancelled(cancel: Any) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def _data_channels(samples: Sequence[Sample]) -> int:
    chans = {s.channels for s in samples}
    if len(chans) > 1:
        raise InputError(
            f"The training images mix channel counts {sorted(chans)}",
            "train on images of one kind (all grey or all colour)",
        )
    return chans.pop()


def _channel_plan(
    data_c: int, base: LoadedModel | None, config: TrainConfig
) -> tuple[int, str, dict[str, Any] | None]:
    """``(model in_channels, card channel_policy, channel_adaptation record or None)``."""
    if base is None:
        if data_c == 3 and config.channel_mode == "convert":
            return 1, "luminance", None
        return data_c, "native", None
    model_c = base.card.in_channels
    if model_c == data_c:
        return model_c, base.card.channel_policy, None
    if model_c == 1 and data_c == 3:
        if config.channel_mode == "adapt":
            return 3, "adapted", {"from": 1, "to": 3, "method": "first layer weights spread"}
        return 1, "luminance", None
    if model_c == 3 and data_c == 1:
        return 3, "replicate", None
    raise ModelError(
        f"The model takes {model_c} channel(s) but the training images have {data_c}",
        "train from scratch, or pick a model made for this kind of image",
    )


def _prep_policy(policy: str) -> str:
    """The ``prepare_image`` policy for a card policy (``adapted`` models take native input)."""
    return "native" if policy == "adapted" else policy


def _parent_ref(base: LoadedModel | None, registry: Registry | None) -> str | None:
    if base is None:
        return None
    from .registry import parent_ref

    return parent_ref(base, registry)


# --------------------------------------------------------------------------- validation


def _predict_prob(model: UNet, image: np.ndarray, device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(image[None]).to(device)
    return model(x)[0, 0]


def _validate(
    model: UNet,
    val: Sequence[Prepared],
    loss_fn: nn.Module,
    device: torch.device,
) -> Generator[int, None, tuple[float, float, list[np.ndarray]]]:
    """Whole-image validation; yields the index of each image done, returns
    ``(mean loss, pooled Dice at 0.5, float16 probabilities)`` — float16 as prediction caches
    them, so the threshold chosen on them is exact for predicted stacks."""
    was_training = model.training
    model.eval()
    losses, probs = [], []
    tp = fp = fn = 0
    try:
        with torch.no_grad():
            for i, p in enumerate(val):
                logits = _predict_prob(model, p.image, device)
                target = torch.from_numpy(p.mask.astype(np.float32)).to(device)
                losses.append(float(loss_fn(logits[None, None], target[None, None])))
                prob = torch.sigmoid(logits).to(torch.float16).cpu().numpy()
                a, b, c = pooled_counts(prob, p.mask, 0.5)
                tp, fp, fn = tp + a, fp + b, fn + c
                probs.append(prob)
                yield i
    finally:
        model.train(was_training)
    return float(np.mean(losses)), _dice(tp, fp, fn), probs


# --------------------------------------------------------------------------- training


def planned_split(
    config: TrainConfig,
    samples: Sequence[Sample],
    base: LoadedModel | None = None,
    registry: Registry | None = None,
    val_samples: Sequence[Sample] | None = None,
) -> tuple[tuple[list[Sample], list[Sample], Split], Split | None]:
    """The ``(train, val, split)`` a run would use, and the parent's split — the very call
    training makes, so a widget can say beforehand how many samples train and validate."""
    parent_split = Split.from_dict(base.card.training.get("split")) if base is not None else None
    parent = _parent_ref(base, registry)
    salt = parent_split.salt if parent_split else (parent or "napari-bulbseg")
    result = split_train_val(
        samples, config.val_fraction, salt=salt, parent=parent_split, val_samples=val_samples
    )
    return result, parent_split


def _check_masks_informative(samples: Sequence[Sample]) -> None:
    """Refuse training masks that are all empty or all foreground: nothing can be learnt."""
    fractions = [float(np.count_nonzero(s.mask)) / max(s.mask.size, 1) for s in samples]
    n = len(samples)
    if max(fractions) == 0.0:
        raise InputError(
            f"All {n} training mask(s) are empty: a model trained on them would mark nothing",
            "mark the objects in at least one image or slice (empty slices help only alongside "
            "slices with objects)",
        )
    if min(fractions) == 1.0:
        raise InputError(
            f"All {n} training mask(s) are entirely foreground: a model trained on them would "
            "mark everything",
            "check that the masks are 0 for background (not inverted, not all 255), or add "
            "images with background",
        )


def iter_train(
    config: TrainConfig,
    samples: Sequence[Sample],
    val_samples: Sequence[Sample] | None = None,
    base: LoadedModel | None = None,
    name: str = "unet",
    registry: Registry | None = None,
    output_dir: str | os.PathLike | None = None,
    cancel: Any = None,
    description: str = "",
    make_current: bool = True,
    sample_weights: dict[str, float] | None = None,
) -> Generator[TrainProgress, None, TrainResult]:
    """Train (``base=None``) or fine-tune ``base`` on ``samples``; yield progress; return result.

    ``val_samples`` gives an explicit validation set; otherwise the fixed hash split of
    ``samples`` (inheriting the parent's split) decides. The validated model is saved into
    ``registry`` as a new version (made current when ``make_current``) or into the new folder
    ``output_dir``; with neither it is only returned. ``cancel`` is a ``threading.Event`` or a
    callable returning True to stop (raises :class:`CancelledError`, nothing written).
    ``sample_weights`` maps sample keys to how often their patches are drawn (relative; keys
    not in it weigh 1), e.g. to balance sources of different sizes.
    """
    config.validate()
    if registry is not None and output_dir is not None:
        raise InputError("Give either a registry or an output folder, not both", "")
    if output_dir is not None and Path(output_dir).exists():
        raise InputError(
            f"The output folder {output_dir} already exists", "models are never overwritten"
        )
    samples = list(samples)
    if not samples:
        raise InputError("No training images", "annotate at least one image or slice")
    _check_masks_informative(samples)
    prev_threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    try:
        result = yield from _train(
            config, samples, val_samples, base, name, registry, output_dir, cancel, description,
            make_current, sample_weights,
        )  # fmt: skip
    finally:
        if config.num_threads:
            torch.set_num_threads(prev_threads)
    return result


def _train(
    config: TrainConfig,
    samples: list[Sample],
    val_samples: Sequence[Sample] | None,
    base: LoadedModel | None,
    name: str,
    registry: Registry | None,
    output_dir: str | os.PathLike | None,
    cancel: Any,
    description: str,
    make_current: bool,
    sample_weights: dict[str, float] | None = None,
) -> Generator[TrainProgress, None, TrainResult]:
    t0 = time.perf_counter()
    device = select_device(config.device)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)

    # ---- split (fixed per lineage) and channels
    (train_s, val_s, split), parent_split = planned_split(
        config, samples, base, registry, val_samples
    )
    parent = _parent_ref(base, registry)
    if not val_s:
        raise TrainingError(
            "Training needs at least two annotated images (one is kept for validation)",
            "annotate one more image or slice, or give a validation folder",
        )
    lineage_split = copy.deepcopy(split)
    if parent_split is not None:  # keys of earlier rounds keep their side in later rounds
        lineage_split.train += [k for k in parent_split.train if k not in set(split.train)]
        lineage_split.val += [k for k in parent_split.val if k not in set(split.val)]
    data_c = _data_channels(train_s + val_s)
    in_c, policy, adaptation = _channel_plan(data_c, base, config)
    prep = _prep_policy(policy)

    # ---- model
    if base is None:
        norm = Normalization.from_dict(config.normalization or {})
        model = UNet(UNetConfig(in_c, 1, config.base_channels, config.depth))
    else:
        norm = base.card.norm
        model = copy.deepcopy(base.model).to("cpu")
        if adaptation is not None:
            model = adapt_input_channels(model, in_c)
    model.to(device).train()
    freeze_bn = (base is not None) if config.freeze_bn == "auto" else bool(config.freeze_bn)
    if freeze_bn:
        _set_bn_eval(model)

    diameter = config.diameter if base is None else base.card.diameter
    crop = config.center_crop
    train_p = [prepare_sample(s, in_c, norm, prep, crop, diameter) for s in train_s]
    val_p = [prepare_sample(s, in_c, norm, prep, crop, diameter) for s in val_s]
    weights = None
    if sample_weights:
        weights = [float(sample_weights.get(s.key, 1.0)) for s in train_s]
    sampler = PatchSampler(
        train_p,
        config.patch_size,
        config.foreground_fraction,
        Augment() if config.augment else None,
        scale_range=config.scale_range,
        weights=weights,
    )
    loss_fn = make_loss(config.loss, **config.loss_params)
    opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt,
        mode="max",
        factor=config.plateau_factor,
        patience=config.plateau_patience,
        min_lr=config.min_lr,
    )

    total = config.epochs * config.steps_per_epoch
    step = 0
    history: list[dict[str, Any]] = []
    best_dice, best_epoch, best_state, kept_dice = -1.0, 0, None, -1.0
    few_val = len(val_p) < MIN_VAL_IMAGES_FOR_SELECTION
    best_probs: list[np.ndarray] = []
    best_val_loss = math.nan
    bad_epochs = 0
    stop_reason = "completed"
    step_time = val_time = 0.0

    def eta(validated: int) -> float:
        """Seconds left: remaining steps and validation passes at their average cost so far."""
        per_step = step_time / max(step, 1)
        per_val = val_time / validated if validated else per_step * max(1, len(val_p)) / 4
        est = (total - step) * per_step + (config.epochs - validated) * per_val
        if config.time_budget_s is not None:
            est = min(est, max(0.0, config.time_budget_s - (time.perf_counter() - t0)))
        return float(est)

    for epoch in range(1, config.epochs + 1):
        ep_losses = []
        out_of_time = False
        for _ in range(config.steps_per_epoch):
            if _is_cancelled(cancel):
                raise CancelledError("Training was stopped", "nothing was saved")
            ts = time.perf_counter()
            x, y, v = sampler.batch(config.batch_size, rng)
            xt, yt, vt = (torch.from_numpy(a).to(device) for a in (x, y, v))
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt), yt, vt)
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise TrainingError(
                    f"The training loss became {lv} at step {step + 1}; no model was saved",
                    "lower the learning rate, check the images for extreme values, or try "
                    "another loss",
                )
            loss.backward()
            opt.step()
            step += 1
            step_time += time.perf_counter() - ts
            ep_losses.append(lv)
            yield TrainProgress(
                epoch=epoch,
                step=step,
                total_steps=total,
                loss=lv,
                lr=float(opt.param_groups[0]["lr"]),
                elapsed_s=time.perf_counter() - t0,
                eta_s=eta(epoch - 1),
            )
            if config.time_budget_s is not None and (
                time.perf_counter() - t0 >= config.time_budget_s
            ):
                out_of_time = True
                break

        # ---- validation after each epoch
        tv = time.perf_counter()
        gen = _validate(model, val_p, loss_fn, device)
        while True:
            try:
                i = next(gen)
            except StopIteration as stop:
                val_loss, val_dice, probs = stop.value
                break
            if _is_cancelled(cancel):
                gen.close()
                raise CancelledError("Training was stopped", "nothing was saved")
            yield TrainProgress(
                epoch=epoch,
                step=step,
                total_steps=total,
                loss=float(np.mean(ep_losses)),
                lr=float(opt.param_groups[0]["lr"]),
                elapsed_s=time.perf_counter() - t0,
                eta_s=eta(epoch - 1),
                message=f"validating {i + 1}/{len(val_p)}",
                kind="validate",
            )
        if freeze_bn:
            _set_bn_eval(model)
        val_time += time.perf_counter() - tv
        if not (math.isfinite(val_loss) and math.isfinite(val_dice)):
            raise TrainingError(
                f"Validation gave non-finite results (loss {val_loss}) at epoch {epoch}; "
                "no model was saved",
                "lower the learning rate or check the validation images",
            )
        lr_now = float(opt.param_groups[0]["lr"])
        history.append(
            {
                "epoch": epoch,
                "steps": step,
                "loss": float(np.mean(ep_losses)),
                "val_loss": val_loss,
                "val_dice": val_dice,
                "lr": lr_now,
                "elapsed_s": round(time.perf_counter() - t0, 2),
            }
        )
        improved = val_dice > best_dice + 1e-4 or best_state is None
        if improved:
            best_dice, bad_epochs = val_dice, 0
        else:
            bad_epochs += 1
        # with 1-2 validation images "best epoch" is noise: keep the latest weights instead
        if improved or few_val:
            best_epoch, kept_dice = epoch, val_dice
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_probs, best_val_loss = probs, val_loss
        sched.step(val_dice)
        yield TrainProgress(
            epoch=epoch,
            step=step,
            total_steps=total,
            loss=float(np.mean(ep_losses)),
            lr=lr_now,
            elapsed_s=time.perf_counter() - t0,
            eta_s=eta(epoch),
            val_loss=val_loss,
            val_dice=val_dice,
            message=f"epoch {epoch}: val Dice {val_dice:.4f} (best {best_dice:.4f})",
            kind="epoch",
        )
        if out_of_time:
            stop_reason = "time_budget"
            break
        if config.early_stopping_patience and bad_epochs >= config.early_stopping_patience:
            stop_reason = "early_stopping"
            break

    # ---- best weights, threshold sweep on validation, final metrics
    if best_state is None:  # cannot happen with epochs >= 1; never save an unvalidated model
        raise TrainingError("No validation pass completed; no model was saved", "")
    model.load_state_dict(best_state)
    model.eval()
    probs, val_loss, dice05 = best_probs, best_val_loss, kept_dice
    masks = [p.mask for p in val_p]
    curve = threshold_sweep(probs, masks, config.thresholds)
    thr, dice_t = best_threshold(curve)
    if few_val:  # a sweep over 1-2 images is noise: keep 0.5 (the curve is still stored)
        thr, dice_t = 0.5, dice05
    tp = fp = fn = n = 0
    for p, m in zip(probs, masks, strict=True):
        a, b, c = pooled_counts(p, m, thr)
        tp, fp, fn, n = tp + a, fp + b, fn + c, n + m.size
    val_metrics = {
        "dice": dice_t,
        "dice_at_0.5": dice05,
        "iou": tp / (tp + fp + fn) if tp + fp + fn else 1.0,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "pixel_error": (fp + fn) / n if n else 0.0,
        "loss": val_loss,
        "threshold": thr,
        "n_images": len(val_p),
        "n_pixels": int(n),
        "pooled": True,
        "selection": (
            f"last epoch and threshold 0.5 (fewer than {MIN_VAL_IMAGES_FOR_SELECTION} "
            "validation images)"
            if few_val
            else "best epoch by validation Dice; threshold swept on validation"
        ),
    }
    if not all(math.isfinite(float(v)) for v in val_metrics.values() if not isinstance(v, str)):
        raise TrainingError("Validation metrics are not finite; no model was saved", "")

    card = ModelCard(
        name=name,
        architecture=model.config.to_dict(),
        normalization=norm.to_dict(),
        channel_policy=policy,
        threshold=thr,
        diameter=diameter,
        postprocess=dict(base.card.postprocess) if base is not None else ModelCard().postprocess,
        threshold_curve=curve,
        metrics={"val": val_metrics, "best_epoch": best_epoch},
        training={
            "config": config.to_dict(),
            "loss": {"name": config.loss, "params": dict(config.loss_params)},
            "split": lineage_split.to_dict(),
            "samples": {
                "train": [s.key for s in train_s],
                "val": [s.key for s in val_s],
                "train_digest": _keys_digest([s.key for s in train_s]),
                "val_digest": _keys_digest([s.key for s in val_s]),
            },
            "parent": parent,
            "from_scratch": base is None,
            "freeze_bn": freeze_bn,
            "channel_adaptation": adaptation,
            "stop_reason": stop_reason,
            "epochs_run": len(history),
            "steps_run": step,
            "elapsed_s": round(time.perf_counter() - t0, 2),
            "history": history,
            "device": str(device),
            "software": _software_versions(),
        },
        parent=parent,
        description=description,
    )
    model.to("cpu")
    if _is_cancelled(cancel):  # stopped after the last event: still nothing is written
        raise CancelledError(
            "Training was stopped", "nothing was saved; the current model is unchanged"
        )
    # ---- the only write, after the last yield: a new folder, atomically
    path: Path | None = None
    version_id: str | None = None
    if registry is not None:
        version_id = registry.save_version(
            model, card, dtype=config.weights_dtype, make_current=make_current
        )
        path = registry.path_of(version_id)
    elif output_dir is not None:
        path = save_model(output_dir, model, card, dtype=config.weights_dtype)
    return TrainResult(model, card, path, version_id, history, stop_reason, best_epoch)


def train(
    config: TrainConfig,
    samples: Sequence[Sample],
    callback: Callable[[TrainProgress], Any] | None = None,
    **kwargs: Any,
) -> TrainResult:
    """Run :func:`iter_train` to the end (``callback`` gets every event); return its result."""
    return drain(iter_train(config, samples, **kwargs), callback)


def evaluate_model(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    threshold: float | None = None,
    policy: str | None = None,
    diameter: float | str | None = None,
) -> dict[str, float]:
    """Pooled pixel Dice/IoU/precision/recall of a model on samples, normalised like prediction
    (whole images, float16 probabilities, ``p >= threshold``).

    ``policy`` overrides the card's channel policy (e.g. ``"luminance"`` for RGB images on a
    grey model); ``threshold`` defaults to the card's. ``diameter`` (needs a card diameter):
    ``None`` runs at the image's own scale; a number (px) or ``"mask"`` (each image's true
    median object diameter, an oracle) rescales the image by ``card.diameter / diameter`` for
    the U-Net and the probabilities back to the image's shape, scored at the original size.
    """
    from .scale import back_to_shape, median_diameter, resize_image, resized_shape, zoom_factor

    thr = loaded.card.threshold if threshold is None else float(threshold)
    pol = _prep_policy(policy or loaded.card.channel_policy)
    model = loaded.model.eval()
    tp = fp = fn = 0
    with torch.no_grad():
        for s in samples:
            img = prepare_image(s.image, loaded.card.in_channels, loaded.card.norm, pol)
            d = median_diameter(s.mask) if diameter == "mask" else diameter
            f = zoom_factor(loaded.card.diameter, d)
            shape = s.mask.shape
            if f != 1.0:
                img = resize_image(img, resized_shape(shape, f))
            logits = _predict_prob(model, np.ascontiguousarray(img), loaded.device)
            prob = torch.sigmoid(logits).cpu().numpy()
            prob = back_to_shape(prob, shape).astype(np.float16)
            a, b, c = pooled_counts(prob, s.mask, thr)
            tp, fp, fn = tp + a, fp + b, fn + c
    return {
        "dice": _dice(tp, fp, fn),
        "iou": tp / (tp + fp + fn) if tp + fp + fn else 1.0,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "threshold": thr,
        "n_images": len(samples),
    }
