"""Review state of one image, without Qt: probability cache, post-processing generations,
reviewed slices, per-slice object counts and the object-prior check.

The widgets' session (``_widgets/_session.py``) drives a :class:`ReviewState` from the GUI
thread and keeps the layers, timers, workers and signals; the rules live here, so they can be
read, run and tested without a display. The state's fields are read-only properties: it changes
through its methods only.

Generations: every new prediction and every new post-processing spec bumps :attr:`gen`; each
slice remembers the generation its displayed mask was made with, so a slice is *stale* when it is
predicted and its mask is older than :attr:`gen`.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Mapping
from types import MappingProxyType

import numpy as np

from .postprocess import PostProcess, count_objects, postprocess_slice

__all__ = ["RefreshItem", "ReviewState"]

#: one result of :meth:`ReviewState.iter_refresh`: (generation, slice, mask, object count)
RefreshItem = tuple[int, int, np.ndarray, int]


class ReviewState:
    """Probabilities, post-processing and review flags of the image being reviewed."""

    def __init__(self) -> None:
        self._image_name: str | None = None
        self._prob: np.ndarray | None = None  # (Z, Y, X) float16
        self._done: np.ndarray | None = None  # (Z,) bool: probabilities available
        self._mask_gen: np.ndarray | None = None  # (Z,) generation of each written mask
        self._gen = 0
        self._spec = PostProcess()
        self._user_spec = False
        self._expected_max = 0
        self._counts: dict[int, int] = {}
        self._reviewed: set[int] = set()
        self._follow: set[int] = set()

    # ------------------------------------------------------------------ read-only fields
    @property
    def image_name(self) -> str | None:
        """Name of the image the state belongs to (None before the first one)."""
        return self._image_name

    @property
    def prob(self) -> np.ndarray | None:
        """The (Z, Y, X) float16 probability cache; prediction fills it in place."""
        return self._prob

    @property
    def done(self) -> np.ndarray | None:
        """(Z,) bool: which slices' probabilities are final."""
        return self._done

    @property
    def gen(self) -> int:
        """Generation of the current prediction and post-processing."""
        return self._gen

    @property
    def spec(self) -> PostProcess:
        return self._spec

    @property
    def user_spec(self) -> bool:
        """The user has set the rules: a model's suggestion no longer replaces them."""
        return self._user_spec

    @property
    def expected_max(self) -> int:
        """Most objects a slice should hold (0: the check is off)."""
        return self._expected_max

    @property
    def counts(self) -> Mapping[int, int]:
        """Objects per slice under the current spec (only the slices counted so far)."""
        return MappingProxyType(self._counts)

    @property
    def reviewed(self) -> frozenset[int]:
        return frozenset(self._reviewed)

    @property
    def follow(self) -> frozenset[int]:
        """Unreviewed slices whose corrections nobody edited: they take each new mask."""
        return frozenset(self._follow)

    @property
    def n_slices(self) -> int:
        return 0 if self._prob is None else int(self._prob.shape[0])

    @property
    def violations(self) -> list[int]:
        """Slices with more objects than :attr:`expected_max` (empty when the check is off)."""
        if self._expected_max <= 0:
            return []
        return sorted(z for z, n in self._counts.items() if n > self._expected_max)

    # ------------------------------------------------------------------ prediction
    def begin(
        self, image_name: str, shape: tuple[int, ...], follow: Iterable[int] = ()
    ) -> tuple[np.ndarray, bool]:
        """A new prediction of ``image_name``: a zeroed float16 cache of ``shape`` (Z, Y, X).

        ``follow``: the slices whose corrections take the new masks (see
        :meth:`untouched_slices`). The reviewed flags are kept for the same image and cleared
        for another one. Returns the cache and whether the image changed.
        """
        self._follow = set(follow)
        new_image = self._image_name != image_name
        if new_image:
            self._reviewed = set()
        self._image_name = image_name
        zyx = tuple(int(s) for s in shape[:3])
        self._prob = np.zeros(zyx, dtype=np.float16)
        self._done = np.zeros(zyx[0], dtype=bool)
        self._mask_gen = np.full(zyx[0], -1, dtype=np.int64)
        self._counts = {}
        self._gen += 1
        return self._prob, new_image

    def untouched_slices(self, corr: np.ndarray, pred: np.ndarray) -> set[int]:
        """Unreviewed predicted slices whose corrections ``corr`` still equal ``pred`` (both
        (Z, Y, X)): nobody painted them. Empty when the shapes differ."""
        if self._done is None or corr.shape != pred.shape:
            return set()
        todo = (z for z in range(corr.shape[0]) if z not in self._reviewed and self._done[z])
        return {z for z in todo if np.array_equal(corr[z] > 0, pred[z] > 0)}

    def mark_predicted(self, z: int) -> bool:
        """Probabilities of slice ``z`` are final; False when ``z`` is not in the cache."""
        if self._done is None or not 0 <= z < self._done.size:
            return False
        self._done[z] = True
        return True

    def mask_for(self, z: int) -> np.ndarray | None:
        """Slice ``z`` post-processed with the current spec (None until it is predicted)."""
        if self._prob is None or not self._done[z]:
            return None
        return postprocess_slice(self._prob[z], self._spec)

    def mark_written(self, z: int, gen: int | None = None) -> None:
        """The mask of slice ``z`` made with generation ``gen`` (default: current) is shown."""
        self._mask_gen[z] = self._gen if gen is None else gen

    def needs_write(self, z: int, gen: int) -> bool:
        """Whether the shown mask of slice ``z`` is not of generation ``gen``."""
        return bool(self._mask_gen[z] != gen)

    def is_stale(self, z: int) -> bool:
        """Slice ``z`` is predicted and its shown mask predates the current spec."""
        if self._prob is None:
            return False
        return bool(self._done[z] and self._mask_gen[z] != self._gen)

    def stale_slices(self) -> list[int]:
        """Every stale slice (see :meth:`is_stale`), in order."""
        if self._done is None:
            return []
        return [int(z) for z in np.flatnonzero(self._done & (self._mask_gen != self._gen))]

    def is_current(self, gen: int) -> bool:
        return gen == self._gen

    # ------------------------------------------------------------------ rules
    def set_expected_max(self, expected_max: int) -> bool:
        """Set the object prior; returns whether it changed."""
        if expected_max == self._expected_max:
            return False
        self._expected_max = expected_max
        return True

    def set_spec(self, spec: PostProcess, *, from_user: bool = True) -> bool:
        """New post-processing; returns whether it differs from the current one.

        A change starts a new generation (every slice is stale) and forgets the counts.
        ``from_user=False`` is a model's suggestion: it does not mark the rules as the user's.
        """
        if from_user:
            self._user_spec = True
        if spec == self._spec:
            return False
        self._spec = spec
        self._gen += 1
        self._counts = {}
        return True

    def record_count(self, z: int, count: int) -> None:
        """Slice ``z`` holds ``count`` objects under the current spec."""
        self._counts[z] = int(count)

    def iter_refresh(self) -> Generator[RefreshItem, None, None]:
        """Post-process every predicted slice under the current spec (run in a worker).

        Yields ``(gen, z, mask, count)``; rescans for slices predicted meanwhile, and stops
        once the generation moves on or nothing new is left.
        """
        return self._refresh(self._gen, self._spec, self._prob, self._done)

    def _refresh(
        self, gen: int, spec: PostProcess, prob: np.ndarray, done: np.ndarray
    ) -> Generator[RefreshItem, None, None]:
        handled: set[int] = set()
        while gen == self._gen:
            todo = [int(z) for z in np.flatnonzero(done) if z not in handled]
            if not todo:
                return
            for z in todo:
                if gen != self._gen:
                    return
                mask = postprocess_slice(prob[z], spec)
                handled.add(z)
                yield gen, z, mask, count_objects(mask)

    # ------------------------------------------------------------------ review
    def set_reviewed(self, z: int, reviewed: bool) -> bool:
        """Mark slice ``z`` (un)reviewed; a reviewed slice stops following the model. Returns
        whether the flag changed."""
        changed = (z in self._reviewed) != reviewed
        if reviewed:
            self._follow.discard(z)
            self._reviewed.add(z)
        else:
            self._reviewed.discard(z)
        return changed

    def adopt_image(self, image_name: str) -> None:
        """Belong to ``image_name`` (its saved corrections are being restored)."""
        self._image_name = image_name

    def restore_reviewed(self, reviewed: Iterable[int]) -> None:
        """Replace the reviewed flags (by the autosaved ones)."""
        self._reviewed = {int(z) for z in reviewed}

    def follows(self, z: int) -> bool:
        return z in self._follow

    def stop_following(self, z: int) -> None:
        """Slice ``z``'s corrections were painted: new masks no longer overwrite them."""
        self._follow.discard(z)
