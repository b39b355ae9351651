"""``bulbseg``: the headless command line — predict, evaluate, train, info, demo, export, import.
No Qt."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .cohort import SLICES_PER_TASK
from .errors import BulbsegError, CancelledError, InputError
from .io import (
    IMAGE_SUFFIXES,
    file_stem,
    image_files,
    prediction_names,
    prob_files,
    slice_files,
)
from .options import LOSS_NAMES, START_MODES

if TYPE_CHECKING:
    import torch

    from .inference import PredictOptions
    from .metrics import StackMetrics
    from .model import LoadedModel, ModelCard
    from .outputs import OutputFolder
    from .postprocess import PostProcess

# --------------------------------------------------------------------------- progress display


class ProgressBar:
    """A dependency-free progress bar on stderr; plain periodic lines when not a terminal."""

    def __init__(self, label: str, stream: Any = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self._last_decile = -1

    def update(self, done: int, total: int, message: str = "") -> None:
        frac = 1.0 if total <= 0 else min(1.0, done / total)
        elapsed = time.perf_counter() - self.start
        eta = (elapsed / frac - elapsed) if frac > 0 else float("nan")
        if self.tty:
            n = int(frac * self.width)
            bar = "#" * n + "-" * (self.width - n)
            self.stream.write(
                f"\r{self.label} [{bar}] {100 * frac:5.1f}% {elapsed:6.1f}s "
                f"eta {eta:5.0f}s {message[:40]:<40}"
            )
            self.stream.flush()
        else:
            decile = int(frac * 10)
            if decile != self._last_decile:
                self._last_decile = decile
                self.stream.write(f"{self.label}: {100 * frac:3.0f}% ({elapsed:.1f}s) {message}\n")
                self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _run_with_bar(gen: Any, label: str) -> Any:
    from .events import Progress, TrainProgress, drain

    bar = ProgressBar(label)

    def show(ev: Any) -> None:
        if isinstance(ev, Progress):
            bar.update(ev.done, ev.total, ev.message)
        elif isinstance(ev, TrainProgress):
            extra = f"loss {ev.loss:.4f}"
            if ev.val_dice is not None:
                extra += f" val Dice {ev.val_dice:.4f}"
            bar.update(ev.step, ev.total_steps, extra)

    try:
        return drain(gen, show)
    finally:
        bar.close()


# --------------------------------------------------------------------------- helpers


def _collect_inputs(paths: Sequence[str]) -> list[Path]:
    """Image files named or found in the folders named; in a folder, the ground-truth masks of
    its images (``stack_mask.tif`` beside ``stack.tif``) are not inputs."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            everything, found = image_files(p), slice_files(p)
            if len(found) < len(everything):
                n = len(everything) - len(found)
                print(f"{p}: skipping {n} ground-truth mask(s) of its images", file=sys.stderr)
            if not found:
                raise InputError(
                    f"No images ({', '.join(IMAGE_SUFFIXES)}) in folder {p}",
                    "point at a folder of TIFF/PNG/JPEG images",
                )
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif p.is_symlink():
            try:
                target = p.resolve(strict=True)
            except RuntimeError:  # Python < 3.13: a loop
                target = None
            except OSError as e:
                target = None if e.errno == errno.ELOOP else Path(os.readlink(p))
            if target is None:
                raise InputError(
                    f"{p} is a symbolic link that loops back on itself",
                    "point at the real file or folder (ls -l shows where the link goes)",
                )
            raise InputError(
                f"{p} is a symbolic link to {target}, which does not exist",
                "point at the real file or folder, or fix the link",
            )
        else:
            raise InputError(f"No such file or folder: {p}", "check the path")
    # the same file named twice (a.tif, ./a.tif, a folder and a file in it): predicted once
    unique: dict[Path, Path] = {}
    for f in files:
        unique.setdefault(f.resolve(), f)
    if len(unique) < len(files):
        n = len(files) - len(unique)
        print(f"{n} input(s) named twice: each file is predicted once", file=sys.stderr)
    return list(unique.values())


def _select_device(device: str) -> torch.device:
    from .devices import select_device

    return select_device(device)


