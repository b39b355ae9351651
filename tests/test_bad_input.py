"""Bad input, end to end: each case gives ONE clear line (problem — what to do), never a traceback.

Engine-level cases already covered in ``test_io.py`` / ``test_model.py`` / ``test_normalize.py`` /
``test_metrics.py`` are not repeated here; this file drives the same failures through the
``bulbseg`` command line and covers the cross-module paths. ``docs/reliability.md`` maps every
case to its test.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_bulbseg import io
from napari_bulbseg.cli import main
from napari_bulbseg.errors import InputError, ModelError
from napari_bulbseg.metrics import match_objects, slice_metrics, stack_metrics
from napari_bulbseg.model import (
    CARD_NAME,
    WEIGHTS_NAME,
    ModelCard,
    UNet,
    UNetConfig,
    load_model,
    save_model,
)
from napari_bulbseg.normalize import Normalization, prepare_image
from napari_bulbseg.postprocess import difference_map


def _needs_inference() -> None:
    pytest.importorskip("napari_bulbseg.inference", reason="inference.py not in this checkout yet")


# ----------------------------------------------------------------------------------- helpers


def cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_error_line(rc: int, err: str, *fragments: str) -> str:
    """The run failed with exactly one ``bulbseg: error:`` line holding a hint and ``fragments``."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("bulbseg: error:")]
    assert len(errors) == 1, err
    line = errors[0]
    assert line == lines[-1]  # nothing after it
    assert " — " in line, f"no hint (what to do) in: {line}"
    for f in fragments:
        assert f.lower() in line.lower(), f"{f!r} not in: {line}"
    return line


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def predict(capsys, tiny_model_dir: Path, inputs, out: Path, *extra: object):
    ins = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    return cli(
        capsys, "predict", *ins, "-o", out, "--model", tiny_model_dir, "--device", "cpu", *extra
    )


@pytest.fixture
def img(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    p = tmp_path / "in" / "cells.tif"
    io.write_tiff(p, rng.integers(100, 4000, (2, 24, 28)).astype(np.uint16), axes="ZYX")
    return p


@pytest.fixture
def model3(tmp_path: Path) -> Path:
    """A 3-input-channel model."""
    torch.manual_seed(1)
    return save_model(tmp_path / "rgb-model", UNet(UNetConfig(3, 1, 4, 2)), ModelCard(name="rgb"))


def _card(d: Path) -> dict:
    return json.loads((d / CARD_NAME).read_text())


def _write_card(d: Path, card: dict) -> None:
    (d / CARD_NAME).write_text(json.dumps(card))


# ------------------------------------------------------------------------------ input files


def test_cli_not_a_tiff(tmp_path, capsys, tiny_model_dir):
    _needs_inference()
    p = tmp_path / "notes.tif"
    p.write_text("these are my notes, not an image")
    rc, _, err = predict(capsys, tiny_model_dir, p, tmp_path / "out")
    one_error_line(rc, err, "not a TIFF", "notes.tif", "save the image as TIFF")
    assert not any(f.endswith("_mask.tif") for f in files_under(tmp_path / "out"))


def test_cli_zero_byte_file(tmp_path, capsys, tiny_model_dir):
    _needs_inference()
    p = tmp_path / "empty.tif"
    p.write_bytes(b"")
    rc, _, err = predict(capsys, tiny_model_dir, p, tmp_path / "out")
    one_error_line(rc, err, "empty (0 bytes)", "re-export")


def test_cli_truncated_tiff(tmp_path, capsys, tiny_model_dir):
    _needs_inference()
    p = tmp_path / "cut.tif"
    tifffile.imwrite(p, np.ones((4, 32, 32), np.uint16), metadata={"axes": "ZYX"})
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    rc, _, err = predict(capsys, tiny_model_dir, p, tmp_path / "out")
    one_error_line(rc, err, "truncated", "copy or export the file again")


def test_cli_corrupt_compressed_strips(tmp_path, capsys, tiny_model_dir):
    _needs_inference()
    p = tmp_path / "strips.tif"
    data = np.arange(3 * 16 * 16, dtype=np.uint16).reshape(3, 16, 16)
    tifffile.imwrite(p, data, compression="zlib", photometric="minisblack")
    with tifffile.TiffFile(p) as tif:
        off, cnt = tif.pages[1].dataoffsets[0], tif.pages[1].databytecounts[0]
    raw = bytearray(p.read_bytes())
    raw[off : off + cnt] = b"\x55" * cnt
    p.write_bytes(bytes(raw))
    rc, _, err = predict(capsys, tiny_model_dir, p, tmp_path / "out")
    one_error_line(rc, err, "decode", "damaged")


def test_cli_absurd_declared_size(tmp_path, capsys, tiny_model_dir):
    _needs_inference()
    p = tmp_path / "huge.tif"
    tifffile.imwrite(p, np.zeros((20, 30), np.uint8))
    with tifffile.TiffFile(p) as tif:
        offsets = [tif.pages[0].tags[n].valueoffset for n in ("ImageWidth", "ImageLength")]
    raw = bytearray(p.read_bytes())
    for v in offsets:  # SHORT -> LONG 2**31 - 16 pixels per side
        raw[v - 6 : v - 4] = struct.pack("<H", 4)
        raw[v : v + 4] = struct.pack("<I", 0x7FFFFFF0)
    p.write_bytes(bytes(raw))
    rc, _, err = predict(capsys, tiny_model_dir, p, tmp_path / "out")
    one_error_line(rc, err, "huge.tif", "re-export")


@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (23, 1), (2, 3)])
def test_cli_tiny_images_work(tmp_path, capsys, tiny_model_dir, shape):
    """1×1, 1×N and N×1 images predict: the U-Net pads internally and crops back."""
    _needs_inference()
    rng = np.random.default_rng(1)
    p = io.write_tiff(tmp_path / "tiny.tif", rng.integers(0, 255, shape).astype(np.uint8))
    out = tmp_path / "out"
    rc, _, err = predict(capsys, tiny_model_dir, p, out)
    assert rc == 0, err
    mask = io.read_mask(out / "tiny_mask.tif")
    prob = tifffile.imread(out / "tiny_prob.tif")
    assert mask.shape == shape and prob.reshape(shape).shape == shape
    assert np.isfinite(prob).all() and 0 <= prob.min() and prob.max() <= 1


