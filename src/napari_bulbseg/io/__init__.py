"""Stacks in and out: TIFF (ImageJ, OME, plain), PNG/JPEG, folders of slices, image–mask pairs.

Everything read becomes a :class:`Stack` in the canonical layout ``(Z, Y, X)`` or
``(Z, Y, X, C)``. The rules, decided from the file's axes metadata (tifffile's
``series[0].axes``), never from the array's shape:

Axes
    ``Y`` and ``X`` are the image plane. ``S`` (TIFF samples per pixel) and ``C`` (channels)
    become the last axis, ``C`` before ``S`` when both exist. Every other axis (``T``, ``Z`` and
    tifffile's other named axes) is a *slice* axis; several are flattened in file order into the
    one slice axis, so for ``TZ`` slice ``t * nZ + z`` (``Stack.source_axes`` keeps the file's
    axes). ``Q`` (unknown) and ``I`` (a plain sequence of pages) are ambiguous: when it is the only
    slice axis it is taken as slices (and ``Stack.notes`` says so); ambiguous axes together with
    any other slice axis raise :class:`~napari_bulbseg.errors.InputError`, asking for a file saved
    with axes metadata, rather than guess.
Colour
    ``rgb`` is true when the channel axis is the TIFF's samples (``S``) with 3 or 4 samples and an
    RGB / YCbCr photometric interpretation, or for a PNG/JPEG with 3 or 4 channels. A ``C``
    channel axis (fluorescence channels in ImageJ / OME files) is never colour. PNG/JPEG alpha that
    is fully opaque is dropped (RGBA → RGB, grey+alpha → grey); TIFF alpha is kept.
Pixel size
    From OME ``PhysicalSizeX/Y/Z`` (+ units), else ImageJ resolution tags + ``unit`` + ``spacing``,
    else this module's own JSON metadata, else resolution tags in cm/mm/µm (inch resolutions are
    screen DPI, not a microscope calibration, and are ignored). PNG/JPEG carry none.
Laziness
    ``lazy=None`` reads lazily when the uncompressed stack is larger than
    ``min(LAZY_MAX_BYTES, available memory / 4)``. A lazy stack's ``data`` is a
    :class:`LazyStack` that reads only the planes asked for: memory-mapped when the TIFF data is
    uncompressed and contiguous, else page by page through tifffile. The readers look the limit
    up in :mod:`.memory` (set ``napari_bulbseg.io.memory.LAZY_MAX_BYTES`` to change it).
Writing
    :func:`write_tiff` and :func:`write_mask` are atomic (temporary file in the same folder,
    fsync, ``os.replace``); a failed write leaves an existing file untouched.

Modules
    :mod:`.stack` (``Stack``, ``LazyStack``), :mod:`.reading` (``read_stack``: files and folders
    of slices), :mod:`.tiff_read`, :mod:`.tiff_layout` (axes), :mod:`.tiff_meta` (pixel size),
    :mod:`.raster` (PNG/JPEG/BMP), :mod:`.checks` (what a readable file is), :mod:`.memory`
    (when to be lazy), :mod:`.masks` (what a mask may hold), :mod:`.pairs` (file-name rules,
    image–mask folders), :mod:`.writing`. Import from ``napari_bulbseg.io``; the modules are
    how it is built, not its API.
"""

from __future__ import annotations

# The public API is __all__. Also re-exported, for the package's own modules and tests: the
# file-name rules the reader, CLI and output folder use (MASK_*, PRED_*, PROB_SUFFIX,
# mask_partner_*, slice_files), read_image_rgb (data.py), LAZY_MEMORY_FRACTION and InputError.
# ruff: noqa: F401
from ..errors import InputError
from .masks import mask_foreground, read_mask, to_binary_mask
from .memory import LAZY_MAX_BYTES, LAZY_MEMORY_FRACTION
from .pairs import (
    IMAGE_SUFFIXES,
    MASK_FOLDERS,
    MASK_SUFFIXES,
    PRED_MASK_SUFFIX,
    PRED_SUFFIXES,
    PROB_SUFFIX,
    file_stem,
    image_files,
    image_stem_of_mask,
    is_mask_name,
    list_pairs,
    mask_partner_candidates,
    mask_partner_folders,
    pair_masks,
    prediction_names,
    prob_files,
    slice_files,
)
from .reading import read_image, read_image_rgb, read_stack
from .stack import LazyStack, Stack
from .writing import write_mask, write_tiff

__all__ = [
    "IMAGE_SUFFIXES",
    "LAZY_MAX_BYTES",
    "LazyStack",
    "Stack",
    "file_stem",
    "image_files",
    "image_stem_of_mask",
    "is_mask_name",
    "list_pairs",
    "mask_foreground",
    "pair_masks",
    "prediction_names",
    "prob_files",
    "read_image",
    "read_mask",
    "read_stack",
    "to_binary_mask",
    "write_mask",
    "write_tiff",
]