def _load_model(spec: str, device: str) -> LoadedModel:
    """``bundled``, ``current``, a registry version id, or a model folder (Registry.resolve)."""
    from .model import load_model
    from .registry import Registry

    registry = Registry()
    path = registry.resolve(spec)
    if str(spec).strip() == "current" and (problem := registry.pointer_problem()):
        print(
            _printable(
                f"bulbseg: warning: {problem}; using the bundled model — name a version "
                "(--model v002) to use another"
            ),
            file=sys.stderr,
        )
    return load_model(path, device=_select_device(device))


def _prepare_output_dir(path: str) -> OutputFolder:
    """Create the output folder (or check it) and prove it is writable, before any work."""
    from .outputs import OutputFolder

    return OutputFolder(path)


def _case_insensitive(folder: Path) -> bool:
    """Whether file names in ``folder`` ignore case (macOS, Windows, exFAT, some shares)."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".bulbseg-case-") as fh:
            name = Path(fh.name).name
            return (folder / name.upper()).exists()
    except OSError:
        return False


def _check_unique_outputs(files: Sequence[Path], ignore_case: bool = False) -> None:
    seen: dict[str, Path] = {}
    for f in files:
        stem = file_stem(f)
        key = stem.casefold() if ignore_case else stem
        if key in seen:
            what = " in this output folder, whose file names ignore case" if ignore_case else ""
            raise InputError(
                f"{seen[key]} and {f} would both be written as {prediction_names(f, False)[0]}"
                f"{what}",
                "predict them into different output folders, or rename one of them",
            )
        seen[key] = f


def _postprocess_from(args: argparse.Namespace, card: ModelCard) -> PostProcess:
    from .postprocess import PostProcess

    return PostProcess.from_card(
        card,
        threshold=args.threshold,
        min_size=args.min_size,
        keep_largest=args.keep_largest,
        fill_holes=args.fill_holes,
    )


def _add_predict_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="bundled",
        help="'bundled' (default), a model folder, or a registry version id",
    )
    p.add_argument(
        "--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, mps, cpu"
    )
    p.add_argument("--tile", type=int, default=None, help="largest tile side in pixels")
    p.add_argument("--overlap", type=int, default=None, help="overlap between tiles in pixels")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per forward pass")
    p.add_argument("--tta", action="store_true", help="average over flips and 90° rotations")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="probability threshold (default: the model card's validated threshold)",
    )
    p.add_argument("--min-size", type=int, default=None, help="remove objects smaller than this")
    p.add_argument(
        "--keep-largest",
        type=int,
        default=None,
        help="keep the N largest objects per slice (0 = all)",
    )
    p.add_argument("--fill-holes", action=argparse.BooleanOptionalAction, default=None)


def _predict_options(args: argparse.Namespace) -> PredictOptions:
    from .inference import PredictOptions

    kw: dict[str, Any] = {"device": args.device, "tta": args.tta}
    for name in ("tile", "overlap", "batch_size"):
        v = getattr(args, name)
        if v is not None:
            kw[name] = v
    return PredictOptions(**kw)


def _predict_inputs(args: argparse.Namespace) -> tuple[OutputFolder, list[Path]]:
    """The output folder and the inputs of ``predict``, checked before any work (the outputs
    an earlier run wrote into that folder are never inputs)."""
    from .cohort import not_our_outputs

    folder = _prepare_output_dir(args.output)
    files, ours = not_our_outputs(_collect_inputs(args.inputs), folder)
    if ours:
        print(f"skipping {len(ours)} output(s) of an earlier run in {folder.path}", file=sys.stderr)
        if not files:
            raise InputError(
                f"Every input is an output bulbseg wrote into {folder.path}",
                "give the images, and an output folder apart from them",
            )
    _check_unique_outputs(files, ignore_case=_case_insensitive(folder.path))
    folder.check_not_ground_truth_of(files)
    return folder, files


# --------------------------------------------------------------------------- commands


def _predict_on_cluster(args: argparse.Namespace) -> int:
    """``bulbseg predict … --cluster local:N | --scheduler ADDRESS``: returns the exit status
    (0: every file done or skipped; 1: some failed, named in the summary)."""
    from .cluster import iter_run, open_client, parse_cluster, require_distributed
    from .cohort import (
        SLICES_PER_TASK,
        ModelRef,
        OutputLock,
        Summary,
        new_staging_dir,
        options_key,
        output_names,
        plan,
        remove_staging_dir,
        warm_up,
    )
    from .scale import requested_diameter

    if args.cluster is not None:
        parse_cluster(args.cluster)  # a bad spec fails before anything else
    require_distributed()
    folder, files = _predict_inputs(args)
    with OutputLock(folder.path):
        loaded = _load_model(args.model, "cpu")  # checked here, loaded again on workers
        spec = _postprocess_from(args, loaded.card)
        options = _predict_options(args)
        model = ModelRef.of(loaded)
        diameter = requested_diameter(args.diameter, loaded.card.default_diameter)
        write_prob = not args.no_prob
        slices_per_task = getattr(args, "slices_per_task", None)
        if slices_per_task is None:
            slices_per_task = SLICES_PER_TASK
        key = options_key(options, spec, diameter, write_prob)
        todo, skipped = plan(files, folder, model.sha256, key)
        folder.check_targets(n for it in todo for n in output_names(it.path, write_prob))
        summary = Summary(total=len(files), skipped=skipped)
        where = f"cluster {args.cluster}" if args.cluster else f"scheduler {args.scheduler}"
        print(
            f"model {loaded.name} ({model.sha256[:12]}…); {spec}; {len(todo)} file(s) to do, "
            f"{len(skipped)} already finished; {where}",
            file=sys.stderr,
        )
        if todo:
            staging = new_staging_dir(folder.path)
            try:
                with open_client(args.cluster, args.scheduler) as (client, threads, startup):
                    t0 = time.perf_counter()
                    client.run(warm_up)  # torch imported on the workers before the clock starts
                    summary.startup_s = startup + time.perf_counter() - t0
                    gen = iter_run(
                        client,
                        todo,
                        folder,
                        staging,
                        model,
                        options,
                        spec,
                        diameter=diameter,
                        write_prob=write_prob,
                        threads=threads,
                        summary=summary,
                        slices_per_task=slices_per_task,
                    )
                    _run_with_bar(gen, "predict")
            finally:
                remove_staging_dir(staging)
    for line in summary.lines():
        print(_printable(line))
    return 1 if summary.failed else 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .cohort import iter_predict_file, output_names
    from .scale import requested_diameter

    if args.rank and args.no_prob:
        raise InputError("--rank scores the probability maps", "drop --no-prob to use --rank")
    if args.cluster is not None or args.scheduler is not None:
        if args.rank:
            raise InputError(
                "--rank is not done on a cluster",
                f"run 'bulbseg rank {args.output} -o ranking.csv' once the predictions are written",
            )
        return _predict_on_cluster(args)
    folder, files = _predict_inputs(args)
    folder.check_targets(n for f in files for n in output_names(f, not args.no_prob))
    loaded = _load_model(args.model, args.device)
    spec = _postprocess_from(args, loaded.card)
    options = _predict_options(args)
    diameter = requested_diameter(args.diameter, loaded.card.default_diameter)
    print(f"model {loaded.name} on {loaded.device}; {spec}", file=sys.stderr)
    probs: list[Path] = []
    for i, f in enumerate(files, 1):
        gen = iter_predict_file(
            f,
            folder.path,
            loaded,
            options,
            spec,
            diameter=diameter,
            write_prob=not args.no_prob,
            on_written=folder.record,
        )
        record = _run_with_bar(gen, _printable(f"[{i}/{len(files)}] {f.name}"))
        for note in record.read_notes:  # e.g. T and Z axes read as one run of slices
            print(_printable(f"{f.name}: {note}"), file=sys.stderr)
        if record.scale_message:
            print(_printable(f"{f.name}: {record.scale_message}"), file=sys.stderr)
        mp = folder.path / record.outputs[-1]
        print(_printable(f"{f.name}: {record.foreground} foreground pixels -> {mp}"))
        probs.append(folder.path / record.outputs[0])
    if args.rank:
        _write_ranking(probs, spec, args.expected_max, args.rank, args.top)
    return 0


def _write_ranking(
    probs: list[Path], spec: PostProcess, expected_max: int, dest: str, top: int
) -> None:
    from .ranking import rank, score_files, write_ranking_csv

    ranked = rank(score_files(probs, spec, expected_max))
    out = write_ranking_csv(dest, ranked)
    print(_printable(f"slices most worth correcting first ({len(ranked)} in all) -> {out}"))
    for i, s in enumerate(ranked[: max(top, 0)], 1):
        print(_printable(f"{i:3d}. {s.source} slice {s.index}: score {s.score:.3f} — {s.reasons}"))


def cmd_rank(args: argparse.Namespace) -> int:
    probs: list[Path] = []
    for item in args.inputs:
        p = Path(item)
        if p.is_dir():
            probs += prob_files(p)
        elif p.exists():
            probs.append(p)
        else:
            raise InputError(f"{p} does not exist", "give *_prob.tif files or their folder")
    if not probs:
        raise InputError(
            "No probability maps (*_prob.tif) found",
            "run bulbseg predict without --no-prob first, then rank its output folder",
        )
    loaded = _load_model(args.model, "cpu")
    spec = _postprocess_from(args, loaded.card)
    print(f"ranking {len(probs)} probability map(s) under {spec}", file=sys.stderr)
    _write_ranking(probs, spec, args.expected_max, args.output, args.top)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from .io import pair_masks, read_mask
    from .metrics import stack_metrics, write_metrics_csv

    pairs, missing = pair_masks(_collect_inputs([args.pred]), _collect_inputs([args.truth]))
    if not pairs:
        raise InputError(
            f"No prediction in {args.pred} matches a truth file in {args.truth} by name",
            "name predictions like the truth files (endings such as _mask, _pred, _gt are ignored)",
        )
    if missing:
        print(
            f"warning: {len(missing)} truth file(s) have no prediction, e.g. {missing[0].name}",
            file=sys.stderr,
        )
    t_planes, p_planes, names = [], [], []
    for stem, t_path, p_path in pairs:
        t, p = read_mask(t_path), read_mask(p_path)
        if t.shape != p.shape:
            raise InputError(
                f"{stem}: prediction shape {p.shape} ({p_path.name}) differs from truth "
                f"shape {t.shape} ({t_path.name})",
                "predict on the same images the truth was drawn on",
            )
        t = t[None] if t.ndim == 2 else t
        p = p[None] if p.ndim == 2 else p
        for z in range(t.shape[0]):
            t_planes.append(t[z])
            p_planes.append(p[z])
            names.append(stem if t.shape[0] == 1 else f"{stem}[{z}]")
    shapes = {a.shape for a in t_planes}
    if len(shapes) == 1:
        result = stack_metrics(np.stack(t_planes), np.stack(p_planes), match_iou=args.match_iou)
    else:
        result = _metrics_ragged(t_planes, p_planes, args.match_iou)
    _print_metrics(result, names)
    if args.csv:
        print(f"CSV written to {write_metrics_csv(args.csv, result)}")
    return 0


def _metrics_ragged(t_planes: list, p_planes: list, match_iou: float) -> StackMetrics:
    """Stack metrics over images of different sizes: pool per-slice metrics."""
    from .metrics import StackMetrics, slice_metrics

    per = [
        slice_metrics(t, p, index=i, match_iou=match_iou)
        for i, (t, p) in enumerate(zip(t_planes, p_planes))
    ]
    return StackMetrics.from_slices(per)


def _print_metrics(result: StackMetrics, names: Sequence[str] | None = None) -> None:
    head = f"{'slice':<40} {'Dice':>7} {'IoU':>7} {'px err':>8} {'hits':>5} {'miss':>5} {'FP':>5}"
    print(head)
    for m in result.per_slice:
        name = names[m.index] if names and m.index < len(names) else str(m.index)
        print(
            f"{name[:40]:<40} {m.dice:7.4f} {m.iou:7.4f} {m.pixel_error:8.5f} "
            f"{m.hits:5d} {m.misses:5d} {m.false_positives:5d}"
        )
    s = result.summary
    print(
        f"{'pooled (all pixels, all objects)':<40} {s.dice:7.4f} {s.iou:7.4f} "
        f"{s.pixel_error:8.5f} {s.hits:5d} {s.misses:5d} {s.false_positives:5d}"
    )
    mean = result.mean
    print(f"{'mean of slices':<40} {mean.dice:7.4f} {mean.iou:7.4f} {mean.pixel_error:8.5f}")


def cmd_info(args: argparse.Namespace) -> int:
    import json

    loaded = _load_model(args.model, "cpu")
    card = loaded.card
    print(f"model      {loaded.name}   ({loaded.path})")
    print(f"arch       {card.architecture}")
    print(
        f"input      {card.in_channels} channel(s), policy {card.channel_policy}, "
        f"normalisation {card.normalization}"
    )
    print(f"threshold  {card.threshold} (post-processing {card.postprocess})")
    print(f"parent     {card.parent}   created {card.created}")
    if card.metrics:
        print(f"metrics    {json.dumps(card.metrics)}")
    print(f"weights    {card.weights.get('dtype')} sha256 {card.weights.get('sha256')}")
    if args.json:
        print(card.to_json())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .data import samples_from_folders
    from .registry import Registry
    from .training import TrainConfig, iter_train

    kw: dict[str, Any] = {
        "loss": args.loss, "seed": args.seed, "device": args.device, "start": args.start,
    }  # fmt: skip
    for name in ("epochs", "batch_size", "patch_size", "lr", "steps_per_epoch"):
        v = getattr(args, name)
        if v is not None:
            kw[name] = v
    if args.time_budget is not None:
        kw["time_budget_s"] = args.time_budget
    config = TrainConfig(**kw)
    config.validate()  # before reading any data: bad settings fail at once
    _select_device(args.device)
    registry = Registry()
    registry.check_writable()  # not after the whole time budget was spent
    samples = samples_from_folders(args.images, args.masks)
    val = None
    if args.val_images or args.val_masks:
        if not (args.val_images and args.val_masks):
            raise InputError("--val-images and --val-masks go together", "give both or neither")
        val = samples_from_folders(args.val_images, args.val_masks)
    base = _load_model(args.base, args.device) if args.base else None
    print(
        f"training on {len(samples)} image(s)"
        + (f", validating on {len(val)}" if val else " (validation split fixed by content hash)")
        + (f", from {base.name}" if base else " from scratch"),
        file=sys.stderr,
    )
    result = _run_with_bar(
        iter_train(config, samples, val_samples=val, base=base, name=args.name, registry=registry),
        "train",
    )
    print(result.summary() if hasattr(result, "summary") else result)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .io import read_stack, write_mask, write_tiff
    from .metrics import write_metrics_csv
    from .overview import save_overview
    from .postprocess import PostProcess, difference_map, postprocess_stack

    sample = Path(__file__).parent / "sample"
    folder = _prepare_output_dir(args.output)
    out = folder.path
    folder.check_targets(("probabilities.tif", "mask.tif", "metrics.csv", "overview.png"))
    loaded = _load_model(args.model, args.device)
    stack = read_stack(sample / "bbbc039_sample.tif")
    truth = read_stack(sample / "bbbc039_sample_mask.tif").data
    truth = (truth > 0).astype("uint8")
    print(
        f"demo: {stack.n_slices} BBBC039 validation slices {stack.shape[1:]} "
        f"with model {loaded.name} on {loaded.device}",
        file=sys.stderr,
    )
    from .inference import PredictOptions, iter_predict

    prob = _run_with_bar(iter_predict(loaded, stack, PredictOptions(device=args.device)), "predict")
    spec = PostProcess.from_card(loaded.card)
    mask = postprocess_stack(prob, spec)
    from .metrics import stack_metrics

    result = stack_metrics(truth, mask)
    _print_metrics(result)
    folder.record(write_tiff(out / "probabilities.tif", prob.astype("float32"), axes="ZYX"))
    folder.record(write_mask(out / "mask.tif", mask))
    folder.record(write_metrics_csv(out / "metrics.csv", result))
    png = save_overview(out / "overview.png", stack.data, mask, difference_map(truth, mask))
    folder.record(png)
    print(
        f"threshold {spec.threshold:.2f}; wrote {out}/probabilities.tif, mask.tif, metrics.csv, "
        f"{png.name}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .bioimageio import export_package

    loaded = _load_model(args.model, "cpu")
    authors = args.author or None
    result = export_package(
        loaded, args.output, force=args.force, authors=authors, license=args.license, test=args.test
    )
    for note in result.notes:
        print(_printable(f"note: {note}"), file=sys.stderr)
    print(_printable(f"wrote {result.path} (bioimage.io format {result.format_version})"))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .bioimageio import import_package
    from .registry import Registry

    vid = import_package(args.package, Registry(), make_current=args.make_current)
    print(_printable(f"imported {args.package} as version {vid}"))
    return 0


# --------------------------------------------------------------------------- entry point


class UsageError(Exception):
    """A command line that argparse cannot parse (reported in one line by :func:`main`)."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors raise :class:`UsageError` instead of printing and exiting."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(message, self.prog)


