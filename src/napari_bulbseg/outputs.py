"""Output folders of the command line: never overwrite what the tool did not write.

``bulbseg predict`` and ``bulbseg demo`` record every file they write in a manifest
(``.bulbseg-outputs.json``, in the output folder) with its size and modification time. A later
run may replace a file only when it is still exactly what was recorded; anything else — a
hand-drawn ``stack_mask.tif``, a prediction the user edited and saved over — is refused before
any work starts. Outputs are also refused where they would be read back as an image's ground
truth (beside it, or in its ``masks/`` / ``labels/`` folder).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .atomic import atomic_write
from .errors import InputError
from .io import (
    IMAGE_SUFFIXES,
    PRED_MASK_SUFFIX,
    PROB_SUFFIX,
    file_stem,
    mask_partner_folders,
    prediction_names,
)

MANIFEST = ".bulbseg-outputs.json"
#: temp files of :func:`atomic.atomic_write` for the outputs of predict and demo (only these
#: are ever removed: a user's own hidden files never are)
_OUR_TEMP = re.compile(
    rf"^\.(.+({re.escape(PRED_MASK_SUFFIX)}|{re.escape(PROB_SUFFIX)})\.tif"
    r"|\.bulbseg-outputs\.json|probabilities\.tif|mask\.tif"
    r"|metrics\.csv|overview\.png)\.[A-Za-z0-9_]{8}\.tmp$"
)
_FORMAT = 1


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


class OutputFolder:
    """An output folder, created and proven writable on construction."""

    def __init__(self, path: str | os.PathLike) -> None:
        out = Path(path)
        if out.exists() and not out.is_dir():
            raise InputError(
                f"The output {out} is an existing file, not a folder",
                "give a folder for the results (it is created if it does not exist)",
            )
        try:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=out, prefix=".bulbseg-write-test-"):
                pass
        except OSError as e:
            raise InputError(
                f"Cannot write to the output folder {out}: {e.strerror or e}",
                "choose a folder you can write to (check permissions and free space)",
            ) from e
        self.path = out
        self._files = self._read_manifest()
        self._remove_stale_temp()

    def _remove_stale_temp(self, older_than_s: float = 600.0) -> None:
        """Temp files of our atomic writes (``.NAME.XXXX.tmp``) left by a killed run."""
        import time

        now = time.time()
        for p in self.path.glob(".*.tmp"):
            try:
                if (
                    _OUR_TEMP.match(p.name)
                    and p.is_file()
                    and now - p.stat().st_mtime > older_than_s
                ):
                    p.unlink()
            except OSError:
                pass

    def _read_manifest(self) -> dict[str, Any]:
        try:
            data = json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
            files = data.get("files", {}) if isinstance(data, dict) else {}
            return files if isinstance(files, dict) else {}
        except (OSError, ValueError):
            return {}  # no (readable) manifest: no file here counts as ours

    def ours(self, name: str) -> bool:
        """True when ``name`` is still exactly the file an earlier run wrote."""
        entry = self._files.get(name)
        try:
            st = (self.path / name).stat()
        except OSError:
            return False
        return (
            isinstance(entry, dict)
            and entry.get("size") == st.st_size
            and entry.get("mtime_ns") == st.st_mtime_ns
        )

    def check_targets(self, names: Iterable[str]) -> None:
        """Refuse, before any work, to replace a file this tool did not write."""
        for name in names:
            target = self.path / name
            if (target.exists() or target.is_symlink()) and not self.ours(name):
                raise InputError(
                    f"{target} already exists and was not written by bulbseg into this folder "
                    "(it may be a hand-drawn mask or an edited result); it is left untouched",
                    "choose another output folder (-o), or move that file away first",
                )

    def check_not_ground_truth_of(self, images: Iterable[Path]) -> None:
        """Refuse an output folder where predictions would be read back as ground truth."""
        for image in images:
            for folder in mask_partner_folders(image):
                if _same(self.path, folder):
                    raise InputError(
                        f"The output folder {self.path} is where the ground truth of "
                        f"{image.name} is looked for: a predicted mask written there would be "
                        "read back as its ground truth (and could replace it)",
                        "choose an output folder apart from the images and their masks, "
                        "e.g. -o predictions/",
                    )
            stem = file_stem(image)
            beside = [self.path / (stem + ext) for ext in IMAGE_SUFFIXES]
            if any(p.is_file() for p in beside):
                raise InputError(
                    f"The output folder {self.path} holds an image named {stem}: the predicted "
                    f"{prediction_names(image, False)[0]} would be read back as that image's "
                    "ground truth",
                    "choose an output folder apart from the images, e.g. -o predictions/",
                )

    def record(self, path: Path, info: dict[str, Any] | None = None) -> None:
        """Note that this run wrote ``path`` (call right after writing it); ``info`` (JSON
        values, e.g. the model and object diameter used) is kept with the entry."""
        st = path.stat()
        self._files[path.name] = {**(info or {}), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        text = json.dumps({"format": _FORMAT, "files": self._files}, indent=1, sort_keys=True)
        with atomic_write(self.path / MANIFEST) as fh:
            fh.write(text.encode("utf-8"))
