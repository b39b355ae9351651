"""Qt lifetime helpers: timers owned by a widget, connections undone when it is destroyed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from magicgui.widgets import ComboBox
from qtpy.QtCore import QObject, QTimer


def text_label(value: str = "", **kw: Any) -> Any:
    """A magicgui Label that wraps long text instead of widening the dock."""
    from magicgui.widgets import Label
    from qtpy.QtWidgets import QSizePolicy

    label = Label(value=value, **kw)
    label.native.setWordWrap(True)
    # take the full width of the dock: a wrapped QLabel otherwise picks a narrow "nice" width
    label.native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
    return label


def single_shot(parent: QObject, ms: int, slot: Callable[[], Any]) -> QTimer:
    """A restartable single-shot (debounce) timer that dies with ``parent``."""
    t = QTimer(parent)
    t.setSingleShot(True)
    t.setInterval(ms)
    t.timeout.connect(slot)
    return t


class Connections:
    """Connect napari / psygnal emitters to a widget's slots; disconnect all on destruction.

    The viewer and the session outlive a closed dock widget; without this their events would
    call into deleted Qt objects.
    """

    def __init__(self, owner: QObject) -> None:
        self._pairs: list[tuple[Any, Callable]] = []
        owner.destroyed.connect(self.disconnect_all)

    def connect(self, emitter: Any, slot: Callable) -> None:
        emitter.connect(slot)
        self._pairs.append((emitter, slot))

    def disconnect(self, emitter: Any, slot: Callable) -> None:
        with contextlib.suppress(Exception):
            emitter.disconnect(slot)
        self._pairs = [(e, s) for e, s in self._pairs if not (e is emitter and s == slot)]

    def disconnect_all(self, *_: Any) -> None:
        pairs, self._pairs = self._pairs, []
        for emitter, slot in pairs:
            with contextlib.suppress(Exception):
                emitter.disconnect(slot)


class OrderedComboBox(ComboBox):
    """A ComboBox whose ``reset_choices`` keeps the order its choices callable gives.

    magicgui keeps the items whose text is unchanged where they were and appends new ones
    after them, so a new model version would land below "Model folder…".
    """

    def reset_choices(self, *_: Any) -> None:
        old = self.value
        with self.changed.blocked():
            self.choices = ()  # empty first, so every item is added in the new order
            super().reset_choices()
            if old in self.choices:
                self.value = old
        if self.value != old:
            self.changed.emit(self.value)


#: the object name given to each of our dock panels' top widget (to find the siblings)
PANEL_NAME = "napari-bulbseg-panel"


def tabify_with_siblings(native: Any) -> None:
    """Once ``native`` sits in its dock, stack that dock as a tab on an open napari-bulbseg dock
    in the same area, so the four panels need one panel's height, not their sum (a laptop's
    1080 px), and show it. A panel docked elsewhere, floating or undocked is left alone."""
    from qtpy.QtWidgets import QDockWidget, QMainWindow

    native.setObjectName(PANEL_NAME)

    def dock_of(w: Any) -> Any:
        while w is not None and not isinstance(w, QDockWidget):
            w = w.parent()
        return w

    def go() -> None:
        with contextlib.suppress(RuntimeError):  # the panel was closed before this ran
            dock = dock_of(native)
            window = dock.parent() if dock is not None else None
            if not isinstance(window, QMainWindow) or dock.isFloating():
                return
            area = window.dockWidgetArea(dock)
            for other in window.findChildren(QDockWidget):
                if (
                    other is not dock
                    and other.isVisible()
                    and not other.isFloating()
                    and window.dockWidgetArea(other) == area
                    and other.findChild(QObject, PANEL_NAME) is not None
                ):
                    window.tabifyDockWidget(other, dock)
                    dock.show()
                    dock.raise_()
                    return

    QTimer.singleShot(0, go)
