"""Predicting many files: one file into an output folder, and the bookkeeping of a cohort run.

:func:`predict_file` is *the* per-file prediction: read one stack, predict it, post-process it,
write ``<stem>_prob.tif`` and ``<stem>_mask.tif`` atomically, and return a small
:class:`FileRecord`. ``bulbseg predict`` calls it for each file; a distributed run
(:mod:`.cluster`) calls it on its workers through :func:`predict_task`, which loads the model
once per worker process (cached by path + sha256) and writes into a private staging folder.
The client then moves the finished files into place (:func:`commit`), records them in the
output folder's manifest (:class:`~.outputs.OutputFolder`) and appends one line to the run log
(:class:`RunLog`, ``.bulbseg-runs.jsonl``), from which a rerun knows what is finished.

A long stack is split into slice ranges (:func:`slice_ranges`): :func:`predict_range` predicts
one range into a part of its own, :func:`merge_parts` writes the parts into the stack's outputs
with :func:`write_outputs` — the writer :func:`predict_file` uses — and the client commits that
one record as for any file. ``--diameter auto`` is measured once per stack (:func:`measure_scale`).

Nothing here imports dask: a worker needs only this package.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import BulbsegError, InputError, ModelError
from .events import Progress, drain
from .io import prediction_names

RUN_LOG = ".bulbseg-runs.jsonl"
LOCK = ".bulbseg-lock"
STAGING = ".bulbseg-staging"
_LOG_FORMAT = 1


def output_names(path: str | os.PathLike, write_prob: bool = True) -> list[str]:
    """The files :func:`predict_file` writes for ``path``, the mask last (io.prediction_names)."""
    return prediction_names(path, write_prob)


def not_our_outputs(files: Sequence[Path], folder: Any) -> tuple[list[Path], list[Path]]:
    """``files`` split into (inputs, outputs this tool wrote into ``folder``, an
    :class:`~.outputs.OutputFolder`): a run never reads its own outputs back as inputs."""
    keep, ours = [], []
    for f in files:
        try:
            mine = f.parent.resolve() == folder.path.resolve() and folder.ours(f.name)
        except OSError:
            mine = False
        (ours if mine else keep).append(f)
    return keep, ours


# --------------------------------------------------------------------------- one file


@dataclass(frozen=True)
class FileRecord:
    """What became of one input: ``status`` is ``"done"`` or ``"failed"`` (with ``error``).

    ``outputs`` are file names in the output folder (the mask last); ``options`` the settings
    that decide the outputs (see :func:`options_key`); ``seconds`` the time spent reading,
    predicting and writing; ``started`` / ``ended`` wall-clock times on the machine that did it.
    """

    input: str
    status: str
    outputs: tuple[str, ...] = ()
    shape: tuple[int, ...] | None = None
    model: str = ""
    model_sha256: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    foreground: int | None = None
    diameter_px: float | None = None
    scale_message: str = ""
    #: what reading the file did that the user should know (axes flattened, series skipped, …)
    read_notes: tuple[str, ...] = ()
    model_load_s: float = 0.0
    worker: str = ""
    started: float = 0.0
    ended: float = 0.0
    #: a stack split into slice ranges: one entry per task (``"task"``: ``"scale"``,
    #: ``"slices"`` with its ``[lo, hi)``, ``"merge"``) with its worker and times; () otherwise
    parts: tuple[dict[str, Any], ...] = ()
    #: where a worker left the outputs for the client to move into place (None once moved)
    staged: str | None = None
    #: the slice ranges' folders, removed by the client once the merged record is committed
    staged_parts: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("staged")
        d.pop("staged_parts")
        return d

    def tasks(self) -> list[dict[str, Any]]:
        """The tasks that made this record, each with ``worker``, ``started``, ``ended`` and
        ``model_load_s``: its parts, or the record itself."""
        if self.parts:
            return list(self.parts)
        return [
            {
                "worker": self.worker,
                "started": self.started,
                "ended": self.ended,
                "model_load_s": self.model_load_s,
            }
        ]


def options_key(options: Any, postprocess: Any, diameter: Any, write_prob: bool) -> dict[str, Any]:
    """The settings that decide a file's outputs, as JSON values (threads and batch excluded:
    they change the speed, not the result)."""
    predict = {k: v for k, v in asdict(options).items() if k not in ("num_threads", "batch_size")}
    predict["device"] = str(predict["device"])
    return {
        "predict": predict,
        "postprocess": postprocess.to_dict(),
        "diameter": diameter,
        "write_prob": bool(write_prob),
    }


def _weights_sha(loaded: Any) -> str:
    return str((loaded.card.weights or {}).get("sha256") or "")


def _where() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def iter_predict_file(
    path: str | os.PathLike,
    output_dir: str | os.PathLike,
    loaded: Any,
    options: Any,
    postprocess: Any,
    *,
    diameter: float | str | None = None,
    write_prob: bool = True,
    on_written: Callable[[Path, dict[str, Any]], Any] | None = None,
) -> Generator[Progress, None, FileRecord]:
    """Predict one file into ``output_dir``; a generator of Progress returning its FileRecord.

    ``options``: :class:`~.inference.PredictOptions`; ``postprocess``:
    :class:`~.postprocess.PostProcess`. ``on_written(path, info)`` is called right after each
    output is written (the probabilities first, then the mask). Every file is written
    atomically, and a probability map is never left without its mask. Errors are raised.
    """
    from .inference import iter_predict
    from .io import read_stack
    from .postprocess import postprocess_stack

    started, t0 = time.time(), time.perf_counter()
    path, out = Path(path), Path(output_dir)
    stack = read_stack(path)
    try:
        scales: list[Any] = []
        gen = iter_predict(loaded, stack, options, diameter=diameter, on_scale=scales.append)
        prob = yield from gen
        scale = scales[0] if scales else None
        mask = postprocess_stack(prob, postprocess)
        names = output_names(path, write_prob)
        info = {"model": loaded.name, "diameter_px": scale.diameter if scale else None}
        prob_out = prob if write_prob else None
        write_outputs(
            out,
            names,
            prob_out,
            mask,
            stack.pixel_size,
            stack.unit,
            on_written=on_written,
            info=info,
        )
    finally:
        stack.close()
    return FileRecord(
        input=str(path),
        status="done",
        outputs=tuple(names),
        shape=tuple(int(n) for n in mask.shape),
        model=loaded.name,
        model_sha256=_weights_sha(loaded),
        options=options_key(options, postprocess, diameter, write_prob),
        seconds=time.perf_counter() - t0,
        foreground=int(mask.sum()),
        diameter_px=info["diameter_px"],
        scale_message=(scale.message if scale is not None else "") or "",
        read_notes=tuple(stack.notes),
        worker=_where(),
        started=started,
        ended=time.time(),
    )


def write_outputs(
    out: Path,
    names: Sequence[str],
    prob: Any,
    mask: Any,
    pixel_size: Any,
    unit: str,
    *,
    on_written: Callable[[Path, dict[str, Any]], Any] | None = None,
    info: dict[str, Any] | None = None,
) -> None:
    """Write one input's outputs into ``out``: the probabilities (float32; skipped when
    ``prob`` is None) then the mask, each atomically, with the input's pixel size and unit.

    ``on_written(path, info)`` is called after each. On any error the files written so far are
    removed: never a probability map without its mask, nor an output its record (the folder's
    manifest, e.g. on a full disk) does not know — a rerun would refuse it.
    """
    import numpy as np

    from .io import write_mask, write_tiff

    pp = mp = None
    try:
        if prob is not None:
            prob = np.asarray(prob, dtype=np.float32)  # no copy of a float32 memmap
            pp = write_tiff(
                out / names[0], prob, axes="ZYX", pixel_size=pixel_size, unit=unit or "µm"
            )
            if on_written is not None:
                on_written(pp, info or {})
        mp = write_mask(out / names[-1], mask, pixel_size=pixel_size)
        if on_written is not None:
            on_written(mp, info or {})
    except BaseException:
        for written in (mp, pp):
            if written is not None:
                with contextlib.suppress(OSError):
                    written.unlink()
        raise


def predict_file(
    path: str | os.PathLike,
    output_dir: str | os.PathLike,
    loaded: Any,
    options: Any,
    postprocess: Any,
    *,
    diameter: float | str | None = None,
    write_prob: bool = True,
    on_written: Callable[[Path, dict[str, Any]], Any] | None = None,
    callback: Callable[[Progress], Any] | None = None,
) -> FileRecord:
    """Predict one file into ``output_dir`` to the end (see :func:`iter_predict_file`)."""
    gen = iter_predict_file(
        path,
        output_dir,
        loaded,
        options,
        postprocess,
        diameter=diameter,
        write_prob=write_prob,
        on_written=on_written,
    )
    return drain(gen, callback)


# --------------------------------------------------------------------------- on a worker


@dataclass(frozen=True)
class ModelRef:
    """A model as a task carries it: a folder every worker can read and its weights' sha256."""

    path: str
    sha256: str
    name: str

    @classmethod
    def of(cls, loaded: Any) -> ModelRef:
        if loaded.path is None:
            raise ModelError(
                f"The model {loaded.name} has no folder that workers could load it from",
                "save it as a model folder (or a registry version) and pass that",
            )
        return cls(str(Path(loaded.path).resolve()), _weights_sha(loaded), loaded.name)


