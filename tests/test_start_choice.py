"""Fine-tuning chooses where to start: the base's weights, or new weights when the base hurts."""

from __future__ import annotations

import threading

import pytest
import torch

from _helpers import discs, tiny_config
from napari_bulbseg.errors import CancelledError, InputError
from napari_bulbseg.events import drain
from napari_bulbseg.model import LoadedModel
from napari_bulbseg.registry import Registry
from napari_bulbseg.training import PROBE_BELOW_DICE, TrainRun, iter_train, train


def _base(tmp_path, steps: int = 30) -> Registry:
    reg = Registry(tmp_path / "models")
    train(tiny_config(epochs=2, steps_per_epoch=steps), discs(8, seed=1), registry=reg)
    return reg


def _dead(loaded: LoadedModel) -> LoadedModel:
    """The base made useless: every weight zero, so no gradient reaches it but the last bias."""
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.zero_()
    return loaded


def test_a_useless_base_is_replaced_by_training_from_scratch(tmp_path):
    reg = _base(tmp_path, steps=2)
    base = _dead(reg.load("v001"))
    cfg = tiny_config(epochs=2, steps_per_epoch=25)
    result = train(cfg, discs(8, seed=31), val_samples=discs(3, seed=32), base=base, registry=reg)
    start = result.card.training["start"]
    assert start["mode"] == "auto" and start["chosen"] == "scratch"
    assert start["base_dice_before"] < PROBE_BELOW_DICE
    assert start["probe_val_dice"]["scratch"] > start["probe_val_dice"]["base"]
    assert result.card.training["from_scratch"] is True
    assert result.card.training["freeze_bn"] is False  # new weights learn their statistics
    assert result.card.architecture == base.card.architecture  # the base's shape and scale
    assert result.card.normalization == base.card.normalization
    # the probe's dropped arm does not count: one probe arm plus two epochs
    assert result.card.training["steps_run"] == start["probe_steps"] + 2 * 25
    saved = reg.load(result.version_id).card  # the record survives the round trip
    assert saved.training["start"] == start and saved.training["config"]["start"] == "auto"
    assert result.made_current  # it beats the dead base on the held-out slices
    assert "trained from new weights" in result.start_note  # what the panel and CLI say
    assert result.start_note in result.summary()


def test_a_good_base_is_kept_without_trying_scratch(tmp_path):
    reg = _base(tmp_path, steps=40)
    base = reg.load("v001")
    cfg = tiny_config(epochs=1, steps_per_epoch=5, require_improvement=False)
    run = TrainRun(cfg, discs(8, seed=31), val_samples=discs(3, seed=32), base=base)
    msgs = [ev.message for ev in _events(run)]
    start = run.result.card.training["start"]
    assert start["base_dice_before"] >= PROBE_BELOW_DICE, start
    assert start["chosen"] == "base" and "probe_steps" not in start
    assert not any("trying the start" in m for m in msgs)
    assert run.result.card.training["steps_run"] == 5 and not run.scratch
    assert run.result.start_note == ""  # nothing to say when the base was kept
    training = run.result.card.training  # a good base is refined at a lower learning rate
    assert training["refining"] is True
    assert training["lr_used"] == pytest.approx(cfg.lr * cfg.refine_lr_factor)
    assert run.lr <= training["lr_used"] + 1e-12


def test_a_poor_base_is_adapted_at_the_full_learning_rate(tmp_path):
    reg = _base(tmp_path, steps=2)
    cfg = tiny_config(epochs=1, steps_per_epoch=3, start="base", require_improvement=False)
    r = train(cfg, discs(6, seed=31), val_samples=discs(3, seed=32), base=_dead(reg.load("v001")))
    assert r.card.training["refining"] is False
    assert r.card.training["lr_used"] == pytest.approx(cfg.lr)
    with pytest.raises(InputError, match="refine_lr_factor"):
        tiny_config(refine_lr_factor=0.0).validate()


@pytest.mark.parametrize("mode", ["base", "scratch"])
def test_a_fixed_start_never_probes(tmp_path, mode):
    reg = _base(tmp_path, steps=2)
    base = _dead(reg.load("v001"))
    cfg = tiny_config(epochs=1, steps_per_epoch=4, start=mode, require_improvement=False)
    run = TrainRun(cfg, discs(6, seed=31), val_samples=discs(3, seed=32), base=base)
    msgs = [ev.message for ev in _events(run)]
    assert not any("trying the start" in m for m in msgs)
    training = run.result.card.training
    assert training["start"] == {"mode": mode} and training["from_scratch"] is (mode == "scratch")
    weights = [p.abs().sum().item() for p in run.result.model.parameters()]
    if mode == "base":  # dead weights stay dead (only the output bias moves)
        assert sum(weights[:-1]) == 0.0
    else:
        assert sum(weights[:-1]) > 0.0


