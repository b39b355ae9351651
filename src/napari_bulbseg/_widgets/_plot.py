"""A lightweight live plot of training loss and validation Dice (QPainter, no matplotlib)."""

from __future__ import annotations

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

LOSS_COLOR = QColor(255, 170, 0)
DICE_COLOR = QColor(80, 200, 255)
AXIS_COLOR = QColor(160, 160, 160)


class CurvePlot(QWidget):
    """Training loss per step (left axis, auto range) and validation Dice per epoch (0–1)."""

    def __init__(self) -> None:
        super().__init__()
        self.loss: list[tuple[int, float]] = []
        self.dice: list[tuple[int, float]] = []
        self.total_steps = 1
        self.setMinimumHeight(150)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def clear(self, total_steps: int = 1) -> None:
        self.loss, self.dice, self.total_steps = [], [], max(1, total_steps)
        self.update()

    def add_loss(self, step: int, value: float) -> None:
        self.loss.append((step, float(value)))
        self.update()

    def add_dice(self, step: int, value: float) -> None:
        self.dice.append((step, float(value)))
        self.update()

    def paintEvent(self, _event: object) -> None:
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = self.width(), self.height()
        plot = QRectF(38, 8, max(10, w - 76), max(10, h - 30))
        p.setPen(QPen(AXIS_COLOR, 1))
        p.drawRect(plot)
        font = p.font()
        font.setPointSizeF(max(7.0, font.pointSizeF() * 0.8))
        p.setFont(font)
        lo, hi = 0.0, 1.0
        if self.loss:
            vals = [v for _, v in self.loss]
            lo, hi = min(vals), max(vals)
            if hi - lo < 1e-9:
                lo, hi = lo - 0.5, hi + 0.5
        align_r = Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
        align_l = Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter
        p.setPen(LOSS_COLOR)
        p.drawText(QRectF(0, plot.top() - 6, 34, 14), align_r, f"{hi:.3g}")
        p.drawText(QRectF(0, plot.bottom() - 8, 34, 14), align_r, f"{lo:.3g}")
        p.setPen(DICE_COLOR)
        p.drawText(QRectF(plot.right() + 4, plot.top() - 6, 34, 14), align_l, "1.0")
        p.drawText(QRectF(plot.right() + 4, plot.bottom() - 8, 34, 14), align_l, "0.0")
        p.setPen(AXIS_COLOR)
        legend = QRectF(plot.left(), plot.bottom() + 4, plot.width(), 16)
        p.drawText(
            legend, Qt.AlignmentFlag.AlignCenter, "steps →   loss (orange) · val Dice (blue)"
        )

        def to_pt(step: float, v: float, vlo: float, vhi: float) -> QPointF:
            x = plot.left() + plot.width() * min(1.0, step / self.total_steps)
            y = plot.bottom() - plot.height() * (v - vlo) / (vhi - vlo)
            return QPointF(x, y)

        for series, color, vlo, vhi in (
            (self.loss, LOSS_COLOR, lo, hi),
            (self.dice, DICE_COLOR, 0, 1),
        ):
            if not series:
                continue
            p.setPen(QPen(color, 2))
            path = QPainterPath(to_pt(*series[0], vlo, vhi))
            for s, v in series[1:]:
                path.lineTo(to_pt(s, v, vlo, vhi))
            p.drawPath(path)
            if series is self.dice:
                p.setBrush(color)
                for s, v in series:
                    p.drawEllipse(to_pt(s, v, vlo, vhi), 3, 3)
        p.end()