_models: dict[tuple[str, str, str], Any] = {}
_models_lock = threading.Lock()


def cached_model(ref: ModelRef, device: str = "auto") -> tuple[Any, float]:
    """The model ``ref`` on ``device``, loaded once per process; returns (model, seconds spent
    loading it now: 0.0 when it came from the cache)."""
    from .devices import select_device
    from .model import load_model

    key = (ref.path, ref.sha256, str(device))
    with _models_lock:
        if key in _models:
            return _models[key], 0.0
        t0 = time.perf_counter()
        loaded = load_model(ref.path, device=select_device(device))
        if _weights_sha(loaded) != ref.sha256:
            raise ModelError(
                f"The model in {ref.path} changed after the run started (sha256 "
                f"{_weights_sha(loaded)[:12]}…, the run uses {ref.sha256[:12]}…)",
                "do not replace a model while a run uses it; start the run again",
            )
        _models.clear()  # one model per worker is enough; free the previous one
        _models[key] = loaded
        return loaded, time.perf_counter() - t0


def warm_up() -> str:
    """Import the prediction code (torch) on a worker before the first task; returns where."""
    from . import inference  # noqa: F401

    return _where()


def predict_task(
    path: str,
    staging_dir: str,
    model: ModelRef,
    options: Any,
    postprocess: Any,
    diameter: float | str | None = None,
    write_prob: bool = True,
) -> FileRecord:
    """One file on a worker: predict into a fresh folder under ``staging_dir``; never raises
    for a bad file or a model that cannot run (the record says ``failed`` and why)."""
    started = time.time()
    where = Path(staging_dir) / secrets.token_hex(4)
    load_s = 0.0
    try:
        loaded, load_s = cached_model(model, str(options.device))
        where.mkdir(parents=True)
        record = predict_file(
            path, where, loaded, options, postprocess, diameter=diameter, write_prob=write_prob
        )
        return replace(record, staged=str(where), model_load_s=load_s)
    except Exception as e:  # reported in the summary; the other files go on
        shutil.rmtree(where, ignore_errors=True)
        return FileRecord(
            input=str(path),
            status="failed",
            model=model.name,
            model_sha256=model.sha256,
            options=options_key(options, postprocess, diameter, write_prob),
            error=describe_error(e),
            model_load_s=load_s,
            worker=_where(),
            started=started,
            ended=time.time(),
        )


