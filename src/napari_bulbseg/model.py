"""The U-Net, its model card, and safe save/load (safetensors + JSON, never pickle).

A saved model is a folder::

    model.json            the card: architecture, input channels and normalisation,
                          threshold and post-processing defaults, provenance, metrics
    weights.safetensors   the weights; the card holds their sha256

Loading checks the card's format, the weights' hash, and that the weights fit the architecture;
any mismatch is a :class:`~napari_bulbseg.errors.ModelError` that says what to do.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .atomic import current_umask, fsync_dir
from .errors import ModelError
from .normalize import Normalization

CARD_NAME = "model.json"
WEIGHTS_NAME = "weights.safetensors"
CARD_FORMAT = "napari-bulbseg-model"
#: 2 added ``diameter`` and the normalisation's ``polarity`` / ``noise_floor`` (version-1 cards
#: read as before: no rescaling, bright objects, no noise floor); 3 added ``default_diameter``
#: (older cards read as before: no diameter given means the image's own scale)
CARD_FORMAT_VERSION = 3
#: file suffixes of pickled PyTorch / Python objects, refused without being opened
#: a model.json larger than this is refused unread (cards are a few kB)
MAX_CARD_BYTES = 16 * 1024**2
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar")


# --------------------------------------------------------------------------- architecture


#: the largest value of each architecture setting a card may declare
ARCH_LIMITS = {"in_channels": 64, "out_channels": 64, "base_channels": 1024, "depth": 7}
#: the most weights a card's architecture may have (4e8: 1.6 GB in float32)
MAX_PARAMETERS = 400_000_000


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a 2D U-Net; ``depth`` counts resolution levels (``depth - 1`` poolings)."""

    in_channels: int = 1
    out_channels: int = 1
    base_channels: int = 16
    depth: int = 4

    def __post_init__(self) -> None:
        for name, top in ARCH_LIMITS.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ModelError(
                    f"Invalid U-Net setting {name}={v!r}", f"it must be an integer in 1…{top}"
                )
        if self.depth > ARCH_LIMITS["depth"]:
            raise ModelError(f"U-Net depth {self.depth} is too deep", "use a depth of 1 to 7")
        for name, top in ARCH_LIMITS.items():
            v = getattr(self, name)
            if v > top:  # refused before any tensor is built (1e9 channels: C++ overflow)
                raise ModelError(
                    f"U-Net setting {name}={v} is out of range",
                    f"{name} must be an integer in 1…{top}",
                )
        n = self.parameter_count()
        if n > MAX_PARAMETERS:
            raise ModelError(
                f"The U-Net base_channels={self.base_channels}, depth={self.depth} would have "
                f"{n:.3g} parameters, more than the {MAX_PARAMETERS:.0e} allowed",
                "use fewer base_channels or a smaller depth",
            )

    def parameter_count(self) -> int:
        """The number of weights this architecture has (computed, nothing is built)."""
        c = [self.base_channels * 2**i for i in range(self.depth)]

        def block(a: int, b: int) -> int:  # two 3×3 convolutions + two batch norms
            return 9 * a * b + 9 * b * b + 4 * b

        n = block(self.in_channels, c[0]) + c[0] * self.out_channels + self.out_channels
        for i in range(self.depth - 1):
            n += block(c[i], c[i + 1])  # down
            n += 4 * c[i + 1] * c[i] + c[i] + block(2 * c[i], c[i])  # up: transposed conv
        return n

    @property
    def multiple(self) -> int:
        """Height and width are padded internally to a multiple of this."""
        return 2 ** (self.depth - 1)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "unet", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        if d.get("type", "unet") != "unet":
            raise ModelError(f"Unknown architecture {d.get('type')!r}", "this version knows 'unet'")
        try:
            return cls(
                **{k: d[k] for k in ("in_channels", "out_channels", "base_channels", "depth")}
            )
        except KeyError as e:
            raise ModelError(
                f"The model card's architecture lacks {e}", "re-export the model"
            ) from e


