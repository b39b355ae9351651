"""File-name rules, once: which files are images, which are masks and whose, what ``bulbseg
predict`` writes, and how image and mask folders pair up."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError

#: file suffixes taken as images in folders of slices and image/mask folders
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
#: name endings of a ground-truth mask kept beside its image (``stack.tif`` + ``stack_mask.tif``)
MASK_SUFFIXES = ("_mask", "_masks", "-mask", "_gt", "_labels")
#: folders holding ground-truth masks, beside an image or beside its ``images/`` folder
MASK_FOLDERS = ("masks", "labels")
#: what ``bulbseg predict`` writes for image ``<stem>``: ``<stem>_prob.tif``, ``<stem>_mask.tif``
PROB_SUFFIX = "_prob"
PRED_MASK_SUFFIX = "_mask"
#: name endings of a predicted mask (ours, or another tool's) after the image's stem
PRED_SUFFIXES = ("_mask", "_pred", "_prediction")


def _natural_key(s: str) -> tuple:
    parts = re.split(r"(\d+)", s.lower())
    return (tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), s)


def file_stem(p: Path) -> str:
    """A file's name without its extension; ``x.ome.tif`` gives ``x``."""
    name = p.name
    low = name.lower()
    for suf in (".ome.tiff", ".ome.tif"):
        if low.endswith(suf):
            return name[: -len(suf)]
    return p.stem


def is_mask_name(path: str | os.PathLike) -> bool:
    """True for files named like a ground-truth mask (``*_mask.tif``, see ``MASK_SUFFIXES``)
    or kept in a mask folder (``masks/``, ``labels/``)."""
    path = Path(path)
    stem = file_stem(path).lower()
    return stem.endswith(MASK_SUFFIXES) or path.parent.name.lower() in MASK_FOLDERS


def image_stem_of_mask(path: str | os.PathLike) -> str:
    """The stem of the image a mask file belongs to: its stem without one ground-truth
    (``MASK_SUFFIXES``) or prediction (``PRED_SUFFIXES``) ending — ``x_gt.tif`` and
    ``x_mask.tif`` both give ``x``; a name without such an ending is kept."""
    stem = file_stem(Path(path))
    for suf in sorted(set(MASK_SUFFIXES) | set(PRED_SUFFIXES), key=len, reverse=True):
        if stem.lower().endswith(suf) and len(stem) > len(suf):
            return stem[: -len(suf)]
    return stem


def pair_masks(
    preds: Sequence[Path], truths: Sequence[Path]
) -> tuple[list[tuple[str, Path, Path]], list[Path]]:
    """Pair predicted masks with ground-truth masks by name: ``(name, truth, pred)`` triples in
    natural order, and the truths without a prediction.

    Exact stems match first; then the stems without a mask ending (:func:`image_stem_of_mask`),
    so ``x_mask.tif`` (predicted) pairs with ``x.tif``, ``x_gt.tif`` or ``x_mask.tif`` (truth).
    """
    by_key: dict[str, Path] = {}
    for p in preds:
        by_key.setdefault(file_stem(p), p)
    for p in preds:
        by_key.setdefault(image_stem_of_mask(p), p)
    pairs, missing = [], []
    for t in truths:
        keys = (file_stem(t), image_stem_of_mask(t))
        match = next((by_key[k] for k in keys if k in by_key), None)
        if match is None:
            missing.append(t)
        else:
            pairs.append((image_stem_of_mask(t), t, match))
    pairs.sort(key=lambda x: _natural_key(x[0]))
    return pairs, missing


def prediction_names(path: str | os.PathLike, write_prob: bool = True) -> list[str]:
    """The files ``bulbseg predict`` writes for image ``path``: probabilities, then the mask."""
    stem = file_stem(Path(path))
    mask = f"{stem}{PRED_MASK_SUFFIX}.tif"
    return [f"{stem}{PROB_SUFFIX}.tif", mask] if write_prob else [mask]