def test_cli_nan_and_inf_pixels_predict_finite(tmp_path, capsys, tiny_model_dir):
    _needs_inference()
    rng = np.random.default_rng(2)
    a = rng.random((1, 32, 32)).astype(np.float32)
    a[0, :4, :4] = np.nan
    a[0, 10, 10] = np.inf
    a[0, 11, 11] = -np.inf
    p = io.write_tiff(tmp_path / "holes.tif", a, axes="ZYX")
    out = tmp_path / "out"
    rc, _, err = predict(capsys, tiny_model_dir, p, out)
    assert rc == 0, err
    prob = tifffile.imread(out / "holes_prob.tif")
    assert np.isfinite(prob).all() and prob.shape[-2:] == (32, 32)


def test_cli_all_nan_image_is_a_clear_error(tmp_path, capsys, tiny_model_dir):
    _needs_inference()
    p = io.write_tiff(tmp_path / "void.tif", np.full((16, 16), np.nan, np.float32))
    rc, _, err = predict(capsys, tiny_model_dir, p, tmp_path / "out")
    one_error_line(rc, err, "no finite pixel")
    assert not (tmp_path / "out" / "void_mask.tif").exists()


def test_cli_constant_image(tmp_path, capsys, tiny_model_dir):
    _needs_inference()
    p = io.write_tiff(tmp_path / "flat.tif", np.full((2, 20, 20), 700, np.uint16), axes="ZYX")
    out = tmp_path / "out"
    rc, _, err = predict(capsys, tiny_model_dir, p, out)
    assert rc == 0, err
    prob = tifffile.imread(out / "flat_prob.tif")
    assert np.isfinite(prob).all()
    # a constant image normalises to zeros: every pixel sees the same input, so one value
    # away from the border (the model's zero padding makes the rim differ)
    assert np.ptp(prob[:, 8:12, 8:12]) < 1e-6


@pytest.mark.parametrize("shape", [(2, 3, 8, 9), (2, 2, 3, 8, 9)])
def test_cli_4d_5d_without_axes_metadata(tmp_path, capsys, tiny_model_dir, shape):
    _needs_inference()
    p = tmp_path / "amb.tif"
    tifffile.imwrite(p, np.zeros(shape, np.uint8), photometric="minisblack")  # axes Q…QYX
    rc, _, err = predict(capsys, tiny_model_dir, p, tmp_path / "out")
    one_error_line(rc, err, "stacked dimensions", "no metadata", "axes")


