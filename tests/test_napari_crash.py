"""A crash while painting: autosaved corrections reload on the next start.

A separate Python process opens a real napari viewer, starts corrections, paints with the
Labels layer's brush and waits for the autosave; the test then SIGKILLs it (no clean shutdown)
and restores the corrections in a fresh viewer through the "Restore saved corrections" button.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("napari")

from conftest import open_dock
from napari_bulbseg import io

pytestmark = [pytest.mark.gui, pytest.mark.slow]

Z, SHAPE = 3, (64, 80)
#: predicted block on every slice (probability 0.9, above any default threshold)
BLOCK = (slice(20, 44), slice(40, 70))
#: brush strokes on slice 1: (y, x, label) — paint in the background, erase inside the block
PAINT, ERASE, BRUSH = (15, 15, 1), (32, 55, 0), 7

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import napari
    from qtpy.QtWidgets import QApplication
    from napari_bulbseg._widgets._session import get_session

    path, spec = sys.argv[1], json.loads(sys.argv[2])
    block = tuple(slice(a, b) for a, b in spec["block"])
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()

    def wait(cond, timeout=20.0):
        t0 = time.monotonic()
        while not cond():
            app.processEvents()
            time.sleep(0.01)
            if time.monotonic() - t0 > timeout:
                print("TIMEOUT", flush=True)
                sys.exit(3)

    viewer.open(path, plugin="napari-bulbseg")
    image = viewer.layers[0]
    s = get_session(viewer)
    _, prob = s.begin_prediction(image)          # a model's output, without loading torch
    prob[(slice(None), *block)] = 0.9
    for z in range(prob.shape[0]):
        s.slice_predicted(z)
    corr = s.corrections.start()                 # what "Start corrections" does
    saver = s.corrections.saver
    wait(lambda: saver.saves >= 1 and saver.idle)
    n0 = saver.saves
    viewer.dims.set_point(0, 1)
    corr.brush_size = spec["brush"]
    for y, x, label in spec["strokes"]:  # one brush dab each, as a mouse click paints
        corr.paint((1, y, x), label)
    wait(lambda: saver.saves > n0 and saver.idle)
    assert saver.store.exists()
    print("AUTOSAVED", int(corr.data.sum()), saver.store.folder, flush=True)
    while True:                                  # a user keeps working... until the crash
        app.processEvents()
        time.sleep(0.02)
    """
)


def _read_marker(proc: subprocess.Popen, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        if not sel.select(timeout=0.2):
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("AUTOSAVED"):
            return line
    raise AssertionError("child never autosaved:\n" + "".join(lines))


def test_crash_while_painting_restores_autosave(make_napari_viewer, qtbot, tmp_path, bulbseg_home):

    assert os.environ.get("DISPLAY"), "needs the X server pytest-xvfb provides"
    image = np.random.default_rng(0).integers(0, 200, (Z, *SHAPE), dtype=np.uint8)
    path = io.write_tiff(tmp_path / "crash.tif", image)
    env = dict(os.environ, NAPARI_BULBSEG_HOME=str(bulbseg_home))
    env["NAPARI_CONFIG"] = str(tmp_path / "napari-settings.yaml")
    env.pop("QT_QPA_PLATFORM", None)
    spec = {
        "block": [[b.start, b.stop] for b in BLOCK],
        "strokes": [PAINT, ERASE],
        "brush": BRUSH,
    }
    args = [str(path), json.dumps(spec)]
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        marker = _read_marker(proc, timeout=25)
    finally:
        proc.send_signal(signal.SIGKILL)  # the crash: no close event, no final save
        proc.wait(10)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    painted_sum = int(marker.split()[1])

    # --- next start: a fresh viewer opens the same file and is offered the saved corrections
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-bulbseg")
    rw = open_dock(viewer, "Review & correct")
    assert rw.corrections.offer is viewer.layers["crash"]
    assert not rw.restore_btn.native.isHidden()
    rw.restore_btn.native.click()
    corr = viewer.layers["crash corrections"]
    assert rw.corrections.layer is corr and rw.reference.value is corr
    data = np.asarray(corr.data)
    assert data.shape == image.shape and int(data.sum()) == painted_sum

    # untouched slices: exactly the prediction (the block)
    pred = np.zeros(SHAPE, np.uint8)
    pred[BLOCK] = 1
    np.testing.assert_array_equal(data[0], pred)
    np.testing.assert_array_equal(data[2], pred)
    # slice 1: the painted dab is there, the erased dab is gone, the rest is the prediction
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    r = BRUSH / 2
    near = {}
    for name, (y, x, _) in (("paint", PAINT), ("erase", ERASE)):
        d = np.hypot(yy - y, xx - x)
        near[name] = (d <= r - 1, d > r + 1)
    assert data[1][near["paint"][0]].all()
    assert not data[1][near["erase"][0]].any()
    far = near["paint"][1] & near["erase"][1]
    np.testing.assert_array_equal(data[1][far], pred[far])