def prob_files(folder: str | os.PathLike) -> list[Path]:
    """The probability maps ``bulbseg predict`` wrote into ``folder`` (``*_prob.tif``)."""
    return sorted(Path(folder).glob(f"*{PROB_SUFFIX}.tif"), key=lambda p: _natural_key(p.name))


def mask_partner_candidates(
    path: str | os.PathLike, suffixes: Sequence[str] = (".tif", ".tiff")
) -> list[Path]:
    """Where the ground-truth mask of image ``path`` is looked for, in order of preference."""
    path = Path(path)
    stem = file_stem(path)
    found = [path.with_name(stem + s + ext) for s in MASK_SUFFIXES for ext in suffixes]
    for folder in MASK_FOLDERS:
        for base in (path.parent.parent, path.parent):
            found += [base / folder / (stem + ext) for ext in suffixes]
            found += [base / folder / (stem + "_mask" + ext) for ext in suffixes]
    return found


def mask_partner_folders(path: str | os.PathLike) -> list[Path]:
    """The folders :func:`mask_partner_candidates` looks in for image ``path``."""
    return list(dict.fromkeys(c.parent for c in mask_partner_candidates(path)))


def image_files(folder: Path) -> list[Path]:
    """The image files in ``folder`` (hidden files skipped), in natural order (2 before 10)."""
    try:
        entries = list(folder.iterdir())
    except OSError as e:
        raise InputError(f"Cannot list {folder}: {e.strerror or e}", "check the folder") from e
    files = [
        p
        for p in entries
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    return sorted(files, key=lambda p: _natural_key(p.name))


def slice_files(folder: Path) -> list[Path]:
    """The image files of ``folder`` that are slices: the ground-truth masks of its images
    (``stack_mask.png`` beside ``stack.png``) are not, nor are files in its subfolders."""
    files = image_files(folder)
    truths = {c for f in files for c in mask_partner_candidates(f, IMAGE_SUFFIXES) if c != f}
    return [f for f in files if f not in truths]


def list_pairs(
    images_dir: str | os.PathLike, masks_dir: str | os.PathLike | None = None
) -> list[tuple[Path, Path]]:
    """(image, mask) paths matched by file stem (extensions may differ), natural order.

    ``list_pairs(root)`` uses ``root/images`` and ``root/masks``. Unmatched files on either side
    raise InputError listing a few of them.
    """
    if masks_dir is None:
        root = Path(images_dir)
        img_dir, msk_dir = root / "images", root / "masks"
        if not img_dir.is_dir() or not msk_dir.is_dir():
            raise InputError(
                f"{root} has no images/ and masks/ subfolders",
                "pass the images and masks folders explicitly, or arrange the dataset as "
                "root/images and root/masks with matching file names",
            )
    else:
        img_dir, msk_dir = Path(images_dir), Path(masks_dir)
    for d in (img_dir, msk_dir):
        if not d.is_dir():
            raise InputError(f"{d} is not a folder", "check the path")

    def by_stem(folder: Path) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for f in image_files(folder):
            s = file_stem(f)
            if s in out:
                raise InputError(
                    f"{folder} has two files for {s!r}: {out[s].name} and {f.name}",
                    "keep one file per image name",
                )
            out[s] = f
        return out

    images, masks = by_stem(img_dir), by_stem(msk_dir)
    if not images:
        raise InputError(f"{img_dir} contains no images", f"supported: {', '.join(IMAGE_SUFFIXES)}")
    no_mask = sorted(set(images) - set(masks), key=_natural_key)
    no_image = sorted(set(masks) - set(images), key=_natural_key)
    if no_mask or no_image:
        parts = []
        if no_mask:
            parts.append(
                f"{len(no_mask)} image(s) without a mask in {msk_dir}: " + ", ".join(no_mask[:5])
            )
        if no_image:
            parts.append(
                f"{len(no_image)} mask(s) without an image in {img_dir}: " + ", ".join(no_image[:5])
            )
        raise InputError(
            "Images and masks do not pair up — " + "; ".join(parts),
            "each image needs a mask with the same file name (the extension may differ)",
        )
    return [(images[s], masks[s]) for s in sorted(images, key=_natural_key)]