def test_cli_rgb_image_on_grey_model_uses_luminance(tmp_path, capsys, tiny_model_dir):
    _needs_inference()
    rng = np.random.default_rng(3)
    p = tmp_path / "he.tif"
    tifffile.imwrite(p, rng.integers(0, 255, (24, 20, 3), dtype=np.uint8), photometric="rgb")
    out = tmp_path / "out"
    rc, _, err = predict(capsys, tiny_model_dir, p, out)
    assert rc == 0, err
    assert io.read_mask(out / "he_mask.tif").shape == (24, 20)


def test_cli_two_channel_image_on_grey_model(tmp_path, capsys, tiny_model_dir):
    _needs_inference()
    p = tmp_path / "two.tif"
    data = np.zeros((1, 2, 16, 16), np.uint16)  # Z C Y X
    tifffile.imwrite(p, data, imagej=True, metadata={"axes": "ZCYX"})
    rc, _, err = predict(capsys, tiny_model_dir, p, tmp_path / "out")
    one_error_line(rc, err, "takes 1 channel", "has 2", "pick one channel")


def test_three_fluorescence_channels_are_not_colour():
    """An ImageJ C=3 hyperstack is not RGB: no silent luminance mix into a grey model."""
    img = np.random.default_rng(4).random((16, 16, 3)).astype(np.float32)
    with pytest.raises(ModelError, match="not RGB colour") as exc:
        prepare_image(img, 1, Normalization(), rgb=False)
    assert "pick one channel" in exc.value.hint
    # four fluorescence channels: the 4th is not dropped as if it were alpha
    with pytest.raises(ModelError, match="4 channels"):
        prepare_image(np.zeros((8, 8, 4), np.float32), 1, Normalization(), rgb=False)
    # true colour still converts (and unknown keeps the old behaviour)
    assert prepare_image(img, 1, Normalization(), rgb=True).shape == (1, 16, 16)
    assert prepare_image(img, 1, Normalization()).shape == (1, 16, 16)


def test_cli_three_fluorescence_channels_on_grey_model(tmp_path, capsys, tiny_model_dir):
    _needs_inference()
    p = tmp_path / "three.tif"
    data = np.random.default_rng(6).integers(0, 4000, (1, 3, 16, 16)).astype(np.uint16)
    tifffile.imwrite(p, data, imagej=True, metadata={"axes": "ZCYX"})
    assert io.read_stack(p).rgb is False
    rc, _, err = predict(capsys, tiny_model_dir, p, tmp_path / "out")
    one_error_line(rc, err, "not RGB colour", "pick one channel")


def test_cli_model_input_channels_do_not_match(tmp_path, capsys, model3):
    _needs_inference()
    p = tmp_path / "two.tif"
    tifffile.imwrite(p, np.zeros((1, 2, 16, 16), np.uint16), imagej=True, metadata={"axes": "ZCYX"})
    rc, _, err = predict(capsys, model3, p, tmp_path / "out")
    one_error_line(rc, err, "takes 3 channel", "has 2")


def test_fine_tuned_rgb_model_predicts_through_the_cli(tmp_path, capsys):
    """A grey model widened to RGB by fine-tuning has channel_policy "adapted": it must load
    and predict RGB images (it used to fail with "Unknown channel policy 'adapted'")."""
    _needs_inference()
    torch.manual_seed(2)
    net = UNet(UNetConfig(3, 1, 4, 2))
    m = save_model(tmp_path / "adapted", net, ModelCard(name="he", channel_policy="adapted"))
    p = tmp_path / "he.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(8).integers(0, 255, (20, 24, 3), np.uint8)).save(p)
    out = tmp_path / "out"
    rc, _, err = predict(capsys, m, p, out)
    assert rc == 0, err
    assert io.read_mask(out / "he_mask.tif").shape == (20, 24)
    card = _card(m)
    card["channel_policy"] = "magic"
    _write_card(m, card)
    rc, _, err = cli(capsys, "info", m)
    one_error_line(rc, err, "unknown channel policy 'magic'")