def _path(text: str) -> str:
    """A path argument: not empty (``-o ""`` would mean the current folder, unasked)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path is not a file or folder")
    return text


def _count(text: str) -> int:
    """An integer >= 0."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative: give a number >= 0")
    return n


def _add_rank_options(p: argparse.ArgumentParser, *flags: str, required: bool = False) -> None:
    p.add_argument(
        *flags,
        dest="rank" if "--rank" in flags else "output",
        default=None,
        required=required,
        metavar="CSV",
        help="write the slices ranked by how much they are worth correcting (CSV)",
    )
    p.add_argument(
        "--expected-max",
        type=_count,
        default=0,
        help="most objects a slice should hold, for ranking when --keep-largest is off",
    )
    p.add_argument("--top", type=_count, default=10, help="print the N slices to correct first")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="bulbseg", description="U-Net segmentation of microscopy stacks")
    ap.add_argument("--version", action="version", version=f"napari-bulbseg {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="predict probability and mask TIFFs for images or folders")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", required=True, type=_path, help="output folder")
    p.add_argument("--no-prob", action="store_true", help="do not write probability TIFFs")
    p.add_argument(
        "--diameter",
        default=None,
        help="object diameter in pixels, 'auto' (measured once per stack), 'auto-slice' "
        "(measured on every slice) or 'none' (the image's own scale); images are rescaled "
        "internally to the model's trained diameter, outputs keep the input's size (default: "
        "the model card's default_diameter — 'auto-slice' for the bundled model and fine-tuned "
        "versions)",
    )
    _add_predict_options(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--cluster",
        default=None,
        help="local:N — predict on N worker processes on this machine (dask.distributed)",
    )
    where.add_argument(
        "--scheduler",
        default=None,
        help="address of a running dask scheduler (e.g. a dask_jobqueue SLURMCluster's)",
    )
    p.add_argument(
        "--slices-per-task",
        type=_count,
        default=SLICES_PER_TASK,
        metavar="N",
        help="with --cluster/--scheduler: split a stack of more than N slices into tasks of at "
        "most N slices, merged into the same outputs (default %(default)s; 0: never split)",
    )
    _add_rank_options(p, "--rank")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "rank", help="rank slices by how much they are worth correcting (from *_prob.tif)"
    )
    p.add_argument("inputs", nargs="+", help="*_prob.tif files, or folders bulbseg predict wrote")
    p.add_argument(
        "--model",
        default="bundled",
        help="whose card gives the default threshold and object rules (default: bundled)",
    )
    p.add_argument("--threshold", type=float, default=None, help="probability threshold")
    p.add_argument("--min-size", type=int, default=None, help="remove objects smaller than this")
    p.add_argument("--keep-largest", type=int, default=None, help="keep the N largest objects")
    p.add_argument("--fill-holes", action=argparse.BooleanOptionalAction, default=None)
    _add_rank_options(p, "-o", "--output", required=True)
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("evaluate", help="compare predicted masks with ground truth")
    p.add_argument("--pred", required=True, type=_path, help="folder (or file) of predicted masks")
    p.add_argument(
        "--truth", required=True, type=_path, help="folder (or file) of ground-truth masks"
    )
    p.add_argument(
        "--csv", default=None, type=_path, help="write per-slice and summary metrics here"
    )
    p.add_argument("--match-iou", type=float, default=0.5, help="IoU above which objects match")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train or fine-tune a model; writes a new version")
    p.add_argument("--images", required=True, type=_path)
    p.add_argument("--masks", required=True, type=_path)
    p.add_argument("--val-images", type=_path)
    p.add_argument("--val-masks", type=_path)
    p.add_argument(
        "--from",
        dest="base",
        default=None,
        help="fine-tune this model ('bundled', a folder or a version id)",
    )
    p.add_argument(
        "--start",
        choices=START_MODES,
        default="auto",
        help="with --from: begin from its weights ('base'), from new weights ('scratch'), or "
        "'auto': when the base does badly on the validation images, try both briefly and "
        "keep the better (default)",
    )
    p.add_argument("--name", default="model")
    p.add_argument("--loss", default="focal+dice", help="one of " + ", ".join(LOSS_NAMES))
    p.add_argument("--epochs", type=int)
    p.add_argument("--time-budget", type=float, help="stop after this many seconds")
    p.add_argument("--steps-per-epoch", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("info", help="show a model's card")
    p.add_argument("model", nargs="?", default="bundled")
    p.add_argument("--json", action="store_true", help="also print the whole card")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="segment the bundled sample with the bundled model")
    p.add_argument("-o", "--output", default="bulbseg-demo", type=_path, help="output folder")
    p.add_argument("--model", default="bundled")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="write a model as a bioimage.io package (.zip)")
    p.add_argument("model", help="'bundled', a registry version id or a model folder")
    p.add_argument("-o", "--output", required=True, type=_path, help="the .zip to write")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.add_argument("--author", action="append", help="package author (repeatable)")
    p.add_argument("--license", default="BSD-3-Clause", help="SPDX licence id")
    p.add_argument("--test", action="store_true", help="also run bioimageio.core's model test")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="register a package written by 'bulbseg export'")
    p.add_argument("package", help="the .zip")
    p.add_argument("--make-current", action="store_true", help="make it the current model")
    p.set_defaults(func=cmd_import)
    return ap


