"""napari-bulbseg: human-in-the-loop U-Net segmentation of microscopy stacks."""

__version__ = "0.1.0"
