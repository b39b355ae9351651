"""Training samples, the fixed train/validation split, patch sampling and augmentation.

A *sample* is one annotated 2D image: ``(image (Y,X) or (Y,X,C), mask uint8 {0,1}, key)``.
``key`` is a content fingerprint (sha256 of the image and mask bytes, shapes and dtypes), so the
same picture gets the same key wherever it lives and whatever it is called.

The split is fixed for a model lineage: a key goes to validation when
``sha256(salt + key)`` read as a fraction is below ``val_fraction`` — the answer never changes
between rounds — and keys that a parent model already placed keep their side.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import io as bio
from .errors import InputError
from .normalize import Normalization, prepare_image
from .scale import median_diameter, resize_image, resize_mask, resized_shape

#: training never rescales an image by more than this factor either way (to reach the diameter)
MAX_TRAIN_ZOOM = 4.0

#: salt of a lineage that has no parent to inherit one from
DEFAULT_SALT = "napari-bulbseg"


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True, eq=False)
class Sample:
    """One annotated image; ``key`` fingerprints its content, ``source`` says where it came from."""

    image: np.ndarray
    mask: np.ndarray
    key: str
    source: str = ""
    #: whether the channel axis is colour (``io.Stack.rgb``); ``None``: unknown, 3/4 channels
    #: count as RGB(A) — the same rule as prediction (``normalize.convert_channels``)
    rgb: bool | None = None

    @property
    def channels(self) -> int:
        """Image channels as the model sees them (RGBA counts as 3; 4 non-colour channels, 4)."""
        if self.image.ndim == 2:
            return 1
        c = int(self.image.shape[-1])
        return 3 if c == 4 and self.rgb is not False else c


def fingerprint(image: np.ndarray, mask: np.ndarray) -> str:
    """sha256 over the image's and mask's shape, dtype and bytes (hex)."""
    h = hashlib.sha256()
    for arr in (np.ascontiguousarray(image), np.ascontiguousarray(mask)):
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def make_sample(image: Any, mask: Any, source: str = "", rgb: bool | None = None) -> Sample:
    """Validate one image/mask pair and fingerprint it; ``rgb`` as in :class:`Sample`."""
    img = np.asarray(image)
    if img.ndim not in (2, 3):
        raise InputError(
            f"Training image {source or ''} has shape {img.shape}",
            "give a 2D image (Y, X) or (Y, X, C)",
        )
    m = bio.to_binary_mask(mask, f"The mask of {source or 'a training image'}")
    if m.shape != img.shape[:2]:
        raise InputError(
            f"Mask shape {m.shape} does not match image shape {img.shape[:2]}"
            + (f" ({source})" if source else ""),
            "each mask must have the same height and width as its image",
        )
    return Sample(image=img, mask=m, key=fingerprint(img, m), source=source, rgb=rgb)


def samples_from_folders(
    images_dir: str | os.PathLike, masks_dir: str | os.PathLike | None = None
) -> list[Sample]:
    """Every image/mask pair of a dataset (matched by file stem, see ``io.list_pairs``).

    ``masks_dir=None``: ``images_dir`` holds ``images/`` and ``masks/``. The keys depend on the
    pixels only, not on file names or locations.
    """
    pairs = bio.list_pairs(images_dir, masks_dir)
    if not pairs:
        raise InputError(
            f"No image/mask pairs found in {images_dir}",
            "put images in images/ and masks with the same file names in masks/",
        )
    samples = []
    for ip, mp in pairs:
        img, rgb = bio.read_image_rgb(ip)
        samples.append(make_sample(img, bio.read_mask(mp), source=Path(ip).name, rgb=rgb))
    return samples


def samples_from_slices(
    image_stack: Any, mask_stack: Any, indices: Iterable[int] | None = None
) -> list[Sample]:
    """Samples from slices of a stack ``(Z,Y,X)`` / ``(Z,Y,X,C)`` and its mask ``(Z,Y,X)``.

    ``indices`` are the slices a user corrected (default: all). Each slice is copied, so later
    edits of the stack do not change a sample.
    """
    stack = image_stack.data if hasattr(image_stack, "plane") else image_stack
    masks = np.asarray(mask_stack)
    if masks.ndim == 2:
        masks = masks[None]
    n = masks.shape[0]
    n_img = image_stack.n_slices if hasattr(image_stack, "n_slices") else len(stack)
    if n_img != n:
        raise InputError(
            f"The image stack has {n_img} slices but the mask stack {n}",
            "use the mask layer painted on this image",
        )
    rgb = bool(image_stack.rgb) if hasattr(image_stack, "rgb") else None
    idx = list(range(n)) if indices is None else [int(i) for i in indices]
    if not idx:
        raise InputError("No slices selected for training", "paint or pick at least one slice")
    out = []
    for i in idx:
        if not 0 <= i < n:
            raise InputError(f"Slice {i} is outside the stack (0..{n - 1})", "pick existing slices")
        plane = image_stack.plane(i) if hasattr(image_stack, "plane") else np.asarray(stack[i])
        out.append((i, plane, masks[i]))
    return samples_from_planes(out, rgb)


def samples_from_planes(
    planes: Iterable[tuple[int, Any, Any]], rgb: bool | None = None
) -> list[Sample]:
    """Samples from ``(slice index, image plane, mask plane)`` triples, each copied — e.g. the
    reviewed slices a widget snapshotted on the GUI thread, turned into samples in a worker;
    ``rgb`` as in :class:`Sample`."""
    return [make_sample(np.array(img), np.array(m), f"slice {i}", rgb=rgb) for i, img, m in planes]


# --------------------------------------------------------------------------- the fixed split


def _hash_fraction(key: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass
class Split:
    """Which keys train and which validate, with the salt that placed new keys."""

    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    salt: str = DEFAULT_SALT
    val_fraction: float = 0.2
    #: "hash" (placed by hashing, parent's keys kept) or "explicit" (a given validation set)
    method: str = "hash"

    def to_dict(self) -> dict[str, Any]:
        return {
            "train": list(self.train),
            "val": list(self.val),
            "salt": self.salt,
            "val_fraction": self.val_fraction,
            "method": self.method,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Split | None:
        if not isinstance(d, dict):
            return None
        return cls(
            train=[str(k) for k in d.get("train", [])],
            val=[str(k) for k in d.get("val", [])],
            salt=str(d.get("salt", DEFAULT_SALT)),
            val_fraction=float(d.get("val_fraction", 0.2)),
            method=str(d.get("method", "hash")),
        )


def _dedupe(samples: Sequence[Sample]) -> list[Sample]:
    seen: set[str] = set()
    out = []
    for s in samples:
        if s.key not in seen:
            seen.add(s.key)
            out.append(s)
    return out


def split_train_val(
    samples: Sequence[Sample],
    val_fraction: float = 0.2,
    salt: str = DEFAULT_SALT,
    parent: Split | None = None,
    val_samples: Sequence[Sample] | None = None,
) -> tuple[list[Sample], list[Sample], Split]:
    """Split samples into (train, val, split record), stably across rounds.

    Keys the ``parent`` split already placed keep their side, and the parent's salt is reused;
    new keys go to validation when their salted hash fraction is below ``val_fraction``. With
    two or more samples at least one validates and at least one trains (the key with the lowest
    hash fraction among the new keys — or all keys if none is new — moves). ``val_samples``
    (an explicit validation set) overrides all this. Identical samples count once.
    """
    samples = _dedupe(samples)
    if val_samples is not None:
        val = _dedupe(val_samples)
        vkeys = {s.key for s in val}
        train = [s for s in samples if s.key not in vkeys]
        if not train or not val:
            raise InputError(
                "Training needs at least one training and one validation image",
                "add annotated images",
            )
        split = Split([s.key for s in train], [s.key for s in val], salt, val_fraction, "explicit")
        return train, val, split
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction={val_fraction} is outside [0, 1)", "use e.g. 0.2")
    if parent is not None:
        salt = parent.salt
    p_train = set(parent.train) if parent else set()
    p_val = set(parent.val) if parent else set()
    side: dict[str, bool] = {}  # key -> is validation
    for s in samples:
        if s.key in p_val:
            side[s.key] = True
        elif s.key in p_train:
            side[s.key] = False
        else:
            side[s.key] = _hash_fraction(s.key, salt) < val_fraction
    if len(samples) >= 2:
        new = [s.key for s in samples if s.key not in p_val and s.key not in p_train]
        for want_val in (True, False):
            if not any(v == want_val for v in side.values()):
                pool = [k for k in new if side[k] != want_val] or [
                    k for k in side if side[k] != want_val
                ]
                # lowest fraction moves to val, highest to train: the nearest to the boundary
                pick = (min if want_val else max)(pool, key=lambda k: _hash_fraction(k, salt))
                side[pick] = want_val
    train = [s for s in samples if not side[s.key]]
    val = [s for s in samples if side[s.key]]
    split = Split([s.key for s in train], [s.key for s in val], salt, val_fraction, "hash")
    return train, val, split


# --------------------------------------------------------------------------- patches


def center_crop(
    array: np.ndarray, size: int | tuple[int, int] | None, channels_first: bool = False
) -> np.ndarray:
    """The central ``size`` (square, or ``(h, w)``) of an image over its Y, X axes.

    Sides shorter than ``size`` are kept whole. ``channels_first``: the array is ``(C, Y, X)``.
    """
    return _crop_yx(array, size, channels_first)


def _crop_yx(
    array: np.ndarray, size: int | tuple[int, int] | None, channels_first: bool
) -> np.ndarray:
    if size is None:
        return array
    h, w = (int(size), int(size)) if isinstance(size, int | np.integer) else map(int, size)
    ya, xa = (1, 2) if channels_first else (0, 1)
    ys, xs = array.shape[ya], array.shape[xa]
    y0, x0 = max(0, (ys - h) // 2), max(0, (xs - w) // 2)
    sl = [slice(None)] * array.ndim
    sl[ya], sl[xa] = slice(y0, y0 + min(h, ys)), slice(x0, x0 + min(w, xs))
    return array[tuple(sl)]


@dataclass
class Prepared:
    """A sample ready for training: normalised ``(C,Y,X)`` image, mask, foreground coordinates."""

    image: np.ndarray
    mask: np.ndarray
    key: str
    fg: np.ndarray  # (n, 2) int32 foreground coordinates


def prepare_sample(
    sample: Sample,
    in_channels: int,
    norm: Normalization,
    policy: str = "native",
    crop: int | tuple[int, int] | None = None,
    diameter: float | None = None,
) -> Prepared:
    """Normalise the whole image exactly as prediction does, then (optionally) centre-crop.

    ``diameter``: rescale image and mask so that the mask's median object (equivalent diameter
    of its connected components) is ``diameter`` px; images without objects keep their scale,
    and the factor is limited to ``1/MAX_TRAIN_ZOOM``..``MAX_TRAIN_ZOOM``. The channels are
    read with the sample's ``rgb`` flag, as prediction reads the stack's.
    """
    img = prepare_image(sample.image, in_channels, norm, policy, rgb=sample.rgb)
    m = sample.mask
    if diameter is not None:
        d = median_diameter(m)
        if d is not None:
            f = float(np.clip(diameter / d, 1.0 / MAX_TRAIN_ZOOM, MAX_TRAIN_ZOOM))
            shape = resized_shape(m.shape, f)
            if shape != m.shape:
                img, m = resize_image(img, shape), resize_mask(m, shape)
    img = _crop_yx(img, crop, channels_first=True)
    m = _crop_yx(m, crop, channels_first=False)
    fg = np.argwhere(m > 0).astype(np.int32)
    return Prepared(np.ascontiguousarray(img), np.ascontiguousarray(m), sample.key, fg)


@dataclass(frozen=True)
class Augment:
    """Random flips, 90° rotations and mild intensity changes on normalised patches."""

    flips: bool = True
    rotations: bool = True
    scale: float = 0.1  # intensity × U(1 - scale, 1 + scale)
    gamma: float = 0.2  # exponent U(1 - gamma, 1 + gamma) on the positive part
    noise: float = 0.03  # gaussian noise sigma ≤ this (in normalised units)
    p_intensity: float = 0.5  # probability of each intensity change

    def __call__(
        self, img: np.ndarray, mask: np.ndarray, valid: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.flips:
            if rng.random() < 0.5:
                img, mask, valid = img[..., ::-1], mask[..., ::-1], valid[..., ::-1]
            if rng.random() < 0.5:
                img, mask, valid = img[..., ::-1, :], mask[..., ::-1, :], valid[..., ::-1, :]
        if self.rotations and img.shape[-1] == img.shape[-2]:
            k = int(rng.integers(4))
            if k:
                img = np.rot90(img, k, axes=(-2, -1))
                mask = np.rot90(mask, k, axes=(-2, -1))
                valid = np.rot90(valid, k, axes=(-2, -1))
        img = np.array(img, dtype=np.float32)  # contiguous copy, safe to modify
        if self.scale > 0 and rng.random() < self.p_intensity:
            img *= np.float32(rng.uniform(1 - self.scale, 1 + self.scale))
        if self.gamma > 0 and rng.random() < self.p_intensity:
            g = np.float32(rng.uniform(1 - self.gamma, 1 + self.gamma))
            pos = img > 0
            img[pos] = img[pos] ** g
        if self.noise > 0 and rng.random() < self.p_intensity:
            sigma = rng.uniform(0, self.noise)
            img += rng.normal(0, sigma, size=img.shape).astype(np.float32)
        return img, np.ascontiguousarray(mask), np.ascontiguousarray(valid)


class PatchSampler:
    """Draws training patches from prepared samples, deterministically given ``rng``.

    A ``foreground_fraction`` of patches is centred on a random foreground pixel (of an image
    that has any), the rest anywhere. Images smaller than the patch are reflect-padded; the
    padding is background in the mask and 0 in the ``valid`` map, so losses can ignore it.
    """

    def __init__(
        self,
        prepared: Sequence[Prepared],
        patch_size: int,
        foreground_fraction: float = 0.5,
        augment: Augment | None = None,
        scale_range: tuple[float, float] | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        if not prepared:
            raise InputError("No training images", "annotate at least one image")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise InputError(
                f"foreground_fraction={foreground_fraction} is outside [0, 1]", "use e.g. 0.5"
            )
        self.patch = int(patch_size)
        self.fg_fraction = float(foreground_fraction)
        self.augment = augment
        self.scale_range = None
        if scale_range is not None:
            lo, hi = (float(v) for v in scale_range)
            if not (0.1 <= lo <= hi <= 10.0):
                raise InputError(
                    f"Invalid scale augmentation range {scale_range!r}",
                    "give (low, high) zoom factors with 0.1 <= low <= high <= 10, e.g. (0.7, 1.4)",
                )
            self.scale_range = (lo, hi) if (lo, hi) != (1.0, 1.0) else None
        #: the largest crop a patch is cut from (zoom < 1 reads a larger region)
        self.crop = self.patch
        if self.scale_range is not None:
            self.crop = int(np.ceil(self.patch / self.scale_range[0]))
        self.p = None
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (len(prepared),) or not np.all(np.isfinite(w)) or (w < 0).any():
                raise InputError("Sample weights must be one finite weight >= 0 per image", "")
            if w.sum() <= 0:
                raise InputError("Sample weights are all zero", "give some image a weight > 0")
            self.p = w / w.sum()
        self.items = [self._pad(p) for p in prepared]
        self.with_fg = [i for i, p in enumerate(self.items) if len(p[3])]

    def _pad(self, p: Prepared) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        _, h, w = p.image.shape
        ph, pw = max(0, self.crop - h), max(0, self.crop - w)
        valid = np.ones((h, w), dtype=np.float32)
        if not (ph or pw):
            return p.image, p.mask, valid, p.fg
        top, left = ph // 2, pw // 2
        pads = ((top, ph - top), (left, pw - left))
        img = np.pad(p.image, ((0, 0), *pads), mode="reflect" if min(h, w) > 1 else "edge")
        mask = np.pad(p.mask, pads, mode="constant")
        valid = np.pad(valid, pads, mode="constant")
        fg = p.fg + np.array([top, left], dtype=np.int32)
        return img, mask, valid, fg

    def patch_at(
        self, index: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        img, mask, valid, fg = self.items[index]
        _, h, w = img.shape
        s = self.patch
        if self.scale_range is not None:
            lo, hi = self.scale_range
            zoom = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            s = int(np.clip(round(self.patch / zoom), 1, min(h, w)))
        if len(fg) and rng.random() < self.fg_fraction:
            cy, cx = fg[int(rng.integers(len(fg)))]
            y0 = int(np.clip(cy - s // 2, 0, h - s))
            x0 = int(np.clip(cx - s // 2, 0, w - s))
        else:
            y0 = int(rng.integers(h - s + 1))
            x0 = int(rng.integers(w - s + 1))
        sl = (slice(y0, y0 + s), slice(x0, x0 + s))
        out = img[(slice(None), *sl)], mask[sl][None], valid[sl][None]
        if s != self.patch:  # scale augmentation: the region is resized to the patch
            size = (self.patch, self.patch)
            out = (
                resize_image(out[0], size),
                resize_mask(out[1][0], size)[None],
                (resize_image(out[2][0], size) >= 0.5).astype(np.float32)[None],
            )
        if self.augment is not None:
            return self.augment(*out, rng)
        return np.array(out[0]), np.array(out[1]), np.array(out[2])

    def batch(
        self, batch_size: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(images (N,C,s,s) float32, masks (N,1,s,s) float32, valid (N,1,s,s) float32)``."""
        imgs, masks, valids = [], [], []
        for _ in range(batch_size):
            if self.p is None:
                i = int(rng.integers(len(self.items)))
            else:
                i = int(rng.choice(len(self.items), p=self.p))
            img, m, v = self.patch_at(i, rng)
            imgs.append(img)
            masks.append(m)
            valids.append(v)
        return (
            np.stack(imgs).astype(np.float32),
            np.stack(masks).astype(np.float32),
            np.stack(valids).astype(np.float32),
        )
