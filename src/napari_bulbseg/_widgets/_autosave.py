"""The widgets' autosave of corrections: debounced, in a worker, never losing a painted pixel.

Where and how corrections are stored is the engine's :mod:`napari_bulbseg.corrections`.
"""

from __future__ import annotations

import datetime as _dt
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from napari.utils.notifications import show_warning
from qtpy.QtCore import QTimer

from ..corrections import CorrectionStore
from . import _text as T
from ._jobs import start_job


def saved_when(saved_at: Any, now: _dt.datetime | None = None) -> str:
    """A save time (ISO 8601, as state.json holds it) in local time: "today 14:03",
    "yesterday 09:10" or "2 Dec 2026 14:03". A time without a zone is taken as local."""
    try:
        when = _dt.datetime.fromisoformat(str(saved_at))
    except ValueError:
        return T.WHEN_UNKNOWN
    if when.tzinfo is not None:
        when = when.astimezone().replace(tzinfo=None)
    today = (now or _dt.datetime.now()).date()
    hm = f"{when:%H:%M}"
    if when.date() == today:
        return T.WHEN_TODAY.format(hm=hm)
    if when.date() == today - _dt.timedelta(days=1):
        return T.WHEN_YESTERDAY.format(hm=hm)
    return T.WHEN_DATE.format(day=when.day, month_year=f"{when:%b %Y}", hm=hm)


class AutoSaver:
    """Debounced background saving of a corrections layer (never loses a painted pixel).

    ``touch()`` after every edit; the save runs ``delay_ms`` after the last one, on a copy of
    the data, in a worker thread. A save requested while one runs is done right after it.
    """

    def __init__(
        self,
        store: CorrectionStore,
        get_data: Any,
        get_reviewed: Any,
        delay_ms: int = 1000,
        on_saved: Any = None,
    ) -> None:
        self.store, self._get_data, self._get_reviewed = store, get_data, get_reviewed
        self._on_saved = on_saved
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(delay_ms)
        self._timer.timeout.connect(self.save_now)
        self._worker: Any = None
        self._pending = False
        self._warned = False
        self._crc: dict[int, int] = {}
        self.saves = 0
        # saves run in workers and in flush(): a snapshot never overwrites a newer one on disk
        self._lock = threading.Lock()
        self._seq = 0
        self._written_seq = 0
        # the snapshot buffer is reused: a fresh 30 MB copy costs ~100 ms of page faults on the
        # GUI thread, a copy into touched memory ~1 ms (only one save job reads it at a time)
        self._buf: np.ndarray | None = None

    def touch(self) -> None:
        self._timer.start()

    def maybe_changed(self, z: int) -> None:
        """After an undo/redo (napari emits no paint event): save if slice ``z`` changed."""
        data = self._get_data()
        if data is not None and 0 <= z < data.shape[0] and self._crc.get(z) != _crc(data[z]):
            self.touch()

    def save_now(self) -> None:
        data = self._get_data()
        if data is None:
            return
        if self._worker is not None:
            self._pending = True
            return
        if self._buf is None or self._buf.shape != data.shape:
            self._buf = np.empty(data.shape, np.uint8)
        np.copyto(self._buf, data, casting="unsafe")
        snapshot = self._buf
        reviewed = set(self._get_reviewed())
        self._seq += 1
        self._worker = start_job(
            self._save_job(snapshot, reviewed, self._seq),
            on_done=self._saved,
            on_error=self._failed,
            on_finish=self._finished,
        )

    def _write(self, snapshot: np.ndarray, reviewed: set[int], seq: int) -> Path:
        with self._lock:
            if seq < self._written_seq:  # flush() already wrote newer data
                return self.store.mask_path
            path = self.store.save(snapshot, reviewed)
            self._written_seq = seq
            return path

    def _save_job(self, snapshot: np.ndarray, reviewed: set[int], seq: int) -> Any:
        path = self._write(snapshot, reviewed, seq)
        crc = {z: _crc(snapshot[z]) for z in range(snapshot.shape[0])}
        yield
        return path, crc

    def flush(self) -> None:
        """Save now, on this thread, if an edit is not on disk yet (viewer closing, layer removed).

        A save already running in a worker cannot overwrite this one with older data.
        """
        if not (self._timer.isActive() or self._pending or self._worker is not None):
            return
        self._timer.stop()
        self._pending = False
        data = self._get_data()
        if data is None:
            return
        self._seq += 1
        try:
            snapshot = np.array(data, dtype=np.uint8, copy=True)
            self._write(snapshot, set(self._get_reviewed()), self._seq)
        except Exception as e:  # the viewer is closing: say it, never raise into Qt
            show_warning(T.MSG_AUTOSAVE_FAIL.format(err=e))
            return
        self.saves += 1

    def _saved(self, res: tuple[Path, dict[int, int]]) -> None:
        path, self._crc = res
        self.saves += 1
        self._warned = False
        if self._on_saved is not None:
            self._on_saved(path)

    def _failed(self, error: BaseException) -> None:
        if not self._warned:  # once per failure streak; the next edit tries again
            show_warning(T.MSG_AUTOSAVE_FAIL.format(err=error))
            self._warned = True

    def _finished(self) -> None:
        self._worker = None
        if self._pending:
            self._pending = False
            self.save_now()

    @property
    def idle(self) -> bool:
        return self._worker is None and not self._timer.isActive() and not self._pending

    def stop(self) -> None:
        self._timer.stop()


def _crc(plane: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(plane, dtype=np.uint8).data)