def describe_error(e: BaseException) -> str:
    """One line for the summary: our errors as they are, others with their type."""
    if isinstance(e, BulbsegError):
        text = str(e)
    elif isinstance(e, OSError):
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        text = f"{e.strerror or e}{where}"
    elif isinstance(e, MemoryError):
        text = "not enough memory — use a smaller --tile or --batch-size, or fewer workers"
    else:
        text = f"unexpected {type(e).__name__}: {e}"
    return " ".join(text.split())


# --------------------------------------------------------------------------- slice ranges

#: ``--slices-per-task`` default: a stack of more slices is split into ranges of at most this
#: many, predicted as separate tasks and merged into the same outputs (0: never split)
SLICES_PER_TASK = 64
_PART_PROB = "prob.npy"
_PART_MASK = "mask.npy"


def slice_ranges(n_slices: int, per_task: int | None) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges covering ``n_slices`` slices: one range when ``per_task`` is 0 / None
    or the stack is no longer; else ``ceil(n / per_task)`` ranges of near-equal length."""
    n = max(int(n_slices), 0)
    if not per_task or per_task <= 0 or n <= per_task:
        return [(0, n)]
    k = -(-n // per_task)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


def count_slices(path: str | os.PathLike) -> int | None:
    """The number of slices of ``path`` from its header (PNG / JPEG: 1, not read); None when it
    cannot be read (its task then reports why)."""
    from .io import read_stack

    p = Path(path)
    if p.is_file() and p.suffix.lower() not in (".tif", ".tiff"):
        return 1
    try:
        stack = read_stack(p, lazy=True)
    except Exception:
        return None
    try:
        return stack.n_slices
    finally:
        stack.close()


class _RangeBuffer:
    """An ``out`` for :func:`~.inference.iter_predict` that keeps slices ``lo..hi`` only.

    It has the whole stack's shape (what iter_predict checks) but holds ``hi - lo`` slices;
    writes to other slices are dropped.
    """

    def __init__(self, shape: tuple[int, ...], lo: int, hi: int, dtype: Any) -> None:
        import numpy as np

        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.lo, self.hi = lo, hi
        self.data = np.zeros((hi - lo, *shape[1:]), dtype=self.dtype)

    def __setitem__(self, z: int, value: Any) -> None:
        if self.lo <= z < self.hi:
            self.data[z - self.lo] = value


def is_auto(diameter: Any) -> bool:
    """Whether ``diameter`` asks for the object scale to be measured (``"auto"``)."""
    from .inference import _is_auto

    return _is_auto(diameter)


class _ScaleFound(Exception):
    def __init__(self, scale: Any) -> None:
        self.scale = scale


def measure_scale(
    path: str, model: ModelRef, options: Any, diameter: float | str | None
) -> dict[str, Any]:
    """The object scale a whole-stack prediction of ``path`` would use, measured once for all
    its slice ranges: ``{"diameter": what the ranges ask for, "measured": px or None,
    "message": …}`` plus the task's timing, or
    ``{"error": …}``. For ``auto`` this runs the same first pass as single-process predict (the
    same slices of the whole stack) and stops before the real pass; otherwise it is just the
    given diameter. Never raises."""
    from .inference import iter_predict
    from .io import read_stack
    from .scale import NATIVE

    started, t0 = time.time(), time.perf_counter()
    timing: dict[str, Any] = {"task": "scale", "worker": _where(), "started": started}
    load_s = 0.0
    if not is_auto(diameter):
        return {"diameter": diameter, "message": None}
    try:
        loaded, load_s = cached_model(model, str(options.device))
        stack = read_stack(path, lazy=True)
        try:

            def stop(scale: Any) -> None:
                raise _ScaleFound(scale)

            out = _RangeBuffer(tuple(stack.data.shape[:3]), 0, 0, options.prob_dtype)
            try:
                drain(
                    iter_predict(loaded, stack, options, out=out, diameter=diameter, on_scale=stop)
                )
                raise RuntimeError("the prediction never reported its scale")
            except _ScaleFound as found:
                scale = found.scale
        finally:
            stack.close()
        # what every range predicts at: the zoom auto chose (no rescaling: "none", not None,
        # which would mean the card's default), and the diameter it measured, for the record
        request = NATIVE if scale.zoom == 1.0 else loaded.card.diameter / scale.zoom
        result = {"diameter": request, "measured": scale.diameter, "message": scale.message or ""}
    except Exception as e:
        result = {"error": describe_error(e)}
    timing.update(ended=time.time(), seconds=time.perf_counter() - t0, model_load_s=load_s)
    return {**result, "timing": timing}


@dataclass(frozen=True)
class PartRecord:
    """One slice range ``[lo, hi)`` of a split stack, predicted on a worker into ``folder``
    (``prob.npy`` float32 as written to the TIFF, unless ``write_prob`` was off, and
    ``mask.npy`` uint8 {0, 1}, each written atomically). ``shape`` is the whole stack's."""

    input: str
    lo: int
    hi: int
    status: str
    folder: str | None = None
    shape: tuple[int, ...] | None = None
    pixel_size: tuple[float, float] | None = None
    unit: str = ""
    foreground: int = 0
    diameter_px: float | None = None
    scale_message: str = ""
    read_notes: tuple[str, ...] = ()
    error: str | None = None
    seconds: float = 0.0
    model_load_s: float = 0.0
    worker: str = ""
    started: float = 0.0
    ended: float = 0.0

    def timing(self) -> dict[str, Any]:
        return {
            "task": "slices",
            "slices": [self.lo, self.hi],
            "worker": self.worker,
            "started": self.started,
            "ended": self.ended,
            "seconds": self.seconds,
            "model_load_s": self.model_load_s,
        }


