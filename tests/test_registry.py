"""Model versions: ids, the current pointer, rollback, the bundled root, broken entries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from napari_bulbseg import model as model_mod
from napari_bulbseg import registry as registry_mod
from napari_bulbseg.errors import ModelError
from napari_bulbseg.model import LoadedModel, ModelCard, UNet, UNetConfig, load_model, save_model
from napari_bulbseg.registry import Registry, bundled_ref, default_root, parent_ref

REAL_BUNDLED = Path(model_mod.__file__).parent / "bundled" / "default"


def tiny_model(seed: int = 0) -> UNet:
    import torch

    torch.manual_seed(seed)
    return UNet(UNetConfig(1, 1, 2, 2))


def card(parent=None, dice=0.5) -> ModelCard:
    return ModelCard(name="t", parent=parent, metrics={"val": {"dice": dice}})


@pytest.fixture
def bundled(tmp_path, monkeypatch) -> Path:
    """A stand-in bundled model, so these tests do not depend on the shipped weights."""
    path = save_model(tmp_path / "pkg" / "bundled" / "default", tiny_model(9), card())
    monkeypatch.setattr(registry_mod, "bundled_model_dir", lambda: path)
    return path


def test_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_BULBSEG_HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / "models"
    assert Registry().root == tmp_path / "home" / "models"
    monkeypatch.delenv("NAPARI_BULBSEG_HOME")
    assert default_root().name == "models" and "napari-bulbseg" in str(default_root())


def test_versions_current_and_rollback(tmp_path, bundled):
    reg = Registry(tmp_path / "models")
    assert reg.current() == "bundled"
    assert [v.id for v in reg.list_versions()] == ["bundled"]
    ref = bundled_ref()
    v1 = reg.save_version(tiny_model(1), card(parent=ref, dice=0.7))
    v2 = reg.save_version(tiny_model(2), card(parent=v1, dice=0.8), make_current=False)
    assert (v1, v2) == ("v001", "v002")
    assert reg.current() == "v001"
    rows = reg.list_versions()
    assert [(r.id, r.parent, r.val_dice, r.current) for r in rows] == [
        ("bundled", None, 0.5, False),
        ("v001", ref, 0.7, True),
        ("v002", "v001", 0.8, False),
    ]
    assert reg.load("v002").card.version == "v002"
    reg.set_current("v002")
    assert json.loads((reg.root / "current.json").read_text()) == {"id": "v002"}
    assert reg.load("current").card.version == "v002"
    assert reg.rollback() == "v001"  # the parent
    assert reg.rollback() == "bundled"  # v001 came from the bundled model
    with pytest.raises(ModelError, match="already"):
        reg.rollback()
    # rollback never deletes; versions are never overwritten
    assert [v.id for v in reg.list_versions(include_bundled=False)] == ["v001", "v002"]
    with pytest.raises(ModelError, match="never overwritten"):
        save_model(reg.root / "v001", tiny_model(), card())
    v3 = reg.save_version(tiny_model(3), card(parent="somewhere-else"))
    assert v3 == "v003" and reg.rollback() == "v002"  # unknown parent: the previous version


def test_bundled_is_the_root_of_lineages(tmp_path, bundled):
    reg = Registry(tmp_path / "models")
    loaded = reg.load("bundled")
    sha = loaded.card.weights["sha256"]
    assert parent_ref(loaded) == f"bundled:{sha[:12]}" == bundled_ref()
    assert reg.load(f"bundled:{sha[:12]}").card.weights["sha256"] == sha
    with pytest.raises(ModelError, match="different default"):
        reg.load("bundled:0123456789ab")
    v1 = reg.save_version(tiny_model(), card(parent=parent_ref(loaded)))
    assert parent_ref(reg.load(v1), reg) == "v001"
    other = load_model(save_model(tmp_path / "elsewhere", tiny_model(), card()))
    assert parent_ref(other).startswith("t@sha256:")
    assert not any(p.is_relative_to(bundled) for p in reg.root.rglob("*"))


def test_broken_entries_are_listed_not_fatal(tmp_path, bundled):
    reg = Registry(tmp_path / "models")
    reg.save_version(tiny_model(1), card())
    reg.save_version(tiny_model(2), card())
    reg.save_version(tiny_model(3), card())
    (reg.root / "v002" / "model.json").write_text("{ not json")
    w3 = reg.root / "v003" / "weights.safetensors"
    w3.write_bytes(w3.read_bytes()[:100])
    (reg.root / "v004").mkdir()  # an empty folder
    (reg.root / "notes").mkdir()  # not a version: ignored
    rows = {r.id: r for r in reg.list_versions()}
    assert set(rows) == {"bundled", "v001", "v002", "v003", "v004"}
    assert rows["v001"].ok and rows["bundled"].ok
    assert "JSON" in rows["v002"].broken
    assert "size" in rows["v003"].broken
    assert "No model card" in rows["v004"].broken
    with pytest.raises(ModelError):
        reg.load("v003")
    with pytest.raises(ModelError, match="broken"):
        reg.set_current("v002")
    assert reg.save_version(tiny_model(), card()) == "v005"  # ids are never reused
    # a pointer to a version that has gone falls back to the bundled model
    (reg.root / "current.json").write_text('{"id": "v099"}')
    assert reg.current() == "bundled"
    (reg.root / "current.json").write_text("garbage")
    assert reg.current() == "bundled"
    with pytest.raises(ModelError, match="version id"):
        reg.load("../etc")


def test_interrupted_save_leaves_nothing(tmp_path, bundled, monkeypatch):
    reg = Registry(tmp_path / "models")
    reg.save_version(tiny_model(), card())

    def crash(path, data):
        raise OSError("power cut (simulated)")

    monkeypatch.setattr(model_mod, "_fsync_write", crash)
    with pytest.raises(OSError, match="power cut"):
        reg.save_version(tiny_model(), card())
    assert sorted(p.name for p in reg.root.iterdir()) == ["current.json", "v001"]
    assert reg.current() == "v001"


@pytest.mark.skipif(not (REAL_BUNDLED / "model.json").is_file(), reason="no bundled model built")
def test_shipped_bundled_model_loads(tmp_path):
    loaded = Registry(tmp_path).load("bundled")
    assert isinstance(loaded, LoadedModel)
    assert loaded.card.in_channels == 1 and 0 < loaded.card.threshold < 1
    assert loaded.card.threshold_curve and "val" in loaded.card.metrics


def test_stray_file_named_like_a_version_is_skipped(tmp_path, bundled):
    reg = Registry(tmp_path / "models")
    assert reg.save_version(tiny_model(), card()) == "v001"
    (reg.root / "v002").write_text("not a model")  # e.g. a file copied in by hand
    assert reg.save_version(tiny_model(1), card()) == "v003"
    assert reg.save_version(tiny_model(2), card()) == "v004"
    assert (reg.root / "v002").read_text() == "not a model"
    assert [v.id for v in reg.list_versions(include_bundled=False)] == ["v001", "v003", "v004"]


def test_losing_the_rename_race_retries_with_the_next_id(tmp_path, bundled, monkeypatch):
    """Another process renames its v002 into place between our check and our rename."""
    import os

    reg = Registry(tmp_path / "models")
    reg.save_version(tiny_model(), card())
    real = os.replace
    other = tiny_model(5)

    def slow_disk(src, dst):
        if Path(dst).name == "v002" and not Path(dst).exists():
            monkeypatch.setattr(model_mod.os, "replace", real)
            save_model(Path(dst), other, card(dice=0.9))  # the other process wins v002
        return real(src, dst)

    monkeypatch.setattr(model_mod.os, "replace", slow_disk)
    vid = reg.save_version(tiny_model(3), card(dice=0.7))
    assert vid == "v003" and reg.current() == "v003"
    assert reg.info("v002").val_dice == pytest.approx(0.9)  # theirs, intact
    assert reg.info("v003").val_dice == pytest.approx(0.7)  # ours, not lost
    assert not list(reg.root.glob(".v*.tmp"))


def test_lineage_walks_the_rounds_back_to_the_bundled_model(tmp_path, bundled):
    reg = Registry(tmp_path / "models")
    v1 = reg.save_version(tiny_model(1), card(parent=bundled_ref(), dice=0.6))
    v2 = reg.save_version(tiny_model(2), card(parent=v1, dice=0.7))
    side = reg.save_version(tiny_model(3), card(parent=v1, dice=0.65))  # a branch from v001
    v4 = reg.save_version(tiny_model(4), card(parent=v2, dice=0.8))
    assert [(i.id, i.val_dice) for i in reg.lineage(v4)] == [("v001", 0.6), ("v002", 0.7),
                                                            ("v004", 0.8)]  # fmt: skip
    assert [i.id for i in reg.lineage(side)] == ["v001", side]
    assert [i.id for i in reg.lineage("current")] == ["v001", "v002", "v004"]
    assert reg.lineage("bundled") == []
    # a parent outside the registry, or a loop in damaged cards, ends the walk
    v5 = reg.save_version(tiny_model(5), card(parent="t@sha256:abc"))
    assert [i.id for i in reg.lineage(v5)] == [v5]
    cardfile = reg.root / v1 / "model.json"
    d = json.loads(cardfile.read_text())
    d["parent"] = v4  # v001 → v004 → v002 → v001 …
    cardfile.write_text(json.dumps(d))
    assert len(reg.lineage(v4)) <= 3


def test_saving_leaves_the_callers_card_unchanged(tmp_path, bundled):
    """save_version / save_model write a completed copy; the card passed in stays as it was."""
    reg = Registry(tmp_path / "models")
    c = card()
    before = c.to_dict()
    vid = reg.save_version(tiny_model(), c)
    assert c.to_dict() == before and c.version != vid and c.weights == {}
    assert reg.load(vid).card.version == vid and reg.load(vid).card.weights["sha256"]
    path = save_model(tmp_path / "plain", UNet(UNetConfig(1, 1, 4, 3)), c)
    assert c.to_dict() == before
    assert model_mod.read_card(path).architecture["base_channels"] == 4


def test_resolve_is_the_one_rule_for_naming_a_model(tmp_path, bundled, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reg = Registry(tmp_path / "models")
    assert reg.resolve("bundled") == reg.resolve("default") == bundled
    assert reg.resolve("current") == bundled  # nothing trained yet
    vid = reg.save_version(tiny_model(1), card())
    assert reg.resolve("current") == reg.resolve(vid) == reg.root / vid
    assert reg.resolve(f"bundled:{bundled_ref().split(':')[1][:6]}") == bundled
    folder = save_model(tmp_path / "mine", tiny_model(2), card())
    assert reg.resolve(str(folder)) == folder
    assert reg.resolve(folder / "model.json").parent == folder
    assert reg.resolve("mine") == Path("mine")  # a folder here, not a registry name
    with pytest.raises(ModelError, match="not a model version id"):
        reg.load("mine")  # load takes registry names only
    with pytest.raises(ModelError, match="No model version v009"):
        reg.resolve("v009")
    with pytest.raises(ModelError, match="No model at nothing-here"):
        reg.resolve("nothing-here")
    with pytest.raises(ModelError, match="ships a different default model"):
        reg.resolve("bundled:ffffffffffff" if not bundled_ref().endswith("f") else "bundled:0")
    # a version id that is also another folder here is ambiguous; ./v001 names the folder
    save_model(tmp_path / vid, tiny_model(3), card())
    with pytest.raises(ModelError, match="names both the folder"):
        reg.resolve(vid)
    assert reg.resolve(f"./{vid}") == Path(vid)


def test_one_home_for_models_and_corrections(tmp_path, monkeypatch):
    from napari_bulbseg.corrections import CorrectionStore
    from napari_bulbseg.home import user_home

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NAPARI_BULBSEG_HOME", "~/bulbseg")  # "~" as a user writes it
    assert user_home() == tmp_path / "bulbseg"
    assert Registry().root == tmp_path / "bulbseg" / "models"
    store = CorrectionStore("stack", (3, 8, 8), "/data/stack.tif")
    assert store.folder.parent == tmp_path / "bulbseg" / "corrections"  # the same home
