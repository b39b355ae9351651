"""What a file must be before it is decoded: a regular file, of a kind we read (from its first
bytes, not its name), holding a pixel type we support; and the errors a damaged file raises."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

_DECODE_ERRORS = (
    ValueError,
    RuntimeError,
    OSError,
    EOFError,
    IndexError,
    KeyError,
    struct.error,
    zlib.error,
    MemoryError,
)


def _check_regular_file(path: Path) -> None:
    """Refuse pipes, sockets and devices: reading one can block forever."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise InputError(
            f"Cannot read {path}: {e.strerror or e}", "check the path and its permissions"
        ) from e
    if not stat.S_ISREG(mode):
        raise InputError(
            f"{path} is not a regular file (a pipe, socket or device)",
            "save the image to a file and open that file",
        )


def _sniff(path: Path) -> str:
    """'tiff', 'png', 'jpeg', 'bmp' from the first bytes; InputError for empty or unknown."""
    _check_regular_file(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as e:
        raise InputError(
            f"Cannot read {path}: {e.strerror or e}", "check the path and its permissions"
        ) from e
    if size == 0:
        raise InputError(
            f"{path} is empty (0 bytes)", "the file was not written completely; re-export it"
        )
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"BM"):
        return "bmp"
    raise InputError(
        f"{path} is not a TIFF, PNG or JPEG image (it starts with {head[:4]!r})",
        "save the image as TIFF (preferred) or PNG",
    )


def _check_dtype(dtype: np.dtype, path: Any) -> None:
    if dtype.kind not in "biuf":
        raise InputError(
            f"{path} has unsupported pixel type {dtype}",
            "convert it to an integer or float32 image (e.g. in Fiji: Image > Type)",
        )
