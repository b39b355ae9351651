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
import dataclasses
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
    Sample,
    Split,
    prepare_sample,
    split_train_val,
)
from .devices import select_device
from .errors import CancelledError, InputError, ModelError, TrainingError
from .events import TrainProgress, drain
from .inference import predict_whole
from .losses import LOSS_NAMES, make_loss
from .metrics import (
    DEFAULT_THRESHOLDS,
    best_threshold,
    pooled_pixel_metrics,
    threshold_sweep,
)
from .model import (
    LoadedModel,
    ModelCard,
    UNet,
    UNetConfig,
    adapt_input_channels,
    read_card,
    save_model,
)
from .model import software_versions as _software_versions
from .normalize import Normalization, prepare_image
from .options import START_MODES
from .scale import AUTO_PER_SLICE

if TYPE_CHECKING:
    from .registry import Registry

OPTIMIZERS = ("adam", "adamw")
CHANNEL_MODES = ("adapt", "convert")
#: ``start="auto"`` tries training from scratch only when the base model's validation Dice
#: before fine-tuning is below this: a base that already finds the objects is the better start
PROBE_BELOW_DICE = 0.5
#: ... and gives each of the two starts this share of the time budget (at least
#: :data:`MIN_PROBE_STEPS`, at most one epoch's steps) before keeping the one with the better
#: validation Dice
PROBE_SHARE = 0.15
MIN_PROBE_STEPS = 10
#: ``warmup_steps=None``: the learning rate rises linearly over this many steps when training
#: starts from a model's weights (Adam's first steps are full-size whatever the gradient, and
#: knock a good model off its optimum), and not at all from new weights
WARMUP_STEPS = 20
#: with fewer validation images than this, the best-epoch choice and the threshold sweep are
#: noise (measured in docs/benchmarks.md, fine-tuning): keep the last weights and threshold 0.5
MIN_VAL_IMAGES_FOR_SELECTION = 3
#: below this validation Dice (on slices that hold objects) a new model is never made current
MIN_USEFUL_DICE = 0.05
#: with too few validation slices to choose on, a fine-tuned model is used unless it is worse
#: than its base by more than this Dice (measured: docs/hitl.md, "acceptance rule")
FEW_VAL_MARGIN = 0.05


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
    ``start`` (fine-tuning only): begin from the base's weights, from new weights, or
    ``"auto"``: when the base does badly on the validation slices, train both starts briefly
    and continue with the better one (:meth:`TrainRun.choose_start`; recorded in the card).
    ``refine_lr_factor``: when the base model already does well on the validation slices
    before training (Dice >= :data:`PROBE_BELOW_DICE`: it is refined, not adapted to a new
    kind of image), its fine-tuning runs at ``lr`` times this (measured: docs/model.md).
    ``warmup_steps``: the learning rate rises linearly to ``lr`` over this many steps
    (``None``: :data:`WARMUP_STEPS` from a base model's weights, 0 from new weights).
    ``require_improvement``: a new registry version becomes current only when it beats its
    base on the validation slices and finds objects there (:meth:`TrainRun.judge`); with
    False it becomes current regardless, and the verdict still says when it should not have.
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
    require_improvement: bool = True
    start: str = "auto"
    warmup_steps: int | None = None
    refine_lr_factor: float = 0.3

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
        f = self.refine_lr_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise bad("refine_lr_factor", "use a factor in (0, 1]; 1 keeps the learning rate")
        w = self.warmup_steps
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
            raise bad("warmup_steps", "use a whole number of steps >= 0, or None (automatic)")
        if self.start not in START_MODES:
            raise bad("start", f"use one of {', '.join(START_MODES)}")
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
    #: whether the registry's current pointer moved to this version (see :meth:`TrainRun.judge`)
    made_current: bool = False
    #: what the comparison with the base said when it matters: why the version was not made
    #: current, or that it was on weak evidence ("" otherwise)
    verdict: str = ""

    @property
    def threshold(self) -> float:
        return self.card.threshold

    @property
    def val_dice(self) -> float:
        return float(self.card.metrics["val"]["dice"])

    @property
    def time_note(self) -> str:
        """What more time would likely buy, read off this run's validation curve."""
        return time_advice(self.history, self.stop_reason)

    @property
    def start_note(self) -> str:
        """Says so when an automatic start chose new weights over the base model's."""
        start = self.card.training.get("start", {})
        if start.get("mode") == "auto" and start.get("chosen") == "scratch":
            return f"trained from new weights, not the base model's: {start.get('reason', '')}"
        return ""

    def summary(self) -> str:
        """One line for a terminal: where it went, validation Dice, threshold, why it stopped."""
        where = self.version_id or (str(self.path) if self.path else "not saved")
        line = (
            f"{self.card.name} → {where}: validation Dice {self.val_dice:.4f} at threshold "
            f"{self.threshold:.2f} (best epoch {self.best_epoch}, {self.stop_reason})"
        )
        return "\n".join(x for x in (line, self.start_note, self.time_note, self.verdict) if x)


# --------------------------------------------------------------------------- helpers

#: validation Dice gained per minute (a line fitted over the last half of the epochs) above
#: which a run stopped by its time budget is called still improving, and below which flat
RISING_PER_MIN, FLAT_PER_MIN = 0.01, 0.002


def time_advice(history: Sequence[dict[str, Any]], stop_reason: str) -> str:
    """One sentence on whether a longer time budget would likely help, from the validation
    Dice of the last half of the epochs (at least 3) against their elapsed time; "" when the
    curve is too short or too noisy to say."""
    rows = [r for r in history if "val_dice" in r and "elapsed_s" in r]
    tail = rows[len(rows) // 2 :]
    if len(tail) < 3:
        return ""
    t = np.array([float(r["elapsed_s"]) for r in tail]) / 60.0
    d = np.array([float(r["val_dice"]) for r in tail])
    if float(np.ptp(t)) <= 0 or not np.all(np.isfinite(d)):
        return ""
    slope = float(np.polyfit(t, d, 1)[0])
    span = f"{slope:+.3f} Dice per minute over the last {len(tail)} epochs"
    if slope > RISING_PER_MIN and stop_reason == "time_budget":
        return (
            f"Validation Dice was still rising ({span}) when the time ran out: "
            "a longer time budget would likely give a better model."
        )
    if abs(slope) < FLAT_PER_MIN or slope < 0:
        return (
            f"Validation Dice had levelled off ({span}): more time is unlikely to help; "
            "correcting more slices is."
        )
    return ""


def _beats(new: dict[str, float], base_dice: float, base_err: float | None) -> bool:
    """A higher Dice wins; on a tie (e.g. held-out slices without objects, where both score 0)
    fewer wrong pixels do."""
    if abs(new["dice"] - base_dice) > 1e-4:
        return new["dice"] > base_dice
    return base_err is not None and new["pixel_error"] < base_err - 1e-9


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


# --------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Validation:
    """One whole-image validation pass: mean loss, pooled Dice at 0.5, float16 probabilities."""

    loss: float
    dice05: float
    probs: list[np.ndarray]


@dataclass(frozen=True)
class Snapshot:
    """What a run would return if it stopped now (:meth:`TrainRun.snapshot`): a copy of the
    chosen weights (eval mode), the threshold the run would choose, and how the input is
    prepared for this model (channels, ``prepare_image`` policy, normalisation)."""

    model: UNet
    threshold: float
    note: str
    in_channels: int
    prep_policy: str
    norm: Normalization


class TrainRun:
    """One training run as small steps; :meth:`events` drives them as the run's generator.

    ``setup()`` (split, channel plan, model, optimiser, sampler) → ``step()`` per optimiser
    step → ``iter_validate()`` after each epoch → ``end_epoch()`` (history, best-epoch choice,
    learning-rate schedule) → ``finish()`` (best weights, threshold, validation metrics) →
    ``build_card()`` → ``save()``, the only write. ``snapshot()`` answers "what if it stopped
    now" without touching the run. Arguments as :func:`iter_train`.
    """

    def __init__(
        self,
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
    ) -> None:
        self.config, self.samples, self.val_samples = config, list(samples), val_samples
        self.base, self.name, self.registry, self.output_dir = base, name, registry, output_dir
        self.cancel, self.description, self.make_current = cancel, description, make_current
        self.sample_weights = sample_weights
        self.history: list[dict[str, Any]] = []
        self.step_count = 0
        self.stop_reason = "completed"
        self.best_dice, self.best_epoch, self.kept_dice = -1.0, 0, -1.0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_val: Validation | None = None
        self.bad_epochs = 0
        self._base_scores: dict[str, float] | None = None
        self.refining = False  # the base does well here: fine-tuned at a lower learning rate
        self._arm_scratch = base is None
        self._step_time = self._val_time = 0.0
        self.t0 = time.perf_counter()

    # ---- checks and set-up

    def check_inputs(self) -> None:
        """Refuse bad settings, a taken output folder and uninformative masks."""
        self.config.validate()
        if self.registry is not None and self.output_dir is not None:
            raise InputError("Give either a registry or an output folder, not both", "")
        if self.output_dir is not None and Path(self.output_dir).exists():
            raise InputError(
                f"The output folder {self.output_dir} already exists",
                "models are never overwritten",
            )
        if not self.samples:
            raise InputError("No training images", "annotate at least one image or slice")
        _check_masks_informative(self.samples)

    def setup(self) -> None:
        """Split (fixed per lineage), channels, model, prepared samples, optimiser."""
        config, base = self.config, self.base
        self.t0 = time.perf_counter()
        self.device = select_device(config.device)
        self.rng = np.random.default_rng(config.seed)
        torch.manual_seed(config.seed)
        (self.train_s, self.val_s, split), parent_split = planned_split(
            config, self.samples, base, self.registry, self.val_samples
        )
        self.parent = _parent_ref(base, self.registry)
        if not self.val_s:
            raise TrainingError(
                "Training needs at least two annotated images (one is kept for validation)",
                "annotate one more image or slice, or give a validation folder",
            )
        self.lineage_split = copy.deepcopy(split)
        if parent_split is not None:  # keys of earlier rounds keep their side in later rounds
            self.lineage_split.train += [k for k in parent_split.train if k not in set(split.train)]
            self.lineage_split.val += [k for k in parent_split.val if k not in set(split.val)]
        data_c = _data_channels(self.train_s + self.val_s)
        self.in_c, self.policy, self.adaptation = _channel_plan(data_c, base, config)
        self.prep = _prep_policy(self.policy)

        self.norm = (
            Normalization.from_dict(config.normalization or {}) if base is None else base.card.norm
        )
        self.start_info: dict[str, Any] = {"mode": config.start if base is not None else "scratch"}
        self.scratch = base is None or config.start == "scratch"
        self.build_model(self.scratch)

        self.diameter = config.diameter if base is None else base.card.diameter
        #: what the new card asks prediction to run at when the user gives no diameter: every
        #: image is brought to the trained diameter here, so prediction measures every slice
        #: and brings it there too (measured on a bulb stack: docs/model.md, "Object scale")
        self.default_diameter = AUTO_PER_SLICE if self.diameter is not None else None
        prep_args = (self.in_c, self.norm, self.prep, config.center_crop, self.diameter)
        self.train_p = [prepare_sample(s, *prep_args) for s in self.train_s]
        self.val_p = [prepare_sample(s, *prep_args) for s in self.val_s]
        weights = None
        if self.sample_weights:
            weights = [float(self.sample_weights.get(s.key, 1.0)) for s in self.train_s]
        self.sampler = PatchSampler(
            self.train_p,
            config.patch_size,
            config.foreground_fraction,
            Augment() if config.augment else None,
            scale_range=config.scale_range,
            weights=weights,
        )
        self.loss_fn = make_loss(config.loss, **config.loss_params)
        self.build_optimizer()
        self.total = config.epochs * config.steps_per_epoch
        self.few_val = len(self.val_p) < MIN_VAL_IMAGES_FOR_SELECTION

    def build_model(self, scratch: bool) -> None:
        """The run's model: the base's weights (channels adapted when needed) or, with
        ``scratch``, new weights of the base's architecture (a plain run's without a base)."""
        config, base = self.config, self.base
        torch.manual_seed(config.seed)
        self._arm_scratch = scratch
        if base is None:
            model = UNet(UNetConfig(self.in_c, 1, config.base_channels, config.depth))
        elif scratch:
            model = UNet(dataclasses.replace(base.model.config, in_channels=self.in_c))
        else:
            model = copy.deepcopy(base.model).to("cpu")
            if self.adaptation is not None:
                model = adapt_input_channels(model, self.in_c)
        self.model = model.to(self.device).train()
        fb = config.freeze_bn
        self.freeze_bn = (not scratch) if fb == "auto" else bool(fb)
        w = config.warmup_steps
        self.warmup = (0 if scratch else WARMUP_STEPS) if w is None else int(w)
        if self.freeze_bn:
            _set_bn_eval(self.model)

    def build_optimizer(self) -> None:
        config = self.config
        opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        self.opt = opt_cls(self.model.parameters(), lr=self.lr0, weight_decay=config.weight_decay)
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.opt,
            mode="max",
            factor=config.plateau_factor,
            patience=config.plateau_patience,
            min_lr=config.min_lr,
        )
        self.arm_steps = 0  # steps of this model and optimiser (the warm-up counts these)

    @property
    def lr0(self) -> float:
        """The learning rate of the model being trained (before warm-up and schedule)."""
        refine = self.refining and not self._arm_scratch
        return self.config.lr * (self.config.refine_lr_factor if refine else 1.0)

    def decide_refining(self) -> None:
        """Score the base on the validation slices (once; :meth:`judge` reuses it): a base
        that already does well is refined at ``lr × refine_lr_factor``."""
        self.refining = self.base_scores()["dice"] >= PROBE_BELOW_DICE
        if self.refining:
            self.build_optimizer()  # no step taken yet: the same optimiser at the lower rate

    def base_scores(self) -> dict[str, float]:
        """The base model on the validation slices, as :meth:`judge` scores it (computed once):
        at the new card's default diameter (each slice measured), so that both models are
        judged at the scale the new version predicts at."""
        if self._base_scores is None:
            self._base_scores = evaluate_model(
                self.base, self.val_s, diameter=self.default_diameter
            )
        return self._base_scores

    def choose_start(self) -> Generator[TrainProgress, None, None]:
        """``start="auto"``: keep the base's weights when the base already does well on the
        validation slices (Dice >= :data:`PROBE_BELOW_DICE`). Otherwise fine-tune it for a
        short probe (:data:`PROBE_SHARE` of the time budget, at least :data:`MIN_PROBE_STEPS`
        steps, at most one epoch) and validate: if it has reached that Dice, go on with it.
        Only if not, train new weights for the same steps on the same patches and go on with
        whichever validates better — the base on a tie. The answer is in the card
        (``training.start``).

        Validation slices without a single object pixel (the empty end slices of a stack) give
        every model Dice 0, whatever it predicts there: they cannot tell a useless base from a
        good one, so the base is kept."""
        before = self.base_scores()["dice"]
        info = self.start_info
        info["base_dice_before"] = round(before, 4)
        if not any(np.any(np.asarray(s.mask) > 0) for s in self.val_s):
            info.update(
                chosen="base",
                reason="the validation slices hold no objects, so Dice cannot judge the base",
            )
            return
        if before >= PROBE_BELOW_DICE:
            info.update(chosen="base", reason=f"the base model reaches Dice {before:.3f} here")
            return
        n = self.config.steps_per_epoch
        budget = self.config.time_budget_s
        limit = None if budget is None else PROBE_SHARE * budget
        rng_state = copy.deepcopy(self.rng.bit_generator.state)
        self.total += 2 * n
        arms: dict[str, tuple[float, Any]] = {}
        for arm in ("base", "scratch"):
            self.rng.bit_generator.state = copy.deepcopy(rng_state)  # the same patches for both
            self.build_model(arm == "scratch")
            self.build_optimizer()
            t_arm = time.perf_counter()
            for i in range(n):
                self.check_cancel()
                loss = self.step()
                msg = f"trying the start from {arm}: step {i + 1}/{n}"
                yield self._progress(0, loss, 0, message=msg, kind="probe")
                timed_out = limit is not None and time.perf_counter() - t_arm >= limit
                if arm == "base" and i + 1 >= MIN_PROBE_STEPS and timed_out:
                    self.total -= 2 * (n - i - 1)
                    n = i + 1  # the scratch arm gets as many steps
                    break
            val = yield from self._validate_start(arm)
            state = (self.model, self.opt, self.sched, self.freeze_bn, self.warmup, self.arm_steps)
            arms[arm] = (val.dice05, (state, copy.deepcopy(self.rng.bit_generator.state)))
            if arm == "base" and val.dice05 >= PROBE_BELOW_DICE:
                break  # fine-tuning the base works here: no need to try new weights
        d_base = arms["base"][0]
        d_scratch = arms["scratch"][0] if "scratch" in arms else None
        chosen = "scratch" if d_scratch is not None and d_scratch > d_base + 1e-4 else "base"
        state, rng = arms[chosen][1]
        self.model, self.opt, self.sched, self.freeze_bn, self.warmup, self.arm_steps = state
        self.rng.bit_generator.state = rng
        self.scratch = self._arm_scratch = chosen == "scratch"
        self.total -= n
        if d_scratch is None:
            info.update(
                chosen="base",
                probe_steps=n,
                probe_val_dice={"base": round(d_base, 4)},
                reason=f"after {n} steps from the base model, validation Dice {d_base:.3f}",
            )
            return
        self.step_count -= n  # the steps of the start that was dropped
        info.update(
            chosen=chosen,
            probe_steps=n,
            probe_val_dice={"base": round(d_base, 4), "scratch": round(d_scratch, 4)},
            reason=(
                f"after {n} steps each, validation Dice {d_scratch:.3f} from scratch vs "
                f"{d_base:.3f} from the base model"
            ),
        )

    def _validate_start(self, arm: str) -> Generator[TrainProgress, None, Validation]:
        """:meth:`iter_validate` of the run's model as progress events, honouring cancel."""
        gen = self.iter_validate()
        while True:
            try:
                i = next(gen)
            except StopIteration as stop:
                return stop.value
            if _is_cancelled(self.cancel):
                gen.close()
                self.check_cancel()
            msg = f"validating the start from {arm}: {i + 1}/{len(self.val_p)}"
            yield self._progress(0, 0.0, 0, message=msg, kind="validate")

    # ---- small steps

    @property
    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def check_cancel(self) -> None:
        if _is_cancelled(self.cancel):
            raise CancelledError("Training was stopped", "nothing was saved")

    def out_of_time(self) -> bool:
        budget = self.config.time_budget_s
        return budget is not None and self.elapsed >= budget

    def eta(self, validated: int) -> float:
        """Seconds left: remaining steps and validation passes at their average cost so far."""
        per_step = self._step_time / max(self.step_count, 1)
        n_val = max(1, len(self.val_p))
        per_val = self._val_time / validated if validated else per_step * n_val / 4
        est = (self.total - self.step_count) * per_step + (self.config.epochs - validated) * per_val
        if self.config.time_budget_s is not None:
            est = min(est, max(0.0, self.config.time_budget_s - self.elapsed))
        return float(est)

    def step(self) -> float:
        """One optimiser step on a random batch; returns its loss (a non-finite loss stops)."""
        ts = time.perf_counter()
        x, y, v = self.sampler.batch(self.config.batch_size, self.rng)
        xt, yt, vt = (torch.from_numpy(a).to(self.device) for a in (x, y, v))
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(xt), yt, vt)
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise TrainingError(
                f"The training loss became {lv} at step {self.step_count + 1}; no model was saved",
                "lower the learning rate, check the images for extreme values, or try another loss",
            )
        loss.backward()
        if self.arm_steps < self.warmup:
            f = min(1.0, (self.arm_steps + 1) / self.warmup)
            for group in self.opt.param_groups:
                group["lr"] = self.lr0 * f
        self.opt.step()
        self.arm_steps += 1
        self.step_count += 1
        self._step_time += time.perf_counter() - ts
        return lv

    def iter_validate(self, model: nn.Module | None = None) -> Generator[int, None, Validation]:
        """Whole-image validation of ``model`` (the run's own by default) through the
        prediction helper; yields the index of each image done."""
        model = self.model if model is None else model
        was_training = model.training
        model.eval()
        losses, probs = [], []
        try:
            for i, p in enumerate(self.val_p):
                # no_grad per image, never across the yield: grad mode is global to the thread,
                # and a caller that abandons this generator must not be left without gradients
                with torch.no_grad():
                    logits, prob = predict_whole(model, p.image, self.device)
                    target = torch.from_numpy(p.mask.astype(np.float32)).to(self.device)
                    losses.append(float(self.loss_fn(logits[None, None], target[None, None])))
                probs.append(prob)
                yield i
        finally:
            model.train(was_training)
            if model is self.model and self.freeze_bn:
                _set_bn_eval(model)
        dice05 = pooled_pixel_metrics(probs, [p.mask for p in self.val_p], 0.5)["dice"]
        return Validation(float(np.mean(losses)), dice05, probs)

    def _improves(self, dice: float) -> bool:
        return self.best_state is None or dice > self.best_dice + 1e-4

    def end_epoch(self, epoch: int, losses: Sequence[float], val: Validation) -> dict[str, Any]:
        """Record the epoch, keep the best weights (the latest with 1–2 validation images: the
        best-epoch choice is noise there), step the schedule; returns the history row."""
        if not (math.isfinite(val.loss) and math.isfinite(val.dice05)):
            raise TrainingError(
                f"Validation gave non-finite results (loss {val.loss}) at epoch {epoch}; "
                "no model was saved",
                "lower the learning rate or check the validation images",
            )
        row = {
            "epoch": epoch,
            "steps": self.step_count,
            "loss": float(np.mean(losses)),
            "val_loss": val.loss,
            "val_dice": val.dice05,
            "lr": self.lr,
            "elapsed_s": round(self.elapsed, 2),
        }
        self.history.append(row)
        improved = self._improves(val.dice05)
        if improved:
            self.best_dice, self.bad_epochs = val.dice05, 0
        else:
            self.bad_epochs += 1
        if improved or self.few_val:
            self.best_epoch, self.kept_dice = epoch, val.dice05
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.best_val = val
        self.sched.step(val.dice05)
        return row

    def should_stop_early(self) -> bool:
        patience = self.config.early_stopping_patience
        return bool(patience) and self.bad_epochs >= patience

    def choose_threshold(self, val: Validation) -> tuple[float, float, list[list[float]], str]:
        """``(threshold, Dice there, curve, selection note)`` on the validation set; with 1–2
        validation images a sweep is noise: 0.5 (the curve is still stored)."""
        curve = threshold_sweep(val.probs, [p.mask for p in self.val_p], self.config.thresholds)
        if self.few_val:
            note = (
                f"last epoch and threshold 0.5 (fewer than {MIN_VAL_IMAGES_FOR_SELECTION} "
                "validation images)"
            )
            return 0.5, val.dice05, curve, note
        thr, dice_t = best_threshold(curve)
        return thr, dice_t, curve, "best epoch by validation Dice; threshold swept on validation"

    def finish(self) -> None:
        """Load the kept weights; choose the threshold; compute the validation metrics."""
        if self.best_state is None or self.best_val is None:
            # cannot happen with epochs >= 1; never save an unvalidated model
            raise TrainingError("No validation pass completed; no model was saved", "")
        self.model.load_state_dict(self.best_state)
        self.model.eval()
        val = self.best_val
        thr, dice_t, self.curve, selection = self.choose_threshold(val)
        pooled = pooled_pixel_metrics(val.probs, [p.mask for p in self.val_p], thr)
        self.val_metrics = {
            "dice": dice_t,
            "dice_at_0.5": self.kept_dice,
            "iou": pooled["iou"],
            "precision": pooled["precision"],
            "recall": pooled["recall"],
            "pixel_error": pooled["pixel_error"],
            "loss": val.loss,
            "threshold": thr,
            "n_images": len(self.val_p),
            "n_pixels": pooled["n_pixels"],
            "pooled": True,
            "selection": selection,
        }
        vals = [v for v in self.val_metrics.values() if not isinstance(v, str)]
        if not all(math.isfinite(float(v)) for v in vals):
            raise TrainingError("Validation metrics are not finite; no model was saved", "")

    def build_card(self) -> ModelCard:
        config, base = self.config, self.base
        train_keys, val_keys = [s.key for s in self.train_s], [s.key for s in self.val_s]
        return ModelCard(
            name=self.name,
            architecture=self.model.config.to_dict(),
            normalization=self.norm.to_dict(),
            channel_policy=self.policy,
            threshold=self.val_metrics["threshold"],
            diameter=self.diameter,
            default_diameter=self.default_diameter,
            postprocess=dict(base.card.postprocess)
            if base is not None
            else ModelCard().postprocess,
            threshold_curve=self.curve,
            metrics={"val": self.val_metrics, "best_epoch": self.best_epoch},
            training={
                "config": config.to_dict(),
                "loss": {"name": config.loss, "params": dict(config.loss_params)},
                "split": self.lineage_split.to_dict(),
                "samples": {
                    "train": train_keys,
                    "val": val_keys,
                    "train_digest": _keys_digest(train_keys),
                    "val_digest": _keys_digest(val_keys),
                },
                "parent": self.parent,
                "from_scratch": self.scratch,
                "start": self.start_info,
                "freeze_bn": self.freeze_bn,
                "warmup_steps": self.warmup,
                "refining": self.refining and not self.scratch,
                "lr_used": self.lr0,
                "channel_adaptation": self.adaptation,
                "stop_reason": self.stop_reason,
                "epochs_run": len(self.history),
                "steps_run": self.step_count,
                "elapsed_s": round(self.elapsed, 2),
                "history": self.history,
                "device": str(self.device),
                "software": _software_versions(),
            },
            parent=self.parent,
            description=self.description,
        )

    def judge(self, card: ModelCard) -> tuple[bool, str]:
        """Is the new model worth making current? Records the answer in ``card``.

        Both models are scored the same way (:func:`evaluate_model`, whole slices, each at its
        own card's threshold, both at the new card's default scale) on the validation slices. A
        model that finds next to nothing where the slices hold objects (Dice below
        :data:`MIN_USEFUL_DICE`) is never made current; a fine-tuned one is made current only
        when it beats its base there — or, with fewer than :data:`MIN_VAL_IMAGES_FOR_SELECTION`
        validation slices (one or two: a comparison on them is mostly noise, and an empty slice
        ties every model), when it is not clearly worse (by more than :data:`FEW_VAL_MARGIN`
        Dice), with a note saying the comparison was weak. Either way the version is saved, so
        the user can still choose it.
        """
        has_fg = any(s.mask.any() for s in self.val_s)
        new = evaluate_model(LoadedModel(self.model, card, device=self.device), self.val_s)
        base_dice = base_err = None
        if self.base is not None:
            old = self.base_scores()
            base_dice, base_err = old["dice"], old["pixel_error"]
        accepted, reason = True, ""
        if has_fg and new["dice"] < MIN_USEFUL_DICE:
            accepted = False
            reason = (
                f"its validation Dice is {new['dice']:.3f}: it finds next to nothing on the "
                f"{len(self.val_s)} held-out slice(s)"
            )
        elif base_dice is not None and not _beats(new, base_dice, base_err):
            n = len(self.val_s)
            if n < MIN_VAL_IMAGES_FOR_SELECTION and new["dice"] >= base_dice - FEW_VAL_MARGIN:
                reason = (
                    f"compared on only {n} held-out slice(s) it is not clearly better or worse "
                    f"(Dice {new['dice']:.3f} vs {base_dice:.3f}), so it is used; review more "
                    "slices for a firmer comparison"
                )
            else:
                accepted = False
                reason = (
                    f"it does not beat its base on the {n} held-out slice(s) "
                    f"(Dice {new['dice']:.3f} vs {base_dice:.3f})"
                )
        card.metrics["val"]["compared"] = {
            "new_dice": new["dice"],
            "base_dice": base_dice,
            "new_pixel_error": new["pixel_error"],
            "base_pixel_error": base_err,
            "protocol": "evaluate_model: whole slices, each model at its own card threshold, "
            "both at the new card's default diameter",
            "diameter": self.default_diameter,
        }
        card.training["accepted"] = {"current": accepted, "reason": reason}
        return accepted, reason

    def save(self, card: ModelCard) -> TrainResult:
        """The only write: a new registry version or ``output_dir``, atomically."""
        self.model.to("cpu")
        if _is_cancelled(self.cancel):  # stopped after the last event: still nothing written
            raise CancelledError(
                "Training was stopped", "nothing was saved; the current model is unchanged"
            )
        path: Path | None = None
        version_id: str | None = None
        dtype = self.config.weights_dtype
        accepted = bool(card.training.get("accepted", {}).get("current", True))
        reason = str(card.training.get("accepted", {}).get("reason", ""))
        current, verdict = False, ""
        if self.registry is not None:
            current = self.make_current and (accepted or not self.config.require_improvement)
            version_id = self.registry.save_version(
                self.model, card, dtype=dtype, make_current=current
            )
            path = self.registry.path_of(version_id)
            if self.make_current and not accepted and not current:
                verdict = (
                    f"{version_id} was saved but not made current: {reason}. "
                    "The current model is unchanged; choose the new version yourself to use it."
                )
            elif not accepted:
                verdict = f"warning: {version_id} was made current although {reason}"
            elif reason:
                verdict = f"{version_id} is current: {reason}"
        elif self.output_dir is not None:
            path = save_model(self.output_dir, self.model, card, dtype=dtype)
            if not accepted:
                verdict = f"warning: {reason}"
        if path is not None:  # the saved card: its version id and weights hash filled in
            card = read_card(path)
        return TrainResult(
            self.model, card, path, version_id, self.history, self.stop_reason, self.best_epoch,
            current, verdict,
        )  # fmt: skip

    def snapshot(self) -> Snapshot:
        """What the run would return if its time ran out now — the current weights validated
        and kept if they beat the best epoch (else the best), the threshold chosen as at the
        end — on a copy; the running training is not touched."""
        model = copy.deepcopy(self.model)
        val = drain(self.iter_validate(model))
        note = "current weights"
        if self.few_val:
            note = "current weights, 0.5 (tiny validation split)"
        elif self.best_state is not None and not self._improves(val.dice05):
            model.load_state_dict(self.best_state)
            val, note = self.best_val or val, f"best validated epoch {self.best_epoch}"
        thr = self.choose_threshold(val)[0]
        return Snapshot(model.eval(), thr, note, self.in_c, self.prep, self.norm)

    # ---- the generator

    def _progress(self, epoch: int, loss: float, validated: int, **kw: Any) -> TrainProgress:
        return TrainProgress(
            epoch=epoch,
            step=self.step_count,
            total_steps=self.total,
            loss=loss,
            lr=self.lr,
            elapsed_s=self.elapsed,
            eta_s=self.eta(validated),
            **kw,
        )

    def events(self) -> Generator[TrainProgress, None, TrainResult]:
        """The run: progress events out, the saved :class:`TrainResult` returned."""
        self.check_inputs()
        prev_threads = torch.get_num_threads()
        if self.config.num_threads:
            torch.set_num_threads(int(self.config.num_threads))
        try:
            return (yield from self._events())
        finally:
            if self.config.num_threads:
                torch.set_num_threads(prev_threads)

    def _events(self) -> Generator[TrainProgress, None, TrainResult]:
        config = self.config
        self.setup()
        if self.base is not None and config.start != "scratch":
            yield self._progress(0, 0.0, 0, message="scoring the base model", kind="validate")
            self.decide_refining()
        if self.base is not None and config.start == "auto":
            yield from self.choose_start()
        for epoch in range(1, config.epochs + 1):
            losses: list[float] = []
            out_of_time = False
            for _ in range(config.steps_per_epoch):
                self.check_cancel()
                losses.append(self.step())
                yield self._progress(epoch, losses[-1], epoch - 1)
                if self.out_of_time():
                    out_of_time = True
                    break
            mean_loss = float(np.mean(losses))
            tv = time.perf_counter()
            gen = self.iter_validate()
            while True:
                try:
                    i = next(gen)
                except StopIteration as stop:
                    val = stop.value
                    break
                if _is_cancelled(self.cancel):
                    gen.close()
                    self.check_cancel()
                yield self._progress(
                    epoch,
                    mean_loss,
                    epoch - 1,
                    message=f"validating {i + 1}/{len(self.val_p)}",
                    kind="validate",
                )
            self._val_time += time.perf_counter() - tv
            self.end_epoch(epoch, losses, val)
            yield self._progress(
                epoch,
                mean_loss,
                epoch,
                val_loss=val.loss,
                val_dice=val.dice05,
                message=f"epoch {epoch}: val Dice {val.dice05:.4f} (best {self.best_dice:.4f})",
                kind="epoch",
            )
            if out_of_time:
                self.stop_reason = "time_budget"
                break
            if self.should_stop_early():
                self.stop_reason = "early_stopping"
                break
        self.finish()
        card = self.build_card()
        self.check_cancel()
        yield self._progress(
            len(self.history), 0.0, len(self.history), message="comparing with the base model"
            if self.base is not None else "checking the model", kind="validate",
        )  # fmt: skip
        self.judge(card)
        return self.save(card)


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
    not in it weigh 1), e.g. to balance sources of different sizes. The steps are those of
    :class:`TrainRun` (build one to reach them, e.g. for :meth:`TrainRun.snapshot`).
    """
    run = TrainRun(
        config, samples, val_samples, base, name, registry, output_dir, cancel, description,
        make_current, sample_weights,
    )  # fmt: skip
    return (yield from run.events())


def train(
    config: TrainConfig,
    samples: Sequence[Sample],
    callback: Callable[[TrainProgress], Any] | None = None,
    **kwargs: Any,
) -> TrainResult:
    """Run :func:`iter_train` to the end (``callback`` gets every event); return its result."""
    return drain(iter_train(config, samples, **kwargs), callback)


def model_probs(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    policy: str | None = None,
    diameter: float | str | None = None,
) -> list[np.ndarray]:
    """Whole-image float16 probabilities of ``loaded`` on each sample, normalised as prediction
    normalises (the card's channel policy and normalisation), at each mask's shape.

    ``policy`` overrides the card's channel policy (e.g. ``"luminance"`` for RGB images on a
    grey model). ``diameter`` as prediction takes it (:func:`.inference.effective_diameter`):
    ``None`` is the card's ``default_diameter`` — each model scored the way a user's prediction
    runs it —, ``"none"`` the image's own scale, ``"auto"`` measured per image as prediction
    measures it, a number (px) or ``"mask"`` (each image's true median object diameter, an
    oracle) rescales the image by ``card.diameter / diameter`` for the U-Net and the
    probabilities back.
    """
    from .inference import auto_scale_of, effective_diameter
    from .normalize import convert_channels
    from .scale import median_diameter, resize_image, resized_shape, zoom_factor

    pol = _prep_policy(policy or loaded.card.channel_policy)
    eff = "mask" if diameter == "mask" else effective_diameter(loaded, diameter)
    model = loaded.model.eval()
    probs = []
    with torch.no_grad():
        for s in samples:
            img = prepare_image(s.image, loaded.card.in_channels, loaded.card.norm, pol)
            if eff in ("auto", AUTO_PER_SLICE):  # one image: measured on its own either way
                raw = s.image
                if policy is not None:  # measured on what the model is fed
                    c = convert_channels(s.image, loaded.card.in_channels, pol, rgb=s.rgb)
                    raw = c[0] if c.shape[0] == 1 else np.moveaxis(c, 0, -1)
                f = auto_scale_of(loaded, raw).zoom
            else:
                d = median_diameter(s.mask) if eff == "mask" else eff
                f = zoom_factor(loaded.card.diameter, d)
            shape = s.mask.shape
            if f != 1.0:
                img = resize_image(img, resized_shape(shape, f))
            probs.append(predict_whole(model, img, loaded.device, out_shape=shape)[1])
    return probs


def evaluate_model(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    threshold: float | None = None,
    policy: str | None = None,
    diameter: float | str | None = None,
) -> dict[str, float]:
    """Pooled pixel Dice/IoU/precision/recall of a model on samples, normalised like prediction
    (whole images, float16 probabilities, ``p >= threshold``; :func:`model_probs`), scored at
    the original size. ``threshold`` defaults to the card's; ``policy`` and ``diameter`` as in
    :func:`model_probs`.
    """
    thr = loaded.card.threshold if threshold is None else float(threshold)
    probs = model_probs(loaded, samples, policy, diameter)
    m = pooled_pixel_metrics(probs, [s.mask for s in samples], thr)
    return {
        "dice": m["dice"],
        "iou": m["iou"],
        "precision": m["precision"],
        "recall": m["recall"],
        "pixel_error": m["pixel_error"],
        "threshold": thr,
        "n_images": len(samples),
    }