def _printable(text: str) -> str:
    """Control characters (from file names, say) escaped, never sent raw to the terminal."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(text))


def _one_line(text: str) -> str:
    """Collapse whitespace (newlines included) so that every error is one printable line."""
    return _printable(" ".join(str(text).split()))


def _fail(message: str) -> int:
    print(_one_line(f"bulbseg: error: {message}"), file=sys.stderr)
    return 2


class _Terminated(KeyboardInterrupt):
    """SIGTERM (sent by ``timeout``, SLURM, dask): stopped like Ctrl-C, cleaning up as it goes."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Any:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``bulbseg`` command; returns the exit status (0 ok, 2 error, 130 cancelled).

    Every failure is reported as ONE line on stderr starting ``bulbseg: error:`` (the problem,
    then what to do), without a traceback unless ``--debug`` is given. Outputs are written
    atomically, so an interrupted run never leaves a file that looks complete but is not.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        return _fail(f"{e} — see '{e.prog} --help'")
    except SystemExit as e:  # --help and --version print and "exit" successfully
        return e.code if isinstance(e.code, int) else 0
    debug = bool(getattr(args, "debug", False))
    try:
        with _sigterm_as_interrupt():
            return int(args.func(args) or 0)
    except _Terminated:
        print("bulbseg: terminated; no partial output was written as complete", file=sys.stderr)
        return 143
    except CancelledError as e:
        print(_one_line(f"bulbseg: cancelled: {e}"), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("bulbseg: cancelled; no partial output was written as complete", file=sys.stderr)
        return 130
    except BulbsegError as e:
        if debug:
            raise
        return _fail(str(e))
    except MemoryError:
        if debug:
            raise
        size = "--patch-size" if getattr(args, "command", "") == "train" else "--tile"
        return _fail(
            f"not enough memory — use a smaller {size} or --batch-size, close other programs, "
            "or process fewer files at once"
        )
    except OSError as e:
        if debug:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        if e.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", -1)):
            return _fail(
                f"the disk is full or the file too large: {e.strerror or e}{where} — free disk "
                "space or write elsewhere; files and model versions written before are intact"
            )
        return _fail(
            f"{e.strerror or e}{where} — check the path, its permissions and free disk space"
        )
    except Exception as e:  # a bug: still one line, the traceback behind --debug
        if debug:
            raise
        return _fail(
            f"unexpected {type(e).__name__}: {e} — this is a bug in napari-bulbseg; re-run "
            "with --debug for the traceback and report it"
        )


if __name__ == "__main__":
    sys.exit(main())
