"""Sliding-window prediction of foreground probabilities for single images and stacks.

Each slice is normalised once as a whole (the model card's :class:`~.normalize.Normalization`,
the same code as in training), reflect-padded to the model's multiple exactly as the U-Net pads
internally, and cut into equal tiles whose starts are multiples of that multiple, so every tile
sees the whole image's pooling grid. Tiles from one or more slices are run in batches; their
probabilities are blended with :func:`~.tiling.blend_window` weights. With the default options
(crop-style blending: ``trim = overlap // 2``) tiled output matches one whole-image forward pass
to float rounding while computing few redundant pixels (see docs/benchmarks.md).

The model is prepared once per call: a copy in eval mode with batch norm folded into the
convolutions and channels-last weights (the caller's model is left untouched). On CUDA,
``amp=True`` runs under ``torch.autocast`` in float16 (falling back to float32 for a batch whose
logits overflow). Out of memory halves the batch, then moves to the CPU, and says so in the
progress message.

The jobs are generators (see :mod:`.events`): they yield :class:`~.events.Progress` after each
batch (units: tiles) and return the result; closing them between batches stops the work. Slices
written to ``out`` are complete; the generator's return value exists only when all are.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .devices import select_device
from .errors import InputError, ModelError
from .events import Progress, drain
from .model import LoadedModel
from .normalize import convert_channels, prepare_image
from .options import DEFAULT_BATCH_SIZE, DEFAULT_OVERLAP, DEFAULT_TILE
from .postprocess import threshold_prob
from .scale import (
    AUTO_PER_SLICE,
    NATIVE,
    SPECK_FRACTION,
    back_to_shape,
    check_diameter,
    object_diameters,
    requested_diameter,
    resize_image,
    resized_shape,
    typical_diameter,
    zoom_factor,
)
from .tiling import BLEND_MODES, TileGrid, blend_window, make_grid

PROB_DTYPES = ("float16", "uint8", "float32")
_AMP_DTYPE = torch.float16


@dataclass(frozen=True)
class PredictOptions:
    """How to run sliding-window prediction.

    ``tile``: largest tile side in pixels (tiles are shrunk to cover the image with the least
    redundant work, see :func:`.tiling.effective_tile`). ``overlap``: pixels shared by
    neighbouring tiles. ``blend``: weighting of overlapping tiles (see :mod:`.tiling`).
    ``trim``: pixels along each interior tile edge given no weight; ``None`` = ``overlap // 2``
    (crop-style: each output pixel comes from the tile where it lies farthest from an edge).
    ``tta``: average the 8 flips/rotations (8× the compute). ``device``: ``"auto"``, ``"cpu"``,
    ``"cuda"``, ``"cuda:N"`` or ``"mps"``. ``amp``: float16 autocast on CUDA (ignored elsewhere).
    ``prob_dtype``: ``"float16"`` or ``"uint8"`` (``p * 255``, rounded) storage; ``"float32"``
    also accepted. ``num_threads``: torch CPU threads during the job (restored after each
    batch); ``None`` leaves torch's setting alone.

    Why these defaults: a pixel of a 4-level U-Net (the bundled model) depends on input up to
    46 px away, so with tiles aligned to its pooling grid, trimming 48 px from interior tile
    edges (``overlap=96``, crop) gives the whole-image result to float rounding (measured
    max |tiled − whole| 1.4e-6; trimming 32 px left errors up to 2.3e-2). The redundant work is
    about ``overlap / tile`` per axis, so tiles are large: 1280 covers a 2048 px side with 2
    tiles (1.10× the pixels) where 1024 needs 3 (1.21×). Memory grows with
    ``batch_size × tile²``: lower either if memory is short (out-of-memory halves the batch
    by itself). See docs/benchmarks.md.
    """

    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    batch_size: int = DEFAULT_BATCH_SIZE
    tta: bool = False
    device: str = "auto"
    amp: bool = True
    prob_dtype: str = "float16"
    blend: str = "constant"
    trim: int | None = None
    num_threads: int | None = None

    def __post_init__(self) -> None:
        def positive_int(name: str, v: Any, minimum: int) -> None:
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < minimum:
                raise InputError(f"Invalid {name}={v!r}", f"use an integer >= {minimum}")

        positive_int("tile", self.tile, 8)
        positive_int("overlap", self.overlap, 0)
        positive_int("batch_size", self.batch_size, 1)
        if self.overlap >= self.tile:
            raise InputError(
                f"The overlap ({self.overlap} px) must be smaller than the tile ({self.tile} px)",
                "use a larger tile or a smaller overlap",
            )
        if self.trim is not None:
            positive_int("trim", self.trim, 0)
            if 2 * self.trim > self.overlap:
                raise InputError(
                    f"trim={self.trim} is more than half the overlap ({self.overlap} px)",
                    "tiles would leave gaps: use trim <= overlap // 2",
                )
        if self.num_threads is not None:
            positive_int("num_threads", self.num_threads, 1)
        if self.blend not in BLEND_MODES:
            raise InputError(f"Unknown blend mode {self.blend!r}", f"use one of {BLEND_MODES}")
        if self.prob_dtype not in PROB_DTYPES:
            raise InputError(
                f"Unknown probability dtype {self.prob_dtype!r}", "use 'float16' or 'uint8'"
            )
        if not isinstance(self.device, (str, torch.device)):
            raise InputError(f"Invalid device {self.device!r}", "use 'auto', 'cpu' or 'cuda'")

    @property
    def effective_trim(self) -> int:
        return self.overlap // 2 if self.trim is None else self.trim


# --------------------------------------------------------------------------- devices


def _is_oom(e: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(
        torch.cuda, "OutOfMemoryError", None
    )
    if oom_type is not None and isinstance(e, oom_type):
        return True
    if isinstance(e, MemoryError):
        return True
    if isinstance(e, RuntimeError):
        msg = str(e).lower()
        # CUDA: "out of memory"; CPU: "DefaultCPUAllocator: can't allocate memory: ..."
        return any(k in msg for k in ("out of memory", "not enough memory", "can't allocate"))
    return False


def _can_fall_back(device: torch.device) -> bool:
    """Whether out-of-memory on ``device`` can be retried on the CPU."""
    return device.type != "cpu"


@contextlib.contextmanager
def _num_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads, restoring the caller's setting afterwards."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- the network


def prepare_network(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``model`` for inference: eval mode, BatchNorm folded into the preceding
    convolution (one pass over memory fewer per layer), on ``device``, channels-last."""
    net = copy.deepcopy(model).eval()
    for mod in net.modules():
        if not isinstance(mod, nn.Sequential):
            continue
        for i in range(len(mod) - 1):
            conv, bn = mod[i], mod[i + 1]
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(bn, nn.BatchNorm2d)
                and bn.track_running_stats
                and bn.running_mean is not None
            ):
                mod[i] = nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
                mod[i + 1] = nn.Identity()
    net.to(device)
    if device.type in ("cpu", "cuda"):
        net.to(memory_format=torch.channels_last)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def predict_whole(
    net: nn.Module,
    image: np.ndarray,
    device: torch.device,
    out_shape: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """The network on one whole prepared image ``(C, H, W)`` (normalised, at the network's
    scale; the U-Net pads internally): ``(logits (H, W), float16 probabilities)``.

    float16 as prediction caches probabilities, so a threshold chosen on them holds for
    predicted stacks; with ``out_shape`` the probabilities are brought back to that shape (an
    image rescaled for the network). Call under ``torch.no_grad()``. Training validates and
    :func:`napari_bulbseg.training.evaluate_model` scores through this one function.
    """
    x = torch.from_numpy(np.ascontiguousarray(image)[None]).to(device)
    logits = net(x)[0, 0]
    prob = torch.sigmoid(logits)
    if out_shape is not None and tuple(out_shape) != tuple(prob.shape):
        return logits, back_to_shape(prob.cpu().numpy(), out_shape).astype(np.float16)
    return logits, prob.to(torch.float16).cpu().numpy()


def _forward(net: nn.Module, x: torch.Tensor, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Logits of one batch (the single call into the network; tests replace it)."""
    if x.device.type in ("cpu", "cuda"):
        x = x.contiguous(memory_format=torch.channels_last)
    if amp_dtype is None:
        return net(x)
    with torch.autocast(device_type=x.device.type, dtype=amp_dtype):
        return net(x)


class _Engine:
    """The prepared network on its device, with batch size and device fallback on OOM."""

    def __init__(
        self, loaded: LoadedModel, options: PredictOptions, shape: tuple[int, int]
    ) -> None:
        self.source = loaded.model
        self.options = options
        self.plan = _Plan.make(shape, loaded.card.unet_config.multiple, options)
        self.device = select_device(options.device)
        self.net = prepare_network(self.source, self.device)
        self.batch = options.batch_size
        self.notes: list[str] = []
        self._windows: dict[tuple, torch.Tensor] = {}  # blend windows, weight sums

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return _AMP_DTYPE if (self.options.amp and self.device.type == "cuda") else None

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        amp = self.amp_dtype
        y = _forward(self.net, x, amp)
        if amp is not None and not bool(torch.isfinite(y).all()):
            self.notes.append("float16 overflow in a batch: recomputed it in float32")
            y = _forward(self.net, x, None)
        return y.float()

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        if not self.options.tta:
            return torch.sigmoid(self._logits(x))
        acc = torch.zeros((x.shape[0], 1, *x.shape[-2:]), device=x.device)
        for k in range(4):
            for flip in (False, True):
                xt = torch.rot90(x.flip(-1) if flip else x, k, (-2, -1))
                p = torch.rot90(torch.sigmoid(self._logits(xt)), -k, (-2, -1))
                acc += p.flip(-1) if flip else p
        return acc / 8.0

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities ``(B, 1, h, w)`` float32 of tiles ``x``, in chunks of ``self.batch``;
        on out-of-memory halves the batch, then falls back to the CPU (noted in ``notes``)."""
        out: list[torch.Tensor] = []
        i = 0
        while i < x.shape[0]:
            chunk = x[i : i + self.batch].to(self.device)
            try:
                p = self._probs(chunk)
            except Exception as e:
                if not _is_oom(e):
                    raise
                p = None
            if p is None:
                # handled outside the except block, so the traceback's frames (and the
                # activations they hold) are gone before the cache is emptied
                del chunk
                self._release()
                if self.batch > 1:
                    self.batch = max(1, self.batch // 2)
                    self.notes.append(
                        f"Out of memory on {self.device}: batch size reduced to {self.batch}"
                    )
                    continue
                if _can_fall_back(self.device):
                    self.notes.append(
                        f"Out of memory on {self.device} with one tile per batch: "
                        "continuing on the CPU (slower)"
                    )
                    self._to_cpu()
                    out = [o.to(self.device) for o in out]
                    continue
                raise InputError(
                    "Out of memory even with one tile per batch",
                    "use a smaller tile size, or close other programs",
                ) from None
            out.append(p)
            i += chunk.shape[0]
        return out[0] if len(out) == 1 else torch.cat(out)

    def _release(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _to_cpu(self) -> None:
        old = self.device
        self.device = torch.device("cpu")
        self.net = prepare_network(self.source, self.device)
        self.batch = self.options.batch_size
        self._windows.clear()
        if old.type == "cuda":
            torch.cuda.empty_cache()

    def window(self, grid: TileGrid, y0: int, x0: int) -> torch.Tensor:
        flags = grid.interior(y0, x0)
        key = (grid.tile, flags, self.device)
        w = self._windows.get(key)
        if w is None:
            o = self.options
            th, tw = grid.tile
            arr = blend_window(
                th, tw, o.blend, overlap=o.overlap, trim=o.effective_trim, interior=flags
            )
            w = torch.from_numpy(arr).to(self.device)
            self._windows[key] = w
        return w

    def weight_sum(self, grid: TileGrid) -> torch.Tensor:
        """Sum of all tiles' windows over the padded plane (the same for every slice)."""
        key = ("sum", grid, self.device)
        total = self._windows.get(key)
        if total is None:
            total = torch.zeros(grid.shape, device=self.device)
            th, tw = grid.tile
            for y, x in grid:
                total[y : y + th, x : x + tw] += self.window(grid, y, x)
            self._windows[key] = total
        return total

    def take_notes(self) -> str:
        text = "; ".join(self.notes)
        self.notes.clear()
        return text


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Plan:
    """How every slice of a given (Y, X) size is cut: padded size and tile grid."""

    shape: tuple[int, int]
    padded: tuple[int, int]
    pad_mode: str
    grid: TileGrid

    @classmethod
    def make(cls, shape: tuple[int, int], multiple: int, options: PredictOptions) -> _Plan:
        h, w = shape
        ph, pw = (-h) % multiple, (-w) % multiple
        # exactly the U-Net's own rule, so tiles see what one whole-image forward pass sees
        pad_mode = "reflect" if (h > ph and w > pw) else "replicate"
        hp, wp = h + ph, w + pw
        max_tile = max(multiple, options.tile // multiple * multiple)
        overlap = options.overlap
        grid = make_grid((hp, wp), max_tile, overlap, multiple)
        return cls((h, w), (hp, wp), pad_mode, grid)


# --------------------------------------------------------------------------- memory


def _free_memory() -> int:
    """Bytes of memory this process may still use (cgroup limit respected)."""
    from .io import memory

    return memory._available_memory()


@dataclass(frozen=True)
class WorkingSet:
    """Host (CPU) memory a prediction needs at its peak, in bytes, by part."""

    #: per-slice buffers: the raw plane, the float32 normalised (and padded) plane, the
    #: probability accumulator, the blending weight sum, the clamped result, its encoding
    slices: int
    #: the batch of tiles, the network's activations for it, its probabilities
    tiles: int
    #: the probabilities of the whole stack when prediction allocates them
    output: int

    @property
    def total(self) -> int:
        return self.slices + self.tiles + self.output


def working_set(
    loaded: LoadedModel,
    options: PredictOptions,
    shape: tuple[int, int],
    channels: int | None = None,
    *,
    itemsize: int = 2,
    n_slices: int = 1,
    plan_shape: tuple[int, int] | None = None,
    allocate_output: bool = True,
) -> WorkingSet:
    """The host memory predicting ``n_slices`` slices of ``shape`` (Y, X) needs, by part.

    What :func:`_run` really allocates: per live slice the raw plane (``itemsize`` bytes per
    pixel and channel), the normalised float32 plane (and its padded copy, and its resized
    copy when ``plan_shape`` differs: a diameter was given), the float32 accumulator, weight
    sum and clamped probabilities of the padded plane (one tile: none of these but the
    result), the encoded slice; per batch the tiles, the network's activations (measured:
    about 6.5 float32 feature maps of ``base_channels`` per tile pixel) and the
    probabilities. On a GPU only the raw, normalised and result planes stay on the host.
    Measured peaks are 0.7–0.8 × this estimate (docs/reliability.md).
    """
    cfg = loaded.card.unet_config
    h, w = plan_shape or shape
    plan = _Plan.make((h, w), cfg.multiple, options)
    (th, tw), (hp, wp) = plan.grid.tile, plan.padded
    per_slice = len(list(plan.grid))
    c_in = cfg.in_channels
    src_px, px, padded_px = shape[0] * shape[1], h * w, hp * wp
    on_host = select_device(options.device).type == "cpu"
    out_item = np.dtype(options.prob_dtype).itemsize
    host = src_px * (max(1, channels or 1) * itemsize + 4 * c_in)  # raw + normalised
    if (h, w) != tuple(shape):
        host += 4 * c_in * px + 4 * src_px  # resized input; probabilities resized back
    host += 4 * px + out_item * src_px  # clamped probabilities, their encoding
    device = 0
    if (hp, wp) != (h, w):
        device += 4 * c_in * padded_px
    if per_slice > 1:
        device += 2 * 4 * padded_px  # accumulator and weight sum (divided in place)
    batch = max(1, min(options.batch_size, per_slice * n_slices))
    # slices open at once: one tile per slice opens a batch of them; otherwise a batch can
    # straddle two slices
    live = min(batch, n_slices) if per_slice == 1 else 1 + (n_slices > 1 and per_slice % batch > 0)
    tiles = batch * th * tw * 4 * (c_in + 13 * cfg.base_channels // 2 + 2)
    slices = live * (host + (device if on_host else 0))
    output = n_slices * src_px * out_item if allocate_output else 0
    return WorkingSet(slices, tiles if on_host else 0, output)


def _gib(n: float) -> str:
    return f"{n / 1024**3:.3g} GiB" if n >= 1024**3 else f"{n / 1024**2:.3g} MiB"


def check_memory(
    loaded: LoadedModel,
    options: PredictOptions,
    shape: tuple[int, int],
    channels: int | None = None,
    **kw: Any,
) -> int:
    """The largest batch size (at most ``options.batch_size``) whose :func:`working_set` fits
    in free memory; :class:`InputError` before any work when not even one tile per batch fits,
    saying which part is large and what shrinks it."""
    free = _free_memory()
    batch = options.batch_size
    need = working_set(loaded, options, shape, channels, **kw)
    while need.total > free and batch > 1:
        batch = max(1, batch // 2)
        need = working_set(loaded, replace(options, batch_size=batch), shape, channels, **kw)
    if need.total <= free:
        return batch
    parts = [
        (need.slices, "the slice's own buffers: crop or bin the image, or predict on a GPU"),
        (need.tiles, "the tiles: use a smaller tile size (--tile)"),
        (need.output, "the probabilities of every slice: predict fewer slices at once"),
    ]
    big = [hint for n, hint in sorted(parts, key=lambda p: -p[0]) if n >= 0.2 * need.total]
    h, w = shape
    raise InputError(
        f"Predicting {h} × {w}-pixel slices needs about {_gib(need.total)} of memory even with "
        f"one tile per batch ({_gib(need.slices)} for the slice, {_gib(need.tiles)} for the "
        f"tiles, {_gib(need.output)} for the results), {_gib(free)} free",
        "; ".join(big) + "; or close other programs",
    )


def _fit_batch(engine: Any, batch: int) -> Any:
    """Start ``engine`` at ``batch`` tiles per batch when fewer fit in memory (noted)."""
    if batch < engine.batch:
        engine.batch = batch
        engine.notes.append(f"batch size {batch} to fit the free memory")
    return engine


@dataclass
class _SliceJob:
    index: int
    x: torch.Tensor  # (1, C, Hp, Wp) normalised, padded
    acc: torch.Tensor | None  # (Hp, Wp) sum of weight * probability; None for a single tile
    remaining: int

    def to(self, device: torch.device) -> None:
        self.x = self.x.to(device)
        if self.acc is not None:
            self.acc = self.acc.to(device)


@dataclass
class _Source:
    """Where slices come from: ``plane(i)`` → (Y, X) or (Y, X, C) array."""

    n: int
    shape: tuple[int, int]
    channels: int | None  # None: 2D planes
    plane: Callable[[int], np.ndarray]
    #: True/False when the stack says whether its channels are colour (io.Stack.rgb); None: guess
    rgb: bool | None = None


def _as_source(stack: Any) -> _Source:
    if stack is None:
        raise InputError("No image to predict on", "load an image first")
    if hasattr(stack, "plane") and hasattr(stack, "data"):
        shape = tuple(int(s) for s in stack.data.shape)
        rgb = bool(getattr(stack, "rgb", False))
        axes = str(getattr(stack, "axes", "ZYXC" if len(shape) == 4 else "ZYX"))
        if len(shape) == 3 and not rgb and axes != "ZYXC":
            channels = None
        elif len(shape) == 4:
            channels = shape[3]
        else:
            raise InputError(
                f"The stack has shape {shape} (axes {axes!r}, rgb={rgb})",
                "expected (Z, Y, X) or (Z, Y, X, C); re-open the file",
            )
        _check_shape(shape)
        return _Source(shape[0], (shape[1], shape[2]), channels, stack.plane, rgb=rgb)
    # numpy, memmap, zarr, dask…: index plane by plane, never load the whole stack here
    arr = stack if hasattr(stack, "shape") and hasattr(stack, "ndim") else np.asarray(stack)
    shape = tuple(int(s) for s in arr.shape)
    if len(shape) not in (2, 3, 4):
        raise InputError(
            f"Cannot predict on an array of shape {shape}",
            "expected (Y, X), (Z, Y, X) or (Z, Y, X, C) with channels last",
        )
    _check_shape(shape)
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in "biuf":
        raise InputError(f"Cannot predict on an image of dtype {dtype}", "use a numeric image")
    if len(shape) == 2:  # one 2D image: a stack of one slice
        return _Source(1, shape, None, lambda _i: np.asarray(arr))
    channels = shape[3] if len(shape) == 4 else None
    return _Source(shape[0], (shape[1], shape[2]), channels, lambda i: np.asarray(arr[i]))


def _check_shape(shape: tuple[int, ...]) -> None:
    if any(s == 0 for s in shape):
        raise InputError(f"The image is empty (shape {shape})", "load an image with pixels in it")


def _check_channels(loaded: LoadedModel, source: _Source) -> None:
    card = loaded.card
    channels = source.channels
    probe = np.zeros((1, 1) if channels is None else (1, 1, channels), dtype=np.float32)
    convert_channels(probe, card.in_channels, card.channel_policy, source.rgb)  # ModelError


def _check_loaded(loaded: Any) -> None:
    if not isinstance(getattr(loaded, "model", None), nn.Module) or not hasattr(loaded, "card"):
        raise ModelError("No model loaded", "load a model (or the bundled default) first")


def _slice_indices(n: int, slices: Sequence[int] | None) -> list[int]:
    if slices is None:
        return list(range(n))
    if isinstance(slices, (int, np.integer)):
        slices = [int(slices)]
    out: list[int] = []
    for s in slices:
        if not isinstance(s, (int, np.integer)) or isinstance(s, bool):
            raise InputError(f"Invalid slice index {s!r}", "slice indices are integers")
        i = int(s) + n if s < 0 else int(s)
        if not 0 <= i < n:
            raise InputError(f"Slice {s} is out of range", f"the stack has {n} slices (0…{n - 1})")
        if i not in out:
            out.append(i)
    return out


def _encoder(dtype: np.dtype) -> Callable[[np.ndarray], np.ndarray]:
    if dtype == np.uint8:
        return lambda p: np.rint(np.clip(p, 0.0, 1.0) * 255.0).astype(np.uint8)
    if dtype.kind == "f":
        return lambda p: p.astype(dtype, copy=False)
    raise InputError(
        f"Cannot store probabilities in an array of dtype {dtype}",
        "give `out` dtype float16, float32 or uint8",
    )


# --------------------------------------------------------------------------- the job


def _run(
    engine: _Engine,
    source: _Source,
    indices: list[int],
    loaded: LoadedModel,
    sink: Callable[[int, np.ndarray], None],
    note: str = "",
) -> Generator[Progress, None, None]:
    """Predict ``indices`` of ``source`` tile batch by tile batch, handing each finished slice
    (float32 (Y, X), the source's exact shape) to ``sink``; yields Progress after each batch.

    When the engine's plan is for another size than the source's (a diameter was given), each
    normalised slice is resized to it and its probabilities back to the source's size.
    ``note`` prefixes every progress message (e.g. the diameter used)."""
    options = engine.options
    card = loaded.card
    plan = engine.plan
    grid = plan.grid
    starts = list(grid)
    per_slice = len(starts)
    total = per_slice * len(indices)
    h, w = plan.shape
    (th, tw), (hp, wp) = grid.tile, plan.padded
    work = ((z, y0, x0) for z in indices for (y0, x0) in starts)
    live: dict[int, _SliceJob] = {}
    done = 0
    n_done_slices = 0

    rescaled = tuple(source.shape) != (h, w)

    def open_job(z: int) -> _SliceJob:
        x = prepare_image(
            source.plane(z), card.in_channels, card.norm, card.channel_policy, rgb=source.rgb
        )
        if x.shape[1:] != tuple(source.shape):
            raise InputError(
                f"Slice {z} has shape {x.shape[1:]}, unlike the stack's {tuple(source.shape)}",
                "all slices of a stack must have the same size",
            )
        if rescaled:
            x = resize_image(x, (h, w))
        t = torch.from_numpy(np.ascontiguousarray(x))[None].to(engine.device)
        if (hp, wp) != (h, w):
            t = F.pad(t, (0, wp - w, 0, hp - h), mode=plan.pad_mode)
        acc = torch.zeros((hp, wp), device=engine.device) if per_slice > 1 else None
        return _SliceJob(z, t, acc, per_slice)

    while True:
        batch = [next(work, None) for _ in range(engine.batch)]
        batch = [b for b in batch if b is not None]
        if not batch:
            break
        finished: list[int] = []
        with torch.inference_mode(), _num_threads(options.num_threads):
            for z, _, _ in batch:
                if z not in live:
                    live[z] = open_job(z)
                elif live[z].x.device != engine.device:  # after a fallback to the CPU
                    live[z].to(engine.device)
            tiles = torch.cat([live[z].x[..., y : y + th, x : x + tw] for z, y, x in batch])
            probs = engine.probs(tiles)
            for k, (z, y, x) in enumerate(batch):
                job = live[z]
                job.remaining -= 1
                if job.acc is None:  # the whole slice in one tile: nothing to blend
                    prob = probs[k, 0, :h, :w]
                else:
                    if job.acc.device != probs.device:
                        job.to(probs.device)
                    job.acc[y : y + th, x : x + tw] += probs[k, 0] * engine.window(grid, y, x)
                    if job.remaining:
                        continue
                    prob = job.acc.div_(engine.weight_sum(grid))[:h, :w]
                if job.remaining == 0:
                    p = prob.clamp(0.0, 1.0).cpu().numpy()
                    sink(z, back_to_shape(p, source.shape) if rescaled else p)
                    del live[z]
                    finished.append(z)
        done += len(batch)
        n_done_slices += len(finished)
        z_last = finished[-1] if finished else batch[-1][0]
        if finished:
            msg = f"Slice {z_last} done ({n_done_slices}/{len(indices)})"
        else:
            tile_no = per_slice - live[z_last].remaining
            msg = f"Slice {z_last}: {tile_no}/{per_slice} tiles"
        notes = " — ".join(n for n in (note, engine.take_notes()) if n)
        yield Progress(done, total, f"{notes} — {msg}" if notes else msg, z_last, tuple(finished))


# --------------------------------------------------------------------------- object scale

#: ``auto`` measures the objects on at most this many slices of a stack (spread evenly)
AUTO_SLICES = 3
#: ``auto`` follows its second measurement (at the zoom the first asked for) where the two
#: differ by more than this factor either way
AUTO_RECHECK = 1.25
#: ``auto`` does not rescale when the measured diameter is within this factor of the trained
#: one (training's random zoom covers it); the first pass's probabilities are then the result
AUTO_SNAP = 1.1


@dataclass(frozen=True)
class Scale:
    """The object diameter a prediction used: ``diameter`` px (None: the image's own scale),
    the ``zoom`` applied before the U-Net, and a sentence for the user."""

    diameter: float | None
    zoom: float
    message: str


def _check_diameter_arg(loaded: LoadedModel, diameter: Any, shape: tuple[int, int]) -> None:
    """Validate a resolved ``diameter`` (:func:`effective_diameter`: None, a number of px,
    ``"auto"`` or ``"auto-slice"``) before any work."""
    if diameter is None:
        return
    if _is_auto(diameter) or _is_per_slice(diameter):
        return
    if isinstance(diameter, str):
        try:
            diameter = float(diameter)
        except ValueError:
            raise InputError(
                f"Object diameter {diameter!r} is not a number",
                f"give a number of pixels in (0, {min(shape)}] or 'auto'",
            ) from None
    check_diameter(diameter, shape)
    if loaded.card.diameter is None:
        raise InputError(
            "This model does not record the object diameter it was trained at, so it cannot "
            "rescale images to it",
            "leave the diameter empty (use the image's own scale), or use a model trained with "
            "a diameter (the bundled default is)",
        )


def _is_auto(diameter: Any) -> bool:
    return isinstance(diameter, str) and diameter.strip().lower() == "auto"


def _is_per_slice(diameter: Any) -> bool:
    return isinstance(diameter, str) and diameter.strip().lower() == AUTO_PER_SLICE


def effective_diameter(loaded: LoadedModel, diameter: Any) -> float | str | None:
    """The diameter a prediction of ``loaded`` runs at (see :func:`.scale.requested_diameter`):
    the user's value, or the card's ``default_diameter`` when it is None or empty; ``"auto"``,
    ``"auto-slice"``, a number of px, or None (the image's own scale)."""
    d = requested_diameter(diameter, loaded.card.default_diameter)
    return None if d == NATIVE else d


def fixed_scale(loaded: LoadedModel, diameter: float | None, shape: tuple[int, int]) -> Scale:
    """The :class:`Scale` for a given diameter (px) or None (the image's own scale)."""
    trained = loaded.card.diameter
    if diameter is None:
        return Scale(None, 1.0, "")
    d = check_diameter(diameter, shape)
    z = zoom_factor(trained, d)
    return Scale(d, z, f"diameter {d:g} px (model trained at {trained:g} px: zoom ×{z:.3g})")


def iter_auto_scale(
    engine: _Engine, source: _Source, indices: list[int], loaded: LoadedModel
) -> Generator[Progress, None, Scale]:
    """``auto``: predict up to :data:`AUTO_SLICES` slices at the trained scale, threshold them
    with the card's threshold, take the median equivalent diameter of the objects found; then
    measure again on those slices predicted at the zoom that diameter asks for, and follow the
    second measurement where the two differ by more than :data:`AUTO_RECHECK` (objects far
    from the trained size are often cut into pieces, or merged, at the trained scale).

    No objects: says so and keeps the trained scale (zoom 1)."""
    scale, _ = yield from _auto_scale(engine, source, indices, loaded)
    return scale


def _measure(
    engine: _Engine,
    source: _Source,
    pick: list[int],
    loaded: LoadedModel,
    note: str,
    zoom: float = 1.0,
) -> Generator[Progress, None, tuple[float | None, dict[int, np.ndarray]]]:
    """Predict ``pick`` with ``engine`` (at ``zoom``): the typical object diameter (px at the
    source's scale, specks left out: :func:`.scale.typical_diameter`; None: no objects) and
    the probabilities by slice. Its events finish no slice (the probabilities of a measuring
    pass are not the result)."""
    speck_below = (loaded.card.diameter or 0.0) * SPECK_FRACTION / zoom
    diams: list[np.ndarray] = []
    probs: dict[int, np.ndarray] = {}

    def sink(z: int, p: np.ndarray) -> None:
        diams.append(object_diameters(threshold_prob(p, loaded.card.threshold)))
        probs[z] = p

    for ev in _run(engine, source, pick, loaded, sink, note=note):
        yield replace(ev, finished=())
    found = typical_diameter(np.concatenate(diams) if diams else np.zeros(0), speck_below)
    if found is None:
        return None, probs
    return float(np.clip(found, 1.0, min(source.shape))), probs


def _auto_scale(
    engine: _Engine, source: _Source, indices: list[int], loaded: LoadedModel
) -> Generator[Progress, None, tuple[Scale, dict[int, np.ndarray]]]:
    """:func:`iter_auto_scale`, plus the probabilities of the slices the last measuring pass
    predicted at the scale chosen (final: the prediction need not redo them)."""
    trained = loaded.card.diameter
    if trained is None:
        return Scale(None, 1.0, ""), {}
    pick = indices
    if len(indices) > AUTO_SLICES:
        at = np.linspace(0, len(indices) - 1, AUTO_SLICES).round().astype(int)
        pick = [indices[i] for i in at]
    d, probs = yield from _measure(engine, source, pick, loaded, "diameter auto: first pass")
    if d is None:
        return Scale(
            None,
            1.0,
            f"diameter auto: no objects found at the trained scale; using the trained scale "
            f"({trained:g} px, no rescaling)",
        ), {}
    z = zoom_factor(trained, d)
    if abs(math.log(z)) <= math.log(AUTO_SNAP):
        return Scale(
            d,
            1.0,
            f"diameter auto: {d:.1f} px measured, within {AUTO_SNAP - 1:.0%} of the model's "
            f"{trained:g} px: no rescaling",
        ), probs
    scale = Scale(
        d, z, f"diameter auto: {d:.1f} px measured (model trained at {trained:g} px: zoom ×{z:.3g})"
    )
    eng = _scaled_engine(loaded, engine.options, source, scale, engine)
    d2, probs = yield from _measure(
        eng, source, pick, loaded, f"diameter auto: checking {d:.1f} px", zoom=z
    )
    if d2 is None or abs(math.log(d2 / d)) <= math.log(AUTO_RECHECK):
        return scale, probs
    z2 = zoom_factor(trained, d2)
    keep = probs if z2 == z else {}  # clipped to the same zoom: the same prediction
    return Scale(
        d2,
        z2,
        f"diameter auto: {d2:.1f} px measured at zoom ×{z:.3g} ({d:.1f} px at the image's own "
        f"scale; model trained at {trained:g} px: zoom ×{z2:.3g})",
    ), keep


def auto_scale_of(loaded: LoadedModel, image2d: np.ndarray) -> Scale:
    """What ``diameter="auto"`` chooses for one 2D image ``(Y, X)`` / ``(Y, X, C)`` (the
    measuring passes of :func:`iter_predict_slice`, run to the end), e.g. for scoring a model
    the way a prediction would run it."""
    source = _as_source(np.asarray(image2d)[None])
    _check_channels(loaded, source)
    engine = _Engine(loaded, PredictOptions(device=loaded.device.type), source.shape)
    scale, _ = drain(_auto_scale(engine, source, [0], loaded))
    return scale


def _scaled_engine(
    loaded: LoadedModel, options: PredictOptions, source: _Source, scale: Scale, base: _Engine
) -> _Engine:
    if scale.zoom == 1.0:
        return base
    shape = resized_shape(source.shape, scale.zoom)
    batch = check_memory(
        loaded,
        options,
        source.shape,
        source.channels,
        plan_shape=tuple(shape),
        allocate_output=False,
    )
    return _fit_batch(_Engine(loaded, options, shape), batch)


def iter_predict_slice(
    loaded: LoadedModel,
    image2d: np.ndarray,
    options: PredictOptions | None = None,
    diameter: float | str | None = None,
) -> Generator[Progress, None, np.ndarray]:
    """Predict one 2D image ``(Y, X)`` or ``(Y, X, C)``; returns float32 probabilities (Y, X).

    ``diameter``: see :func:`iter_predict`."""
    options = options or PredictOptions()
    _check_loaded(loaded)
    img = np.asarray(image2d)
    if img.ndim not in (2, 3):
        raise InputError(
            f"Expected one 2D image (Y, X) or (Y, X, C), got shape {img.shape}",
            "use iter_predict for stacks",
        )
    source = _as_source(img[None])
    _check_channels(loaded, source)
    diameter = effective_diameter(loaded, diameter)
    _check_diameter_arg(loaded, diameter, source.shape)
    batch = _check_source_memory(loaded, options, source, img.dtype, 1, False, diameter)
    engine = _fit_batch(_Engine(loaded, options, source.shape), batch)
    return _slice_job(engine, source, loaded, diameter)


def _check_source_memory(
    loaded: LoadedModel,
    options: PredictOptions,
    source: _Source,
    dtype: Any,
    n_slices: int,
    allocate_output: bool,
    diameter: Any,
) -> int:
    plan_shape = None
    if diameter is not None and not _is_auto(diameter) and not _is_per_slice(diameter):
        plan_shape = _scaled_shape(loaded, source.shape, float(diameter))
    return check_memory(
        loaded,
        options,
        source.shape,
        source.channels,
        itemsize=np.dtype(dtype).itemsize,
        n_slices=max(1, n_slices),
        plan_shape=plan_shape,
        allocate_output=allocate_output,
    )


def _scaled_shape(loaded: LoadedModel, shape: tuple[int, int], diameter: float) -> tuple:
    z = zoom_factor(loaded.card.diameter, check_diameter(diameter, shape))
    return tuple(resized_shape(shape, z)) if z != 1.0 else tuple(shape)


def _resolve_scale(
    engine: _Engine, source: _Source, indices: list[int], loaded: LoadedModel, diameter: Any
) -> Generator[Progress, None, tuple[Scale, dict[int, np.ndarray]]]:
    """The :class:`Scale`, and the final probabilities ``auto`` already made (by slice)."""
    if _is_auto(diameter):
        return (yield from _auto_scale(engine, source, indices, loaded))
    return fixed_scale(loaded, None if diameter is None else float(diameter), source.shape), {}


def _predict_rest(
    engine: _Engine,
    source: _Source,
    indices: list[int],
    loaded: LoadedModel,
    sink: Callable[[int, np.ndarray], None],
    scale: Scale,
    done: dict[int, np.ndarray],
) -> Generator[Progress, None, None]:
    """Hand ``done``'s slices to ``sink`` (one event finishing them), then predict the rest."""
    ready = [z for z in indices if z in done]
    for z in ready:
        sink(z, done[z])
    if ready:
        n = len(indices)
        yield Progress(len(ready), n, scale.message, ready[-1], tuple(ready))
    rest = [z for z in indices if z not in done]
    if rest:
        eng = _scaled_engine(loaded, engine.options, source, scale, engine)
        yield from _run(eng, source, rest, loaded, sink, scale.message)


def _per_slice(
    engine: _Engine,
    source: _Source,
    indices: list[int],
    loaded: LoadedModel,
    sink: Callable[[int, np.ndarray], None],
) -> Generator[Progress, None, Scale]:
    """``auto-slice``: every slice measured on its own (:func:`_auto_scale` on that slice) and
    predicted at its own zoom — the sections of one object through a stack differ in size,
    and each is brought to the trained size. Returns a :class:`Scale` summing them up (the
    median diameter and zoom; the range in its message)."""
    n, unit = len(indices), 1000
    scales: list[Scale] = []
    for i, z in enumerate(indices):
        measuring = _auto_scale(engine, source, [z], loaded)
        while True:  # the measuring passes: the first half of this slice's share
            try:
                ev = next(measuring)
            except StopIteration as stop:
                scale, done = stop.value
                break
            yield replace(ev, done=i * unit + int(unit * ev.fraction) // 2, total=n * unit)
        scales.append(scale)
        for ev in _predict_rest(engine, source, [z], loaded, sink, scale, done):
            yield replace(
                ev, done=i * unit + unit // 2 + int(unit * ev.fraction) // 2, total=n * unit
            )
    found = [s.diameter for s in scales if s.diameter is not None]
    zooms = [s.zoom for s in scales]
    if not found:
        return Scale(None, 1.0, "diameter auto per slice: no objects found; no rescaling")
    d, z = float(np.median(found)), float(np.median(zooms))
    return Scale(
        d,
        z,
        f"diameter auto per slice: {min(found):.1f}–{max(found):.1f} px measured (median "
        f"{d:.1f}) on {len(found)} of {n} slice(s); zoom ×{min(zooms):.3g}–×{max(zooms):.3g}",
    )


def _slice_job(
    engine: _Engine, source: _Source, loaded: LoadedModel, diameter: Any = None
) -> Generator[Progress, None, np.ndarray]:
    result: list[np.ndarray] = []
    sink = lambda _z, p: result.append(p)  # noqa: E731
    if _is_per_slice(diameter):
        yield from _per_slice(engine, source, [0], loaded, sink)
        return result[0]
    scale, done = yield from _resolve_scale(engine, source, [0], loaded, diameter)
    yield from _predict_rest(engine, source, [0], loaded, sink, scale, done)
    return result[0]


def iter_predict(
    loaded: LoadedModel,
    stack: Any,
    options: PredictOptions | None = None,
    out: Any = None,
    slices: Sequence[int] | None = None,
    diameter: float | str | None = None,
    on_scale: Callable[[Scale], Any] | None = None,
) -> Generator[Progress, None, Any]:
    """Predict a stack slice by slice; a generator of Progress returning probabilities (Z, Y, X).

    ``diameter``: the objects' diameter in pixels; the image is rescaled by ``card.diameter /
    diameter`` for the U-Net and the probabilities come back at the input's exact size. None
    (default): the card's ``default_diameter`` (:func:`effective_diameter`). ``"none"``: the
    image's own scale. ``"auto"``: measured once for the stack by a first pass at the trained
    scale (see :func:`iter_auto_scale`); ``"auto-slice"``: measured on every slice, each
    predicted at its own zoom. ``on_scale`` is called once with the :class:`Scale` used (for
    ``auto-slice``, after the slices, summing them up; otherwise before, and its message is
    also the prefix of every progress message).

    ``stack``: an array (Z, Y, X) / (Z, Y, X, C) (a 2D array is one slice), or an ``io.Stack``
    (anything with ``.data``, ``.rgb`` and ``.plane(i)``; lazy stacks are read one plane at a
    time). ``out``: optional array (Z, Y, X) to write into (numpy, ``np.memmap``, zarr); its
    dtype decides the encoding (uint8: ``p * 255`` rounded; float: ``p``); by default one of
    ``options.prob_dtype`` is allocated. ``slices``: only these indices, in this order (the rest
    of ``out`` is left as it was). Inputs are checked here, before the first ``next()``.
    """
    options = options or PredictOptions()
    if not isinstance(options, PredictOptions):
        raise InputError(
            f"options must be PredictOptions, not {type(options).__name__}",
            "build them with PredictOptions(tile=..., overlap=...)",
        )
    _check_loaded(loaded)
    source = _as_source(stack)
    _check_channels(loaded, source)
    indices = _slice_indices(source.n, slices)
    shape = (source.n, *source.shape)
    allocated = out is None
    if out is None:
        out = np.zeros(shape, dtype=options.prob_dtype)  # pages committed as slices are written
    elif tuple(out.shape) != shape:
        raise InputError(
            f"The output array has shape {tuple(out.shape)}, the stack needs {shape}",
            "give `out` the stack's (Z, Y, X) shape",
        )
    encode = _encoder(np.dtype(out.dtype))
    diameter = effective_diameter(loaded, diameter)
    _check_diameter_arg(loaded, diameter, source.shape)
    dtype = getattr(getattr(stack, "data", stack), "dtype", np.float32)
    batch = _check_source_memory(loaded, options, source, dtype, len(indices), allocated, diameter)
    engine = _fit_batch(_Engine(loaded, options, source.shape), batch)
    return _stack_job(engine, source, indices, loaded, out, encode, diameter, on_scale)


def _stack_job(
    engine: _Engine,
    source: _Source,
    indices: list[int],
    loaded: LoadedModel,
    out: Any,
    encode: Callable[[np.ndarray], np.ndarray],
    diameter: Any = None,
    on_scale: Callable[[Scale], Any] | None = None,
) -> Generator[Progress, None, Any]:
    def sink(z: int, p: np.ndarray) -> None:
        out[z] = encode(p)

    if indices and _is_per_slice(diameter):
        scale = yield from _per_slice(engine, source, indices, loaded, sink)
        if on_scale is not None:  # after the slices: it sums up what each was measured at
            on_scale(scale)
    elif indices:
        scale, done = yield from _resolve_scale(engine, source, indices, loaded, diameter)
        if on_scale is not None:
            on_scale(scale)
        yield from _predict_rest(engine, source, indices, loaded, sink, scale, done)
    return out


def predict(
    loaded: LoadedModel,
    stack: Any,
    options: PredictOptions | None = None,
    *,
    out: Any = None,
    slices: Sequence[int] | None = None,
    callback: Callable[[Progress], Any] | None = None,
    diameter: float | str | None = None,
) -> Any:
    """Predict a stack to the end (see :func:`iter_predict`); ``callback`` gets each Progress."""
    return drain(
        iter_predict(loaded, stack, options, out=out, slices=slices, diameter=diameter), callback
    )


def predict_slice(
    loaded: LoadedModel,
    image2d: np.ndarray,
    options: PredictOptions | None = None,
    diameter: float | str | None = None,
) -> np.ndarray:
    """Predict one 2D image to the end; float32 probabilities (Y, X)."""
    return drain(iter_predict_slice(loaded, image2d, options, diameter))


__all__ = [
    "PROB_DTYPES",
    "PredictOptions",
    "Scale",
    "WorkingSet",
    "check_memory",
    "fixed_scale",
    "iter_auto_scale",
    "iter_predict",
    "iter_predict_slice",
    "predict",
    "predict_slice",
    "prepare_network",
    "select_device",
    "working_set",
]
