"""The plugin as a user meets it: napari's own menus open every dock and both samples.

Everything here goes through napari — the real Plugins ▸, Layers ▸ Segment ▸ and File ▸ Open
Sample ▸ menu actions, which instantiate our widgets with the viewer injected by napari.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from conftest import DOCKS, menu_action, open_dock

pytestmark = pytest.mark.gui

_CLASSES = {
    "Segment": "SegmentWidget",
    "Threshold & objects": "ThresholdWidget",
    "Review & correct": "ReviewWidget",
    "Fine-tune": "FinetuneWidget",
}


def _docked(viewer, name):
    """The widget of our dock ``name`` if napari has docked it, else None."""
    from napari._qt.widgets.qt_viewer_dock_widget import QtViewerDockWidget

    from napari_bulbseg import _widgets

    for dock in viewer.window._qt_window.findChildren(QtViewerDockWidget):
        if dock.name.startswith(name + " (napari-bulbseg)"):
            inner = dock.inner_widget()
            assert isinstance(inner, getattr(_widgets, _CLASSES[name]))
            return inner
    return None


@pytest.mark.parametrize("menu", ["plugins", "layers"])
def test_every_dock_opens_from_the_menus(make_napari_viewer, qtbot, bulbseg_home, menu):
    viewer = make_napari_viewer()
    win = viewer.window
    for name in DOCKS:
        label = f"{name} (napari-bulbseg)"
        if menu == "plugins":
            action = menu_action(win.plugins_menu, "napari-bulbseg", label)
        else:
            action = menu_action(win.layers_menu, "Segment", label)
        assert _docked(viewer, name) is None
        action.trigger()  # raised TypeError (viewer not injected) before the fix
        widget = _docked(viewer, name)
        assert widget is not None, f"{label} opened no dock"
        assert widget._viewer is viewer
        # the API route gives the same, already open dock, not a second one
        assert open_dock(viewer, name) is widget


def test_samples_open_from_file_menu(make_napari_viewer, bulbseg_home):
    from napari.layers import Image, Labels

    viewer = make_napari_viewer()
    menu = viewer.window.file_menu
    label = "BBBC039 nuclei (with ground truth)"
    menu_action(menu, "Open Sample", "napari-bulbseg", label).trigger()
    image, gt = viewer.layers["bbbc039"], viewer.layers["bbbc039 ground truth"]
    assert isinstance(image, Image) and isinstance(gt, Labels)
    assert image.data.shape == gt.data.shape and image.data.ndim == 3
    assert set(np.unique(np.asarray(gt.data))) <= {0, 1} and np.asarray(gt.data).any()

    label = "Synthetic olfactory bulbs (with ground truth)"
    menu_action(menu, "Open Sample", "napari-bulbseg", label).trigger()
    bulbs = viewer.layers["bulb phantom ground truth"]
    assert isinstance(bulbs, Labels) and np.asarray(bulbs.data).any()


def test_repredict_opens_segment_when_not_docked(make_napari_viewer, qtbot, bulbseg_home):
    """Fine-tune's Re-predict docks Segment through napari when it is not open."""
    viewer = make_napari_viewer()
    menu = viewer.window.file_menu
    label = "Synthetic olfactory bulbs (with ground truth)"
    menu_action(menu, "Open Sample", "napari-bulbseg", label).trigger()
    ft = open_dock(viewer, "Fine-tune")
    assert _docked(viewer, "Segment") is None
    ft.repredict()
    seg = _docked(viewer, "Segment")
    assert seg is not None
    # the request reached the new dock: it predicts the open image with the session's model
    qtbot.waitUntil(lambda: not seg.running, timeout=60000)
    assert viewer.layers["bulb phantom prediction"].data.shape == (
        viewer.layers["bulb phantom"].data.shape
    )


def test_open_a_folder_of_jpegs_with_a_masks_folder(make_napari_viewer, tmp_path, bulbseg_home):
    """Names with spaces and parentheses, natural order, masks/ beside: one stack + Labels."""
    from napari.layers import Image, Labels
    from PIL import Image as PILImage

    root = tmp_path / "my experiment (day 2)"
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    names = ["slice (2).jpg", "slice (10).jpg", "slice (1).jpg"]  # natural order: 1, 2, 10
    for name in names:
        k = int(name.split("(")[1].split(")")[0])
        img = np.full((48, 64), 20, np.uint8)
        img[10 : 10 + k, 5:40] = 220  # the bright band grows with the slice number
        PILImage.fromarray(img).save(images / name, quality=95)
        m = np.zeros((48, 64), np.uint8)
        m[10 : 10 + k, 5:40] = 255
        PILImage.fromarray(m).save(masks / name.replace(".jpg", ".png"))

    viewer = make_napari_viewer()
    viewer.open(str(images), plugin="napari-bulbseg")
    image, gt = viewer.layers["images"], viewer.layers["images ground truth"]
    assert isinstance(image, Image) and isinstance(gt, Labels)
    assert image.data.shape == gt.data.shape == (3, 48, 64)
    assert gt.data.dtype == np.uint8 and set(np.unique(gt.data)) == {0, 1}
    rows = [int(np.asarray(gt.data[z]).any(axis=1).sum()) for z in range(3)]
    assert rows == [1, 2, 10]  # natural name order, masks paired by name
    bright = [int((np.asarray(image.data[z]) > 120).any(axis=1).sum()) for z in range(3)]
    assert bright == rows


def test_the_four_docks_share_one_panel_height_on_a_laptop_screen(
    make_napari_viewer, qtbot, bulbseg_home
):
    """Opened from the menu, the docks stack as tabs in one area, and each fits in the height a
    1920×1080 screen leaves (the four stacked needed 1,612–1,670 px before)."""
    from napari._qt.widgets.qt_viewer_dock_widget import QtViewerDockWidget

    viewer = make_napari_viewer(show=True)
    win = viewer.window
    win._qt_window.resize(1920, 1040)
    for name in DOCKS:
        menu_action(win.plugins_menu, "napari-bulbseg", f"{name} (napari-bulbseg)").trigger()
        qtbot.wait(20)
    docks = [d for d in win._qt_window.findChildren(QtViewerDockWidget)
             if d.name.endswith("(napari-bulbseg)")]  # fmt: skip
    assert len(docks) == 4
    main = win._qt_window
    for d in docks:
        others = set(main.tabifiedDockWidgets(d))
        assert others == set(docks) - {d}, d.name
    qtbot.wait(50)
    # each panel's own minimum height fits the canvas area of a maximised 1080 px window
    for d in docks:
        need = d.widget().minimumSizeHint().height()
        assert need <= 1080 - 160, (d.name, need)
    # the last one opened is the tab shown; the others wait behind their tabs
    shown = [d.name for d in docks if not d.visibleRegion().isEmpty()]
    assert shown == ["Fine-tune (napari-bulbseg)"], shown