def _save_npy(path: Path, arr: Any) -> None:
    import numpy as np

    from .atomic import atomic_write

    with atomic_write(path) as fh:
        np.save(fh, arr, allow_pickle=False)


def predict_range(
    path: str,
    staging_dir: str,
    model: ModelRef,
    options: Any,
    postprocess: Any,
    scale: dict[str, Any],
    lo: int,
    hi: int,
    write_prob: bool = True,
) -> PartRecord:
    """Slices ``lo..hi`` of one stack on a worker (a task of a split stack): read only those
    planes, predict them at ``scale`` (from :func:`measure_scale`), post-process them (every
    step works slice by slice) and write the part into a fresh folder under ``staging_dir``.
    Never raises: a failed record says why."""
    import numpy as np

    from .inference import iter_predict
    from .io import read_stack
    from .postprocess import postprocess_stack

    started, t0 = time.time(), time.perf_counter()
    where = Path(staging_dir) / secrets.token_hex(4)
    load_s = 0.0
    try:
        if scale.get("error"):
            raise InputError(scale["error"], "")
        loaded, load_s = cached_model(model, str(options.device))
        stack = read_stack(path, lazy=True)  # only the planes asked for are read
        try:
            shape = tuple(int(n) for n in stack.data.shape[:3])
            if not 0 <= lo < hi <= shape[0]:
                raise InputError(
                    f"Slices {lo}…{hi - 1} are not in the stack ({shape[0]} slices)",
                    "the file changed after the run started; run again",
                )
            scales: list[Any] = []
            buf = _RangeBuffer(shape, lo, hi, options.prob_dtype)
            drain(
                iter_predict(
                    loaded,
                    stack,
                    options,
                    out=buf,
                    slices=range(lo, hi),
                    diameter=scale.get("diameter"),
                    on_scale=scales.append,
                )
            )
            mask = postprocess_stack(buf.data, postprocess)
            where.mkdir()  # not parents: a cancelled run's staging folder stays removed
            if write_prob:
                _save_npy(where / _PART_PROB, np.asarray(buf.data, dtype=np.float32))
            _save_npy(where / _PART_MASK, mask)
        finally:
            stack.close()
        used = scales[0] if scales else None
        message = scale.get("message")
        return PartRecord(
            input=str(path),
            lo=lo,
            hi=hi,
            status="done",
            folder=str(where),
            shape=shape,
            pixel_size=stack.pixel_size,
            unit=stack.unit,
            foreground=int(mask.sum()),
            diameter_px=scale["measured"]
            if "measured" in scale
            else (used.diameter if used is not None else None),
            scale_message=(message if message is not None else (used.message if used else ""))
            or "",
            read_notes=tuple(stack.notes),
            seconds=time.perf_counter() - t0,
            model_load_s=load_s,
            worker=_where(),
            started=started,
            ended=time.time(),
        )
    except Exception as e:
        shutil.rmtree(where, ignore_errors=True)
        return PartRecord(
            input=str(path),
            lo=lo,
            hi=hi,
            status="failed",
            error=describe_error(e),
            seconds=time.perf_counter() - t0,
            model_load_s=load_s,
            worker=_where(),
            started=started,
            ended=time.time(),
        )