def test_cli_empty_input_folder(tmp_path, capsys, tiny_model_dir):
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "readme.txt").write_text("x")
    rc, _, err = predict(capsys, tiny_model_dir, tmp_path / "nothing", tmp_path / "out")
    one_error_line(rc, err, "No images")


def test_cli_two_inputs_same_output_name(tmp_path, capsys, tiny_model_dir):
    for d in ("a", "b"):
        io.write_tiff(tmp_path / d / "x.tif", np.zeros((8, 8), np.uint8))
    out = tmp_path / "out"
    rc, _, err = predict(capsys, tiny_model_dir, [tmp_path / "a", tmp_path / "b"], out)
    one_error_line(rc, err, "x_mask.tif", "different output folders")
    assert files_under(out) == set()  # refused before any work


def test_cli_spaces_and_non_ascii_names(tmp_path, capsys, tiny_model_dir):
    _needs_inference()
    folder = tmp_path / "Daten 2024 – Zellkerne µm"
    io.write_tiff(
        folder / "Zelle Nr 1 – ß é 核.tif", np.arange(400, dtype=np.uint16).reshape(20, 20)
    )
    out = tmp_path / "Ergebnisse (ß)"
    rc, _, err = predict(capsys, tiny_model_dir, folder, out)
    assert rc == 0, err
    mask_path = out / "Zelle Nr 1 – ß é 核_mask.tif"
    assert io.read_mask(mask_path).shape == (20, 20)
    truth = folder / "truth"
    io.write_mask(truth / "Zelle Nr 1 – ß é 核.tif", np.zeros((20, 20), bool))
    rc, outp, err = cli(
        capsys, "evaluate", "--pred", out, "--truth", truth, "--csv", out / "m é.csv"
    )
    assert rc == 0, err
    assert (out / "m é.csv").is_file() and "Zelle Nr 1" in outp


def test_cli_predict_refuses_the_image_folder_as_output(tmp_path, capsys, tiny_model_dir):
    """a_mask.tif beside a.tif is read back as a.tif's ground truth: never write it there."""
    d = tmp_path / "work"
    io.write_tiff(d / "a.tif", np.arange(256, dtype=np.uint16).reshape(16, 16))
    rc, _, err = predict(capsys, tiny_model_dir, d, d)
    one_error_line(rc, err, "ground truth of a.tif", "-o predictions/")
    assert sorted(p.name for p in d.iterdir()) == ["a.tif"]


# ------------------------------------------------------------------------------ output paths


def test_cli_output_is_an_existing_file(tmp_path, capsys, tiny_model_dir, img):
    target = tmp_path / "results"
    target.write_text("precious")
    rc, _, err = predict(capsys, tiny_model_dir, img, target)
    one_error_line(rc, err, "existing file", "give a folder")
    assert target.read_text() == "precious"


def test_cli_read_only_output_folder_simulated(tmp_path, capsys, tiny_model_dir, img, monkeypatch):
    """As root chmod does not block writes: the final rename is made to fail instead."""
    _needs_inference()
    out = tmp_path / "out"
    out.mkdir()

    def deny(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", deny)  # what atomic_write renames with
    rc, _, err = predict(capsys, tiny_model_dir, img, out)
    one_error_line(rc, err, "Permission denied", "cells_")
    assert files_under(out) == set()  # no temp file, no half-written result


def test_cli_unwritable_output_folder_is_found_before_any_work(
    tmp_path, capsys, tiny_model_dir, img, monkeypatch
):
    import napari_bulbseg.outputs as cli_mod

    real = cli_mod.tempfile.TemporaryFile

    def deny(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli_mod.tempfile, "TemporaryFile", deny)
    rc, _, err = predict(capsys, tiny_model_dir, img, tmp_path / "out")
    line = one_error_line(rc, err, "Cannot write to the output folder", "Permission denied")
    assert "model" not in err.replace(line, "")  # refused before the model was loaded
    monkeypatch.setattr(cli_mod.tempfile, "TemporaryFile", real)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_cli_read_only_output_folder_real(tmp_path, capsys, tiny_model_dir, img):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        rc, _, err = predict(capsys, tiny_model_dir, img, out)
        one_error_line(rc, err, "Cannot write", "permission")
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o700)