class ConvBlock(nn.Sequential):
    """Two padded 3×3 convolutions, each followed by batch norm and ReLU (size-preserving)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2×2 max pooling, then a :class:`ConvBlock`."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.MaxPool2d(2), ConvBlock(c_in, c_out))


class Up(nn.Module):
    """2× transposed-convolution upsampling, concatenation with the skip, then a ConvBlock."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        self.conv = ConvBlock(2 * c_out, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """A 2D U-Net whose output has exactly the input's height and width, for any size.

    Inputs whose sides are not a multiple of ``2 ** (depth - 1)`` are reflect-padded inside
    ``forward`` and the logits cropped back, so no pixel is lost (no 512 → 472 shrinkage).
    Returns logits; apply ``torch.sigmoid`` for probabilities.
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or UNetConfig()
        c = [self.config.base_channels * 2**i for i in range(self.config.depth)]
        self.inc = ConvBlock(self.config.in_channels, c[0])
        self.downs = nn.ModuleList(Down(c[i], c[i + 1]) for i in range(self.config.depth - 1))
        self.ups = nn.ModuleList(Up(c[i + 1], c[i]) for i in reversed(range(self.config.depth - 1)))
        self.head = nn.Conv2d(c[0], self.config.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.config.multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            mode = "reflect" if (h > ph and w > pw) else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        y = self.head(y)
        return y[..., :h, :w] if (ph or pw) else y


def build_unet(
    in_channels: int = 1, out_channels: int = 1, base_channels: int = 16, depth: int = 4
) -> UNet:
    """A :class:`UNet` from plain keyword arguments (how a bioimage.io package builds it)."""
    return UNet(UNetConfig(in_channels, out_channels, base_channels, depth))


def adapt_input_channels(model: UNet, in_channels: int) -> UNet:
    """A copy of ``model`` taking ``in_channels`` inputs; the first convolution's weights are
    spread evenly over the new channels, so a grey image replicated to every channel gives
    exactly the old output (1-channel model → RGB: starts as "mean of channels")."""
    old = model.config
    new = UNet(UNetConfig(in_channels, old.out_channels, old.base_channels, old.depth))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    w = state["inc.0.weight"]  # (out, in, 3, 3)
    mean = w.sum(dim=1, keepdim=True) / in_channels
    state["inc.0.weight"] = mean.repeat(1, in_channels, 1, 1)
    new.load_state_dict(state)
    return new


# --------------------------------------------------------------------------- the model card


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def software_versions() -> dict[str, str]:
    return {"napari_bulbseg": __version__, "torch": torch.__version__, "numpy": np.__version__}


@dataclass
class ModelCard:
    """Everything needed to use a model correctly, next to its weights as ``model.json``."""

    name: str = "unet"
    architecture: dict[str, Any] = field(default_factory=lambda: UNetConfig().to_dict())
    normalization: dict[str, Any] = field(default_factory=lambda: Normalization().to_dict())
    #: how image channels reach the model: see normalize.CHANNEL_POLICIES; "adapted" notes
    #: that the first layer was widened from a model with fewer channels
    channel_policy: str = "native"
    threshold: float = 0.5
    #: median object diameter (px) the model was trained at; None: unknown (no rescaling)
    diameter: float | None = None
    #: what prediction runs at when the user gives no diameter: "auto" (measure the objects
    #: once per stack), "auto-slice" (measure every slice), a number of px, or None (the
    #: image's own scale)
    default_diameter: float | str | None = None
    postprocess: dict[str, Any] = field(
        default_factory=lambda: {"min_size": 0, "fill_holes": False, "keep_largest": 0}
    )
    #: validation threshold sweep: list of [threshold, dice]
    threshold_curve: list[list[float]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    version: str = "0"
    parent: str | None = None
    created: str = field(default_factory=_now)
    description: str = ""
    software: dict[str, str] = field(default_factory=software_versions)
    weights: dict[str, Any] = field(default_factory=dict)
    format: str = CARD_FORMAT
    format_version: int = CARD_FORMAT_VERSION

    @property
    def unet_config(self) -> UNetConfig:
        return UNetConfig.from_dict(self.architecture)

    @property
    def in_channels(self) -> int:
        return self.unet_config.in_channels

    @property
    def norm(self) -> Normalization:
        return Normalization.from_dict(self.normalization)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: Any, source: str = "model card") -> ModelCard:
        if not isinstance(d, dict):
            raise ModelError(f"{source} is not a JSON object", "is this a napari-bulbseg model?")
        if d.get("format") != CARD_FORMAT:
            raise ModelError(
                f"{source} is not a napari-bulbseg model card (format={d.get('format')!r})",
                "load a folder written by napari-bulbseg (model.json + weights.safetensors)",
            )
        fv = d.get("format_version")
        if not isinstance(fv, int) or fv < 1:
            raise ModelError(f"{source} has an invalid format_version {fv!r}", "re-export it")
        if fv > CARD_FORMAT_VERSION:
            raise ModelError(
                f"{source} is format version {fv}, newer than this napari-bulbseg understands "
                f"({CARD_FORMAT_VERSION})",
                "upgrade napari-bulbseg to load this model",
            )
        known = set(cls.__dataclass_fields__)
        for key, kind in _CARD_FIELD_TYPES.items():
            if key in d and not isinstance(d[key], kind):
                raise ModelError(
                    f"{source} has an invalid {key!r} entry (a {type(d[key]).__name__}, "
                    f"expected a {kind.__name__})",
                    "the card was edited or damaged; re-export the model",
                )
        card = cls(**{k: v for k, v in d.items() if k in known})
        card.unet_config  # noqa: B018 - validates the architecture
        try:
            card.norm  # noqa: B018 - validates the normalisation
        except (TypeError, ValueError) as e:
            raise ModelError(
                f"{source} has an invalid normalisation {card.normalization!r}", "re-export it"
            ) from e
        t = card.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise ModelError(f"{source} has a non-numeric threshold {t!r}", "fix or re-export it")
        card.threshold = float(t)
        if not 0.0 < card.threshold <= 1.0:  # NaN fails too
            raise ModelError(
                f"{source} has threshold {card.threshold} outside (0, 1]",
                "fix the threshold in model.json (e.g. 0.5) or re-export the model",
            )
        from .normalize import CHANNEL_POLICIES

        if card.channel_policy not in CHANNEL_POLICIES:
            raise ModelError(
                f"{source} has an unknown channel policy {card.channel_policy!r}",
                f"use one of {', '.join(CHANNEL_POLICIES)}, or re-export the model",
            )
        card.diameter = _check_card_diameter(card.diameter, source)
        card.default_diameter = _check_card_default_diameter(card, source)
        _check_card_postprocess(card, source)
        _check_card_records(card, source)
        _weights_file_name(card, source)
        return card


#: JSON types of the card's structured entries (anything else is a damaged card)
_CARD_FIELD_TYPES: dict[str, type] = {
    "name": str,
    "architecture": dict,
    "normalization": dict,
    "channel_policy": str,
    "postprocess": dict,
    "threshold_curve": list,
    "metrics": dict,
    "training": dict,
    "version": str,
    "description": str,
    "software": dict,
    "weights": dict,
}


def _check_card_diameter(d: Any, source: str) -> float | None:
    """The card's trained object diameter: None, or a finite number of pixels in (0, 10000]."""
    if d is None:
        return None
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < float(d) <= 1e4:
        raise ModelError(
            f"{source} has an invalid object diameter {d!r}",
            "the diameter (px) the model was trained at must be a number > 0 (or null when "
            "unknown); fix model.json or re-export the model",
        )
    return float(d)


def _check_card_default_diameter(card: ModelCard, source: str) -> float | str | None:
    """The card's ``default_diameter``: None, ``"auto"``, ``"auto-slice"`` or a number of px in
    (0, 10000]; anything but None needs the trained ``diameter`` (there is nothing to rescale to
    without)."""
    from .scale import AUTO_PER_SLICE

    d = card.default_diameter
    if d is None:
        return None
    ok = d in ("auto", AUTO_PER_SLICE) or (
        not isinstance(d, bool) and isinstance(d, (int, float)) and 0.0 < float(d) <= 1e4
    )
    if not ok:
        raise ModelError(
            f"{source} has an invalid default_diameter {d!r}",
            'use "auto", "auto-slice", a number of pixels > 0, or null (the image\'s own '
            "scale); fix model.json or re-export the model",
        )
    if card.diameter is None:
        raise ModelError(
            f"{source} has a default_diameter ({d!r}) but no trained diameter to rescale to",
            "set default_diameter to null, or give the diameter the model was trained at",
        )
    return d if isinstance(d, str) else float(d)


def _check_card_records(card: ModelCard, source: str) -> None:
    """The parts of the card that later steps read: ``training.split`` (a fine-tune inherits
    it), ``metrics.val`` (versions are compared by it) and ``threshold_curve``."""

    def bad(field_name: str, what: str) -> ModelError:
        return ModelError(
            f"{source} has an invalid '{field_name}' entry ({what})",
            "the card was edited or damaged; fix that entry in model.json or re-export the model",
        )

    split = card.training.get("split")
    if split is not None:
        if not isinstance(split, dict):
            raise bad("training.split", f"a {type(split).__name__}, expected an object")
        for key in ("train", "val"):
            keys = split.get(key, [])
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise bad(f"training.split.{key}", "expected a list of sample keys (strings)")
        for key in ("salt", "method"):
            if key in split and not isinstance(split[key], str):
                raise bad(f"training.split.{key}", f"{split[key]!r}, expected a string")
        if split.get("method", "hash") not in ("hash", "explicit"):
            raise bad("training.split.method", f"{split['method']!r}, expected hash or explicit")
        vf = split.get("val_fraction", 0.2)
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0.0 <= vf < 1.0:
            raise bad("training.split.val_fraction", f"{vf!r}, expected a number in [0, 1)")
    val = card.metrics.get("val")
    if val is not None:
        if not isinstance(val, dict):
            raise bad("metrics.val", f"a {type(val).__name__}, expected an object")
        dice = val.get("dice")
        if dice is not None and (
            isinstance(dice, bool) or not isinstance(dice, (int, float)) or not 0 <= dice <= 1
        ):
            raise bad("metrics.val.dice", f"{dice!r}, expected a number in [0, 1]")
    for point in card.threshold_curve:
        if (
            not isinstance(point, list)
            or len(point) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in point)
        ):
            raise bad("threshold_curve", f"{point!r}, expected [threshold, dice] pairs")


