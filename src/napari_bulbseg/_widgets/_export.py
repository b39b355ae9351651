"""The Segment widget's "Export for bioimage.io…" button: the chosen model as a package (.zip)."""

from __future__ import annotations

from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import PushButton
from napari.utils.notifications import show_info, show_warning
from qtpy.QtWidgets import QFileDialog

from ..errors import InputError
from . import _text as T
from ._jobs import start_job, user_message
from ._models import FOLDER, ModelChoice, chosen_folder, load_choice

if TYPE_CHECKING:
    from ..bioimageio import ExportResult


def ask_package_path(parent: Any, suggested: str) -> str | None:
    """Ask where to write a bioimage.io package; None when the user cancels (tests patch it)."""
    path, _ = QFileDialog.getSaveFileName(
        parent, T.DLG_EXPORT_MODEL, suggested, T.DLG_EXPORT_FILTER
    )
    if not path:
        return None
    return path if path.lower().endswith(".zip") else path + ".zip"


def package_name(choice: ModelChoice, folder: Path | None) -> str:
    """A file name to suggest for the bioimage.io package of ``choice``."""
    if choice.kind == FOLDER and folder is not None:
        return f"{folder.name}.zip"
    return f"bulbseg-{choice.version}.zip"


def export_job(
    choice: ModelChoice, folder: Path | None, output: str | Path
) -> Generator[None, None, ExportResult]:
    """Worker body: load the chosen model on the CPU and write it as a bioimage.io package.

    The engine function ``bulbseg export`` uses; returns its ``ExportResult``. The user
    confirmed replacing ``output`` in the file dialog, so an existing file is replaced.
    """
    from ..bioimageio import export_package
    from ..devices import select_device

    yield
    loaded, _label = load_choice(choice, folder, select_device("cpu"))
    yield
    return export_package(loaded, output, force=True)


class ModelExporter:
    """The export button; ``chosen()`` gives the widget's ``(ModelChoice, folder value)``."""

    def __init__(self, owner: Any, chosen: Callable[[], tuple[ModelChoice | None, Any]]) -> None:
        self._owner, self._chosen = owner, chosen
        self.button = PushButton(text=T.BTN_EXPORT_MODEL, tooltip=T.TIP_EXPORT_MODEL)
        self.button.changed.connect(self.export)
        self.worker: Any = None

    @property
    def running(self) -> bool:
        return self.worker is not None

    def export(self) -> None:
        """Ask for a .zip, then export in the background; success or failure is reported."""
        choice, folder_value = self._chosen()
        if choice is None or self.running:
            return
        try:
            folder = chosen_folder(choice, folder_value)
        except InputError as e:  # no model folder chosen yet
            show_warning(user_message(e))
            return
        path = ask_package_path(self._owner.native, package_name(choice, folder))
        if path is None:
            return
        self.button.enabled = False
        self._owner.status.value = T.MSG_EXPORTING.format(path=path)
        self.worker = start_job(
            export_job(choice, folder, path),
            on_done=self._exported,
            on_error=self._failed,
            on_finish=self._finished,
        )

    def _exported(self, result: ExportResult) -> None:
        msg = T.MSG_EXPORTED_MODEL.format(path=result.path, version=result.format_version)
        if result.notes:
            msg += T.MSG_EXPORT_NOTES.format(notes="; ".join(result.notes))
        self._owner.status.value = msg
        show_info(msg)

    def _failed(self, error: BaseException) -> None:
        self._owner.status.value = user_message(error)
        show_warning(user_message(error))

    def _finished(self) -> None:
        self.worker = None
        self.button.enabled = True