def test_cli_csv_path_is_a_folder(tmp_path, capsys):
    m = tmp_path / "masks"
    io.write_mask(m / "a.png", np.eye(8, dtype=bool))
    rc, _, err = cli(capsys, "evaluate", "--pred", m, "--truth", m, "--csv", tmp_path)
    one_error_line(rc, err, "is a folder", "metrics.csv")


# ------------------------------------------------------------------------------ masks and metrics


def _masks(tmp_path: Path, truth: np.ndarray, pred: np.ndarray, name: str = "a.tif"):
    t, p = tmp_path / "truth", tmp_path / "pred"
    t.mkdir(exist_ok=True)
    p.mkdir(exist_ok=True)
    tifffile.imwrite(t / name, truth)
    tifffile.imwrite(p / name.replace(".tif", "_mask.tif"), pred)
    return t, p


def test_cli_evaluate_shape_mismatch(tmp_path, capsys):
    t, p = _masks(tmp_path, np.zeros((10, 12), np.uint8), np.zeros((10, 11), np.uint8))
    rc, _, err = cli(capsys, "evaluate", "--pred", p, "--truth", t)
    one_error_line(rc, err, "(10, 11)", "(10, 12)", "same images")


@pytest.mark.parametrize(
    "values, hint",
    [((0, 2), "binary mask"), ((0, 1, 7, 255), "labels > 0"), ((0, 128), "binary mask")],
)
def test_cli_evaluate_mask_values_not_binary(tmp_path, capsys, values, hint):
    truth = np.zeros((8, 8), np.uint8)
    truth.flat[: len(values)] = values
    t, p = _masks(tmp_path, truth, np.zeros((8, 8), np.uint8))
    rc, _, err = cli(capsys, "evaluate", "--pred", p, "--truth", t)
    one_error_line(rc, err, "not a binary mask", hint)


def test_cli_evaluate_instance_labels_uint16(tmp_path, capsys):
    lab = np.zeros((8, 8), np.uint16)
    lab[1:3, 1:3], lab[5:7, 5:7] = 1, 300
    t, p = _masks(tmp_path, lab, (lab > 0).astype(np.uint8))
    rc, _, err = cli(capsys, "evaluate", "--pred", p, "--truth", t)
    one_error_line(rc, err, "not a binary mask", "labels > 0")


def test_cli_evaluate_probabilities_as_prediction(tmp_path, capsys):
    prob = np.random.default_rng(5).random((8, 8)).astype(np.float32)
    t, p = _masks(tmp_path, np.zeros((8, 8), np.uint8), prob)
    rc, _, err = cli(capsys, "evaluate", "--pred", p, "--truth", t)
    one_error_line(rc, err, "not a binary mask", "threshold")


def test_cli_evaluate_empty_ground_truth(tmp_path, capsys):
    """An empty truth is valid: Dice 0 against a non-empty prediction, 1 against an empty one."""
    pred = np.zeros((8, 8), np.uint8)
    pred[2:4, 2:4] = 255
    t, p = _masks(tmp_path, np.zeros((8, 8), np.uint8), pred)
    _masks(tmp_path, np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), name="b.tif")
    csv_path = tmp_path / "m.csv"
    rc, _out, err = cli(capsys, "evaluate", "--pred", p, "--truth", t, "--csv", csv_path)
    assert rc == 0, err
    text = csv_path.read_text()
    assert "nan" not in text.lower()
    rows = {r.split(",")[0]: r.split(",") for r in text.splitlines()[1:]}
    assert float(rows["0"][1]) == 0.0 and float(rows["1"][1]) == 1.0


def test_cli_evaluate_no_matching_names(tmp_path, capsys):
    t, _ = _masks(tmp_path, np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))
    other = tmp_path / "other"
    io.write_mask(other / "zzz.tif", np.zeros((4, 4), bool))
    rc, _, err = cli(capsys, "evaluate", "--pred", other, "--truth", t)
    one_error_line(rc, err, "matches", "name predictions like the truth")


def test_cli_evaluate_bad_match_iou(tmp_path, capsys):
    t, p = _masks(tmp_path, np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))
    rc, _, err = cli(capsys, "evaluate", "--pred", p, "--truth", t, "--match-iou", "1.5")
    one_error_line(rc, err, "outside [0, 1)")


