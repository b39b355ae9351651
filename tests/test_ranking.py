"""The "correct next" score: which slices are most worth correcting, from probabilities alone."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from napari_bulbseg.errors import InputError
from napari_bulbseg.postprocess import PostProcess
from napari_bulbseg.ranking import rank, score_stack, write_ranking_csv


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r


def _confident(shape=(64, 64), r=12.0):
    return np.where(_disc(shape, 32, 32, r), 0.98, 0.02).astype(np.float32)


def test_an_ambiguous_slice_ranks_above_a_confident_one():
    confident = _confident()
    ambiguous = confident.copy()
    ambiguous[_disc((64, 64), 32, 32, 12)] = 0.55  # the same object, barely above threshold
    ambiguous[_disc((64, 64), 32, 32, 16) & ~_disc((64, 64), 32, 32, 12)] = 0.45  # a soft rim
    scores = score_stack(np.stack([confident, ambiguous, confident]), PostProcess(threshold=0.5))
    assert rank(scores)[0].index == 1
    assert scores[1].expected_error > 0.3 and scores[0].expected_error < 0.01
    assert "uncertain" in scores[1].reasons and scores[0].reasons == "looks confident"


def test_a_confident_empty_slice_is_not_a_full_error():
    haze = np.full((64, 64), 0.02, np.float32)  # 82 "pixels" of probability mass, no object
    assert score_stack(haze, PostProcess())[0].expected_error == 0.0  # a haze is certain
    faint = haze.copy()
    faint[:3, :10] = 0.3  # 30 doubtful pixels, nothing shown
    scores = score_stack(np.stack([_confident(), faint]), PostProcess(), is_stack=False)
    assert 0.0 < scores[1].expected_error < 0.1  # floored by half a typical object, not 100 %


def test_more_objects_than_keep_n_rank_high():
    shape = (96, 96)
    one = np.where(_disc(shape, 30, 30, 12), 0.98, 0.02).astype(np.float32)
    five = one.copy()
    for cy, cx in ((70, 20), (70, 70), (20, 75), (50, 50)):
        five[_disc(shape, cy, cx, 6)] = 0.97
    spec = PostProcess(threshold=0.5, keep_largest=2)
    scores = score_stack(np.stack([one, five]), spec, is_stack=False)
    assert scores[1].extra_objects == 3 and scores[0].extra_objects == 0
    assert rank(scores)[0].index == 1 and "3 object(s) more than allowed" in scores[1].reasons
    # without keep-N, an expected maximum does the same
    loose = score_stack(np.stack([one, five]), PostProcess(), expected_max=2, is_stack=False)
    assert loose[1].extra_objects == 3


def test_specks_and_a_vanishing_slice_are_flagged():
    shape = (64, 64)
    stack = np.stack([_confident(shape)] * 5)
    stack[1][5:7, 5:7] = 0.9  # a 4-pixel speck beside the object
    stack[3] = 0.02  # the object vanishes for one slice of a stack
    scores = score_stack(stack, PostProcess())
    assert scores[1].specks == 1 and all(scores[z].specks == 0 for z in (0, 2, 4))
    assert scores[3].area_change == pytest.approx(1.0) and scores[2].area_change > 0.3
    assert rank(scores)[0].index == 3
    # unrelated images are not compared with their neighbours
    assert all(s.area_change == 0 for s in score_stack(stack, PostProcess(), is_stack=False))


def test_rank_leaves_out_reviewed_slices_and_is_deterministic():
    stack = np.stack([_confident()] * 4)
    scores = score_stack(stack, PostProcess())
    assert [s.index for s in rank(scores)] == [0, 1, 2, 3]  # ties keep slice order
    assert [s.index for s in rank(scores, exclude={0, 2})] == [1, 3]


def test_only_the_asked_slices_are_scored_and_uint8_probabilities_agree():
    stack = np.stack([_confident(), _confident(r=8), _confident(r=14)])
    part = score_stack(stack, PostProcess(), slices=[2, 0])
    assert [s.index for s in part] == [0, 2]
    u8 = score_stack(np.round(stack * 255).astype(np.uint8), PostProcess())
    f32 = score_stack(stack, PostProcess())
    for a, b in zip(u8, f32, strict=True):
        assert a.expected_error == pytest.approx(b.expected_error, abs=5e-3)
        assert a.foreground == b.foreground


def test_bad_input_is_refused_clearly():
    with pytest.raises(InputError, match="probability stack"):
        score_stack(np.zeros((2, 2, 2, 2), np.float32), PostProcess())
    with pytest.raises(InputError, match="Slice indices"):
        score_stack(np.zeros((2, 8, 8), np.float32), PostProcess(), slices=[5])
    with pytest.raises(InputError, match="whole number"):
        score_stack(np.zeros((1, 8, 8), np.float32), PostProcess(), expected_max=1.5)


def test_ranking_csv_round_trip(tmp_path):
    stack = np.stack([_confident(), np.full((64, 64), 0.5, np.float32)])
    ranked = rank(score_stack(stack, PostProcess(), source="a.tif"))
    path = write_ranking_csv(tmp_path / "rank.csv", ranked)
    rows = list(csv.DictReader(path.open()))
    assert [r["rank"] for r in rows] == ["1", "2"]
    assert rows[0]["index"] == str(ranked[0].index) and rows[0]["source"] == "a.tif"
    assert float(rows[0]["score"]) == pytest.approx(ranked[0].score)
    assert rows[0]["reasons"] == ranked[0].reasons


# ---------------------------------------------------------------------------- the CLI


def test_predict_rank_and_rank_agree_on_real_images(tmp_path, shared_data, capsys):
    """bulbseg predict --rank and bulbseg rank on its output folder give one ranking."""
    import shutil

    from napari_bulbseg.cli import main

    src = sorted((shared_data / "bbbc039" / "val" / "images").glob("*.tif"))[:2]
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for p in src:
        shutil.copy(p, imgs / p.name)
    out, r1, r2 = tmp_path / "out", tmp_path / "r1.csv", tmp_path / "r2.csv"
    rc = main(["predict", str(imgs), "-o", str(out), "--device", "cpu", "--tile", "256",
               "--rank", str(r1), "--top", "1"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "most worth correcting" in printed and "  1. " in printed and "  2. " not in printed
    assert main(["rank", str(out), "-o", str(r2)]) == 0
    rows1, rows2 = (list(csv.DictReader(p.open())) for p in (r1, r2))
    assert len(rows1) == 2 and {r["source"] for r in rows1} == {f"{p.stem}_prob.tif" for p in src}
    assert [(r["source"], r["score"]) for r in rows1] == [(r["source"], r["score"]) for r in rows2]
    assert float(rows1[0]["score"]) >= float(rows1[1]["score"])


def test_rank_refuses_what_it_cannot_rank(tmp_path, capsys):
    from napari_bulbseg.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["rank", str(empty), "-o", str(tmp_path / "r.csv")]) != 0
    assert "No probability maps" in capsys.readouterr().err
    rc = main(["predict", str(empty), "-o", str(tmp_path / "o"), "--no-prob",
               "--rank", str(tmp_path / "r.csv")])  # fmt: skip
    assert rc != 0 and "drop --no-prob" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()


def test_spread_defers_neighbours_of_listed_and_reviewed_slices():
    stack = np.stack([_confident()] * 6)
    for z, level in ((2, 0.52), (3, 0.53), (5, 0.56)):  # doubtful objects; 2 the most
        stack[z][_disc((64, 64), 32, 32, 12)] = level
    scores = score_stack(stack, PostProcess(), is_stack=False)
    assert [s.index for s in rank(scores)] == [2, 3, 5, 0, 1, 4]
    # 3 is 2's neighbour, 1 and 4 sit beside listed slices: they wait, in their own order
    assert [s.index for s in rank(scores, spread=True)] == [2, 5, 0, 3, 1, 4]
    # a reviewed slice's neighbours wait too
    assert [s.index for s in rank(scores, exclude={5}, spread=True)] == [2, 0, 3, 1, 4]


def test_the_score_term_can_be_the_error_share():
    """The benchmark's comparison switch: the share favours the slice with more wrong pixels."""
    big, small = np.full((64, 64), 0.02, np.float32), np.full((64, 64), 0.02, np.float32)
    big[_disc((64, 64), 32, 32, 20)] = 0.75  # a large, fairly sure object
    small[_disc((64, 64), 32, 32, 9)] = 0.51  # a small, very doubtful one
    stack = np.stack([small, big])
    scores = score_stack(stack, PostProcess(), is_stack=False)
    assert scores[0].expected_error > scores[1].expected_error  # small is relatively worse
    assert scores[1].error_share > scores[0].error_share  # big has more wrong pixels
    assert rank(scores)[0].index == 0
    assert rank(score_stack(stack, PostProcess(), is_stack=False, term="error_share"))[0].index == 1
    with pytest.raises(InputError, match="score term"):
        score_stack(stack, PostProcess(), term="entropy")


