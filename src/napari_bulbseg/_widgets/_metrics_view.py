"""A read-only per-slice metrics table (a small QTableWidget)."""

from __future__ import annotations

from collections.abc import Iterable, Set
from typing import TYPE_CHECKING

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem

from . import _text as T

if TYPE_CHECKING:
    from ..metrics import SliceMetrics


class MetricsTable(QTableWidget):
    """One row per slice: Dice, IoU, pixel error, object hits / misses / false objects."""

    def __init__(self) -> None:
        super().__init__(0, len(T.TABLE_HEADERS))
        self.setHorizontalHeaderLabels(list(T.TABLE_HEADERS))
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.verticalHeader().setVisible(False)
        self.setMinimumHeight(140)
        header = self.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        header.setMinimumSectionSize(28)
        for c, tip in enumerate(T.TABLE_TIPS):
            self.horizontalHeaderItem(c).setToolTip(tip)
        self.setMinimumWidth(0)
        self._rows: dict[int, int] = {}

    def show_metrics(self, per_slice: Iterable[SliceMetrics], reviewed: Set[int]) -> None:
        """Replace the rows with ``per_slice`` (SliceMetrics objects)."""
        items = list(per_slice)
        self.setRowCount(len(items))
        self._rows = {}
        for r, m in enumerate(items):
            self._rows[int(m.index)] = r
            self._set_row(r, m, int(m.index) in reviewed)

    def update_slice(self, m: SliceMetrics, reviewed: bool) -> None:
        """Update the row of slice ``m.index`` (when it is in the table)."""
        r = self._rows.get(int(m.index))
        if r is not None:
            self._set_row(r, m, reviewed)

    def _set_row(self, r: int, m: SliceMetrics, reviewed: bool) -> None:
        values = (
            str(m.index),
            f"{m.dice:.3f}",
            f"{m.iou:.3f}",
            f"{100 * m.pixel_error:.2f}",
            str(m.hits),
            str(m.misses),
            str(m.false_positives),
            "✓" if reviewed else "",
        )
        for c, v in enumerate(values):
            item = QTableWidgetItem(v)
            item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
            self.setItem(r, c, item)

    def row_of(self, z: int) -> int | None:
        return self._rows.get(z)

    def cell_text(self, z: int, column: int) -> str:
        r = self._rows.get(z)
        item = None if r is None else self.item(r, column)
        return "" if item is None else item.text()