def _load_part(part: PartRecord, name: str, dtype: str) -> Any:
    """A part's array, memory-mapped, checked against the slices and size it should hold."""
    import numpy as np

    f = Path(str(part.folder)) / name
    try:
        arr = np.load(f, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(
            f"The part with slices {part.lo}…{part.hi - 1} is missing or damaged ({e})",
            "run again: the file is predicted from the start",
        ) from e
    want = (part.hi - part.lo, *tuple(part.shape or ())[1:])
    if arr.shape != want or arr.dtype != np.dtype(dtype):
        raise InputError(
            f"The part with slices {part.lo}…{part.hi - 1} holds {arr.dtype} {arr.shape}, not "
            f"{dtype} {want}",
            "run again: the file is predicted from the start",
        )
    return arr


def merge_parts(
    path: str,
    staging_dir: str,
    parts: Sequence[PartRecord],
    model: ModelRef,
    options: Any,
    postprocess: Any,
    diameter: float | str | None = None,
    write_prob: bool = True,
    scale: dict[str, Any] | None = None,
) -> FileRecord:
    """Merge the slice ranges of one stack into its outputs, in a fresh folder under
    ``staging_dir``: the same files, written by the same code (:func:`write_outputs`), as
    :func:`predict_file` writes for the whole stack. A record for the whole file, ``staged``
    for the client's :func:`commit`; failed (never raises) when a part failed or is damaged.
    The parts are left for the client to remove once the record is committed."""
    import numpy as np

    started, t0 = time.time(), time.perf_counter()
    where = Path(staging_dir) / secrets.token_hex(4)
    parts = sorted(parts, key=lambda p: p.lo)
    timings = [p.timing() for p in parts]
    if scale is not None and scale.get("timing"):
        timings.insert(0, scale["timing"])
    base = {
        "input": str(path),
        "model": model.name,
        "model_sha256": model.sha256,
        "options": options_key(options, postprocess, diameter, write_prob),
        "model_load_s": sum(float(t.get("model_load_s") or 0.0) for t in timings),
        "staged_parts": tuple(str(p.folder) for p in parts if p.folder),
    }
    try:
        bad = [p for p in parts if p.status != "done"]
        if bad:
            raise InputError(f"slices {bad[0].lo}…{bad[0].hi - 1}: {bad[0].error}", "")
        shape = tuple(parts[0].shape or ())
        end = 0
        for part in parts:
            if part.lo != end or tuple(part.shape or ()) != shape:
                break
            end = part.hi
        if not shape or end != shape[0]:
            covered = [(p.lo, p.hi) for p in parts]
            raise InputError(f"The slice ranges {covered} do not tile the stack {shape}", "")
        where.mkdir()
        prob = mask = None
        try:
            mask = np.lib.format.open_memmap(where / _PART_MASK, "w+", np.uint8, shape)
            if write_prob:
                prob = np.lib.format.open_memmap(where / _PART_PROB, "w+", np.float32, shape)
            for part in parts:
                mask[part.lo : part.hi] = _load_part(part, _PART_MASK, "uint8")
                if prob is not None:
                    prob[part.lo : part.hi] = _load_part(part, _PART_PROB, "float32")
            names = output_names(path, write_prob)
            first = parts[0]
            write_outputs(where, names, prob, mask, first.pixel_size, first.unit)
        finally:
            del prob, mask  # unmapped before the files go
            for name in (_PART_MASK, _PART_PROB):
                with contextlib.suppress(OSError):
                    (where / name).unlink()
        merge_timing = {
            "task": "merge",
            "worker": _where(),
            "started": started,
            "ended": time.time(),
            "seconds": time.perf_counter() - t0,
            "model_load_s": 0.0,
        }
        return FileRecord(
            **base,
            status="done",
            outputs=tuple(names),
            shape=shape,
            seconds=sum(float(t["seconds"]) for t in timings) + merge_timing["seconds"],
            foreground=sum(p.foreground for p in parts),
            diameter_px=first.diameter_px,
            scale_message=first.scale_message,
            read_notes=first.read_notes,
            worker=merge_timing["worker"],
            started=min(float(t["started"]) for t in timings),
            ended=merge_timing["ended"],
            staged=str(where),
            parts=(*timings, merge_timing),
        )
    except Exception as e:
        shutil.rmtree(where, ignore_errors=True)
        return FileRecord(
            **base,
            status="failed",
            error=describe_error(e),
            worker=_where(),
            started=started,
            ended=time.time(),
            parts=tuple(timings),
        )


# --------------------------------------------------------------------------- in the client


def input_stat(path: str | os.PathLike) -> dict[str, int]:
    st = Path(path).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


class RunLog:
    """``.bulbseg-runs.jsonl``: one JSON line per input finished (or failed) by a run.

    Each line is written with one ``write`` to a file opened for appending and fsynced, so an
    interrupted run leaves whole lines; a torn last line (power loss) is ignored on reading.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / RUN_LOG

    def entries(self) -> list[dict[str, Any]]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("input"), str):
                out.append(entry)
        return out

    def latest(self) -> dict[str, dict[str, Any]]:
        """The last entry of each input (keyed by its resolved path)."""
        return {e["input"]: e for e in self.entries()}

    def append(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise InputError(
                f"Could not write the run log {self.path}: {e.strerror or e}",
                "check free disk space and permissions",
            ) from e


def _same_file(out: Path, name: str, stat: Any) -> bool:
    try:
        st = (out / name).stat()
    except OSError:
        return False
    return isinstance(stat, dict) and stat == {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_finished(
    entry: dict[str, Any] | None, stat: dict[str, int], model_sha256: str, key: dict, out: Path
) -> bool:
    """Whether a run-log entry says this input is done with this model and these options, and
    its outputs are still exactly the files that run wrote."""
    if not entry or entry.get("status") != "done" or entry.get("format") != _LOG_FORMAT:
        return False
    if entry.get("input_stat") != stat or entry.get("model_sha256") != model_sha256:
        return False
    if entry.get("options") != json.loads(json.dumps(key)):
        return False
    files = entry.get("output_stat")
    names = entry.get("outputs") or []
    return (
        bool(names)
        and isinstance(files, dict)
        and all(_same_file(out, n, files.get(n)) for n in names)
    )


def commit(record: FileRecord, folder: Any, log: RunLog, stat: dict[str, int]) -> FileRecord:
    """Move a worker's staged outputs into the output folder (the mask last), record them in
    its manifest and append the run-log line; a failed record is only logged."""
    out: Path = folder.path
    stats: dict[str, Any] = {}
    if record.status == "done" and record.staged:
        staged = Path(record.staged)
        info = {"model": record.model, "diameter_px": record.diameter_px}
        moved: list[Path] = []
        try:
            for name in record.outputs:
                target = out / name
                os.replace(staged / name, target)
                moved.append(target)
                folder.record(target, info)
                st = target.stat()
                stats[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        except BaseException:
            if len(moved) < len(record.outputs):  # never a probability map without its mask
                for p in moved:
                    with contextlib.suppress(OSError):
                        p.unlink()
            raise
        shutil.rmtree(staged, ignore_errors=True)
        record = replace(record, staged=None)
    for part in record.staged_parts:  # a split stack's slice ranges, merged or of no use now
        shutil.rmtree(part, ignore_errors=True)
    record = replace(record, staged_parts=())
    entry = {
        **record.to_dict(),
        "format": _LOG_FORMAT,
        "input_stat": stat,
        "output_stat": stats,
        "logged": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    log.append(entry)
    return record


class OutputLock:
    """One run at a time per output folder: an exclusive lock on ``.bulbseg-lock``.

    Held for the whole run; the lock ends with the process, so a killed run never leaves the
    folder locked. (Where the system has no ``fcntl`` locks, nothing is locked.)
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on POSIX
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.read(fd, 200).decode("utf-8", "replace").strip()
            os.close(fd)
            raise InputError(
                f"Another bulbseg run is writing into {self.path.parent}"
                + (f" ({holder})" if holder else ""),
                "wait for it to finish, or predict into another output folder (-o)",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


def new_staging_dir(out: Path, older_than_s: float = 3600.0) -> Path:
    """A fresh folder for this run's staged outputs; those of runs older than an hour (killed,
    or cancelled with tasks still running elsewhere) are removed."""
    root = out / STAGING
    now = time.time()
    with contextlib.suppress(OSError):
        for p in root.iterdir():
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > older_than_s:
                    shutil.rmtree(p, ignore_errors=True)
    run = root / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    run.mkdir(parents=True)
    return run


def remove_staging_dir(run: Path) -> None:
    shutil.rmtree(run, ignore_errors=True)
    with contextlib.suppress(OSError):
        run.parent.rmdir()  # only when empty


# --------------------------------------------------------------------------- the summary


@dataclass
class Summary:
    """How a cohort run went (printed by the CLI, returned to callers)."""

    total: int = 0
    done: list[FileRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[FileRecord] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 0
    startup_s: float = 0.0

    @property
    def files_per_s(self) -> float:
        return len(self.done) / self.seconds if self.seconds > 0 else float("nan")

    def overhead_per_task_s(self) -> float:
        """Seconds a worker spent between its tasks (scheduling, transfers, the client's commit),
        per task: from each worker's first start to its last end, minus the work in between."""
        by_worker: dict[str, list[dict[str, Any]]] = {}
        for r in [*self.done, *self.failed]:
            for t in r.tasks():
                if t.get("worker") and t.get("ended", 0) > 0:
                    by_worker.setdefault(t["worker"], []).append(t)
        gaps, n = 0.0, 0
        for tasks in by_worker.values():
            span = max(t["ended"] for t in tasks) - min(t["started"] for t in tasks)
            busy = sum(t["ended"] - t["started"] for t in tasks)
            gaps += max(0.0, span - busy)
            n += len(tasks)
        return gaps / n if n else 0.0

    def lines(self) -> list[str]:
        done, failed = len(self.done), len(self.failed)
        out = [
            f"{self.total} file(s): {done} done, {len(self.skipped)} skipped (already finished "
            f"with this model and these options), {failed} failed — {self.seconds:.1f} s"
            + (f", {self.files_per_s:.2f} files/s" if done else "")
            + (f" on {self.workers} worker(s)" if self.workers else "")
        ]
        for r in self.failed:
            out.append(f"failed: {r.input}: {r.error}")
        if done:
            mean = sum(r.seconds for r in self.done) / done
            over = self.overhead_per_task_s()
            every = [t for r in [*self.done, *self.failed] for t in r.tasks()]
            loads = [t["model_load_s"] for t in every if (t.get("model_load_s") or 0) > 0]
            out.append(
                f"per file: {mean:.2f} s predicting, {over:.3f} s between tasks "
                f"({100 * over / mean if mean > 0 else 0:.1f} %); model loaded {len(loads)} "
                f"time(s)"
                + (f", {sum(loads) / len(loads):.2f} s each" if loads else "")
                + (f"; cluster started in {self.startup_s:.1f} s" if self.startup_s else "")
            )
        return out


@dataclass(frozen=True)
class Item:
    """One input of a cohort run, as planned by the client."""

    path: Path
    stat: dict[str, int]


def plan(
    files: Iterable[Path], folder: Any, model_sha256: str, key: dict[str, Any]
) -> tuple[list[Item], list[str]]:
    """The inputs still to do, and those skipped because the run log says they are finished."""
    latest = RunLog(folder.path).latest()
    todo, skipped = [], []
    for f in files:
        resolved = str(Path(f).resolve())
        try:
            stat = input_stat(f)
        except OSError as e:
            raise InputError(f"Cannot read {f}: {e.strerror or e}", "check the path") from e
        if is_finished(latest.get(resolved), stat, model_sha256, key, folder.path):
            skipped.append(resolved)
        else:
            todo.append(Item(Path(resolved), stat))
    return todo, skipped