@pytest.mark.parametrize("fn", [slice_metrics, difference_map, match_objects])
def test_metrics_refuse_probabilities_and_nan_as_masks(fn):
    truth = np.zeros((6, 6), np.uint8)
    with pytest.raises(InputError, match="looks like probabilities") as exc:
        fn(truth, np.full((6, 6), 0.3, np.float32))
    assert "threshold" in exc.value.hint
    with pytest.raises(InputError, match="nan"):
        fn(np.where(np.eye(6) > 0, np.nan, 0.0), truth)


@pytest.mark.parametrize("fn", [slice_metrics, difference_map, stack_metrics])
def test_metrics_refuse_wrong_dtype_and_shape(fn):
    good = np.zeros((2, 5, 5), np.uint8) if fn is stack_metrics else np.zeros((5, 5), np.uint8)
    with pytest.raises(InputError, match="not a number type"):
        fn(good.astype("U1"), good)
    with pytest.raises(InputError, match="shape"):
        fn(good, good[..., :4])
    # instance labels (integers) are accepted: label > 0 is foreground
    lab = good.astype(np.int32)
    lab[..., 1, 1], lab[..., 3, 3] = 7, 300
    fn(lab, (lab > 0).astype(np.uint8))


# ------------------------------------------------------------------------------ models


@pytest.mark.parametrize(
    "break_it, fragment",
    [
        (lambda d: (d / CARD_NAME).unlink(), "No model card"),
        (lambda d: (d / CARD_NAME).write_text("{not json"), "not valid JSON"),
        (lambda d: _write_card(d, {**_card(d), "format_version": 7}), "newer than"),
        (lambda d: _write_card(d, {**_card(d), "weights": []}), "invalid 'weights'"),
        (
            lambda d: _write_card(d, {**_card(d), "normalization": {"low": "one", "high": 99}}),
            "not a number",
        ),
        (
            lambda d: _write_card(d, {**_card(d), "postprocess": {"min_size": -4}}),
            "post-processing",
        ),
        (lambda d: _write_card(d, {**_card(d), "threshold": float("nan")}), "threshold"),
        (
            lambda d: _write_card(
                d, {**_card(d), "architecture": {**_card(d)["architecture"], "in_channels": "3"}}
            ),
            "Invalid U-Net setting",
        ),
    ],
)
def test_cli_broken_model_cards(tmp_path, capsys, tiny_model_dir, break_it, fragment):
    break_it(tiny_model_dir)
    rc, _, err = cli(capsys, "info", tiny_model_dir)
    one_error_line(rc, err, fragment)


def test_cli_weights_sha256_mismatch(tmp_path, capsys, tiny_model_dir):
    w = tiny_model_dir / WEIGHTS_NAME
    raw = bytearray(w.read_bytes())
    raw[-5] ^= 0x01  # one flipped bit in the last tensor
    w.write_bytes(bytes(raw))
    rc, _, err = cli(capsys, "info", tiny_model_dir)
    one_error_line(rc, err, "do not match their card", "copy the model folder again")


def test_cli_truncated_safetensors(tmp_path, capsys, tiny_model_dir):
    w = tiny_model_dir / WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[:200])
    rc, _, err = cli(capsys, "info", tiny_model_dir)
    one_error_line(rc, err, "do not match their card")
    # … and when someone "fixes" the hash, the truncated file is still refused as unreadable
    card = _card(tiny_model_dir)
    card["weights"].update(sha256=hashlib.sha256(w.read_bytes()).hexdigest(), bytes=200)
    _write_card(tiny_model_dir, card)
    rc, _, err = cli(capsys, "info", tiny_model_dir)
    one_error_line(rc, err, "unreadable")


def test_oversized_weights_file_is_refused_before_reading(tmp_path, tiny_model_dir, monkeypatch):
    w = tiny_model_dir / WEIGHTS_NAME
    with open(w, "ab") as f:
        f.truncate(w.stat().st_size + (1 << 30))  # 1 GiB more, sparse: never read
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"read {self}"))
    with pytest.raises(ModelError, match="bytes on disk"):
        load_model(tiny_model_dir)