def _image_kind(shape, n, r, p=0.6, seed=0):
    """``n`` discs of radius ``r`` at probability ``p`` (doubtful), on a confident background."""
    rng = np.random.default_rng(seed)
    prob = np.full(shape, 0.01, np.float32)
    for _ in range(n):
        cy, cx = rng.uniform(r + 1, shape[0] - r - 1), rng.uniform(r + 1, shape[1] - r - 1)
        prob[_disc(shape, cy, cx, r)] = p
    return prob


def _unrelated(probs):
    from napari_bulbseg.ranking import SliceScore

    out = []
    for i, p in enumerate(probs):
        (sc,) = score_stack(p, PostProcess(threshold=0.5), is_stack=False)
        out.append(SliceScore(**{**sc.__dict__, "index": i}))
    return out


def test_diverse_ranking_spreads_picks_over_unrelated_kinds_of_image():
    """Three near-copies of one kind of image, the most doubtful, and two other kinds: by
    score alone a round of three corrections takes the three copies; with the diversity term
    it takes one of each kind."""
    copies = [_image_kind((96, 96), 6, 6, p=0.55, seed=s) for s in range(3)]
    big = _image_kind((200, 260), 2, 30, p=0.6, seed=5)  # larger image, few large objects
    dense = _image_kind((64, 64), 12, 3, p=0.65, seed=6)  # small image, many small objects
    scores = _unrelated([*copies, big, dense])
    assert all(s.pixels == s_.size for s, s_ in zip(scores, [*copies, big, dense], strict=True))
    plain = [s.index for s in rank(scores)[:3]]
    assert sorted(plain) == [0, 1, 2]  # the score alone: the copies first
    diverse = [s.index for s in rank(scores, diverse=True)[:3]]
    assert diverse[0] == plain[0]  # the top score still comes first
    assert sorted(diverse[1:]) == [3, 4]
    # every slice once, nothing lost
    assert sorted(s.index for s in rank(scores, diverse=True)) == list(range(5))


def test_diverse_ranking_counts_what_was_reviewed():
    """A kind of image already corrected pulls its look-alikes back."""
    copies = [_image_kind((96, 96), 6, 6, p=0.55, seed=s) for s in range(3)]
    big = _image_kind((200, 260), 2, 30, p=0.6, seed=5)
    scores = _unrelated([*copies, big])
    first = rank(scores, exclude={0}, diverse=True)[0]
    assert first.index == 3  # the copies look like the reviewed slice 0
    assert rank(scores, exclude={0})[0].index in (1, 2)  # without the term: a copy
