"""The second red-team pass: bad inputs and faults beyond ``test_bad_input.py``, through the
``bulbseg`` command line (the engine API where the command line cannot reach them).

Each case either fails with ONE clear line (exit 2, no traceback, nothing written) or works
correctly. ``docs/reliability.md`` ("Second red-team pass") lists every case with its outcome.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_bulbseg import io
from napari_bulbseg.cli import main
from napari_bulbseg.model import CARD_NAME, UNet, UNetConfig

# ----------------------------------------------------------------------------------- helpers


def cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_error_line(rc: int, err: str, *fragments: str) -> str:
    """Exit 2 with exactly one ``bulbseg: error:`` line (problem — hint) holding ``fragments``."""
    assert rc == 2, err
    assert "Traceback" not in err
    assert "this is a bug" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("bulbseg: error:")]
    assert len(errors) == 1, err
    line = errors[0]
    assert line == lines[-1]
    assert " — " in line, f"no hint in: {line}"
    for f in fragments:
        assert f.lower() in line.lower(), f"{f!r} not in: {line}"
    return line


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def edited_model(src: Path, dst: Path, edit) -> Path:
    """A copy of the model folder ``src`` whose card was changed by ``edit(card_dict)``."""
    shutil.copytree(src, dst)
    card = json.loads((dst / CARD_NAME).read_text())
    edit(card)
    (dst / CARD_NAME).write_text(json.dumps(card))
    return dst


@pytest.fixture
def img(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    p = tmp_path / "in" / "cells.tif"
    io.write_tiff(p, rng.integers(100, 4000, (1, 24, 28)).astype(np.uint16), axes="ZYX")
    return p


@pytest.fixture
def train_set(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    for name in ("a", "b", "c"):
        mask = np.zeros((32, 32), bool)
        mask[8:20, 8:20] = True
        io.write_tiff(root / "images" / f"{name}.tif", (mask * 200 + 20).astype(np.uint8))
        io.write_mask(root / "masks" / f"{name}.png", mask)
    return root


# ------------------------------------------------------------- model cards, validated on read

_BAD_CARDS = {
    "base_channels_1e9": (
        lambda c: c["architecture"].update(base_channels=10**9),
        ["base_channels=1000000000", "1…1024"],
    ),
    "base_channels_1e30": (
        lambda c: c["architecture"].update(base_channels=10**30),
        ["base_channels=", "1…1024"],
    ),
    "base_channels_float": (
        lambda c: c["architecture"].update(base_channels=1e30),
        ["base_channels=1e+30", "integer"],
    ),
    "depth_1000": (lambda c: c["architecture"].update(depth=1000), ["depth 1000", "1 to 7"]),
    "in_channels_1e9": (
        lambda c: c["architecture"].update(in_channels=10**9),
        ["in_channels=1000000000", "1…64"],
    ),
    "too_many_parameters": (
        lambda c: c["architecture"].update(base_channels=1024, depth=7),
        ["parameters", "fewer base_channels"],
    ),
    "split_train_not_a_list": (
        lambda c: c["training"].update(split={"train": 5, "val": []}),
        ["training.split.train", "list"],
    ),
    "split_a_list": (lambda c: c["training"].update(split=[1, 2]), ["training.split", "object"]),
    "split_val_fraction": (
        lambda c: c["training"].update(split={"train": [], "val": [], "val_fraction": "x"}),
        ["training.split.val_fraction", "[0, 1)"],
    ),
    "metrics_val_a_list": (lambda c: c["metrics"].update(val=[0.9]), ["metrics.val"]),
    "threshold_curve_garbage": (
        lambda c: c.update(threshold_curve=[["a", None]]),
        ["threshold_curve", "pairs"],
    ),
}


@pytest.mark.parametrize("case", sorted(_BAD_CARDS))
def test_bad_card_is_refused_by_info_predict_and_train(
    case, tmp_path, capsys, tiny_model_dir, img, train_set, bulbseg_home
):
    edit, words = _BAD_CARDS[case]
    bad = edited_model(tiny_model_dir, tmp_path / "bad", edit)
    rc, _, err = cli(capsys, "info", bad)
    one_error_line(rc, err, *words)
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "predict", img, "-o", out, "--model", bad, "--device", "cpu")
    one_error_line(rc, err, *words)
    assert files_under(out) == set()
    rc, _, err = cli(
        capsys, "train", "--images", train_set / "images", "--masks", train_set / "masks",
        "--from", bad, "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "1",
        "--patch-size", "16", "--device", "cpu",
    )  # fmt: skip
    one_error_line(rc, err, *words)
    assert files_under(bulbseg_home / "models") == set()


@pytest.mark.parametrize("where", ["top", "inside_metrics"])
def test_deeply_nested_card_is_a_clear_error(where, tmp_path, capsys, tiny_model_dir, img):
    bad = tmp_path / "nested"
    shutil.copytree(tiny_model_dir, bad)
    deep = "[" * 100_000 + "]" * 100_000
    if where == "top":
        text = deep
    else:
        text = (bad / CARD_NAME).read_text().rstrip()[:-1] + f', "extra": {deep}}}'
    (bad / CARD_NAME).write_text(text)
    for argv in (["info", bad], ["predict", img, "-o", tmp_path / "o", "--model", bad]):
        rc, _, err = cli(capsys, *argv)
        one_error_line(rc, err, "nested too deeply")


def test_huge_card_is_refused_unread(tmp_path, capsys, tiny_model_dir, monkeypatch):
    import napari_bulbseg.model as model_mod

    bad = tmp_path / "huge"
    shutil.copytree(tiny_model_dir, bad)
    with open(bad / CARD_NAME, "ab") as f:
        f.write(b" " * 2048)
    monkeypatch.setattr(model_mod, "MAX_CARD_BYTES", 1024)
    rc, _, err = cli(capsys, "info", bad)
    one_error_line(rc, err, "far more than a card holds")


def test_valid_cards_still_load(tiny_model_dir, capsys):
    rc, out, err = cli(capsys, "info", tiny_model_dir)
    assert rc == 0 and "tiny" in out, err
    rc, out, err = cli(capsys, "info", "bundled")
    assert rc == 0 and "arch" in out, err
    big = UNetConfig(3, 1, 64, 5)  # a large but reasonable architecture is accepted
    assert big.parameter_count() == sum(p.numel() for p in UNet(big).parameters())


# ------------------------------------------------- float64 images beyond float32's range


def _disc_image() -> np.ndarray:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:80, :80]
    discs = ((yy - 25) ** 2 + (xx - 30) ** 2 < 120) | ((yy - 55) ** 2 + (xx - 55) ** 2 < 80)
    return np.clip(0.1 + 0.8 * discs + rng.normal(0, 0.03, (80, 80)), 0.0, 1.0)


@pytest.mark.parametrize(
    "scale, offset", [(9e39, 1e39), (9e-42, 1e-42), (1e300, 0.0)], ids=["1e40", "1e-41", "1e300"]
)
def test_float64_image_outside_float32_range_gives_the_same_mask(scale, offset, tmp_path, capsys):
    base = _disc_image()
    io.write_tiff(tmp_path / "ref" / "cells.tif", base)
    io.write_tiff(tmp_path / "big" / "cells.tif", base * scale + offset)
    assert io.read_stack(tmp_path / "big" / "cells.tif").data.dtype == np.float64
    for name in ("ref", "big"):
        rc, _, err = cli(
            capsys, "predict", tmp_path / name, "-o", tmp_path / f"out-{name}",
            "--model", "bundled", "--device", "cpu",
        )  # fmt: skip
        assert rc == 0, err
    ref = io.read_stack(tmp_path / "out-ref" / "cells_mask.tif").data
    got = io.read_stack(tmp_path / "out-big" / "cells_mask.tif").data
    assert 0 < (ref > 0).mean() < 0.5  # the reference finds the discs, not everything
    np.testing.assert_array_equal(got, ref)
    p_ref = io.read_stack(tmp_path / "out-ref" / "cells_prob.tif").data.astype(np.float32)
    p_got = io.read_stack(tmp_path / "out-big" / "cells_prob.tif").data.astype(np.float32)
    np.testing.assert_allclose(p_got, p_ref, atol=2e-3)


@pytest.mark.parametrize("polarity", ["bright", "dark", "auto"])
@pytest.mark.parametrize("noise_floor", [0.0, 10.0])
@pytest.mark.parametrize("policy", ["native", "luminance", "replicate"])
def test_float64_normalisation_is_scale_free(polarity, noise_floor, policy):
    from napari_bulbseg.normalize import Normalization, prepare_image

    base = _disc_image()
    norm = Normalization(polarity=polarity, noise_floor=noise_floor)
    in_channels = 3 if policy == "replicate" else 1
    lift = (lambda a: np.stack([a] * 3, -1)) if policy == "luminance" else (lambda a: a)
    ref = prepare_image(lift(base), in_channels, norm, policy)
    assert np.ptp(ref) > 0.5
    for scale, offset in [(9e39, 1e39), (9e-42, 1e-42)]:
        got = prepare_image(lift(base * scale + offset), in_channels, norm, policy)
        assert got.dtype == np.float32 and np.isfinite(got).all()
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_float32_image_of_tiny_values_is_not_flattened():
    from napari_bulbseg.normalize import Normalization, normalize_channel

    base = _disc_image().astype(np.float32)
    ref = normalize_channel(base, Normalization())
    got = normalize_channel((base * np.float32(1e-36)).astype(np.float32), Normalization())
    np.testing.assert_allclose(got, ref, atol=1e-5)


# ------------------------------------------------ memory: the real working set, checked first


def _need(model_dir: Path, shape, batch: int, n_slices: int = 1):
    import napari_bulbseg.inference as inf
    from napari_bulbseg.model import load_model

    opts = inf.PredictOptions(device="cpu", batch_size=batch)
    return inf.working_set(load_model(model_dir), opts, shape, n_slices=n_slices)


def test_predict_refuses_a_working_set_larger_than_free_memory(
    tmp_path, capsys, tiny_model_dir, monkeypatch
):
    import napari_bulbseg.inference as inf

    io.write_tiff(tmp_path / "in" / "big.tif", np.zeros((2, 600, 700), np.uint16))
    need = _need(tiny_model_dir, (600, 700), 1, n_slices=2)
    # one raw plane (what the old check compared) fits easily; the working set does not
    monkeypatch.setattr(inf, "_free_memory", lambda: need.total - 1)
    assert need.total > 20 * 600 * 700 * 2
    calls = []
    monkeypatch.setattr(inf, "prepare_image", lambda *a, **k: calls.append(1))
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "predict", tmp_path / "in", "-o", out, "--model", tiny_model_dir,
                     "--device", "cpu")  # fmt: skip
    line = one_error_line(rc, err, "600 × 700-pixel slices needs about", "free", "--tile")
    assert "one tile per batch" in line and ("MiB" in line or "GiB" in line)
    assert calls == []  # refused before any slice was normalised
    assert not [p for p in out.rglob("*.tif")] if out.exists() else True


def test_a_smaller_batch_is_used_when_only_it_fits(tmp_path, tiny_model_dir, monkeypatch):
    import napari_bulbseg.inference as inf
    from napari_bulbseg.events import drain
    from napari_bulbseg.model import load_model

    img = np.random.default_rng(0).random((1, 600, 700)).astype(np.float32)
    m = load_model(tiny_model_dir)
    opts = inf.PredictOptions(device="cpu", tile=256, batch_size=4)
    ref = inf.predict(m, img, opts)
    need4 = inf.working_set(m, opts, (600, 700), itemsize=4)
    monkeypatch.setattr(inf, "_free_memory", lambda: need4.total - 1)
    events = []
    got = drain(inf.iter_predict(m, img, opts), events.append)
    assert "batch size 2 to fit the free memory" in events[0].message
    np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), atol=1e-3)


def test_working_set_matches_what_prediction_allocates(tiny_model_dir):
    import napari_bulbseg.inference as inf
    from napari_bulbseg.model import load_model

    m = load_model(tiny_model_dir)
    o = inf.PredictOptions(device="cpu")
    one = inf.working_set(m, o, (3000, 3000), itemsize=2)  # 3 × 3 tiles
    # per slice: raw 2 + normalised 4 + accumulator 4 + weights 4 + result 4 + float16 2
    assert one.slices == 20 * 3000 * 3000  # 3000 is a multiple of 8: no padded copy
    assert one.output == 2 * 3000 * 3000
    single = inf.working_set(m, o, (1000, 1000), itemsize=2)  # one tile: nothing to blend
    assert single.slices == 12 * 1000 * 1000
    # tiles grow with the tile size and the batch, not with the number of slices
    small = inf.working_set(m, inf.PredictOptions(device="cpu", tile=256), (3000, 3000))
    assert small.tiles < one.tiles / 4
    opts = inf.PredictOptions(device="cpu", tile=256, batch_size=1)
    assert inf.working_set(m, opts, (3000, 3000)).tiles * 4 == small.tiles
    many = inf.working_set(m, o, (3000, 3000), n_slices=10)
    assert many.output == 10 * one.output and many.tiles == one.tiles
    # a batch of 4 over 9 tiles per slice straddles two slices: two sets of slice buffers
    assert many.slices == 2 * one.slices


def test_memory_check_passes_with_enough_memory(tmp_path, capsys, tiny_model_dir, monkeypatch):
    import napari_bulbseg.inference as inf

    io.write_tiff(tmp_path / "in" / "a.tif", np.zeros((1, 40, 50), np.uint16))
    seen = []
    real = inf.check_memory
    monkeypatch.setattr(inf, "check_memory", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    rc, _, err = cli(capsys, "predict", tmp_path / "in", "-o", tmp_path / "out", "--model",
                     tiny_model_dir, "--device", "cpu")  # fmt: skip
    assert rc == 0, err
    assert (tmp_path / "out" / "a_mask.tif").is_file()
    assert seen == [4]  # the full batch fits
