"""Autosave of corrections: a per-image folder in the user data dir, restored after a crash.

Layout (``<home>/corrections/<image-stem>-<key>/``)::

    corrections.tif   the corrections stack, 0/255 (written atomically by io.write_mask)
    state.json        image name, source path, shape, reviewed slices, time of the save

``<home>`` is ``$NAPARI_BULBSEG_HOME`` or the platform's user data dir. The key hashes the
image's source path (or its layer name) and shape, so reopening the same file finds its edits.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from napari.utils.notifications import show_warning
from qtpy.QtCore import QTimer

from . import _text as T
from ._jobs import start_job

STATE = "state.json"
MASK = "corrections.tif"


def bulbseg_home() -> Path:
    env = os.environ.get("NAPARI_BULBSEG_HOME")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-bulbseg", appauthor=False))


def image_key(name: str, shape: tuple[int, ...], source: str | None = None) -> str:
    """Folder name for an image: readable stem + hash of its source (or name) and shape."""
    ident = f"{source or name}|{tuple(int(s) for s in shape)}"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).stem if source else name)[:40]
    return f"{stem}-{hashlib.sha1(ident.encode()).hexdigest()[:10]}"


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


class CorrectionStore:
    """Saved corrections and reviewed flags of one image."""

    def __init__(self, name: str, shape: tuple[int, ...], source: str | None = None) -> None:
        self.name, self.shape, self.source = name, tuple(int(s) for s in shape), source
        self.folder = bulbseg_home() / "corrections" / image_key(name, self.shape, source)

    @property
    def mask_path(self) -> Path:
        return self.folder / MASK

    def exists(self) -> bool:
        return (self.folder / STATE).is_file() and self.mask_path.is_file()

    def info(self) -> dict[str, Any]:
        """The saved state (name, shape, reviewed, saved_at); empty when unreadable."""
        try:
            return json.loads((self.folder / STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def save(self, mask: np.ndarray, reviewed: set[int]) -> Path:
        """Write the mask (atomic) then the state JSON (atomic)."""
        from ..atomic import write_text_atomic
        from ..io import write_mask

        self.folder.mkdir(parents=True, exist_ok=True)
        write_mask(self.mask_path, (np.asarray(mask) > 0).astype(np.uint8))
        state = {
            "name": self.name,
            "source": self.source,
            "shape": list(self.shape),
            "reviewed": sorted(int(z) for z in reviewed),
            "saved_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        write_text_atomic(self.folder / STATE, json.dumps(state, indent=1))
        return self.mask_path

    def load(self) -> tuple[np.ndarray, set[int]]:
        """The saved mask, shaped like the image, and the reviewed slices."""
        from ..io import read_mask

        mask = read_mask(self.mask_path)
        if mask.ndim == 2 and len(self.shape) == 3:
            mask = mask[None]
        return mask.reshape(self.shape), {int(z) for z in self.info().get("reviewed", [])}


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
