"""The second red-team pass: bad inputs and faults beyond ``test_bad_input.py``, through the
``bulbseg`` command line (the engine API where the command line cannot reach them).

Each case either fails with ONE clear line (exit 2, no traceback, nothing written) or works
correctly. ``docs/reliability.md`` ("Second red-team pass") lists every case with its outcome.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_bulbseg import io
from napari_bulbseg.cli import main
from napari_bulbseg.model import CARD_NAME, ModelCard, UNet, UNetConfig, save_model

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


# ------------------------------------------------------------- second red-team pass: cases
# Each setup(tmp, model, home) builds the input and returns the command line.


def _img(p, shape=(1, 24, 28), dtype=np.uint16):
    io.write_tiff(p, np.random.default_rng(0).integers(0, 200, shape).astype(dtype))
    return p


def P(tmp, model, *inputs, extra=()):
    return ["predict", *inputs, "-o", tmp / "out", "--model", model, "--device", "cpu", *extra]


def truncated_png(tmp, model, home):
    p = tmp / "in" / "a.png"
    io.write_mask(p, np.eye(40, dtype=bool))
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 2])
    return P(tmp, model, p)


def truncated_jpeg(tmp, model, home):
    from PIL import Image

    p = tmp / "in" / "a.jpg"
    p.parent.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(p)
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 2])
    return P(tmp, model, p)


def tiff_no_pages(tmp, model, home):
    p = tmp / "in" / "a.tif"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"II*\x00" + struct.pack("<I", 0) + b"\x00" * 8)
    return P(tmp, model, p)


def tiff_zero_slices(tmp, model, home):
    p = tmp / "in" / "a.tif"
    p.parent.mkdir(parents=True)
    tifffile.imwrite(p, np.zeros((0, 8, 8), np.uint8))
    return P(tmp, model, p)


def ome_5d(tmp, model, home):
    p = tmp / "in" / "a.ome.tif"
    p.parent.mkdir(parents=True)
    tifffile.imwrite(
        p,
        np.random.default_rng(0).integers(0, 200, (2, 1, 3, 24, 28)).astype(np.uint8),
        ome=True,
        metadata={"axes": "TCZYX"},
    )
    return P(tmp, model, p)


def complex_tiff(tmp, model, home):
    p = tmp / "in" / "a.tif"
    p.parent.mkdir(parents=True)
    tifffile.imwrite(p, np.ones((8, 8), np.complex128))
    return P(tmp, model, p)


def bool_tiff(tmp, model, home):
    p = tmp / "in" / "a.tif"
    p.parent.mkdir(parents=True)
    tifffile.imwrite(p, np.eye(16, dtype=bool))
    return P(tmp, model, p)


def int64_tiff(tmp, model, home):
    p = tmp / "in" / "a.tif"
    p.parent.mkdir(parents=True)
    tifffile.imwrite(
        p, (np.random.default_rng(0).integers(-(2**62), 2**62, (16, 16))).astype(np.int64)
    )
    return P(tmp, model, p)


def float16_tiff(tmp, model, home):
    p = tmp / "in" / "a.tif"
    p.parent.mkdir(parents=True)
    tifffile.imwrite(p, np.random.default_rng(0).random((16, 16)).astype(np.float16))
    return P(tmp, model, p)


def wide_strip(tmp, model, home):
    p = tmp / "in" / "a.tif"
    io.write_tiff(p, np.random.default_rng(0).integers(0, 200, (3, 65536)).astype(np.uint8))
    return P(tmp, model, p)


def symlink_loop(tmp, model, home):
    d = tmp / "loop"
    os.symlink(d, d)
    return P(tmp, model, d)


def symlink_loop_inside(tmp, model, home):
    d = tmp / "in"
    _img(d / "a.tif")
    os.symlink(d / "self", d / "self")
    return P(tmp, model, d)


def dir_named_tif_in_folder(tmp, model, home):
    d = tmp / "in"
    _img(d / "a.tif")
    (d / "x.tif").mkdir()
    return P(tmp, model, d)


def dir_named_tif_given(tmp, model, home):
    d = tmp / "x.tif"
    d.mkdir()
    return P(tmp, model, d)


def names_differ_in_case(tmp, model, home):
    d = tmp / "in"
    _img(d / "a.tif")
    _img(d / "A.tif")
    return P(tmp, model, d)


def threshold_nan(tmp, model, home):
    return P(tmp, model, _img(tmp / "in" / "a.tif"), extra=["--threshold", "nan"])


def threshold_inf(tmp, model, home):
    return P(tmp, model, _img(tmp / "in" / "a.tif"), extra=["--threshold", "inf"])


def tile_1(tmp, model, home):
    return P(tmp, model, _img(tmp / "in" / "a.tif"), extra=["--tile", "1"])


def overlap_ge_tile(tmp, model, home):
    return P(tmp, model, _img(tmp / "in" / "a.tif"), extra=["--tile", "64", "--overlap", "64"])


def overlap_negative(tmp, model, home):
    return P(tmp, model, _img(tmp / "in" / "a.tif"), extra=["--overlap", "-5"])


def batch_0(tmp, model, home):
    return P(tmp, model, _img(tmp / "in" / "a.tif"), extra=["--batch-size", "0"])


def diameter_0(tmp, model, home):
    return P(tmp, "bundled", _img(tmp / "in" / "a.tif"), extra=["--diameter", "0"])


def diameter_nan(tmp, model, home):
    return P(tmp, "bundled", _img(tmp / "in" / "a.tif"), extra=["--diameter", "nan"])


def diameter_huge(tmp, model, home):
    return P(tmp, "bundled", _img(tmp / "in" / "a.tif"), extra=["--diameter", "1e9"])


def diameter_auto_empty(tmp, model, home):
    p = tmp / "in" / "a.tif"
    io.write_tiff(p, np.full((1, 64, 64), 7, np.uint16))
    return P(tmp, "bundled", p, extra=["--diameter", "auto"])


def min_size_nan(tmp, model, home):
    return P(tmp, model, _img(tmp / "in" / "a.tif"), extra=["--min-size", "nan"])


def keep_largest_float(tmp, model, home):
    return P(tmp, model, _img(tmp / "in" / "a.tif"), extra=["--keep-largest", "1.5"])


def device_bogus(tmp, model, home):
    return [
        "predict",
        _img(tmp / "in" / "a.tif"),
        "-o",
        tmp / "out",
        "--model",
        model,
        "--device",
        "tpu",
    ]


def output_empty_string(tmp, model, home):
    return ["predict", _img(tmp / "in" / "a.tif"), "-o", "", "--model", model, "--device", "cpu"]


def unknown_extension_given(tmp, model, home):
    p = tmp / "in" / "a.czi"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"ZISRAWFILE" + b"\0" * 100)
    return P(tmp, model, p)


def registry_current_garbage(tmp, model, home):
    r = home / "models"
    shutil.copytree(model, r / "v001")
    (r / "current.json").write_bytes(b"\xff\x00garbage{")
    return P(tmp, "current", _img(tmp / "in" / "a.tif"))


def registry_current_points_nowhere(tmp, model, home):
    r = home / "models"
    shutil.copytree(model, r / "v001")
    (r / "current.json").write_text(json.dumps({"id": "v099"}))
    return P(tmp, "current", _img(tmp / "in" / "a.tif"))


def version_without_weights(tmp, model, home):
    r = home / "models"
    shutil.copytree(model, r / "v001")
    (r / "v001" / "weights.safetensors").unlink()
    return P(tmp, "v001", _img(tmp / "in" / "a.tif"))


def card_is_a_list(tmp, model, home):
    m = tmp / "m"
    shutil.copytree(model, m)
    (m / "model.json").write_text("[1, 2]")
    return ["info", m]


def safetensors_2gb_header(tmp, model, home):
    m = tmp / "m"
    shutil.copytree(model, m)
    w = m / "weights.safetensors"
    data = struct.pack("<Q", 2 * 1024**3) + b"{}"
    w.write_bytes(data)
    card = json.loads((m / "model.json").read_text())
    import hashlib

    card["weights"]["sha256"] = hashlib.sha256(data).hexdigest()
    card["weights"]["bytes"] = len(data)
    (m / "model.json").write_text(json.dumps(card))
    return P(tmp, m, _img(tmp / "in" / "a.tif"))


def info_on_a_tiff(tmp, model, home):
    return ["info", _img(tmp / "in" / "a.tif")]


def evaluate_truth_not_masks(tmp, model, home):
    _img(tmp / "pred" / "a_mask.tif", (16, 16), np.uint8)
    io.write_mask(tmp / "pred" / "a_mask.tif", np.eye(16, dtype=bool))
    _img(tmp / "truth" / "a.tif", (16, 16), np.uint16)
    return ["evaluate", "--pred", tmp / "pred", "--truth", tmp / "truth"]


def evaluate_pred_empty_folder(tmp, model, home):
    (tmp / "pred").mkdir()
    io.write_mask(tmp / "truth" / "a.tif", np.eye(16, dtype=bool))
    return ["evaluate", "--pred", tmp / "pred", "--truth", tmp / "truth"]


def rank_non_probability(tmp, model, home):
    _img(tmp / "p" / "a_prob.tif", (2, 16, 16), np.uint16)
    return ["rank", tmp / "p", "-o", tmp / "rank.csv"]


def rank_top_negative(tmp, model, home):
    f = tmp / "p" / "a_prob.tif"
    io.write_tiff(f, np.random.default_rng(0).random((2, 16, 16)).astype(np.float32))
    return ["rank", tmp / "p", "-o", tmp / "rank.csv", "--top", "-1"]


def export_existing_file(tmp, model, home):
    (tmp / "pkg.zip").write_bytes(b"precious")
    return ["export", model, "-o", tmp / "pkg.zip"]


def export_unwritable(tmp, model, home):
    (tmp / "afile").write_text("x")
    return ["export", model, "-o", tmp / "afile" / "pkg.zip"]


def import_random_zip(tmp, model, home):
    with zipfile.ZipFile(tmp / "r.zip", "w") as z:
        z.writestr("hello.txt", "hi")
    return ["import", tmp / "r.zip"]


def import_not_a_zip(tmp, model, home):
    (tmp / "r.zip").write_bytes(os.urandom(300))
    return ["import", tmp / "r.zip"]


def import_zip_slip(tmp, model, home):
    with zipfile.ZipFile(tmp / "evil.zip", "w") as z:
        z.writestr("../../evil.txt", "pwned")
        z.writestr(
            "rdf.yaml", "type: model\nweights: {pytorch_state_dict: {source: ../../evil.txt}}\n"
        )
        z.writestr("/abs.txt", "x")
    return ["import", tmp / "evil.zip"]


def train_empty_images(tmp, model, home):
    (tmp / "i").mkdir()
    (tmp / "m").mkdir()
    return ["train", "--images", tmp / "i", "--masks", tmp / "m", "--device", "cpu"]


def train_lr_nan(tmp, model, home):
    (tmp / "i").mkdir()
    (tmp / "m").mkdir()
    return ["train", "--images", tmp / "i", "--masks", tmp / "m", "--lr", "nan", "--device", "cpu"]


def train_patch_3(tmp, model, home):
    (tmp / "i").mkdir()
    (tmp / "m").mkdir()
    return [
        "train",
        "--images",
        tmp / "i",
        "--masks",
        tmp / "m",
        "--patch-size",
        "3",
        "--device",
        "cpu",
    ]


def train_time_budget_negative(tmp, model, home):
    (tmp / "i").mkdir()
    (tmp / "m").mkdir()
    return [
        "train",
        "--images",
        tmp / "i",
        "--masks",
        tmp / "m",
        "--time-budget",
        "-1",
        "--device",
        "cpu",
    ]


def int8_negative_tiff(tmp, model, home):
    p = tmp / "in" / "a.tif"
    p.parent.mkdir(parents=True)
    tifffile.imwrite(p, np.random.default_rng(0).integers(-128, 127, (16, 16)).astype(np.int8))
    return P(tmp, model, p)


def png_16bit(tmp, model, home):
    from PIL import Image

    p = tmp / "in" / "a.png"
    p.parent.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 65535, (20, 20)).astype(np.uint16)).save(p)
    return P(tmp, model, p)


def rgba_png(tmp, model, home):
    from PIL import Image

    p = tmp / "in" / "a.png"
    p.parent.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 4)).astype(np.uint8)).save(p)
    return P(tmp, model, p)


def csv_in_missing_folder(tmp, model, home):
    io.write_mask(tmp / "pred" / "a_mask.tif", np.eye(16, dtype=bool))
    io.write_mask(tmp / "truth" / "a.tif", np.eye(16, dtype=bool))
    return [
        "evaluate",
        "--pred",
        tmp / "pred",
        "--truth",
        tmp / "truth",
        "--csv",
        tmp / "no" / "such" / "m.csv",
    ]


def same_file_twice(tmp, model, home):
    p = _img(tmp / "in" / "a.tif")
    return P(tmp, model, p, p)


def output_inside_input_file(tmp, model, home):
    p = _img(tmp / "in" / "a.tif")
    return ["predict", p, "-o", p, "--model", model, "--device", "cpu"]


#: case -> ("error", fragments of the one line) or ("ok", outputs under tmp, stderr fragment)
EXPECT: dict[str, tuple] = {
    "truncated_png": ("error", ["truncated"]),
    "truncated_jpeg": ("error", ["truncated"]),
    "tiff_no_pages": ("error", ["contains no images"]),
    "tiff_zero_slices": ("error", ["holds no pixels", "0 slices"]),
    "ome_5d": ("ok", ["out/a_mask.tif"], None),
    "complex_tiff": ("error", ["complex128"]),
    "bool_tiff": ("ok", ["out/a_mask.tif"], None),
    "int64_tiff": ("ok", ["out/a_mask.tif"], None),
    "float16_tiff": ("ok", ["out/a_mask.tif"], None),
    "int8_negative_tiff": ("ok", ["out/a_mask.tif"], None),
    "png_16bit": ("ok", ["out/a_mask.tif"], None),
    "rgba_png": ("ok", ["out/a_mask.tif"], None),
    "wide_strip": ("ok", ["out/a_mask.tif"], None),
    "symlink_loop": ("error", ["loops back on itself"]),
    "symlink_loop_inside": ("ok", ["out/a_mask.tif"], None),
    "dir_named_tif_in_folder": ("ok", ["out/a_mask.tif"], None),
    "dir_named_tif_given": ("error", ["No images", "x.tif"]),
    "names_differ_in_case": ("ok", ["out/a_mask.tif", "out/A_mask.tif"], None),
    "same_file_twice": ("ok", ["out/a_mask.tif"], "named twice"),
    "threshold_nan": ("error", ["Threshold nan", "(0, 1]"]),
    "threshold_inf": ("error", ["Threshold inf", "(0, 1]"]),
    "tile_1": ("error", ["tile=1", ">= 8"]),
    "overlap_ge_tile": ("error", ["smaller than the tile"]),
    "overlap_negative": ("error", ["overlap=-5"]),
    "batch_0": ("error", ["batch_size=0"]),
    "diameter_0": ("error", ["Object diameter 0.0"]),
    "diameter_nan": ("error", ["Object diameter nan"]),
    "diameter_huge": ("error", ["Object diameter 1000000000.0"]),
    "diameter_auto_empty": ("ok", ["out/a_mask.tif"], "no objects found"),
    "min_size_nan": ("error", ["--min-size", "nan"]),
    "keep_largest_float": ("error", ["--keep-largest", "1.5"]),
    "device_bogus": ("error", ["Unknown device 'tpu'"]),
    "output_empty_string": ("error", ["empty path"]),
    "output_inside_input_file": ("error", ["existing file, not a folder"]),
    "unknown_extension_given": ("error", ["not a TIFF, PNG or JPEG"]),
    "registry_current_garbage": ("ok", ["out/a_mask.tif"], "is unreadable"),
    "registry_current_points_nowhere": ("ok", ["out/a_mask.tif"], "'v099', which is not"),
    "version_without_weights": ("error", ["weights.safetensors is missing"]),
    "card_is_a_list": ("error", ["not a JSON object"]),
    "safetensors_2gb_header": ("error", ["unreadable", "header too large"]),
    "info_on_a_tiff": ("error", ["not a model folder"]),
    "evaluate_truth_not_masks": ("error", ["not a binary mask"]),
    "evaluate_pred_empty_folder": ("error", ["No images", "pred"]),
    "csv_in_missing_folder": ("ok", ["no/such/m.csv"], None),
    "rank_non_probability": ("error", ["uint16"]),
    "rank_top_negative": ("error", ["--top", "negative"]),
    "export_existing_file": ("error", ["already exists", "--force"]),
    "export_unwritable": ("error", ["Cannot write"]),
    "import_random_zip": ("error", ["no rdf.yaml"]),
    "import_not_a_zip": ("error", ["not a zip file"]),
    "import_zip_slip": ("error", ["unsafe name", "nothing was imported"]),
    "train_empty_images": ("error", ["contains no images"]),
    "train_lr_nan": ("error", ["lr=nan"]),
    "train_patch_3": ("error", ["patch_size=3"]),
    "train_time_budget_negative": ("error", ["time_budget"]),
}
SETUPS = {name: globals()[name] for name in EXPECT}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and "home" not in p.relative_to(root).parts[:1]
        and p.relative_to(root).parts[:1] != ("tiny",)
    }  # fmt: skip


@pytest.mark.parametrize("case", sorted(EXPECT))
def test_second_red_team_pass(case, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("NAPARI_BULBSEG_HOME", str(home))
    monkeypatch.chdir(tmp_path)  # nothing may land in the working folder unasked
    torch.manual_seed(0)
    model = save_model(tmp_path / "tiny", UNet(UNetConfig(1, 1, 8, 3)), ModelCard(name="tiny"))
    argv = SETUPS[case](tmp_path, model, home)
    before = _snapshot(tmp_path)
    rc, _, err = cli(capsys, *argv)
    expect = EXPECT[case]
    if expect[0] == "error":
        one_error_line(rc, err, *expect[1])
        assert _snapshot(tmp_path) == before  # nothing written, nothing changed
        assert not (tmp_path.parent / "evil.txt").exists()
        return
    _, outputs, note = expect
    assert rc == 0, err
    assert "Traceback" not in err
    for rel in outputs:
        assert (tmp_path / rel).is_file(), (rel, sorted(_snapshot(tmp_path)))
    if note:
        assert note in err, err
    written = set(_snapshot(tmp_path)) - set(before)
    assert {str(Path(r)) for r in outputs} <= written
    assert not [w for w in written if "/" not in w and not w.startswith(("in", "out"))], written


def test_disk_full_while_writing_the_manifest_loses_nothing(tmp_path, capsys, tiny_model_dir):
    import errno

    import napari_bulbseg.outputs as outputs_mod

    io.write_tiff(tmp_path / "a" / "a.tif", np.zeros((1, 16, 16), np.uint16))
    io.write_tiff(tmp_path / "b" / "b.tif", np.zeros((1, 16, 16), np.uint16))
    out = tmp_path / "out"
    args = ["-o", out, "--model", tiny_model_dir, "--device", "cpu"]
    rc, _, err = cli(capsys, "predict", tmp_path / "a", *args)
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = outputs_mod.atomic_write

    def full(path, *a, **k):
        if Path(path).name == outputs_mod.MANIFEST:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(outputs_mod, "atomic_write", full)
        rc, _, err = cli(capsys, "predict", tmp_path / "b", *args)
    one_error_line(rc, err, "No space left on device")
    # the first run's files and the manifest byte for byte; nothing of b, no temp file
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    rc, _, err = cli(capsys, "predict", tmp_path / "b", *args)  # a rerun is not refused
    assert rc == 0, err
    assert (out / "b_mask.tif").is_file() and (out / "a_mask.tif").is_file()


def test_an_output_whose_record_fails_is_removed(tmp_path, tiny_model_dir):
    """Engine level (what cluster workers call): when recording the mask fails, neither the
    mask nor its probability map is left behind unrecorded."""
    from napari_bulbseg.cohort import predict_file
    from napari_bulbseg.inference import PredictOptions
    from napari_bulbseg.model import load_model
    from napari_bulbseg.postprocess import PostProcess

    src = io.write_tiff(tmp_path / "in" / "a.tif", np.zeros((1, 16, 16), np.uint16))
    out = tmp_path / "out"
    out.mkdir()

    def record(path: Path, info) -> None:
        if path.name.endswith("_mask.tif"):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        predict_file(src, out, load_model(tiny_model_dir), PredictOptions(device="cpu"),
                     PostProcess(), on_written=record)  # fmt: skip
    assert list(out.iterdir()) == []


def test_names_differing_in_case_collide_on_a_case_insensitive_output_folder(
    tmp_path, capsys, tiny_model_dir, monkeypatch
):
    import napari_bulbseg.cli as cli_mod

    assert cli_mod._case_insensitive(tmp_path) is False  # this machine's file system
    io.write_tiff(tmp_path / "x" / "Cells.tif", np.zeros((1, 16, 16), np.uint16))
    io.write_tiff(tmp_path / "y" / "cells.tif", np.zeros((1, 16, 16), np.uint16))
    monkeypatch.setattr(cli_mod, "_case_insensitive", lambda folder: True)
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "predict", tmp_path / "x", tmp_path / "y", "-o", out,
                     "--model", tiny_model_dir, "--device", "cpu")  # fmt: skip
    one_error_line(rc, err, "Cells.tif and", "ignore case", "rename one")
    assert not list(out.glob("*.tif"))
