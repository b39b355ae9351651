"""The training run's small steps, each driven alone; snapshots; the shared metric helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_bulbseg.errors import InputError
from napari_bulbseg.events import drain
from napari_bulbseg.inference import predict_whole
from napari_bulbseg.metrics import pooled_counts, pooled_pixel_metrics
from napari_bulbseg.model import UNet, UNetConfig
from napari_bulbseg.training import TrainRun, Validation, iter_train
from test_training import discs, tiny


def test_steps_run_one_by_one():
    run = TrainRun(tiny(epochs=2), discs(6, seed=1), val_samples=discs(3, seed=2))
    run.check_inputs()
    run.setup()
    assert len(run.train_p) == 6 and len(run.val_p) == 3 and run.in_c == 1
    losses = [run.step() for _ in range(3)]
    assert run.step_count == 3 and all(np.isfinite(losses))
    val = drain(run.iter_validate())
    assert isinstance(val, Validation) and len(val.probs) == 3
    assert all(p.dtype == np.float16 and p.shape == s.mask.shape for p, s in zip(
        val.probs, run.val_p, strict=True))  # fmt: skip
    assert val.dice05 == pytest.approx(
        pooled_pixel_metrics(val.probs, [p.mask for p in run.val_p], 0.5)["dice"]
    )
    row = run.end_epoch(1, losses, val)
    assert row["steps"] == 3 and run.best_epoch == 1 and run.best_state is not None
    run.finish()
    card = run.build_card()
    assert card.threshold in run.config.thresholds
    assert card.training["steps_run"] == 3 and card.metrics["best_epoch"] == 1
    result = run.save(card)  # neither registry nor folder: returned, not written
    assert result.path is None and result.version_id is None


def test_a_worse_epoch_does_not_replace_the_kept_weights():
    run = TrainRun(tiny(), discs(6, seed=1), val_samples=discs(3, seed=2))
    run.setup()
    run.step()
    good = Validation(0.1, 0.9, [np.zeros((64, 64), np.float16)] * 3)
    run.end_epoch(1, [0.1], good)
    kept = {k: v.clone() for k, v in run.best_state.items()}
    with torch.no_grad():
        next(iter(run.model.parameters())).add_(1.0)
    run.end_epoch(2, [0.2], Validation(0.2, 0.5, good.probs))
    assert run.best_epoch == 1 and run.bad_epochs == 1
    assert all(torch.equal(kept[k], v) for k, v in run.best_state.items())


def test_snapshot_does_not_change_the_run():
    samples, val = discs(6, seed=1), discs(3, seed=2)
    cfg = dict(epochs=2, steps_per_epoch=3)
    plain = drain(iter_train(tiny(**cfg), samples, val_samples=val))
    run = TrainRun(tiny(**cfg), samples, val_samples=val)
    gen, snaps = run.events(), []
    try:
        while True:
            ev = next(gen)
            if ev.kind == "step":
                snaps.append(run.snapshot())
    except StopIteration as stop:
        result = stop.value
    assert len(snaps) == 6
    assert all(0.0 < s.threshold < 1.0 and not s.model.training for s in snaps)
    # the snapshot after the last step chose exactly what the run then returned
    last = snaps[-1]
    assert last.in_channels == 1 and last.prep_policy == "native"
    assert last.threshold == result.threshold
    for k, v in last.model.state_dict().items():
        assert torch.equal(v, result.model.state_dict()[k]), k
    # and taking snapshots did not perturb the run
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, result.model.state_dict()[k]), k
    assert result.threshold == plain.threshold
    assert [h["val_dice"] for h in result.history] == [h["val_dice"] for h in plain.history]


def test_predict_whole_gives_float16_at_the_asked_shape():
    torch.manual_seed(0)
    net = UNet(UNetConfig(1, 1, 4, 2)).eval()
    img = np.random.default_rng(0).normal(size=(1, 37, 53)).astype(np.float32)
    with torch.no_grad():
        logits, prob = predict_whole(net, img, torch.device("cpu"))
        _, back = predict_whole(net, img, torch.device("cpu"), out_shape=(74, 106))
    assert logits.shape == (37, 53) and prob.shape == (37, 53) and prob.dtype == np.float16
    ref = torch.sigmoid(net(torch.from_numpy(img[None])))[0, 0].detach().numpy()
    np.testing.assert_allclose(prob.astype(np.float32), ref, atol=1e-3)
    assert back.shape == (74, 106) and back.dtype == np.float16
    assert 0.0 <= float(back.min()) and float(back.max()) <= 1.0


def test_pooled_pixel_metrics_pools_counts_not_ratios():
    a = np.array([[0.9, 0.9], [0.1, 0.1]], np.float32)
    ma = np.array([[1, 0], [1, 0]], np.uint8)  # tp 1, fp 1, fn 1
    b = np.zeros((10, 10), np.float32)
    mb = np.zeros((10, 10), np.uint8)  # nothing to find: tp fp fn 0
    assert pooled_counts(a, ma, 0.5) == (1, 1, 1)
    m = pooled_pixel_metrics([a, b], [ma, mb], 0.5)
    assert m["dice"] == pytest.approx(2 / 4) and m["iou"] == pytest.approx(1 / 3)
    assert m["pixel_error"] == pytest.approx(2 / 104) and m["n_pixels"] == 104
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)


def _fine_tune_run(registry, best_state_of, n_val=3):
    """A fine-tuning run from ``registry``'s v001 driven step by step, whose kept weights are
    replaced by ``best_state_of(run)`` before the end: the verdict is then known in advance."""
    base = registry.load("v001")
    cfg = tiny(require_improvement=True)
    run = TrainRun(cfg, discs(6, seed=21), val_samples=discs(n_val, seed=22), base=base,
                   registry=registry)  # fmt: skip
    run.check_inputs()
    run.setup()
    losses = [run.step()]
    run.end_epoch(1, losses, drain(run.iter_validate()))
    run.best_state = best_state_of(run)
    run.finish()
    card = run.build_card()
    run.judge(card)
    return run.save(card)


def test_a_model_that_finds_nothing_is_saved_but_not_made_current(tmp_path):
    from napari_bulbseg.registry import Registry
    from napari_bulbseg.training import train

    reg = Registry(tmp_path / "models")
    train(tiny(epochs=2, steps_per_epoch=10), discs(6, seed=1), registry=reg)
    assert reg.current() == "v001"

    def silenced(run):  # the output layer's bias far below zero: no pixel is foreground
        state = {k: v.clone() for k, v in run.model.state_dict().items()}
        last_bias = [k for k in state if k.endswith("bias")][-1]
        state[last_bias] -= 50.0
        return state

    result = _fine_tune_run(reg, silenced)
    assert result.version_id == "v002" and not result.made_current
    assert reg.current() == "v001"  # the user keeps what they had
    assert "finds next to nothing" in result.verdict and "v002" in result.verdict
    card = reg.load("v002").card  # saved all the same, with the reason
    assert card.training["accepted"]["current"] is False
    assert card.metrics["val"]["compared"]["new_dice"] < 0.05
    assert "v002" in result.summary() and "not made current" in result.summary()


def test_a_fine_tune_that_does_not_beat_its_base_keeps_the_base_current(tmp_path):
    from napari_bulbseg.registry import Registry
    from napari_bulbseg.training import train

    reg = Registry(tmp_path / "models")
    train(tiny(epochs=3, steps_per_epoch=15), discs(8, seed=1), registry=reg)
    base_state = {k: v.clone() for k, v in reg.load("v001").model.state_dict().items()}

    def fresh(run):  # an untrained network of the same shape
        torch.manual_seed(123)
        return UNet(run.model.config).state_dict()

    result = _fine_tune_run(reg, fresh)
    compared = result.card.metrics["val"]["compared"]
    assert compared["base_dice"] > compared["new_dice"]
    assert not result.made_current and reg.current() == "v001"
    assert "does not beat its base" in result.verdict
    for k, v in reg.load("v001").model.state_dict().items():  # the base itself untouched
        assert torch.equal(v, base_state[k].to(v.dtype)), k

    def base_again(run):  # identical to the base: not better either (ties do not move it)
        return {k: v.clone() for k, v in base_state.items()}

    assert not _fine_tune_run(reg, base_again).made_current


def test_a_better_fine_tune_is_made_current(tmp_path):
    from napari_bulbseg.registry import Registry
    from napari_bulbseg.training import train

    reg = Registry(tmp_path / "models")
    train(tiny(), discs(4, seed=1), registry=reg)  # two steps: a weak base
    cfg = tiny(epochs=3, steps_per_epoch=20, require_improvement=True)
    result = train(cfg, discs(8, seed=31), val_samples=discs(3, seed=32),
                   base=reg.load("v001"), registry=reg)  # fmt: skip
    compared = result.card.metrics["val"]["compared"]
    assert compared["new_dice"] > compared["base_dice"] + 0.05
    assert result.made_current and reg.current() == result.version_id == "v002"
    assert result.card.version == "v002" and result.card.weights.get("sha256")  # the saved card
    assert result.verdict == "" and result.card.training["accepted"]["current"] is True


def test_on_one_or_two_held_out_slices_a_tie_is_used_with_a_note(tmp_path):
    from napari_bulbseg.registry import Registry
    from napari_bulbseg.training import train

    reg = Registry(tmp_path / "models")
    train(tiny(epochs=3, steps_per_epoch=15), discs(8, seed=1), registry=reg)
    base_state = {k: v.clone() for k, v in reg.load("v001").model.state_dict().items()}
    same = _fine_tune_run(reg, lambda run: {k: v.clone() for k, v in base_state.items()}, n_val=2)
    assert same.made_current and reg.current() == same.version_id  # a tie on weak evidence
    assert "only 2 held-out slice(s)" in same.verdict and same.card.training["accepted"]["current"]

    def fresh(run):  # clearly worse, even on two slices: not used
        torch.manual_seed(123)
        return UNet(run.model.config).state_dict()

    worse = _fine_tune_run(reg, fresh, n_val=2)
    compared = worse.card.metrics["val"]["compared"]
    assert compared["new_dice"] < compared["base_dice"] - 0.05
    assert not worse.made_current and reg.current() == same.version_id


def test_model_probs_are_what_evaluate_model_scores():
    from napari_bulbseg.model import LoadedModel, ModelCard
    from napari_bulbseg.training import evaluate_model, model_probs

    torch.manual_seed(0)
    loaded = LoadedModel(UNet(UNetConfig(1, 1, 4, 2)), ModelCard(threshold=0.5))
    samples = discs(3, seed=5, shape=(40, 56))
    probs = model_probs(loaded, samples)
    assert [p.shape for p in probs] == [(40, 56)] * 3 and probs[0].dtype == np.float16
    m = evaluate_model(loaded, samples, threshold=0.5)
    assert m["dice"] == pytest.approx(
        pooled_pixel_metrics(probs, [s.mask for s in samples], 0.5)["dice"], abs=1e-12
    )


def test_warm_up_raises_the_learning_rate_from_a_base_but_not_from_new_weights():
    from napari_bulbseg.model import LoadedModel, ModelCard
    from napari_bulbseg.training import WARMUP_STEPS

    torch.manual_seed(0)
    base = LoadedModel(UNet(UNetConfig(1, 1, 4, 2)), ModelCard(threshold=0.5))
    run = TrainRun(tiny(lr=1e-3, warmup_steps=4, start="base"), discs(6, seed=1),
                   val_samples=discs(3, seed=2), base=base)  # fmt: skip
    run.setup()
    lrs = []
    for _ in range(6):
        run.step()
        lrs.append(run.lr)
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3], rel=1e-9)
    auto = TrainRun(tiny(start="base"), discs(6, seed=1), val_samples=discs(3, seed=2), base=base)
    auto.setup()
    assert auto.warmup == WARMUP_STEPS
    auto.step()
    assert auto.lr == pytest.approx(auto.config.lr / WARMUP_STEPS)
    scratch = TrainRun(tiny(), discs(6, seed=1), val_samples=discs(3, seed=2))
    scratch.setup()
    scratch.step()
    assert scratch.warmup == 0 and scratch.lr == scratch.config.lr
    with pytest.raises(InputError, match="warmup_steps"):
        tiny(warmup_steps=-1).validate()


def test_time_advice_reads_the_validation_curve():
    from napari_bulbseg.training import time_advice

    def hist(dices, dt=30.0):
        return [{"val_dice": d, "elapsed_s": dt * (i + 1)} for i, d in enumerate(dices)]

    rising = hist([0.5, 0.55, 0.6, 0.65, 0.7, 0.75])  # +0.1 per minute
    assert "longer time budget" in time_advice(rising, "time_budget")
    assert "+0.100 Dice per minute" in time_advice(rising, "time_budget")
    assert time_advice(rising, "completed") == ""  # it ran all its epochs: nothing to add
    flat = hist([0.5, 0.7, 0.8, 0.801, 0.8, 0.8005])
    assert "levelled off" in time_advice(flat, "time_budget")
    falling = hist([0.8, 0.8, 0.79, 0.78, 0.77, 0.76])
    assert "unlikely to help" in time_advice(falling, "early_stopping")
    assert time_advice(hist([0.5, 0.6]), "time_budget") == ""  # too short to tell
    assert time_advice(hist([0.5, 0.6, 0.7, 0.8], dt=0.0), "time_budget") == ""
