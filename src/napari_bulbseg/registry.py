"""Where trained models live: numbered versions in the user data folder, plus the bundled default.

Layout of the registry root (default ``<user data dir>/napari-bulbseg/models``, or
``$NAPARI_BULBSEG_HOME/models`` when that variable is set)::

    v001/  model.json weights.safetensors     one folder per version, never overwritten
    v002/  ...
    current.json                              {"id": "v002"} — written atomically

The bundled default model (inside the installed package, read-only) is the root of every
lineage: it has the id ``"bundled"``, and a model trained from it records
``parent = "bundled:<first 12 hex digits of its weights' sha256>"``. Versions are written with
:func:`napari_bulbseg.model.save_model` (temporary folder, fsync, rename), so an interrupted save
leaves no half-written version; folders that are damaged anyway are listed as broken.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import write_text_atomic
from .errors import ModelError
from .home import ENV_HOME, user_home
from .model import (
    CARD_NAME,
    WEIGHTS_NAME,
    LoadedModel,
    ModelCard,
    UNet,
    bundled_model_dir,
    load_model,
    read_card,
    save_model,
)

BUNDLED = "bundled"
CURRENT_FILE = "current.json"
_ID_RE = re.compile(r"^v(\d{3,})$")
#: what a registry name looks like (anything else is taken as a path)
_SPEC_RE = re.compile(r"^(v\d{3,}|current|bundled(:[0-9a-f]*)?)$")
#: file names that mean a model path even when the file does not exist
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".pt", ".pth")
_REF_LEN = 12


def default_root() -> Path:
    """``$NAPARI_BULBSEG_HOME/models`` if set, else ``<user data dir>/napari-bulbseg/models``."""
    return user_home() / "models"


def bundled_ref(card: ModelCard | None = None) -> str:
    """``"bundled:<sha256 prefix>"`` naming the bundled model's exact weights."""
    if card is None:
        card = read_card(bundled_model_dir())
    return f"{BUNDLED}:{str(card.weights.get('sha256', ''))[:_REF_LEN]}"


def _same_path(a: Path | None, b: Path) -> bool:
    if a is None:
        return False
    try:
        return Path(a).resolve() == b.resolve()
    except OSError:
        return False


def parent_ref(loaded: LoadedModel, registry: Registry | None = None) -> str:
    """How a model trained from ``loaded`` names its parent.

    The bundled model → ``"bundled:<sha prefix>"``; a registry version → its id (``"v003"``);
    any other model folder → ``"<name>@sha256:<prefix>"``.
    """
    card = loaded.card
    sha = str(card.weights.get("sha256", ""))[:_REF_LEN]
    if _same_path(loaded.path, bundled_model_dir()):
        return bundled_ref(card)
    path = Path(loaded.path) if loaded.path is not None else None
    if path is not None and _ID_RE.match(path.name):
        in_registry = registry is not None and _same_path(path.parent, registry.root)
        if in_registry or card.version == path.name:
            return path.name
    return f"{card.name}@sha256:{sha}"


@dataclass(frozen=True)
class VersionInfo:
    """One row of :meth:`Registry.list_versions`; ``broken`` says why a version is unusable."""

    id: str
    name: str = ""
    version: str = ""
    parent: str | None = None
    created: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    broken: str | None = None
    current: bool = False

    @property
    def ok(self) -> bool:
        return self.broken is None

    @property
    def val_dice(self) -> float | None:
        d = self.metrics.get("dice")
        return float(d) if isinstance(d, int | float) else None


