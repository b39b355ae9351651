"""The napari widgets of napari-bulbseg (the only package that imports Qt, magicgui, napari.qt)."""

from ._finetune import FinetuneWidget
from ._review import ReviewWidget
from ._segment import SegmentWidget
from ._threshold import ThresholdWidget

__all__ = ["FinetuneWidget", "ReviewWidget", "SegmentWidget", "ThresholdWidget"]
