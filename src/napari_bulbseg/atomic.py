"""Atomic file writes: a temp file beside the target, fsync, ``os.replace``.

A crash, a full disk or an exception mid-write leaves any existing file untouched and no temp
file behind; readers never see a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import InputError


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only set it, and a
    set-and-restore is visible to every other thread meanwhile); ``0o022`` when unknown."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in ``path`` durable (a no-op where folders cannot be fsynced)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "wb", **open_kw: Any
) -> Iterator[IO[Any]]:
    """Yield a file opened in ``path``'s folder; on success fsync it and move it onto ``path``.

    ``mode`` is ``"wb"`` or ``"w"`` (text; pass ``encoding``/``newline`` in ``open_kw``). The new
    file keeps an existing file's permissions, or gets the usual ``0666 & ~umask``. An
    ``OSError`` becomes an :class:`~napari_bulbseg.errors.InputError` that says the old file
    was left unchanged.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', not {mode!r}")
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder", "give a file name to write to")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise InputError(
            f"Cannot write to folder {parent}: {e.strerror or e}",
            "choose a folder you can write to (check permissions and free space)",
        ) from e
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # a named handle (not os.fdopen): tifffile wants fh.name to be a path
        with open(tmp, "r+b" if mode == "wb" else "w", **open_kw) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        file_mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~current_umask()
        os.chmod(tmp, file_mode)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise InputError(
                f"Could not write {path}: {e.strerror or e}",
                "check free disk space and permissions; any existing file was left unchanged",
            ) from e
        raise
    fsync_dir(parent)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(path)