class Registry:
    """Numbered model versions in one folder, a ``current`` pointer and the bundled default."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # ------------------------------------------------------------------ ids and paths

    def _ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if p.is_dir() and _ID_RE.match(p.name)]
        return sorted(found, key=lambda s: int(s[1:]))

    def _next_id(self) -> str:
        """One past the highest id taken by anything in the folder (a stray file included)."""
        taken = [int(p.name[1:]) for p in self.root.iterdir() if _ID_RE.match(p.name)]
        return f"v{max(taken, default=0) + 1:03d}"

    def _resolve(self, version_id: str) -> str:
        vid = str(version_id).strip()
        if vid == "current":
            return self.current()
        if vid == BUNDLED or vid.startswith(BUNDLED + ":"):
            return vid
        if not _ID_RE.match(vid):
            raise ModelError(
                f"{vid!r} is not a model version id",
                "use an id from the version list (e.g. v002), 'current' or 'bundled'",
            )
        return vid

    def path_of(self, version_id: str) -> Path:
        """Folder of a version (the package folder for ``"bundled"``)."""
        vid = self._resolve(version_id)
        if vid == BUNDLED or vid.startswith(BUNDLED + ":"):
            return bundled_model_dir()
        return self.root / vid

    # ------------------------------------------------------------------ listing

    def _info(self, vid: str, path: Path, current: str) -> VersionInfo:
        try:
            card = read_card(path)
        except ModelError as e:
            return VersionInfo(id=vid, path=path, broken=e.message, current=vid == current)
        except OSError as e:
            return VersionInfo(id=vid, path=path, broken=str(e), current=vid == current)
        broken = None
        wpath = path / card.weights.get("file", WEIGHTS_NAME)
        if not wpath.is_file():
            broken = f"weights file {wpath.name} is missing"
        elif (
            card.weights.get("bytes") is not None and wpath.stat().st_size != card.weights["bytes"]
        ):
            broken = "weights file size does not match its card (truncated or replaced)"
        metrics = card.metrics.get("val", {}) if isinstance(card.metrics, dict) else {}
        return VersionInfo(
            id=vid,
            name=card.name,
            version=card.version,
            parent=card.parent,
            created=card.created,
            metrics=dict(metrics) if isinstance(metrics, dict) else {},
            path=path,
            broken=broken,
            current=vid == current,
        )

    def list_versions(self, include_bundled: bool = True) -> list[VersionInfo]:
        """Every version, oldest first (the bundled model first); damaged ones have ``broken``."""
        current = self.current()
        out = []
        if include_bundled:
            out.append(self._info(BUNDLED, bundled_model_dir(), current))
        for vid in self._ids():
            out.append(self._info(vid, self.root / vid, current))
        return out

    def info(self, version_id: str) -> VersionInfo:
        vid = self._resolve(version_id)
        vid = BUNDLED if vid.startswith(BUNDLED) else vid
        return self._info(vid, self.path_of(vid), self.current())

    def lineage(self, version_id: str, limit: int = 100) -> list[VersionInfo]:
        """``version_id`` and its registry ancestors, oldest first (the fine-tuning rounds that
        led to it); stops at the bundled model, a missing or damaged parent, or ``limit``."""
        out: list[VersionInfo] = []
        seen: set[str] = set()
        vid: str | None = str(version_id)
        while vid and len(out) < limit:
            try:
                vid = self._resolve(vid)
            except ModelError:
                break
            if vid.startswith(BUNDLED) or vid in seen or not (self.root / vid).is_dir():
                break
            seen.add(vid)
            info = self._info(vid, self.root / vid, self.current())
            out.append(info)
            if not info.ok:
                break
            vid = info.parent
        return out[::-1]

    # ------------------------------------------------------------------ saving and loading

    def check_writable(self) -> None:
        """Prove a new version can be saved here — call it before spending time on training."""
        import tempfile

        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root, prefix=".bulbseg-write-test-"):
                pass
        except OSError as e:
            raise ModelError(
                f"Cannot save models in {self.root}: {e.strerror or e}",
                f"set {ENV_HOME} to a folder you can write to (models go into its models/ "
                "subfolder), or fix the permissions / free some space",
            ) from e

    def save_version(
        self, model: UNet, card: ModelCard, dtype: str = "float32", make_current: bool = True
    ) -> str:
        """Write ``model`` + ``card`` as the next version (atomically); return its id.

        The saved card is a copy of ``card`` whose ``version`` is the new id (``card`` itself is
        not changed). With ``make_current`` the pointer moves to it after the folder is complete.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temp()
        card = copy.deepcopy(card)
        for _ in range(100):  # another process may take the same id: try the next one
            vid = self._next_id()
            if (self.root / vid).exists() or (self.root / vid).is_symlink():
                continue
            card.version = vid
            try:
                save_model(self.root / vid, model, card, dtype=dtype)
            except ModelError:
                if (self.root / vid).exists():
                    continue
                raise
            if make_current:
                self.set_current(vid)
            return vid
        raise ModelError(f"Could not find a free version id in {self.root}", "try again")

    def _remove_stale_temp(self, older_than_s: float = 3600.0) -> None:
        """Remove temp folders of saves that were killed (never a complete version)."""
        now = time.time()
        for p in self.root.glob(".v*.tmp"):
            with contextlib.suppress(OSError):
                if p.is_dir() and now - p.stat().st_mtime > older_than_s:
                    shutil.rmtree(p, ignore_errors=True)

    def resolve(self, spec: str | os.PathLike) -> Path:
        """The model folder that ``spec`` names — the one rule for every way to name a model.

        ``spec`` is ``"bundled"`` (or ``"default"``), ``"bundled:<sha prefix>"`` (checked against
        the shipped model), ``"current"``, a version id such as ``"v002"``, or a model folder
        (or its ``model.json``). A registry name that is also a different folder here is refused
        as ambiguous (``./v002`` names the folder). ModelError when ``spec`` names no model; the
        folder's contents are checked on loading.
        """
        text = os.fspath(spec).strip() if isinstance(spec, (str, os.PathLike)) else ""
        if not text:
            raise ModelError(
                f"No model named {spec!r}", "give a model folder, a version id, or 'bundled'"
            )
        if text in (BUNDLED, "default"):
            return bundled_model_dir()
        p = Path(text)
        if _SPEC_RE.match(text):
            try:
                found = self._version_path(text)
            except ModelError:
                if p.exists():
                    return p
                raise
            if p.exists() and not _same_path(p, found):
                raise ModelError(
                    f"{text!r} names both the folder {p.resolve()} and the registry's model "
                    f"{found}",
                    f"write ./{text} for the folder, or run from another folder",
                )
            return found
        looks_like_path = os.sep in text or bool(os.altsep and os.altsep in text)
        if p.exists() or looks_like_path or text.lower().endswith(_MODEL_FILE_SUFFIXES):
            return p  # load_model explains what is wrong with it (missing, a pickle, ...)
        raise ModelError(
            f"No model at {text}: no such folder, and not a version id",
            "give a model folder (model.json + weights.safetensors), a version id such as "
            "v002, 'current' or 'bundled'",
        )

    def _version_path(self, spec: str) -> Path:
        """The folder of a registry name (``current``, ``v002``, ``bundled:<sha prefix>``)."""
        vid = self._resolve(spec)
        if vid.startswith(BUNDLED + ":"):
            want = vid.split(":", 1)[1]
            have = bundled_ref().split(":", 1)[1]
            if not have.startswith(want) or not want:
                raise ModelError(
                    f"The bundled model is {BUNDLED}:{have}, not {vid}: this napari-bulbseg "
                    "ships a different default model",
                    "use 'bundled' for the current default, or install the version that had it",
                )
        path = self.path_of(vid)
        if not vid.startswith(BUNDLED) and not path.is_dir():
            raise ModelError(f"No model version {vid} in {self.root}", "list the versions")
        return path

    def load(self, version_id: str = "current", device: str | torch.device = "cpu") -> LoadedModel:
        """Load a registry model: a version id, ``"current"``, ``"bundled"`` or
        ``"bundled:<sha prefix>"`` — never a path (:meth:`resolve` takes folders too)."""
        return load_model(self._version_path(version_id), device=device)

    # ------------------------------------------------------------------ current / rollback

    @property
    def _pointer(self) -> Path:
        return self.root / CURRENT_FILE

    def current(self) -> str:
        """The current version id; ``"bundled"`` when none was set or the pointer is unusable."""
        try:
            data = json.loads(self._pointer.read_text(encoding="utf-8"))
            vid = str(data["id"])
        except (OSError, ValueError, KeyError, TypeError):
            return BUNDLED
        if vid == BUNDLED or (_ID_RE.match(vid) and (self.root / vid / CARD_NAME).is_file()):
            return vid
        return BUNDLED

    def pointer_problem(self) -> str:
        """Why the ``current`` pointer file, when there is one, is not used ("" when it is
        fine or absent): :meth:`current` then falls back to the bundled model."""
        if not self._pointer.exists():
            return ""
        try:
            data = json.loads(self._pointer.read_text(encoding="utf-8"))
            vid = str(data["id"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{self._pointer} is unreadable ({type(e).__name__})"
        if vid == BUNDLED or (_ID_RE.match(vid) and (self.root / vid / CARD_NAME).is_file()):
            return ""
        return f"{self._pointer} names {vid!r}, which is not a version in {self.root}"

    def set_current(self, version_id: str) -> None:
        """Point ``current`` at a version (which must exist and have a readable card)."""
        vid = self._resolve(version_id)
        if vid.startswith(BUNDLED):
            vid = BUNDLED
        else:
            info = self._info(vid, self.root / vid, "")
            if not (self.root / vid).is_dir():
                raise ModelError(f"No model version {vid} in {self.root}", "list the versions")
            if info.broken:
                raise ModelError(f"Model version {vid} is broken ({info.broken})", "pick another")
        write_text_atomic(self._pointer, json.dumps({"id": vid}) + "\n")

    def rollback(self) -> str:
        """Make the current version's parent current (else the previous intact version, else
        the bundled model); return the new current id. Nothing is deleted."""
        cur = self.current()
        if cur == BUNDLED:
            raise ModelError("The current model is already the bundled default", "nothing to undo")
        ok = {v.id for v in self.list_versions(include_bundled=False) if v.ok}
        parent = self._info(cur, self.root / cur, cur).parent
        if parent and parent in ok:
            target = parent
        elif parent and parent.startswith(BUNDLED):
            target = BUNDLED
        else:
            earlier = [v for v in ok if int(v[1:]) < int(cur[1:])]
            target = max(earlier, key=lambda s: int(s[1:])) if earlier else BUNDLED
        self.set_current(target)
        return target
