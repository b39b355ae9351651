"""The review state without Qt: cache, generations, staleness, counts, priors, reviewed flags."""

import numpy as np
import pytest

from napari_bulbseg.postprocess import PostProcess, count_objects, postprocess_slice
from napari_bulbseg.review_state import ReviewState


def _prob(z: int = 4, shape: tuple[int, int] = (16, 16), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((z, *shape)).astype(np.float16)


def _predicted(z: int = 4, name: str = "img") -> tuple[ReviewState, np.ndarray]:
    """A state whose cache holds random probabilities, every slice predicted."""
    st = ReviewState()
    src = _prob(z)
    cache, _ = st.begin(name, src.shape)
    cache[...] = src
    for k in range(z):
        assert st.mark_predicted(k)
    return st, src


def test_begin_allocates_a_zeroed_cache_and_a_new_generation():
    st = ReviewState()
    assert st.prob is None and st.n_slices == 0 and st.stale_slices() == []
    cache, new_image = st.begin("a", (3, 5, 7, 3))  # an RGB stack's shape: channels dropped
    assert new_image is True and st.image_name == "a"
    assert cache is st.prob and cache.shape == (3, 5, 7) and cache.dtype == np.float16
    assert not cache.any() and st.done.shape == (3,) and not st.done.any()
    assert st.n_slices == 3
    gen = st.gen
    _, new_image = st.begin("a", (3, 5, 7))
    assert new_image is False and st.gen == gen + 1 and st.prob is not cache


def test_reviewed_flags_survive_a_new_prediction_of_the_same_image_only():
    st, _ = _predicted()
    assert st.set_reviewed(1, True) is True
    assert st.set_reviewed(1, True) is False  # no change
    st.begin("img", (4, 16, 16))
    assert st.reviewed == {1}
    st.begin("other", (4, 16, 16))
    assert st.reviewed == set()


def test_mark_predicted_rejects_slices_outside_the_cache():
    st = ReviewState()
    assert st.mark_predicted(0) is False  # no cache yet
    st.begin("a", (2, 4, 4))
    assert st.mark_predicted(2) is False and st.mark_predicted(-1) is False
    assert st.mark_predicted(1) is True and st.done.tolist() == [False, True]


def test_mask_for_waits_for_the_slice_and_uses_the_current_spec():
    st = ReviewState()
    cache, _ = st.begin("a", (2, 16, 16))
    cache[...] = _prob(2)
    assert st.mask_for(0) is None  # not predicted yet
    st.mark_predicted(0)
    np.testing.assert_array_equal(st.mask_for(0), postprocess_slice(cache[0], PostProcess()))
    spec = PostProcess(threshold=0.8, keep_largest=1)
    st.set_spec(spec)
    np.testing.assert_array_equal(st.mask_for(0), postprocess_slice(cache[0], spec))
    assert st.mask_for(1) is None


def test_a_new_spec_makes_every_written_slice_stale():
    st, _ = _predicted(3)
    assert st.stale_slices() == [0, 1, 2]  # predicted, nothing written yet
    st.mark_written(0)
    st.mark_written(2)
    assert st.stale_slices() == [1] and not st.is_stale(0) and st.is_stale(1)
    old = st.gen
    assert st.set_spec(PostProcess(threshold=0.7)) is True
    assert st.gen == old + 1 and st.stale_slices() == [0, 1, 2]
    st.mark_written(1, old)  # a mask of the old generation does not count as current
    assert st.is_stale(1) and st.needs_write(1, st.gen) and not st.needs_write(1, old)
    assert st.is_current(st.gen) and not st.is_current(old)


def test_unpredicted_slices_are_never_stale():
    st = ReviewState()
    st.begin("a", (3, 4, 4))
    st.mark_predicted(1)
    assert st.stale_slices() == [1] and not st.is_stale(0)


def test_set_spec_reports_changes_and_who_set_the_rules():
    st = ReviewState()
    assert st.user_spec is False
    assert st.set_spec(PostProcess(threshold=0.3), from_user=False) is True
    assert st.user_spec is False and st.spec.threshold == pytest.approx(0.3)
    gen = st.gen
    assert st.set_spec(PostProcess(threshold=0.3)) is False  # same rules: no new generation
    assert st.gen == gen and st.user_spec is True  # but the user has now chosen them


def test_counts_reset_with_the_spec_and_violations_follow_the_prior():
    st, _ = _predicted(4)
    for z, n in enumerate([1, 3, 0, 5]):
        st.record_count(z, n)
    assert st.violations == []  # the check is off
    assert st.set_expected_max(2) is True and st.set_expected_max(2) is False
    assert st.violations == [1, 3]
    assert st.set_expected_max(3) is True and st.violations == [3]
    st.set_spec(PostProcess(min_size=4))
    assert dict(st.counts) == {} and st.violations == []


def test_refresh_pass_yields_every_predicted_slice_with_its_mask_and_count():
    st = ReviewState()
    src = _prob(4)
    cache, _ = st.begin("a", src.shape)
    cache[...] = src
    st.mark_predicted(0)
    st.mark_predicted(2)
    spec = PostProcess(threshold=0.6)
    st.set_spec(spec)
    items = list(st.iter_refresh())
    assert [z for _, z, _, _ in items] == [0, 2]
    for gen, z, mask, count in items:
        assert gen == st.gen
        np.testing.assert_array_equal(mask, postprocess_slice(src[z], spec))
        assert count == count_objects(mask)


def test_refresh_pass_rescans_for_new_slices_and_stops_on_a_new_generation():
    st = ReviewState()
    cache, _ = st.begin("a", (4, 8, 8))
    cache[...] = _prob(4, (8, 8))
    st.mark_predicted(0)
    job = st.iter_refresh()
    assert next(job)[1] == 0
    st.mark_predicted(3)  # predicted while the pass runs
    assert next(job)[1] == 3
    st.mark_predicted(1)
    st.set_spec(PostProcess(threshold=0.9))  # the pass belongs to the old rules now
    assert list(job) == []


def test_a_reviewed_slice_stops_following_the_prediction():
    st, src = _predicted(4)
    pred = (src > 0.5).astype(np.uint8)
    corr = pred.copy()
    corr[2, 0, 0] ^= 1  # painted
    st.set_reviewed(3, True)
    follow = st.untouched_slices(corr, pred)
    assert follow == {0, 1}  # 2 was painted, 3 is reviewed
    st.begin("img", src.shape, follow)
    assert st.follow == {0, 1} and st.follows(0) and not st.follows(2)
    st.set_reviewed(0, True)
    st.stop_following(1)
    assert st.follow == set()
    assert st.set_reviewed(0, False) is True and st.reviewed == {3}


def test_untouched_slices_needs_matching_shapes_and_predicted_slices():
    st = ReviewState()
    st.begin("a", (2, 4, 4))
    same = np.zeros((2, 4, 4), np.uint8)
    assert st.untouched_slices(same, same) == set()  # nothing predicted
    st.mark_predicted(1)
    assert st.untouched_slices(same, same) == {1}
    assert st.untouched_slices(same, np.zeros((2, 4, 5), np.uint8)) == set()


def test_restored_flags_replace_the_reviewed_set():
    st, _ = _predicted(4)
    st.set_reviewed(0, True)
    st.adopt_image("restored")
    st.restore_reviewed([2, 3])
    assert st.image_name == "restored" and st.reviewed == {2, 3}


def test_fields_change_only_through_methods():
    st, _ = _predicted(3)
    st.set_reviewed(1, True)
    st.record_count(0, 2)
    for field in ("prob", "done", "spec", "reviewed", "counts", "expected_max", "image_name"):
        with pytest.raises(AttributeError):
            setattr(st, field, None)
    assert isinstance(st.reviewed, frozenset)  # a copy: changing it cannot reach the state
    with pytest.raises(TypeError):
        st.counts[0] = 5  # type: ignore[index]
    assert st.counts == {0: 2} and st.reviewed == {1}
