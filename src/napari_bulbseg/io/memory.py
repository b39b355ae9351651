"""How much memory there is, and from what size a read goes lazy (``lazy=None``).

The readers look these up through this module (``memory._lazy_threshold()``), so a test that
sets ``LAZY_MAX_BYTES`` or ``_available_memory`` here changes what they decide.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

#: stacks larger than this (uncompressed) open lazily when ``lazy=None`` ...
LAZY_MAX_BYTES = 2 * 1024**3
#: ... as do stacks larger than this fraction of the available memory
LAZY_MEMORY_FRACTION = 0.25


def _available_memory() -> int:
    """Bytes of memory available to this process (cgroup limit respected where readable)."""
    avail = None
    try:
        import psutil  # optional

        avail = int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or unusable
        with contextlib.suppress(ValueError, OSError, AttributeError):
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if avail is None:
        avail = 8 * 1024**3
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            avail = min(avail, max(int(limit) - used, 0))
    return avail


def _lazy_threshold() -> int:
    return int(min(LAZY_MAX_BYTES, _available_memory() * LAZY_MEMORY_FRACTION))


def _gib(n: float) -> str:
    return f"{n / 1024**3:.3g} GiB" if n >= 1024**3 else f"{n / 1024**2:.3g} MiB"
