"""The engine must stay headless: importing it loads neither Qt nor napari."""

import subprocess
import sys

ENGINE = [
    "napari_bulbseg",
    "napari_bulbseg.errors",
    "napari_bulbseg.events",
    "napari_bulbseg.normalize",
    "napari_bulbseg.model",
    "napari_bulbseg.io",
    "napari_bulbseg.tiling",
    "napari_bulbseg.inference",
    "napari_bulbseg.postprocess",
    "napari_bulbseg.metrics",
    "napari_bulbseg.phantom",
    "napari_bulbseg.losses",
    "napari_bulbseg.data",
    "napari_bulbseg.training",
    "napari_bulbseg.registry",
    "napari_bulbseg.overview",
    "napari_bulbseg.devices",
    "napari_bulbseg.atomic",
    "napari_bulbseg.cli",
    "napari_bulbseg.bioimageio",
    "napari_bulbseg.options",
    "napari_bulbseg.review_state",
]


def test_engine_imports_no_qt_or_napari():
    code = (
        "import importlib, sys, json\n"
        f"for m in {ENGINE!r}: importlib.import_module(m)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in "
        "('qtpy','PyQt5','PyQt6','PySide2','PySide6','napari','magicgui','vispy','matplotlib','bioimageio'))\n"
        "print(json.dumps(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_package_import_is_light():
    code = (
        "import sys, napari_bulbseg\n"
        "print(napari_bulbseg.__version__, 'torch' in sys.modules, 'numpy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    version, torch_loaded, numpy_loaded = out.stdout.split()
    assert version.count(".") == 2
    assert torch_loaded == "False" and numpy_loaded == "False"


def test_prediction_defaults_load_without_torch_and_are_the_engines():
    code = (
        "import sys, json\n"
        "from napari_bulbseg import options as o\n"
        "print(json.dumps(['torch' in sys.modules, o.DEFAULT_TILE, o.DEFAULT_OVERLAP]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    torch_loaded, tile, overlap = __import__("json").loads(out.stdout)
    assert torch_loaded is False
    from napari_bulbseg.inference import PredictOptions

    opts = PredictOptions()
    assert (opts.tile, opts.overlap) == (tile, overlap)


def test_segment_widget_offers_the_engines_tiling(make_napari_viewer):
    from conftest import open_dock
    from napari_bulbseg.inference import PredictOptions

    seg = open_dock(make_napari_viewer(), "Segment")
    opts = PredictOptions()
    assert (seg.tile.value, seg.overlap.value) == (opts.tile, opts.overlap)


def test_no_pickle_paths_in_package():
    import pathlib
    import re

    import napari_bulbseg

    pkg = pathlib.Path(napari_bulbseg.__file__).parent
    pat = re.compile(
        r"torch\.load\(|pickle\.loads?\(|^\s*import pickle|weights_only\s*=\s*False", re.M
    )
    hits = [str(p) for p in pkg.rglob("*.py") if pat.search(p.read_text(encoding="utf-8"))]
    assert hits == []
