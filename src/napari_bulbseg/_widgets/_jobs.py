"""Run an engine job generator in napari's thread worker, with user-facing error reporting.

napari relays a worker's uncaught exception as a notification with a traceback; a biologist
should see one sentence instead. So every job runs inside :func:`_guarded`, which turns an
exception into a :class:`Failed` result, and :func:`start_job` shows it with ``show_error``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any

from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils.notifications import show_error

from ..errors import BulbsegError, CancelledError, log_failure

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failed:
    """The result of a job that raised ``error``."""

    error: BaseException


def user_message(error: BaseException) -> str:
    """One sentence for the user: our errors carry a hint, others get their type named."""
    if isinstance(error, BulbsegError):
        return str(error)
    if isinstance(error, MemoryError):
        return "Out of memory — try a smaller tile size, or close other programs."
    return f"Unexpected error ({type(error).__name__}): {error}"


def _guarded(gen: Generator[Any, Any, Any]) -> Generator[Any, Any, Any]:
    try:
        result = yield from gen
    except Exception as e:  # reported to the user by start_job, never as a traceback
        log_failure(log, e)
        return Failed(e)
    return result


def _while_alive(fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """``fn``, except that a job ending after its dock was closed (its Qt widgets deleted)
    does nothing instead of raising into Qt's event loop."""
    if fn is None:
        return None

    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except RuntimeError as e:
            if "has been deleted" not in str(e):
                raise
            log.debug("a job ended after its widget was closed: %s", e)
            return None

    return call


def start_job(
    gen: Generator[Any, Any, Any],
    *,
    on_yield: Callable[[Any], Any] | None = None,
    on_done: Callable[[Any], Any] | None = None,
    on_error: Callable[[BaseException], Any] | None = None,
    on_abort: Callable[[], Any] | None = None,
    on_finish: Callable[[], Any] | None = None,
    progress: dict[str, Any] | None = None,
) -> GeneratorWorker:
    """Start ``gen`` in a napari thread worker and return it (``worker.quit()`` cancels).

    ``on_done`` gets the generator's return value; ``on_error`` (default: a napari error
    notification) gets the exception; ``on_finish`` runs in every case, on the GUI thread.
    ``on_abort`` runs when ``worker.quit()`` stopped the job at a yield. A job that ran to its
    end although ``quit()`` came during its last step has done its work: its result still goes
    to ``on_done`` (superqt would drop it, emitting neither ``returned`` nor ``aborted``).
    """
    results: list[Any] = []  # the generator's return value, once it has one
    settled: list[bool] = []  # returned or aborted was delivered
    on_yield, on_done, on_error, on_abort, on_finish = (
        _while_alive(f) for f in (on_yield, on_done, on_error, on_abort, on_finish)
    )

    def _work() -> Generator[Any, Any, Any]:
        result = yield from _guarded(gen)
        results.append(result)
        return result

    worker = create_worker(_work, _progress=progress or False, _start_thread=False)

    def _returned(value: Any) -> None:
        settled.append(True)
        if isinstance(value, Failed):
            if isinstance(value.error, CancelledError):
                if on_abort is not None:
                    on_abort()
                return
            (on_error or (lambda e: show_error(user_message(e))))(value.error)
        elif on_done is not None:
            on_done(value)

    def _aborted() -> None:
        settled.append(True)
        if on_abort is not None:
            on_abort()

    def _finished() -> None:
        if not settled and results:  # quit() came during the last step
            _returned(results[0])
        if on_finish is not None:
            on_finish()

    if on_yield is not None:
        worker.yielded.connect(on_yield)
    worker.returned.connect(_returned)
    worker.aborted.connect(_aborted)
    worker.finished.connect(_finished)
    worker.start()
    return worker


def warm_imports(*modules: str, calls: Iterable[Callable[[], Any]] = ()) -> None:
    """Import ``modules`` (then run ``calls``) in a background thread, so that the first use
    of a heavy module (scipy's optimisers, torch's training code, vispy's line patterns) does
    not freeze the viewer."""
    import importlib
    import threading

    todo = list(calls)

    def _go() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # the real import, later, reports it
                log.debug("warm import of %s failed", name, exc_info=True)
        for call in todo:
            try:
                call()
            except Exception:  # a cache left cold costs time, never correctness
                log.debug("warm-up call %r failed", call, exc_info=True)

    threading.Thread(target=_go, name="bulbseg-warm-imports", daemon=True).start()