def test_absurd_architecture_fails_without_allocating(tiny_model_dir):
    card = _card(tiny_model_dir)
    card["architecture"]["base_channels"] = 1_000_000  # ~10^13 parameters if built
    _write_card(tiny_model_dir, card)
    with pytest.raises(ModelError, match="base_channels=1000000 is out of range") as exc:
        load_model(tiny_model_dir)
    assert "1…1024" in exc.value.hint
    # within each limit but too large together: refused by its parameter count
    card["architecture"].update(base_channels=512, depth=7)
    _write_card(tiny_model_dir, card)
    with pytest.raises(ModelError, match="parameters"):
        load_model(tiny_model_dir)
    # a plausible architecture that the weights do not fit: checked on the meta device
    card["architecture"].update(base_channels=64, depth=3)
    _write_card(tiny_model_dir, card)
    with pytest.raises(ModelError, match="do not fit the architecture") as exc:
        load_model(tiny_model_dir)
    assert "re-export" in exc.value.hint


class _Payload:
    """Unpickling this creates ``target`` (what a malicious checkpoint could do)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "ckpt.pkl"])
def test_cli_pickle_offered_as_model_is_not_executed(tmp_path, capsys, img, name):
    marker = tmp_path / "PWNED.txt"
    evil = tmp_path / name
    evil.write_bytes(pickle.dumps(_Payload(str(marker))))
    for argv in (["info", evil], ["predict", img, "-o", tmp_path / "o", "--model", evil]):
        rc, _, err = cli(capsys, *argv, *(["--device", "cpu"] if argv[0] == "predict" else []))
        one_error_line(rc, err, "not opened", "safetensors")
    assert not marker.exists()


def test_cli_pickle_disguised_as_safetensors_is_not_executed(tmp_path, capsys):
    marker = tmp_path / "PWNED.txt"
    d = tmp_path / "disguised"
    d.mkdir()
    payload = pickle.dumps(_Payload(str(marker)))
    (d / WEIGHTS_NAME).write_bytes(payload)
    card = ModelCard()
    card.weights = {"file": WEIGHTS_NAME, "sha256": hashlib.sha256(payload).hexdigest()}
    (d / CARD_NAME).write_text(card.to_json())
    rc, _, err = cli(capsys, "info", d)
    one_error_line(rc, err, "unreadable")
    assert not marker.exists()


def test_cli_unknown_model_name(tmp_path, capsys, img, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, "info", "my-best-model")
    one_error_line(rc, err, "No model at my-best-model", "version id")


# ------------------------------------------------------------------------------ options


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--threshold", "1.5"], "outside (0, 1]"),
        (["--threshold", "0"], "outside (0, 1]"),
        (["--min-size", "-3"], "min_size"),
        (["--keep-largest", "-1"], "keep_largest"),
        (["--threshold", "abc"], "invalid float value"),
        (["--tile"], "expected one argument"),
    ],
)
def test_cli_bad_predict_options(tmp_path, capsys, tiny_model_dir, img, extra, fragment):
    _needs_inference()
    rc, _, err = predict(capsys, tiny_model_dir, img, tmp_path / "out", *extra)
    one_error_line(rc, err, fragment)
    assert not (tmp_path / "out" / "cells_mask.tif").exists()


def test_cli_cuda_requested_without_gpu(tmp_path, capsys, tiny_model_dir, img):
    _needs_inference()
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    rc, _, err = predict(capsys, tiny_model_dir, img, tmp_path / "out", "--device", "cuda")
    one_error_line(rc, err, "CUDA was requested but is not available", "--device cpu")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        ([], "required: command"),
        (["predict", "x.tif"], "required: -o/--output"),
        (["frobnicate"], "invalid choice"),
        (["evaluate", "--pred", "p"], "--truth"),
    ],
)
def test_cli_usage_errors_are_one_line(capsys, argv, fragment):
    rc, _, err = cli(capsys, *argv)
    one_error_line(rc, err, fragment, "--help")
    assert "usage:" not in err


def test_cli_help_and_version_exit_zero(capsys):
    assert main(["--version"]) == 0
    assert "napari-bulbseg" in capsys.readouterr().out
    assert main(["predict", "--help"]) == 0
    assert "--output" in capsys.readouterr().out


def test_cli_train_bad_settings_and_unpaired_data(tmp_path, capsys, bulbseg_home):
    root = tmp_path / "ds"
    io.write_tiff(root / "images" / "a.tif", np.zeros((16, 16), np.uint8))
    io.write_tiff(root / "images" / "b.tif", np.zeros((16, 16), np.uint8))
    io.write_mask(root / "masks" / "a.png", np.zeros((16, 16), bool))
    args = ["train", "--images", root / "images", "--masks", root / "masks", "--device", "cpu"]
    rc, _, err = cli(capsys, *args, "--epochs", "0")
    one_error_line(rc, err, "epochs=0", ">= 1")
    rc, _, err = cli(capsys, *args, "--epochs", "1")
    one_error_line(rc, err, "do not pair up", "b")
    assert not (bulbseg_home / "models").exists() or not any((bulbseg_home / "models").iterdir())


def test_cli_unexpected_bug_is_still_one_line(tmp_path, capsys, monkeypatch):
    import napari_bulbseg.cli as cli_mod

    def boom(args):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(cli_mod, "cmd_info", boom)
    rc, _, err = cli(capsys, "info")
    line = one_error_line(rc, err, "unexpected ZeroDivisionError", "--debug", "second line")
    assert "\n" not in line
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "info"])


@pytest.mark.parametrize("how", ["home_is_a_file", "models_is_a_file"])
def test_cli_train_unwritable_registry_found_before_training(tmp_path, capsys, monkeypatch, how):
    import napari_bulbseg.data as data_mod

    root = tmp_path / "ds"
    io.write_tiff(root / "images" / "a.tif", np.zeros((16, 16), np.uint8))
    io.write_mask(root / "masks" / "a.png", np.zeros((16, 16), bool))
    home = tmp_path / "home"
    if how == "home_is_a_file":
        home.write_text("not a folder")
    else:
        home.mkdir()
        (home / "models").write_text("not a folder")
    monkeypatch.setenv("NAPARI_BULBSEG_HOME", str(home))

    def no_data(*a, **k):
        raise AssertionError("data read before the registry was checked")

    monkeypatch.setattr(data_mod, "samples_from_folders", no_data)
    rc, _, err = cli(
        capsys, "train", "--images", root / "images", "--masks", root / "masks", "--device", "cpu"
    )
    one_error_line(rc, err, "Cannot save models in", "NAPARI_BULBSEG_HOME")


@pytest.mark.parametrize("value, words", [(0, "are empty"), (1, "entirely foreground")])
def test_cli_train_refuses_uninformative_masks(tmp_path, capsys, bulbseg_home, value, words):
    """All-empty / all-foreground masks used to give a current model with Dice 0.000 / 1.000."""
    root = tmp_path / "ds"
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        io.write_tiff(root / "images" / f"{name}.tif", rng.integers(0, 255, (32, 32), np.uint8))
        io.write_mask(root / "masks" / f"{name}.png", np.full((32, 32), value, bool))
    args = ["train", "--images", root / "images", "--masks", root / "masks", "--device", "cpu"]
    rc, _, err = cli(capsys, *args, "--epochs", "1", "--steps-per-epoch", "1")
    one_error_line(rc, err, words, "3 training mask")
    models = bulbseg_home / "models"
    assert not models.exists() or not [p for p in models.iterdir() if p.name.startswith("v")]


def test_cli_control_characters_in_names_are_printed_escaped(tmp_path, capsys, tiny_model_dir):
    d = tmp_path / "in"
    d.mkdir()
    evil = d / "a\x1b[2Jb\x07.tif"  # clear-screen escape and a bell in a file name
    io.write_tiff(evil, np.arange(256, dtype=np.uint16).reshape(16, 16))
    rc, out, err = predict(capsys, tiny_model_dir, evil, tmp_path / "out")
    assert rc == 0, err
    assert "\x1b" not in out + err and "\x07" not in out + err
    assert "a\\x1b[2Jb\\x07" in out
    bad = d / "b\x1b[31m.tif"
    bad.write_bytes(b"not an image")
    rc, _, err = predict(capsys, tiny_model_dir, bad, tmp_path / "out2")
    line = one_error_line(rc, err, "b\\x1b[31m")
    assert "\x1b" not in line


def test_cli_train_memory_hint_names_its_own_options(tmp_path, capsys, monkeypatch):
    import napari_bulbseg.cli as cli_mod

    def no_memory(args):
        raise MemoryError

    monkeypatch.setattr(cli_mod, "cmd_train", no_memory)
    rc, _, err = cli(capsys, "train", "--images", tmp_path, "--masks", tmp_path)
    one_error_line(rc, err, "--patch-size", "--batch-size")
    assert "--tile" not in err