def test_the_probe_is_the_same_on_the_same_seed(tmp_path):
    reg = _base(tmp_path, steps=2)
    cfg = tiny_config(epochs=1, steps_per_epoch=6, require_improvement=False)
    starts = []
    for _ in range(2):
        base = _dead(reg.load("v001"))
        r = train(cfg, discs(6, seed=31), val_samples=discs(3, seed=32), base=base)
        starts.append(r.card.training["start"])
    assert starts[0] == starts[1] and "probe_val_dice" in starts[0]


def test_cancel_during_the_probe_writes_nothing(tmp_path):
    reg = _base(tmp_path, steps=2)
    base = _dead(reg.load("v001"))
    stop = threading.Event()
    cfg = tiny_config(epochs=1, steps_per_epoch=10)
    gen = iter_train(cfg, discs(6, seed=31), val_samples=discs(3, seed=32), base=base,
                     registry=reg, cancel=stop)  # fmt: skip
    with pytest.raises(CancelledError):
        for ev in gen:
            if "trying the start from scratch" in ev.message:
                stop.set()
    assert [v.id for v in reg.list_versions(include_bundled=False)] == ["v001"]
    assert reg.current() == "v001"


def test_an_unknown_start_is_refused():
    with pytest.raises(InputError, match="start"):
        tiny_config(start="pretrained").validate()


def _events(run: TrainRun):
    gen = run.events()
    while True:
        try:
            yield next(gen)
        except StopIteration as stop:
            run.result = stop.value
            return


def test_drain_returns_the_result_of_a_probing_run(tmp_path):
    reg = _base(tmp_path, steps=2)
    cfg = tiny_config(epochs=1, steps_per_epoch=3, require_improvement=False)
    gen = iter_train(cfg, discs(6, seed=31), val_samples=discs(3, seed=32),
                     base=_dead(reg.load("v001")))  # fmt: skip
    result = drain(gen)
    assert result.card.training["start"]["chosen"] in ("base", "scratch")


def test_the_cli_parses_the_start_and_refuses_an_unknown_one(capsys):
    from napari_bulbseg import cli

    base = ["train", "--images", "i", "--masks", "m"]
    assert cli.build_parser().parse_args(base).start == "auto"
    assert cli.build_parser().parse_args([*base, "--start", "scratch"]).start == "scratch"
    assert cli.main([*base, "--start", "imagenet"]) == 2  # a usage error, not a traceback
    err = capsys.readouterr().err
    assert "invalid choice: 'imagenet'" in err and "Traceback" not in err


def test_a_base_that_learns_the_new_images_quickly_is_kept_without_new_weights(
    tmp_path, monkeypatch
):
    reg = _base(tmp_path, steps=40)
    base = reg.load("v001")
    before = TrainRun.base_scores

    def looks_bad(self):  # the base scores poorly before fine-tuning (as on a new domain)
        return {**before(self), "dice": 0.0}

    monkeypatch.setattr(TrainRun, "base_scores", looks_bad)
    cfg = tiny_config(epochs=1, steps_per_epoch=12, require_improvement=False)
    run = TrainRun(cfg, discs(8, seed=31), val_samples=discs(3, seed=32), base=base)
    evs = list(_events(run))
    msgs = [ev.message for ev in evs]
    probes = [ev for ev in evs if ev.kind == "probe"]  # the trial's steps, not plotted as steps
    assert probes and all("trying the start from base" in ev.message for ev in probes)
    assert sum(ev.kind == "step" for ev in evs) == 12
    start = run.result.card.training["start"]
    assert start["chosen"] == "base" and list(start["probe_val_dice"]) == ["base"]
    assert start["probe_val_dice"]["base"] >= PROBE_BELOW_DICE
    assert not any("from scratch" in m for m in msgs)
    assert any("validating the start from base" in m for m in msgs)
    # the probe's steps are the first steps of the run that goes on
    assert run.result.card.training["steps_run"] == start["probe_steps"] + 12
    assert run.result.card.training["freeze_bn"] is True and run.warmup > 0


def test_validation_slices_without_objects_keep_the_base_without_a_trial(tmp_path):
    """Empty validation slices give any model Dice 0: that is no evidence against the base."""
    import numpy as np

    from napari_bulbseg.data import Sample

    reg = _base(tmp_path, steps=2)
    base = reg.load("v001")
    empty = [
        Sample(image=s.image, mask=np.zeros_like(s.mask), key=f"empty-{i}")
        for i, s in enumerate(discs(2, seed=32))
    ]
    cfg = tiny_config(epochs=1, steps_per_epoch=3, require_improvement=False)
    run = TrainRun(cfg, discs(6, seed=31), val_samples=empty, base=base)
    msgs = [ev.message for ev in _events(run)]
    start = run.result.card.training["start"]
    assert start["chosen"] == "base" and "probe_steps" not in start
    assert "no objects" in start["reason"]
    assert not any("trying the start" in m for m in msgs)
    assert not run.scratch and run.result.card.training["steps_run"] == 3
