"""Which slices are most worth correcting: a score per slice from what prediction computed.

Nothing here needs ground truth or another forward pass. Each slice gets

* ``expected_error`` — one minus the Dice the mask would have if the probabilities were
  calibrated: with ``M`` the shown mask and ``p`` the probabilities (those within 0.05 of 0
  or 1 taken as certain), ``(Σ_{M}(1−p) + Σ_{¬M} p) / (|M| + Σ p)``, i.e. expected false
  positives plus false negatives over expected predicted-plus-true area (floored at half the
  stack's typical object area). Shown to the user: "31 % expected error";
* ``error_share`` — the same expected wrong pixels over the *stack's* mean expected area: how
  much of a typical slice's worth of objects is likely wrong here (reported, e.g. to sort the
  CSV by impact on the stack's pooled Dice; not part of the score, which was measured with the
  per-slice ``expected_error``);
* ``extra_objects`` — objects beyond the rule the user set (keep the N largest, or the expected
  maximum count), counted before keep-N removes them: the model saw more than there should be;
* ``specks`` — objects in the shown mask smaller than a fifth of the stack's typical object:
  the false-positive specks a user has to delete by hand;
* ``area_change`` — in a stack, how far the slice's foreground area departs from the mean of its
  neighbours (relative): a bulb that vanishes for one slice is suspect.

``score = expected_error + 0.25·min(extra, 4) + 0.05·min(specks, 10) + 0.5·min(area_change, 1)``;
higher is more worth correcting. :func:`rank` orders by it and, in a stack, defers a slice
whose neighbour is already ahead of it in the list (adjacent slices are near-duplicates: the
second teaches little). ``rank(diverse=True)`` can also pick the head of a list of unrelated
images for its score plus how unlike it is to the images picked before it and those already
reviewed (size, object share, object size and density, read off the prediction); measured on
stained tissue it did worse than the plain ranking (docs/hitl.md), so the Review widget and
``bulbseg rank`` do not use it. The weights are round numbers, not fitted; what ranking by it
buys over random or file order is measured in ``benchmarks/bench_hitl.py`` (docs/hitl.md).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Generator, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write
from .errors import InputError
from .events import drain
from .postprocess import PostProcess, label_objects, label_sizes, postprocess_slice, to_float_prob

#: weights of the score's terms (see the module docstring)
W_EXTRA, W_SPECKS, W_AREA = 0.25, 0.05, 0.5
#: an object smaller than this fraction of the stack's typical (median) object is a speck
SPECK_FRACTION = 0.2
#: probabilities this close to 0 or 1 count as certain in the expected error
CONFIDENT = 0.05
#: the error terms a score can use: "expected_error" (per slice; the default, measured in
#: docs/hitl.md) or "error_share" (over the stack's mean area; benchmarks/bench_hitl.py
#: --score-term compares them)
SCORE_TERMS = ("expected_error", "error_share")
#: the expected-error denominator is at least this many pixels (and half a typical object)
MIN_FLOOR_PX = 64.0
#: weight of the coverage term when ranking unrelated images (:func:`rank` ``diverse``)
W_DIVERSE = 0.5
#: the diversity term orders this many slices at the head of the list (the rest by score)
DIVERSE_HEAD = 64


@dataclass(frozen=True)
class SliceScore:
    """How much one slice is worth correcting, and why."""

    index: int
    score: float
    expected_error: float
    error_share: float
    extra_objects: int
    specks: int
    area_change: float
    foreground: int
    objects: int
    source: str = ""
    #: the slice's size in pixels (for the descriptor that spreads picks over unrelated images)
    pixels: int = 0

    @property
    def reasons(self) -> str:
        """Short words for a user: what makes this slice suspect."""
        out = []
        if self.expected_error >= 0.05:
            out.append(f"uncertain ({self.expected_error:.0%} expected error)")
        if self.extra_objects:
            out.append(f"{self.extra_objects} object(s) more than allowed")
        if self.specks:
            out.append(f"{self.specks} speck(s)")
        if self.area_change >= 0.3:
            out.append(f"area {self.area_change:.0%} off its neighbours")
        return ", ".join(out) or "looks confident"


@dataclass
class _Raw:
    fp: float
    fn: float
    shown: int
    mass: float
    sizes: np.ndarray  # object sizes in the shown mask
    n_before_keep: int
    pixels: int = 0


def _slice_raw(prob2d: Any, spec: PostProcess) -> _Raw:
    p = to_float_prob(np.asarray(prob2d)).astype(np.float32, copy=False)
    shown = postprocess_slice(p, spec).astype(bool)
    # within CONFIDENT of 0 or 1 a pixel counts as certain: a faint haze over a large
    # background must not add up to an error the slice does not have
    p = np.where(p < CONFIDENT, 0.0, np.where(p > 1.0 - CONFIDENT, 1.0, p)).astype(np.float32)
    labels, n = label_objects(shown)
    sizes = label_sizes(labels, shown, n)[1:] if n else np.zeros(0, np.intp)
    n_before = int(sizes.size)
    if spec.keep_largest:  # count what keep-N removed: the rule without its last step
        loose = postprocess_slice(p, PostProcess(**{**spec.to_dict(), "keep_largest": 0}))
        n_before = label_objects(loose)[1]
    fp = float((1.0 - p[shown]).sum(dtype=np.float64))
    mass = float(p.sum(dtype=np.float64))
    fn = mass - float(p[shown].sum(dtype=np.float64))
    return _Raw(fp, max(fn, 0.0), int(shown.sum()), mass, sizes, n_before, int(p.size))


def iter_score_stack(
    prob: Any,
    spec: PostProcess,
    expected_max: int = 0,
    *,
    is_stack: bool = True,
    slices: Iterable[int] | None = None,
    source: str = "",
    term: str = "expected_error",
) -> Generator[int, None, list[SliceScore]]:
    """Score the slices of a ``(Z, Y, X)`` probability stack (a 2D array is one slice) under
    the post-processing ``spec``; yields each slice index as it is done, returns the scores in
    slice order. ``expected_max`` (> 0) is the most objects a slice should hold when keep-N is
    off; ``is_stack=False`` for unrelated images (no neighbour comparison); ``slices`` limits
    the work to those indices (e.g. the slices predicted so far); ``term`` is the error term
    of the score (one of :data:`SCORE_TERMS`)."""
    if term not in SCORE_TERMS:
        raise InputError(f"Unknown score term {term!r}", f"use one of {', '.join(SCORE_TERMS)}")
    if isinstance(expected_max, bool) or not isinstance(expected_max, (int, np.integer)):
        raise InputError(f"expected_max must be a whole number, got {expected_max!r}", "e.g. 2")
    shape = tuple(getattr(prob, "shape", np.shape(prob)))
    if len(shape) == 2:
        prob, shape = np.asarray(prob)[np.newaxis], (1, *shape)
    if len(shape) != 3:
        raise InputError(
            f"Expected a (Z, Y, X) probability stack, got shape {shape}",
            "pass one probability value per pixel and slice",
        )
    todo = sorted(set(range(shape[0]) if slices is None else (int(z) for z in slices)))
    if any(not 0 <= z < shape[0] for z in todo):
        raise InputError(f"Slice indices must be in 0..{shape[0] - 1}", "")
    raw: dict[int, _Raw] = {}
    for z in todo:
        raw[z] = _slice_raw(prob[z], spec)
        yield z
    return _combine(raw, spec, expected_max, is_stack, source, term)


def score_stack(prob: Any, spec: PostProcess, expected_max: int = 0, **kw: Any) -> list[SliceScore]:
    """:func:`iter_score_stack` run to the end."""
    return drain(iter_score_stack(prob, spec, expected_max, **kw))


def _combine(
    raw: dict[int, _Raw],
    spec: PostProcess,
    expected_max: int,
    is_stack: bool,
    source: str,
    term: str,
) -> list[SliceScore]:
    all_sizes = np.concatenate([r.sizes for r in raw.values()] or [np.zeros(0)])
    typical = float(np.median(all_sizes)) if all_sizes.size else 0.0
    floor = max(MIN_FLOOR_PX, 0.5 * typical)
    limit = spec.keep_largest or expected_max
    zs = sorted(raw)
    mean_area = max(float(np.mean([r.shown + r.mass for r in raw.values()] or [0.0])), floor)
    out = []
    for i, z in enumerate(zs):
        r = raw[z]
        err = (r.fp + r.fn) / max(r.shown + r.mass, floor)
        share = (r.fp + r.fn) / mean_area
        extra = max(0, r.n_before_keep - limit) if limit > 0 else 0
        specks = 0
        if all_sizes.size >= 3:
            specks = int(np.count_nonzero(r.sizes < SPECK_FRACTION * typical))
        change = 0.0
        if is_stack:
            nb = [raw[zs[j]].shown for j in (i - 1, i + 1) if 0 <= j < len(zs)
                  and abs(zs[j] - z) == 1]  # fmt: skip
            if nb:
                ref = float(np.mean(nb))
                change = abs(r.shown - ref) / max(r.shown, ref, floor)
        score = (
            (share if term == "error_share" else err)
            + W_EXTRA * min(extra, 4)
            + W_SPECKS * min(specks, 10)
            + W_AREA * min(change, 1.0)
        )
        out.append(
            SliceScore(
                index=z,
                score=round(float(score), 6),
                expected_error=round(float(err), 6),
                error_share=round(float(share), 6),
                extra_objects=int(extra),
                specks=specks,
                area_change=round(float(change), 6),
                foreground=r.shown,
                objects=int(r.sizes.size),
                source=source,
                pixels=r.pixels,
            )
        )
    return out


def _descriptors(scores: Sequence[SliceScore]) -> np.ndarray:
    """What a slice's prediction says about the image, standardised over ``scores``: its size,
    the share of it in objects, their mean size and how many there are per pixel (logs)."""
    x = np.array(
        [
            [
                math.log(max(s.pixels, 1)),
                s.foreground / max(s.pixels, 1),
                math.log1p(s.foreground / max(s.objects, 1)),
                math.log1p(1e4 * s.objects / max(s.pixels, 1)),
            ]
            for s in scores
        ],
        dtype=np.float64,
    ).reshape(len(scores), 4)
    sd = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(sd > 1e-9, sd, 1.0)


def _diverse(ordered: list[SliceScore], taken: list[SliceScore]) -> list[SliceScore]:
    """The head of ``ordered`` re-ordered greedily: each next slice maximises its score plus
    :data:`W_DIVERSE` × how far it is from every slice picked before it or already reviewed
    (``taken``; the distance to the nearest, over the pool's typical distance, at most 1). The
    first pick, with nothing reviewed, is the top score."""
    head, tail = ordered[:DIVERSE_HEAD], ordered[DIVERSE_HEAD:]
    if len(head) < 2:
        return ordered
    x = _descriptors(head + taken)
    cand, seen = x[: len(head)], x[len(head) :]
    pair = np.sqrt(((cand[:, None] - cand[None]) ** 2).sum(-1))
    typical = float(np.median(pair[np.triu_indices(len(head), 1)])) or 1.0
    near = np.full(len(head), np.inf)
    if len(seen):
        near = np.sqrt(((cand[:, None] - seen[None]) ** 2).sum(-1)).min(axis=1)
    left, out = list(range(len(head))), []
    while left:
        cover = np.minimum(near[left] / typical, 1.0)
        gain = np.array([head[i].score for i in left]) + W_DIVERSE * cover
        best = left[int(np.argmax(gain))]  # ties: the earlier (higher-scored) slice
        out.append(head[best])
        left.remove(best)
        near = np.minimum(near, pair[best])
    return out + tail


def rank(
    scores: Iterable[SliceScore],
    exclude: Iterable[int] = (),
    spread: bool = False,
    diverse: bool = False,
) -> list[SliceScore]:
    """Most worth correcting first; slices in ``exclude`` (e.g. reviewed ones) left out.

    ``spread`` (for the slices of one stack): a slice whose neighbour (±1, same source) is
    already listed — or excluded as reviewed — moves behind every slice without one, keeping
    its order among the moved. ``diverse`` (for unrelated images): the head of the list is
    picked greedily for its score *and* for differing from the slices picked before it and
    those reviewed (:func:`_diverse`), so that a round of corrections covers the set's variety
    rather than the most doubtful kind of image only. Ties keep slice order, so the ranking is
    deterministic."""
    scores = list(scores)
    skip = set(exclude)
    ordered = sorted(
        (s for s in scores if s.index not in skip), key=lambda s: (-s.score, s.source, s.index)
    )
    if diverse:
        return _diverse(ordered, [s for s in scores if s.index in skip])
    if not spread:
        return ordered
    taken = {(src, z) for src in {s.source for s in ordered} for z in skip}
    first, later = [], []
    for s in ordered:
        near = (s.source, s.index - 1) in taken or (s.source, s.index + 1) in taken
        (later if near else first).append(s)
        taken.add((s.source, s.index))
    return first + later


#: the CSV's columns: the rank, the file, the slice's scores, the reasons in words
RANK_COLUMNS = ("rank", "source", *(f.name for f in fields(SliceScore) if f.name != "source"),
                "reasons")  # fmt: skip


def write_ranking_csv(path: str | os.PathLike, scores: Sequence[SliceScore]) -> Path:
    """Write ranked scores (as given) to CSV, one row per slice, atomically."""
    path = Path(path)
    with atomic_write(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(RANK_COLUMNS))
        w.writeheader()
        for i, s in enumerate(scores, 1):
            w.writerow({"rank": i, **asdict(s), "reasons": s.reasons})
    return path


def score_files(
    paths: Iterable[str | os.PathLike], spec: PostProcess, expected_max: int = 0
) -> list[SliceScore]:
    """Score every slice of the probability maps ``paths`` (``*_prob.tif`` as ``bulbseg
    predict`` writes them), each file read one at a time; ``source`` is the file name."""
    from .io import read_stack

    out: list[SliceScore] = []
    for p in paths:
        stack = read_stack(p)
        if stack.data.ndim != 3:
            raise InputError(
                f"{Path(p).name} is not a probability map (shape {tuple(stack.data.shape)})",
                "give the *_prob.tif files bulbseg predict writes",
            )
        out += score_stack(
            stack.data, spec, expected_max, is_stack=stack.n_slices > 1, source=Path(p).name
        )
    return out
