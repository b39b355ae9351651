"""bioimage.io export (validated by the real bioimageio.spec / bioimageio.core) and import."""

from __future__ import annotations

import hashlib
import json
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("bioimageio.spec")
pytest.importorskip("bioimageio.core")

from napari_bulbseg.bioimageio import (
    export_package,
    import_package,
    preprocessing_for,
    run_model_test,
    validate_package,
)
from napari_bulbseg.cli import main
from napari_bulbseg.errors import InputError, ModelError
from napari_bulbseg.model import load_model
from napari_bulbseg.normalize import Normalization
from napari_bulbseg.registry import Registry


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory):
    """No network (any connection attempt fails loudly) and a private bioimageio cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BIOIMAGEIO_CACHE_PATH", str(tmp_path_factory.mktemp("bioimageio-cache")))

    def refuse(*args, **kwargs):
        raise RuntimeError(f"network access attempted: {args!r}")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, offline) -> tuple[Path, Path]:
    import torch

    from napari_bulbseg.model import ModelCard, UNet, UNetConfig, save_model

    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    folder = save_model(
        tmp / "tiny", UNet(UNetConfig(1, 1, 8, 3)), ModelCard(name="tiny", diameter=25.0)
    )
    out = export_package(load_model(folder), tmp / "tiny.zip")
    return folder, out.path


def test_export_validates_and_passes_model_test(exported) -> None:
    _folder, zpath = exported
    descr = validate_package(zpath)
    assert str(descr.format_version).startswith("0.5")
    assert set(descr.weights.model_fields_set) >= {"pytorch_state_dict", "torchscript"}
    run_model_test(zpath)  # the real bioimageio.core test, on CPU
    with zipfile.ZipFile(zpath) as zf:
        names = set(zf.namelist())
        readme = zf.read("README.md").decode()
    assert {"model.json", "weights.safetensors", "cover.png", "test_input.npy"} <= names
    assert "25 px" in readme  # the diameter the package cannot apply is documented


def test_preprocessing_expresses_dark_polarity_and_notes_the_rest() -> None:
    ops, notes = preprocessing_for(Normalization(polarity="dark"))
    assert [o["id"] for o in ops] == ["ensure_dtype", "scale_linear", "scale_range", "ensure_dtype"]
    assert notes == []
    ops, notes = preprocessing_for(Normalization(polarity="auto", noise_floor=10))
    assert "scale_linear" not in [o["id"] for o in ops]
    assert len(notes) == 2


def test_round_trip_import(exported, bulbseg_home: Path) -> None:
    folder, zpath = exported
    reg = Registry()
    vid = import_package(zpath, reg)
    a, b = load_model(folder), reg.load(vid)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)
    da, db = a.card.to_dict(), b.card.to_dict()
    assert db.pop("version") == vid
    da.pop("version")
    assert da == db
    from napari_bulbseg.inference import PredictOptions, predict_slice

    img = np.random.default_rng(1).random((64, 72)).astype(np.float32)
    opts = PredictOptions(device="cpu", prob_dtype="float32")
    pa, pb = predict_slice(a, img, opts), predict_slice(b, img, opts)
    assert np.abs(pa - pb).max() <= 1e-6


def test_cli_import(exported, bulbseg_home: Path, capsys) -> None:
    _, zpath = exported
    assert main(["import", str(zpath), "--make-current"]) == 0
    assert "as version v001" in capsys.readouterr().out
    assert Registry().current() == "v001"


def _rewrite(src: Path, dst: Path, change: dict[str, bytes | None]) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename in change:
                if change[info.filename] is not None:
                    zout.writestr(info.filename, change[info.filename])
            else:
                zout.writestr(info.filename, zin.read(info))
        for name, data in change.items():
            if name not in zin.namelist() and data is not None:
                zout.writestr(name, data)
    return dst


def _rdf(zpath: Path) -> dict:
    import yaml

    with zipfile.ZipFile(zpath) as zf:
        return yaml.safe_load(zf.read("rdf.yaml"))


def _nothing_imported(home: Path) -> bool:
    return not list((home / "models").glob("v*")) if (home / "models").exists() else True


def test_tampered_weights_refused(exported, tmp_path: Path, bulbseg_home: Path) -> None:
    _, zpath = exported
    with zipfile.ZipFile(zpath) as zf:
        w = bytearray(zf.read("weights.safetensors"))
    w[-1] ^= 1
    bad = _rewrite(zpath, tmp_path / "bad.zip", {"weights.safetensors": bytes(w)})
    with pytest.raises(ModelError, match="sha256"):
        import_package(bad, Registry())
    assert _nothing_imported(bulbseg_home)


def test_unsafe_packages_refused(exported, tmp_path: Path, bulbseg_home: Path) -> None:
    _, zpath = exported
    trav = _rewrite(zpath, tmp_path / "trav.zip", {"../x": b"x"})
    with pytest.raises(ModelError, match="unsafe name"):
        import_package(trav, Registry())
    rdf = _rdf(zpath)
    rdf["attachments"] = [a for a in rdf["attachments"] if a["source"] != "weights.safetensors"]
    pickled = _rewrite(
        zpath,
        tmp_path / "pickle.zip",
        {"rdf.yaml": json.dumps(rdf).encode(), "weights.safetensors": None},
    )
    with pytest.raises(ModelError, match="never unpickles"):
        import_package(pickled, Registry())
    assert _nothing_imported(bulbseg_home)


def test_bomb_like_declared_size_refused(exported, tmp_path: Path, monkeypatch) -> None:
    import napari_bulbseg.bioimageio as bio

    _, zpath = exported
    monkeypatch.setattr(bio, "MAX_WEIGHTS_BYTES", 1000)
    with pytest.raises(ModelError, match="declares"):
        bio.read_package(zpath)


def test_foreign_package_refused(exported, tmp_path: Path, bulbseg_home: Path) -> None:
    _, zpath = exported
    rdf = _rdf(zpath)
    rdf["weights"]["pytorch_state_dict"]["architecture"] = {
        "callable": "StarDist2D",
        "import_from": "stardist.models",
        "kwargs": {},
    }
    foreign = _rewrite(zpath, tmp_path / "f.zip", {"rdf.yaml": json.dumps(rdf).encode()})
    with pytest.raises(ModelError, match=r"StarDist2D from stardist\.models.*imports only"):
        import_package(foreign, Registry())
    assert _nothing_imported(bulbseg_home)
    h = hashlib.sha256(foreign.read_bytes()).hexdigest()
    assert h  # the file is untouched by the refusal
    assert foreign.is_file()


def test_export_bad_input(exported, tmp_path: Path, capsys, bulbseg_home: Path) -> None:
    folder, zpath = exported
    assert main(["export", "v999", "-o", str(tmp_path / "a.zip")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bulbseg: error:") and "v999" in err and "\n" not in err
    assert main(["export", "no-such-model", "-o", str(tmp_path / "a.zip")]) == 2
    assert "not a version id" in capsys.readouterr().err
    with pytest.raises(InputError, match="already exists"):
        export_package(load_model(folder), zpath)


def test_export_to_read_only_folder(exported, tmp_path: Path) -> None:
    folder, _ = exported
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not (ro / "probe").exists():
            try:
                (ro / "probe").write_text("x")
                pytest.skip("running as a user who can write anywhere")
            except OSError:
                pass
        with pytest.raises(InputError, match="Cannot write"):
            export_package(load_model(folder), ro / "m.zip")
    finally:
        ro.chmod(0o700)
