"""Sliding-window prediction: shapes, exactness against one whole-image pass, TTA, storage,
cancellation, progress, slice selection, out-of-memory fallback, devices and input checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_bulbseg import devices, inference
from napari_bulbseg.errors import InputError, ModelError
from napari_bulbseg.events import Progress, drain
from napari_bulbseg.inference import (
    PredictOptions,
    iter_predict,
    iter_predict_slice,
    predict,
    select_device,
)
from napari_bulbseg.model import (
    LoadedModel,
    ModelCard,
    UNet,
    UNetConfig,
    bundled_model_dir,
    load_bundled,
    load_model,
    save_model,
)
from napari_bulbseg.normalize import prepare_image

F32 = PredictOptions(prob_dtype="float32")


def blobs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A fluorescence-like uint16 image: bright round blobs on a noisy background."""
    rng = np.random.default_rng(seed)
    *lead, h, w = shape
    out = np.empty((int(np.prod(lead, dtype=int)), h, w), np.float32)
    yy, xx = np.mgrid[:h, :w]
    for k in range(out.shape[0]):
        img = np.full((h, w), 110.0, np.float32)
        for _ in range(max(1, h * w // 4000)):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, 14)
            img += 900 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        out[k] = img + rng.normal(0, 30, (h, w))
    return np.clip(out, 0, 4095).astype(np.uint16).reshape(shape)


def calibrate(model: UNet, image2d: np.ndarray) -> UNet:
    """Set batch-norm statistics from ``image2d`` so an untrained net's features are lively
    (unit variance at every layer) — a stand-in for a trained model's receptive field."""
    x = torch.from_numpy(prepare_image(image2d, 1, ModelCard().norm))[None]
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def make_loaded(tmp_path: Path, cfg: UNetConfig, calib: np.ndarray | None = None) -> LoadedModel:
    torch.manual_seed(0)
    net = UNet(cfg)
    if calib is not None:
        calibrate(net, calib)
    name = f"m{len(list(tmp_path.iterdir()))}"
    return load_model(save_model(tmp_path / name, net, ModelCard(name=name)))


def whole(loaded: LoadedModel, image2d: np.ndarray) -> np.ndarray:
    """One whole-image forward pass: the reference that tiling must reproduce."""
    x = prepare_image(
        image2d, loaded.card.in_channels, loaded.card.norm, loaded.card.channel_policy
    )
    with torch.inference_mode():
        return torch.sigmoid(loaded.model(torch.from_numpy(x)[None]))[0, 0].numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> LoadedModel:
    """depth 3, base 8, batch norm calibrated on blobs (receptive-field radius 22 px)."""
    return make_loaded(
        tmp_path_factory.mktemp("tiny"), UNetConfig(1, 1, 8, 3), blobs((256, 256), seed=9)
    )


# --------------------------------------------------------------------------- shapes & exactness


@pytest.mark.parametrize("shape", [(1, 517, 333), (1, 7, 9), (2, 300, 1000)])
def test_output_shape_and_tiled_equals_whole(tiny, shape):
    img = blobs(shape, seed=1)
    opts = PredictOptions(tile=192, overlap=48, prob_dtype="float32")
    prob = predict(tiny, img, opts)
    assert prob.shape == shape and prob.dtype == np.float32
    assert np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1
    for z in range(shape[0]):
        np.testing.assert_allclose(prob[z], whole(tiny, img[z]), atol=1e-4)


def test_default_options_match_whole_image_pass(tmp_path):
    """The default tile/overlap/blend reproduce one whole-image forward pass within 1e-3 for a
    4-level, 16-channel U-Net (the bundled model where present, else one whose batch norm is
    calibrated on the image), and the test is sharp: thin overlaps without trim do not."""
    img = blobs((1400, 200), seed=3)
    if bundled_model_dir().is_dir():
        loaded = load_bundled()
    else:  # pragma: no cover - the bundled model ships with the package
        loaded = make_loaded(tmp_path, UNetConfig(), calib=img)
    assert loaded.card.unet_config.depth == 4
    ref = whole(loaded, img)
    assert ref.std() > 0.05  # the model's output varies: edge effects would show
    grid = inference._Plan.make(img.shape, 8, PredictOptions()).grid
    assert len(grid) == 2  # the image really is tiled with the default options
    tiled = predict(loaded, img, F32)[0]
    assert np.abs(tiled - ref).max() < 1e-3
    naive = PredictOptions(overlap=16, blend="cosine", trim=0, prob_dtype="float32")
    assert np.abs(predict(loaded, img, naive)[0] - ref).max() > 1e-2


@pytest.mark.parametrize("blend", ["gaussian", "cosine", "linear", "constant"])
def test_every_blend_mode_is_exact_with_enough_trim(tiny, blend):
    img = blobs((200, 180), seed=4)
    opts = PredictOptions(tile=128, overlap=56, trim=24, blend=blend)
    prob = drain(iter_predict_slice(tiny, img, opts))
    assert prob.shape == img.shape and prob.dtype == np.float32
    np.testing.assert_allclose(prob, whole(tiny, img), atol=1e-4)


def test_rgb_stack_through_luminance(tiny):
    rgb = np.stack([blobs((1, 64, 80), s) for s in (1, 2, 3)], axis=-1)  # (1, 64, 80, 3)
    prob = predict(tiny, rgb, F32)
    assert prob.shape == (1, 64, 80)


# --------------------------------------------------------------------------- TTA


def _symmetrise(model: UNet) -> UNet:
    """Average every kernel over the 8 flips/rotations: the network becomes D4-equivariant."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                w = m.weight
                acc = torch.zeros_like(w)
                for k in range(4):
                    r = torch.rot90(w, k, (-2, -1))
                    acc += r + r.flip(-1)
                w.copy_(acc / 8)
    return model


def test_tta_equals_plain_for_equivariant_model_and_differs_otherwise(tiny, tmp_path):
    img = blobs((96, 96), seed=5)
    sym = LoadedModel(_symmetrise(UNet(UNetConfig(1, 1, 8, 3)).eval()), ModelCard())
    plain = predict(sym, img, F32)
    tta = predict(sym, img, PredictOptions(tta=True, prob_dtype="float32"))
    assert tta.shape == plain.shape and tta.dtype == np.float32
    np.testing.assert_allclose(tta, plain, atol=1e-5)
    # an ordinary model: TTA is the mean of the 8 transformed predictions
    t = torch.from_numpy(prepare_image(img, 1, tiny.card.norm))[None]
    acc = torch.zeros_like(t)
    with torch.inference_mode():
        for k in range(4):
            for flip in (False, True):
                x = torch.rot90(t.flip(-1) if flip else t, k, (-2, -1))
                p = torch.rot90(torch.sigmoid(tiny.model(x)), -k, (-2, -1))
                acc += p.flip(-1) if flip else p
    expected = (acc / 8)[0, 0].numpy()
    got = predict(tiny, img, PredictOptions(tta=True, prob_dtype="float32"))[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(got - predict(tiny, img, F32)[0]).max() > 1e-3


def test_tta_tiled_symmetric_input(tiny):
    img = blobs((1, 112, 112), seed=6)
    img = np.maximum(img, img[:, ::-1, :])  # mirror-symmetric slice (tile grid symmetric too)
    opts = PredictOptions(tile=64, overlap=16, tta=True, prob_dtype="float32")
    assert inference._Plan.make((112, 112), 8, opts).grid.ys == (0, 48)
    prob = predict(tiny, img, opts)[0]
    assert prob.shape == (112, 112)
    np.testing.assert_allclose(prob, prob[::-1, :], atol=1e-5)
    plain = predict(tiny, img, PredictOptions(tile=64, overlap=16, prob_dtype="float32"))[0]
    assert np.abs(plain - plain[::-1, :]).max() > 1e-3  # without TTA the model is not symmetric


# --------------------------------------------------------------------------- storage


def test_uint8_and_float16_storage_agree(tiny):
    img = blobs((2, 200, 170), seed=7)
    p16 = predict(tiny, img, PredictOptions(tile=96, overlap=48))
    p8 = predict(tiny, img, PredictOptions(tile=96, overlap=48, prob_dtype="uint8"))
    assert p16.dtype == np.float16 and p8.dtype == np.uint8
    diff = np.abs(p8.astype(np.float32) / 255 - p16.astype(np.float32))
    assert diff.max() <= 1 / 255 and diff.max() > 0


def test_caller_out_array_memmap(tiny, tmp_path):
    img = blobs((3, 64, 72), seed=8)
    out = np.lib.format.open_memmap(tmp_path / "p.npy", "w+", np.uint8, img.shape)
    res = predict(tiny, img, out=out)
    assert res is out
    out.flush()
    back = np.load(tmp_path / "p.npy")
    ref = np.rint(whole(tiny, img[2]) * 255)
    assert np.abs(back[2].astype(int) - ref).max() <= 1
    with pytest.raises(InputError):
        predict(tiny, img, out=np.zeros((3, 64, 71), np.float16))
    with pytest.raises(InputError):
        predict(tiny, img, out=np.zeros(img.shape, np.int32))


# --------------------------------------------------------------------------- job control


def test_progress_counts_up_to_total(tiny):
    img = blobs((3, 200, 200), seed=10)
    opts = PredictOptions(tile=96, overlap=32, batch_size=3)
    events: list[Progress] = []
    predict(tiny, img, opts, callback=events.append)
    per_slice = len(inference._Plan.make((200, 200), 8, opts).grid)
    total = 3 * per_slice
    assert all(e.total == total for e in events)
    dones = [e.done for e in events]
    assert dones == sorted(dones) and dones[-1] == total and len(set(dones)) == len(dones)
    assert len(events) == -(-total // 3)
    assert [e.slice_index for e in events if "done" in e.message] == [0, 1, 2]


def test_cancel_leaves_partial_out_and_no_result(tiny):
    img = blobs((4, 64, 64), seed=11)
    out = np.zeros(img.shape, np.float16)
    gen = iter_predict(tiny, img, PredictOptions(batch_size=1), out=out)
    first = next(gen)
    assert first.done == 1 and first.slice_index == 0
    assert not torch.is_inference_mode_enabled()  # no torch state leaks between batches
    gen.close()
    with pytest.raises(StopIteration) as stop:
        next(gen)
    assert stop.value.value is None  # closed: no result pretending to be complete
    assert np.any(out[0] != 0)  # the finished slice was written
    assert not np.any(out[1:])  # the rest untouched


def test_slices_restrict_work(tiny):
    img = blobs((5, 64, 64), seed=12)
    out = np.full(img.shape, -1, np.float32)
    events: list[Progress] = []
    predict(
        tiny, img, PredictOptions(batch_size=1), out=out, slices=[3, -1], callback=events.append
    )
    assert [e.slice_index for e in events] == [3, 4]
    assert events[-1].done == events[-1].total == 2
    assert (out[[0, 1, 2]] == -1).all() and (out[[3, 4]] >= 0).all()
    np.testing.assert_allclose(out[3], whole(tiny, img[3]), atol=1e-4)
    with pytest.raises(InputError):
        iter_predict(tiny, img, slices=[5])


def test_batches_span_slices(tiny):
    img = blobs((5, 40, 40), seed=13)
    events: list[Progress] = []
    prob = predict(
        tiny, img, PredictOptions(batch_size=4, prob_dtype="float32"), callback=events.append
    )
    assert [e.done for e in events] == [4, 5]
    np.testing.assert_allclose(prob[4], whole(tiny, img[4]), atol=1e-4)


def test_stack_like_object_read_plane_by_plane(tiny):
    img = blobs((3, 50, 60), seed=14)
    read: list[int] = []

    class LazyStack:
        data = np.empty(img.shape, np.uint16)  # only its shape is used
        rgb = False
        axes = "ZYX"

        def plane(self, i: int) -> np.ndarray:
            read.append(i)
            return img[i]

    np.testing.assert_array_equal(predict(tiny, LazyStack()), predict(tiny, img))
    assert sorted(read) == [0, 1, 2]


def test_caller_model_untouched_and_threads_restored(tiny, monkeypatch):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    seen: list[int] = []
    real = inference._forward

    def spy(net, x, amp):
        seen.append(torch.get_num_threads())
        assert amp is None  # no autocast on the CPU
        return real(net, x, amp)

    monkeypatch.setattr(inference, "_forward", spy)
    old = torch.get_num_threads()
    predict(tiny, blobs((1, 40, 40)), PredictOptions(num_threads=1, amp=True))
    assert seen == [1] and torch.get_num_threads() == old
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in tiny.model.modules())


# --------------------------------------------------------------------------- mixed precision, OOM


def _oom() -> BaseException:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")


def test_oom_halves_batch(tiny, monkeypatch):
    img = blobs((2, 100, 100), seed=15)
    opts = PredictOptions(tile=64, overlap=24, batch_size=4, prob_dtype="float32")
    ref = predict(tiny, img, opts)
    real = inference._forward
    sizes: list[int] = []

    def fake(net, x, amp):
        sizes.append(x.shape[0])
        if x.shape[0] > 1:
            raise _oom()
        return real(net, x, amp)

    monkeypatch.setattr(inference, "_forward", fake)
    events: list[Progress] = []
    got = predict(tiny, img, opts, callback=events.append)
    # batch 1 vs batch 4: float32 convolutions may sum in another order (seen: 1.25e-6)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert sizes[:3] == [4, 2, 1] and set(sizes[3:]) == {1}
    assert "batch size reduced to 2" in events[0].message
    assert "batch size reduced to 1" in events[0].message
    assert all("memory" not in e.message for e in events[1:])


def test_oom_falls_back_to_cpu(tiny, monkeypatch):
    img = blobs((1, 100, 100), seed=16)
    opts = PredictOptions(tile=64, overlap=24, batch_size=2, prob_dtype="float32")
    ref = predict(tiny, img, opts)
    real = inference._forward
    calls = {"n": 0}

    def fake(net, x, amp):
        calls["n"] += 1
        if calls["n"] <= 2:  # batch 2 fails, batch 1 fails: give up the "GPU"
            raise RuntimeError("CUDA error: out of memory")
        return real(net, x, amp)

    monkeypatch.setattr(inference, "_forward", fake)
    monkeypatch.setattr(inference, "_can_fall_back", lambda dev: calls["n"] <= 2)
    events: list[Progress] = []
    got = predict(tiny, img, opts, callback=events.append)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert "continuing on the CPU" in events[0].message


def test_oom_on_cpu_with_batch_one_is_a_user_error(tiny, monkeypatch):
    def fake(net, x, amp):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 9 GB")

    monkeypatch.setattr(inference, "_forward", fake)
    with pytest.raises(InputError, match="Out of memory") as err:
        predict(tiny, blobs((1, 40, 40)), PredictOptions(batch_size=2))
    assert "smaller tile" in err.value.hint


def test_other_errors_are_not_swallowed(tiny, monkeypatch):
    def fake(net, x, amp):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(inference, "_forward", fake)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        predict(tiny, blobs((1, 40, 40)))


def test_autocast_path_and_overflow_fallback(tiny, monkeypatch):
    """The CUDA mixed-precision path, exercised on the CPU with bfloat16 autocast."""
    img = blobs((1, 80, 80), seed=17)
    ref = predict(tiny, img, F32)
    monkeypatch.setattr(inference._Engine, "amp_dtype", property(lambda self: torch.bfloat16))
    amp = predict(tiny, img, F32)
    assert 0 < np.abs(amp - ref).max() < 0.03  # really ran in bfloat16, and close
    real = inference._forward

    def overflow(net, x, dtype):
        y = real(net, x, dtype)
        return y if dtype is None else torch.full_like(y, float("inf"))

    monkeypatch.setattr(inference, "_forward", overflow)
    events: list[Progress] = []
    got = predict(tiny, img, F32, callback=events.append)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert "recomputed it in float32" in events[0].message


# --------------------------------------------------------------------------- devices & inputs


def test_select_device(monkeypatch):
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    with pytest.raises(InputError, match="CUDA was requested") as err:
        select_device("cuda")
    assert "CUDA build" in err.value.hint or "cpu" in err.value.hint
    for build_cuda, why in ((None, "has no CUDA support"), ("12.1", "no CUDA GPU is visible")):
        monkeypatch.setattr(torch.version, "cuda", build_cuda)
        with pytest.raises(InputError) as err:
            select_device("cuda")
        assert why in err.value.message and err.value.message.count("no CUDA") == 1
    with pytest.raises(InputError, match="MPS"):
        select_device("mps")
    with pytest.raises(InputError, match="Unknown device"):
        select_device("tpu")
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert select_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert select_device("auto") == torch.device("cuda")
    assert select_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(InputError, match="does not exist"):
        select_device("cuda:3")


@pytest.mark.parametrize(
    "bad,exc",
    [
        (np.zeros((2, 3, 4, 5, 6)), InputError),  # 5D
        (np.zeros((10,)), InputError),  # 1D
        (np.zeros((0, 10, 10)), InputError),  # empty
        (np.zeros((1, 0, 10)), InputError),
        (np.zeros((2, 8, 8, 2)), ModelError),  # 2 channels into a 1-channel model
        (np.array([[["a"]]]), InputError),  # not numeric
        (None, InputError),
    ],
)
def test_bad_inputs(tiny, bad, exc):
    with pytest.raises(exc) as err:
        iter_predict(tiny, bad)  # checked at call time, before the first next()
    assert err.value.hint


def test_bad_options_and_model():
    with pytest.raises(InputError):
        PredictOptions(tile=0)
    with pytest.raises(InputError):
        PredictOptions(tile=64, overlap=64)
    with pytest.raises(InputError):
        PredictOptions(overlap=32, trim=17)
    with pytest.raises(InputError):
        PredictOptions(prob_dtype="int16")
    with pytest.raises(InputError):
        PredictOptions(blend="hann")
    with pytest.raises(ModelError):
        iter_predict(None, np.zeros((1, 8, 8)))
    with pytest.raises(ModelError):
        iter_predict_slice(None, np.zeros((8, 8)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tiny):  # pragma: no cover - only where a GPU exists
    img = blobs((2, 300, 300), seed=18)
    cpu = predict(tiny, img, PredictOptions(device="cpu", prob_dtype="float32"))
    gpu = predict(tiny, img, PredictOptions(device="cuda", prob_dtype="float32"))
    assert np.abs(cpu - gpu).max() < 5e-3  # float16 autocast


def test_cpu_out_of_memory_also_halves_the_batch(tiny, monkeypatch):
    """The CPU allocator's message is not "out of memory": it must be recognised too."""
    img = blobs((1, 100, 100), seed=16)
    opts = PredictOptions(tile=64, overlap=24, batch_size=4, prob_dtype="float32")
    ref = predict(tiny, img, opts)
    real = inference._forward
    sizes: list[int] = []

    def fake(net, x, amp):
        sizes.append(x.shape[0])
        if x.shape[0] > 1:
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                "memory: you tried to allocate 21474836480 bytes. Error code 12"
            )
        return real(net, x, amp)

    monkeypatch.setattr(inference, "_forward", fake)
    got = predict(tiny, img, opts)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert sizes[:3] == [4, 2, 1]