def _check_card_postprocess(card: ModelCard, source: str) -> None:
    from .errors import InputError
    from .postprocess import PostProcess

    try:
        PostProcess.from_card(card)
    except (InputError, TypeError) as e:
        raise ModelError(
            f"{source} has invalid post-processing defaults {card.postprocess!r} ({e})",
            "fix them in model.json or re-export the model",
        ) from e


def _weights_file_name(card: ModelCard, source: str) -> str:
    """The weights file named by the card: a plain file name inside the model folder."""
    name = card.weights.get("file", WEIGHTS_NAME)
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or Path(name).is_absolute()
        or Path(name).name != name
    ):
        raise ModelError(
            f"{source} names the weights file {name!r}, which is not a file inside the model "
            "folder",
            "a model's card may only refer to files beside it; re-export the model",
        )
    return name


# --------------------------------------------------------------------------- save / load


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_model(
    directory: str | os.PathLike,
    model: UNet,
    card: ModelCard,
    dtype: str = "float32",
) -> Path:
    """Write ``model`` + ``card`` into a new folder ``directory``, atomically.

    The folder is first written under a temporary name beside it and renamed into place only
    when complete, so a crash or full disk never leaves a half-written model. An existing
    ``directory`` is never overwritten. ``dtype="float16"`` halves the file size.
    ``card`` is not changed: the written card is a copy completed with the architecture and
    the weights' hash (``read_card(directory)`` returns it).
    """
    from safetensors.torch import save as st_save

    directory = Path(directory)
    if directory.exists():
        raise ModelError(
            f"A model already exists at {directory}",
            "models are never overwritten: pick a new name",
        )
    if dtype not in ("float32", "float16"):
        raise ModelError(f"Unsupported weight dtype {dtype!r}", "use float32 or float16")
    card = copy.deepcopy(card)
    card.architecture = model.config.to_dict()
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu").contiguous()
        if dtype == "float16" and v.is_floating_point():
            v = v.to(torch.float16)
        tensors[k] = v
    payload = st_save(tensors, metadata={"format": CARD_FORMAT})
    card.weights = {
        "file": WEIGHTS_NAME,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "dtype": dtype,
        "bytes": len(payload),
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        _fsync_write(tmp / WEIGHTS_NAME, payload)
        _fsync_write(tmp / CARD_NAME, card.to_json().encode("utf-8"))
        fsync_dir(tmp)
        # mkdtemp makes the folder private (0700); give it the permissions of a normal folder
        os.chmod(tmp, 0o777 & ~current_umask())
        try:
            os.replace(tmp, directory)
        except OSError as e:
            if directory.exists():  # another process saved under this name meanwhile
                raise ModelError(
                    f"A model already exists at {directory}",
                    "models are never overwritten: pick a new name",
                ) from e
            raise
        fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


@dataclass
class LoadedModel:
    """A model ready for prediction: the network in eval mode, its card and where it came from."""

    model: UNet
    card: ModelCard
    path: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def name(self) -> str:
        return f"{self.card.name} v{self.card.version}"


def read_card(path: str | os.PathLike) -> ModelCard:
    """Read and validate ``model.json`` from a model folder (or the card file itself)."""
    folder = _model_folder(path)
    card_path = folder / CARD_NAME
    if not card_path.is_file():
        raise ModelError(
            f"No model card ({CARD_NAME}) in {folder}",
            "a model folder holds model.json and weights.safetensors",
        )
    size = card_path.stat().st_size
    if size > MAX_CARD_BYTES:
        raise ModelError(
            f"The model card {card_path} is {size:,} bytes, far more than a card holds "
            f"(at most {MAX_CARD_BYTES:,})",
            "the file is damaged or is not a napari-bulbseg card; re-export the model",
        )
    with open(card_path, "rb") as fh:
        raw = fh.read(MAX_CARD_BYTES + 1)
    return parse_card(raw, f"The model card {card_path}")


def parse_card(raw: bytes, source: str) -> ModelCard:
    """A :class:`ModelCard` from the bytes of a ``model.json``, validated; ``source`` names
    it in messages (``"The model card …/model.json"``)."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{source} is not valid JSON ({e})", "re-export it") from e
    except RecursionError:
        raise ModelError(
            f"{source} is nested too deeply to be a model card (thousands of nested lists or "
            "objects)",
            "the file is damaged or is not a napari-bulbseg card; re-export the model",
        ) from None
    return ModelCard.from_dict(data, source=source)


def _model_folder(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(
            f"{p.name} looks like a pickled PyTorch file; it was not opened, because unpickling "
            "can run arbitrary code",
            "convert the weights to a napari-bulbseg model folder (safetensors + model.json)",
        )
    if p.is_file() and p.name in (CARD_NAME, WEIGHTS_NAME):
        return p.parent
    if not p.exists():
        raise ModelError(
            f"No model at {p}", "give a model folder (model.json + weights.safetensors)"
        )
    if not p.is_dir():
        raise ModelError(
            f"{p} is not a model folder", "give a folder holding model.json + weights.safetensors"
        )
    return p


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model folder, checking the card, the weights' sha256 and their fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    folder = _model_folder(path)
    card = read_card(folder)
    wpath = folder / _weights_file_name(card, f"The model card in {folder}")
    if not wpath.is_file():
        raise ModelError(f"The weights file {wpath} is missing", "copy the whole model folder")
    expected = card.weights.get("sha256")
    if not expected or not isinstance(expected, str):
        raise ModelError(f"The model card in {folder} records no weights hash", "re-export it")
    declared = card.weights.get("bytes")
    size = wpath.stat().st_size
    if isinstance(declared, int) and not isinstance(declared, bool) and size > declared:
        # checked before reading, so a substituted huge file is never read into memory
        # (a shorter file is caught by the hash below)
        raise ModelError(
            f"The weights in {folder} do not match their card ({size:,} bytes on disk, "
            f"{declared:,} recorded): the file is corrupt, truncated or was replaced",
            "copy the model folder again from its source",
        )
    # hash by streaming first: a substituted huge file is never read into memory
    digest = hashlib.sha256()
    with open(wpath, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    actual = digest.hexdigest()
    if actual != expected:
        raise ModelError(
            f"The weights in {folder} do not match their card (sha256 {actual[:12]}… ≠ "
            f"{str(expected)[:12]}…): the file is corrupt, truncated or was replaced",
            "copy the model folder again from its source",
        )
    payload = wpath.read_bytes()
    if hashlib.sha256(payload).hexdigest() != actual:  # changed while we were reading it
        raise ModelError(f"The weights file {wpath} changed while it was read", "try again")
    try:
        tensors = st_load(payload)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ModelError(f"The weights file {wpath} is unreadable ({e})", "copy it again") from e
    _check_shapes(card.unet_config, tensors, folder)
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()]
    if broken:
        raise ModelError(
            f"The weights in {folder} contain NaN or infinite values ({len(broken)} tensor(s), "
            f"e.g. {broken[0]}): this model cannot predict anything",
            "use an earlier version (Roll back, or --model v00N / bundled), or train again with "
            "a lower learning rate",
        )
    model = UNet(card.unet_config)
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ModelError(
            f"The weights in {folder} do not fit the architecture in its card ({first})",
            "the card and weights come from different models; re-export the model",
        ) from e
    dev = torch.device(device)
    model.to(dev).eval()
    return LoadedModel(model=model, card=card, path=folder, device=dev)


def _check_shapes(config: UNetConfig, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Compare the weights' names and shapes with the card's architecture without building it.

    The network is instantiated on PyTorch's ``meta`` device (no memory), so a card declaring
    an absurd architecture fails here with a clear message instead of exhausting memory.
    """
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UNet(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected == got:
        return
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    differ = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if differ:
        k = differ[0]
        first = f"{k} has shape {got[k]}, the card's architecture needs {expected[k]}"
    elif missing:
        first = f"{len(missing)} tensor(s) missing, e.g. {missing[0]}"
    else:
        first = f"{len(extra)} unexpected tensor(s), e.g. {extra[0]}"
    raise ModelError(
        f"The weights in {folder} do not fit the architecture in its card ({first})",
        "the card and weights come from different models; re-export the model",
    )


def bundled_model_dir() -> Path:
    """The default model shipped (read-only) inside the package."""
    return Path(__file__).parent / "bundled" / "default"


def load_bundled(device: str | torch.device = "cpu") -> LoadedModel:
    return load_model(bundled_model_dir(), device=device)
