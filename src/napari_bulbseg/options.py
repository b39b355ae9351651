"""Prediction defaults and option names, written once and importable without torch (the
widgets read them).

The values are measured (docs/benchmarks.md): the U-Net's receptive field reaches ~46 px, so
tiles overlapping by 96 px with 48 px trimmed from interior edges give the whole-image result to
float rounding; large tiles keep the redundant work (about ``overlap / tile`` per axis) small.
"""

from __future__ import annotations

#: largest tile side in pixels
DEFAULT_TILE = 1280
#: pixels shared by neighbouring tiles
DEFAULT_OVERLAP = 96
#: tiles per forward pass
DEFAULT_BATCH_SIZE = 4

#: the training losses ``losses.make_loss`` builds (the command line's ``--loss`` lists them)
LOSS_NAMES = ("bce", "focal", "dice", "focal+dice", "bce+dice")
#: where a fine-tune starts: ``"base"`` (the base model's weights), ``"scratch"`` (new weights,
#: the base's architecture, normalisation and scale) or ``"auto"`` (``TrainRun.choose_start``)
START_MODES = ("auto", "base", "scratch")
