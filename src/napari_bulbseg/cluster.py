"""``bulbseg predict --cluster local:N`` / ``--scheduler ADDRESS``: a cohort on dask.distributed.

The only module that imports dask, and only inside its functions: it is imported when one of
those options is given. One task per input file; a task carries the file's path, the output
folder's staging path, the model's folder + sha256 and the options — never pixels. Each worker
runs :func:`.cohort.predict_task` (the same per-file prediction as single-process
``bulbseg predict``), which loads the model once per worker process. The client moves each
finished file into place, records it, and appends it to the run log, so a rerun skips what is
finished (see :mod:`.cohort`).

A worker killed mid-task: the scheduler reruns the task on another worker (up to dask's
``distributed.scheduler.allowed-failures``, 3 by default, then the file is reported as failed).

A stack of more than ``--slices-per-task`` slices is split: one task per slice range
(:func:`.cohort.predict_range`, each writing its part into the staging folder), a merge task
that depends on them all (:func:`.cohort.merge_parts`) and, for ``--diameter auto``, a scale
task they depend on (:func:`.cohort.measure_scale`). The client commits the merge's record as
it would a whole file's: the file is recorded once, when every range is done.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .cohort import (
    FileRecord,
    Item,
    ModelRef,
    RunLog,
    Summary,
    commit,
    count_slices,
    describe_error,
    is_auto,
    measure_scale,
    merge_parts,
    options_key,
    predict_range,
    predict_task,
    slice_ranges,
)
from .errors import InputError
from .events import Progress

#: seconds to wait for a scheduler given with --scheduler
CONNECT_TIMEOUT_S = 10.0
_LOCAL = re.compile(r"^local(?::(\d+))?$")
INSTALL_HINT = 'pip install "napari-bulbseg[distributed]"'


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_cluster(spec: str) -> int:
    """``local:N`` → N worker processes (``local`` alone: one per core)."""
    m = _LOCAL.match(str(spec).strip())
    n = None if m is None else (int(m.group(1)) if m.group(1) else cores())
    if n is None or n < 1:
        raise InputError(
            f"Invalid --cluster {spec!r}",
            "use local:N with N >= 1 worker processes (e.g. local:2), or --scheduler ADDRESS "
            "for a cluster started elsewhere",
        )
    return n


def torch_threads(n_workers: int, n_cores: int | None = None) -> int:
    """Torch threads per local worker so that workers × threads ≤ cores (at least 1)."""
    return max(1, (n_cores or cores()) // n_workers)


def require_distributed() -> Any:
    try:
        import distributed
    except ImportError as e:
        raise InputError(
            "--cluster and --scheduler need dask.distributed, which is not installed",
            INSTALL_HINT,
        ) from e
    return distributed


@contextlib.contextmanager
def open_client(
    cluster: str | None = None, scheduler: str | None = None
) -> Iterator[tuple[Any, int | None, float]]:
    """A dask Client: a new LocalCluster (closed on exit) or a running scheduler.

    Yields ``(client, torch threads per task or None, seconds it took to start)``.
    """
    distributed = require_distributed()
    t0 = time.perf_counter()
    if cluster is not None:
        n = parse_cluster(cluster)
        if n > cores():
            print(
                f"note: {n} workers on {cores()} core(s): each gets 1 thread, and they share "
                "the cores",
                file=sys.stderr,
            )
        local = distributed.LocalCluster(
            n_workers=n,
            threads_per_worker=1,  # one file at a time per worker; torch gets the cores
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        try:
            client = distributed.Client(local)
            try:
                yield client, torch_threads(n), time.perf_counter() - t0
            finally:
                client.close()
        finally:
            local.close()
        return
    try:
        client = distributed.Client(scheduler, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError, TypeError) as e:
        first = " ".join(str(e).split())[:200]
        raise InputError(
            f"No dask scheduler answered at {scheduler} within {CONNECT_TIMEOUT_S:g} s ({first})",
            "start the scheduler (e.g. a dask_jobqueue SLURMCluster) first and pass its "
            "address, such as tcp://host:8786",
        ) from None
    try:
        yield client, None, time.perf_counter() - t0
    finally:
        client.close()


def _n_workers(client: Any) -> int:
    with contextlib.suppress(Exception):
        return len(client.scheduler_info().get("workers", {}))
    return 0


def _submit_file(
    client: Any,
    i: int,
    item: Item,
    staging: Path,
    model: ModelRef,
    options: Any,
    postprocess: Any,
    diameter: float | str | None,
    write_prob: bool,
    ranges: list[tuple[int, int]],
) -> tuple[Any, list[tuple[Any, tuple[int, int]]]]:
    """Submit one input: one task, or (split) a task per slice range and a merge task that
    depends on them (and, for ``--diameter auto``, a scale task they all depend on). Returns
    (the future of the file's :class:`~.cohort.FileRecord`, [(range future, range)])."""
    tag = f"{staging.name}-{i}"
    if len(ranges) <= 1:
        fut = client.submit(
            predict_task,
            str(item.path),
            str(staging),
            model,
            options,
            postprocess,
            diameter,
            write_prob,
            key=f"bulbseg-predict-{tag}",
            pure=False,
        )
        return fut, []
    path = str(item.path)
    scale: Any = {"diameter": diameter, "message": None}
    if is_auto(diameter):
        scale = client.submit(
            measure_scale, path, model, options, diameter, key=f"bulbseg-scale-{tag}", pure=False
        )
    parts = [
        (
            client.submit(
                predict_range,
                path,
                str(staging),
                model,
                options,
                postprocess,
                scale,
                lo,
                hi,
                write_prob,
                key=f"bulbseg-slices-{tag}-{lo}",
                pure=False,
            ),
            (lo, hi),
        )
        for lo, hi in ranges
    ]
    merged = client.submit(
        merge_parts,
        path,
        str(staging),
        [f for f, _ in parts],
        model,
        options,
        postprocess,
        diameter,
        write_prob,
        scale if not isinstance(scale, dict) else None,
        key=f"bulbseg-merge-{tag}",
        pure=False,
    )
    return merged, parts


def iter_run(
    client: Any,
    items: Sequence[Item],
    folder: Any,
    staging: Path,
    model: ModelRef,
    options: Any,
    postprocess: Any,
    *,
    diameter: float | str | None = None,
    write_prob: bool = True,
    threads: int | None = None,
    summary: Summary | None = None,
    slices_per_task: int | None = None,
) -> Generator[Progress, None, Summary]:
    """Run ``items`` on ``client``, one task per file — or, for a stack of more than
    ``slices_per_task`` slices, one per slice range plus a merge; yields Progress by finished
    task and returns the :class:`~.cohort.Summary`. Closing the generator cancels what has not
    run. A file is committed (moved into place, recorded once) only when all of it is done."""
    distributed = require_distributed()
    summary = summary or Summary(total=len(items))
    log = RunLog(folder.path)
    if threads is not None:
        options = replace(options, num_threads=threads)
    t0 = time.perf_counter()
    files: dict[Any, Item] = {}
    ranges_of: dict[Any, tuple[Item, tuple[int, int]]] = {}
    for i, item in enumerate(items):
        n = count_slices(item.path) if slices_per_task else None
        ranges = slice_ranges(n, slices_per_task) if n else []  # [] or one range: one task
        fut, parts = _submit_file(
            client, i, item, staging, model, options, postprocess, diameter, write_prob, ranges
        )
        files[fut] = item
        ranges_of.update({f: (item, r) for f, r in parts})
    everything = [*files, *ranges_of]
    total, finished = len(everything), 0
    try:
        for fut in distributed.as_completed(everything):
            finished += 1
            if fut in ranges_of:
                item, (lo, hi) = ranges_of.pop(fut)
                if fut.status == "finished":
                    yield Progress(finished, total, f"{item.path.name}: slices {lo}…{hi - 1}")
                continue  # an error reaches the file's merge task, and is reported there
            item = files[fut]
            try:
                record = fut.result()
            except distributed.KilledWorker as e:
                record = _failed(item, model, options, postprocess, diameter, write_prob, e)
                record = replace(
                    record,
                    error="the worker process died while predicting this file, on every retry "
                    "(killed, or out of memory) — try fewer workers, a smaller --tile or "
                    "--batch-size",
                )
            except Exception as e:
                record = _failed(item, model, options, postprocess, diameter, write_prob, e)
            record = commit(record, folder, log, item.stat)
            (summary.done if record.status == "done" else summary.failed).append(record)
            name = item.path.name
            msg = f"{name} failed" if record.status != "done" else name
            yield Progress(finished, total, msg)
    finally:
        pending = [f for f in everything if not f.done()]
        if pending:
            with contextlib.suppress(Exception):
                client.cancel(pending)
        summary.seconds = time.perf_counter() - t0
        summary.workers = _n_workers(client)
    return summary


def _failed(
    item: Item,
    model: ModelRef,
    options: Any,
    postprocess: Any,
    diameter: Any,
    write_prob: bool,
    e: BaseException,
) -> FileRecord:
    return FileRecord(
        input=str(item.path),
        status="failed",
        model=model.name,
        model_sha256=model.sha256,
        options=options_key(options, postprocess, diameter, write_prob),
        error=describe_error(e),
    )
