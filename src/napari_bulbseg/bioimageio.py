"""Share models as bioimage.io packages (spec format 0.5) and import packages we exported.

Needs the optional packages (``pip install 'napari-bulbseg[bioimageio]'``); they are imported
only when a package is exported. Import reads the zip itself: member names and sizes are
checked before anything is read, weights come from the safetensors attachment (never
unpickled), and the card's and the weights' sha256 must match those the package records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, ModelError
from .model import CARD_NAME, WEIGHTS_NAME, LoadedModel, ModelCard, parse_card
from .normalize import Normalization

ARCH_MODULE = "napari_bulbseg.model"
ARCH_CALLABLE = "build_unet"
EXTRA_HINT = "install the optional packages: pip install 'napari-bulbseg[bioimageio]'"
#: limits on what import reads from a zip (declared sizes, checked before reading)
MAX_RDF_BYTES = 1 << 20
MAX_CARD_BYTES = 16 << 20
MAX_WEIGHTS_BYTES = 1 << 30
MAX_TOTAL_BYTES = 4 << 30
TEST_SIDE = 256
CITATIONS = (
    {
        "text": "BBBC039 (sample and test image; training data of the bundled model): Caicedo "
        "et al., Evaluation of Deep Learning Strategies for Nucleus Segmentation in "
        "Fluorescence Images, Cytometry A 95(9), 2019; Broad Bioimage Benchmark Collection, "
        "CC0 1.0",
        "doi": "10.1002/cyto.a.23863",
    },
    {
        "text": "DSB2018 (BBBC038): Caicedo et al., Nucleus segmentation across imaging "
        "experiments: the 2018 Data Science Bowl, Nature Methods 16, 2019; CC0",
        "doi": "10.1038/s41592-019-0612-7",
    },
)


@dataclass
class ExportResult:
    """Where the package went and what other consumers must know (``notes``)."""

    path: Path
    format_version: str
    notes: list[str] = field(default_factory=list)


def _require() -> Any:
    try:
        import bioimageio.spec as spec
    except ImportError as e:
        raise ModelError("bioimage.io export needs the bioimageio packages", EXTRA_HINT) from e
    return spec


# --------------------------------------------------------------------------- what the spec can say


def preprocessing_for(norm: Normalization) -> tuple[list[dict[str, Any]], list[str]]:
    """The spec's preprocessing operations for ``norm``, and notes on what they cannot express."""
    ops: list[dict[str, Any]] = [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}]
    notes: list[str] = []
    if norm.polarity == "dark":
        ops.append({"id": "scale_linear", "kwargs": {"gain": -1.0, "offset": 0.0}})
    elif norm.polarity == "auto":
        notes.append(
            "polarity 'auto' (napari-bulbseg inverts images with a bright background, per "
            "image) cannot be expressed: the package assumes bright objects on a dark "
            "background; invert other images before running it elsewhere"
        )
    if norm.method in ("percentile", "minmax"):
        low, high = (norm.low, norm.high) if norm.method == "percentile" else (0.0, 100.0)
        if high <= 1.0:
            raise ModelError(
                f"The upper percentile {high} cannot be expressed in a bioimage.io package",
                "the spec's scale_range needs an upper percentile above 1",
            )
        ops.append(
            {
                "id": "scale_range",
                "kwargs": {"axes": ["y", "x"], "min_percentile": low, "max_percentile": high},
            }
        )
    if norm.noise_floor > 0:
        notes.append(
            f"the noise floor ({norm.noise_floor:g} noise sigmas) cannot be expressed: other "
            "consumers stretch near-empty images to the full range and may find objects in noise"
        )
    ops.append({"id": "ensure_dtype", "kwargs": {"dtype": "float32"}})
    return ops, notes


def expressed_normalization(norm: Normalization) -> Normalization:
    """The normalisation the package's preprocessing applies (auto → bright, no noise floor)."""
    polarity = "bright" if norm.polarity == "auto" else norm.polarity
    return dataclasses.replace(norm, polarity=polarity, noise_floor=0.0)


def sizes_for(card: ModelCard) -> tuple[int, int, int]:
    """``(min, step, halo)`` of the spatial axes: the U-Net's pooling step, the engine's trim."""
    from .inference import PredictOptions

    step = card.unet_config.multiple
    halo = PredictOptions().effective_trim
    minimum = step * ((2 * halo) // step + 1)
    return minimum, step, halo


def _card_notes(card: ModelCard) -> list[str]:
    notes = []
    if card.diameter is not None:
        notes.append(
            f"trained at objects about {card.diameter:g} px across; napari-bulbseg rescales "
            "images to that size (measured per image unless given --diameter), other consumers "
            "do not: rescale images so that objects have about that size"
        )
    if card.channel_policy == "luminance":
        notes.append(
            "napari-bulbseg feeds RGB images through their luminance "
            "(0.299 R + 0.587 G + 0.114 B); other consumers need a one-channel image"
        )
    return notes


# --------------------------------------------------------------------------- export


def _test_image(in_channels: int, policy: str, minimum: int, step: int) -> np.ndarray:
    from .io import read_stack
    from .normalize import convert_channels

    sample = read_stack(Path(__file__).parent / "sample" / "bbbc039_sample.tif").data[0]
    side = max(minimum, (min(TEST_SIDE, *sample.shape[:2]) // step) * step)
    y0, x0 = (sample.shape[0] - side) // 2, (sample.shape[1] - side) // 2
    crop = np.asarray(sample[y0 : y0 + side, x0 : x0 + side], dtype=np.float32)
    return convert_channels(crop, in_channels, policy)  # (C, Y, X)


def _cover(image: np.ndarray, prob: np.ndarray, threshold: float, path: Path) -> None:
    from PIL import Image

    from .overview import OUTLINE_RGB, _gray, _outline

    g = _gray(image).astype(np.float32)
    left = np.repeat(g[..., None], 3, axis=-1)
    tint = np.array([255, 0, 255], np.float32)
    right = left * (1 - 0.5 * prob[..., None]) + 0.5 * prob[..., None] * tint
    right[_outline(prob >= threshold)] = OUTLINE_RGB
    Image.fromarray(np.concatenate([left, right], axis=1).astype(np.uint8)).save(path)


def _readme(card: ModelCard, ops: list, notes: list[str], sizes: tuple[int, int, int]) -> str:
    val = card.metrics.get("val", {}) if isinstance(card.metrics, dict) else {}
    metrics = (
        "\n".join(f"- {k}: {v}" for k, v in val.items())
        if isinstance(val, dict) and val
        else "- no validation metrics recorded in the card"
    )
    lines = [
        f"# {card.name} (napari-bulbseg U-Net)",
        "",
        card.description or "A 2D U-Net for foreground (nuclei) segmentation.",
        "",
        "## Input and output",
        "",
        f"- input: {card.in_channels} channel(s), batch × channel × y × x, any size "
        f"{sizes[0]} + n × {sizes[1]} px per side; halo {sizes[2]} px when tiling",
        f"- preprocessing: {json.dumps(ops)}",
        "- output: foreground probability (sigmoid of the logits), same size as the input",
        f"- napari-bulbseg thresholds it at {card.threshold:g} and post-processes with "
        f"{json.dumps(card.postprocess)}",
        "",
        "## What other consumers must know",
        "",
        *(f"- {n}" for n in notes or ["the preprocessing above is exactly napari-bulbseg's"]),
        "- non-finite pixels: napari-bulbseg sets them to 0 after scaling",
        "",
        "## Validation",
        "",
        metrics,
        "",
        "The card with the whole training record is attached (model.json), with the weights in "
        "safetensors form; `bulbseg import` turns the package back into a napari-bulbseg model.",
        "",
    ]
    return "\n".join(lines)


def _package_name(card: ModelCard) -> str:
    base = card.name if card.version in ("", "0") else f"{card.name} {card.version}"
    name = re.sub(r"[^A-Za-z0-9_+\- ()]", "-", f"napari-bulbseg {base}")
    return name[:64]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_package(
    loaded: LoadedModel,
    output: str | os.PathLike,
    *,
    force: bool = False,
    authors: list[str] | None = None,
    license: str = "BSD-3-Clause",
    test: bool = False,
) -> ExportResult:
    """Write ``loaded`` (a model folder's model) as a bioimage.io package zip at ``output``."""
    import torch

    out = Path(output)
    if out.is_dir():
        raise InputError(f"{out} is a folder", "give the name of the .zip to write")
    if out.exists() and not force:
        raise InputError(f"{out} already exists", "choose another name, or pass --force")
    if loaded.path is None:
        raise ModelError("Only a saved model can be exported", "save it first")
    card = loaded.card
    if card.unet_config.out_channels != 1:
        raise ModelError("Only one-output models can be exported", "napari-bulbseg trains those")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as e:
        raise InputError(
            f"Cannot write to {out.parent}: {e.strerror or e}", "choose a folder you can write to"
        ) from e
    spec = _require()
    from bioimageio.spec.model.v0_5 import ModelDescr

    from .inference import PredictOptions, predict_slice

    ops, notes = preprocessing_for(card.norm)
    notes += _card_notes(card)
    minimum, step, halo = sizes_for(card)
    wfile = loaded.path / card.weights.get("file", WEIGHTS_NAME)
    model = loaded.model.to("cpu").eval()
    with tempfile.TemporaryDirectory(prefix="bulbseg-export-") as tmp:
        work = Path(tmp)
        shutil.copyfile(wfile, work / WEIGHTS_NAME)
        if _sha(work / WEIGHTS_NAME) != card.weights.get("sha256"):
            raise ModelError(f"The weights in {loaded.path} changed", "export again")
        (work / CARD_NAME).write_text(card.to_json(), encoding="utf-8")
        x = _test_image(card.in_channels, card.channel_policy, minimum, step)
        as_packaged = ModelCard(**{**card.to_dict()})
        as_packaged.normalization = expressed_normalization(card.norm).to_dict()
        plain = LoadedModel(model=model, card=as_packaged, path=loaded.path)
        opts = PredictOptions(device="cpu", prob_dtype="float32", tile=max(1280, x.shape[-1]))
        image = x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)
        prob = np.asarray(predict_slice(plain, image, opts), dtype=np.float32)
        np.save(work / "test_input.npy", x[None])
        np.save(work / "test_output.npy", prob[None, None])
        _cover(x[0], prob, card.threshold, work / "cover.png")
        (work / "README.md").write_text(_readme(card, ops, notes, (minimum, step, halo)))
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        torch.save(state, work / "weights.pt")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, torch.from_numpy(x[None]))
            traced.save(str(work / "weights_torchscript.pt"))
        torch_version = torch.__version__.split("+")[0]
        kwargs = {k: v for k, v in card.unet_config.to_dict().items() if k != "type"}
        rdf = {
            "format_version": ModelDescr.implemented_format_version,
            "type": "model",
            "name": _package_name(card),
            "description": (card.description or "napari-bulbseg U-Net")[:500],
            "authors": [{"name": a} for a in (authors or ["napari-bulbseg developers"])],
            "cite": list(CITATIONS),
            "license": license,
            "tags": ["napari-bulbseg", "unet2d", "pytorch", "segmentation", "nuclei", "2d"],
            "documentation": {"source": "README.md"},
            "covers": [{"source": "cover.png"}],
            "attachments": [
                {"source": CARD_NAME, "sha256": _sha(work / CARD_NAME)},
                {"source": WEIGHTS_NAME, "sha256": _sha(work / WEIGHTS_NAME)},
            ],
            "inputs": [
                {
                    "id": "raw",
                    "axes": [
                        {"type": "batch"},
                        {
                            "type": "channel",
                            "channel_names": [f"c{i}" for i in range(card.in_channels)],
                        },
                        *(
                            {"type": "space", "id": a, "size": {"min": minimum, "step": step}}
                            for a in ("y", "x")
                        ),
                    ],
                    "test_tensor": {"source": "test_input.npy", "sha256": None},
                    "data": {"type": "float32"},
                    "preprocessing": ops,
                }
            ],
            "outputs": [
                {
                    "id": "probability",
                    "axes": [
                        {"type": "batch"},
                        {"type": "channel", "channel_names": ["foreground"]},
                        *(
                            {
                                "type": "space",
                                "id": a,
                                "halo": halo,
                                "size": {"tensor_id": "raw", "axis_id": a},
                            }
                            for a in ("y", "x")
                        ),
                    ],
                    "test_tensor": {"source": "test_output.npy", "sha256": None},
                    "data": {"type": "float32", "range": [0.0, 1.0]},
                    "postprocessing": [
                        {"id": "sigmoid"},
                        {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
                    ],
                }
            ],
            "weights": {
                "pytorch_state_dict": {
                    "source": "weights.pt",
                    "architecture": {
                        "callable": ARCH_CALLABLE,
                        "import_from": ARCH_MODULE,
                        "kwargs": kwargs,
                    },
                    "pytorch_version": torch_version,
                },
                "torchscript": {
                    "source": "weights_torchscript.pt",
                    "pytorch_version": torch_version,
                    "parent": "pytorch_state_dict",
                },
            },
            "config": {
                "napari_bulbseg": {
                    "card_format": card.format,
                    "card_format_version": card.format_version,
                    "threshold": card.threshold,
                    "diameter": card.diameter,
                    "default_diameter": card.default_diameter,
                    "normalization": card.normalization,
                    "channel_policy": card.channel_policy,
                    "notes": notes,
                }
            },
        }
        for t in (*rdf["inputs"], *rdf["outputs"]):
            t["test_tensor"]["sha256"] = _sha(work / t["test_tensor"]["source"])
        (work / "rdf.yaml").write_text(json.dumps(rdf, indent=1), encoding="utf-8")
        descr = spec.load_description(work / "rdf.yaml")
        if not isinstance(descr, ModelDescr):
            raise ModelError(
                f"The package does not validate: {_reason(descr)}",
                "this is a bug in napari-bulbseg; please report it",
            )
        partial = out.parent / f".{out.name}.partial"
        try:
            spec.save_bioimageio_package(descr, output_path=partial)
            if test:
                run_model_test(partial)
            os.replace(partial, out)
        finally:
            partial.unlink(missing_ok=True)
    return ExportResult(out, str(descr.format_version), notes)


def _reason(descr: Any) -> str:
    try:
        return " ".join(str(descr.validation_summary.format()).split())[:2000]
    except Exception:
        return repr(descr)[:2000]


def validate_package(path: str | os.PathLike) -> Any:
    """bioimageio.spec's validation of a package (raises :class:`ModelError` when invalid)."""
    spec = _require()
    from bioimageio.spec.model.v0_5 import ModelDescr

    descr = spec.load_description(Path(path))
    if not isinstance(descr, ModelDescr):
        raise ModelError(f"{path} is not a valid bioimage.io model: {_reason(descr)}", "")
    return descr


def run_model_test(path: str | os.PathLike) -> Any:
    """bioimageio.core's model test on CPU; raises :class:`ModelError` when it fails."""
    try:
        from bioimageio.core import test_model
    except ImportError as e:
        raise ModelError("Testing a package needs bioimageio.core", EXTRA_HINT) from e
    summary = test_model(Path(path), devices=["cpu"])
    if summary.status != "passed":
        raise ModelError(f"bioimageio.core's model test failed: {_reason_summary(summary)}", "")
    return summary


def _reason_summary(summary: Any) -> str:
    failed = [d for d in summary.details if d.status != "passed"]
    return "; ".join(f"{d.name}: {d.errors[:1]}" for d in failed)[:2000]


# --------------------------------------------------------------------------- import


def _safe_name(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return not (name.startswith(("/", "\\")) or "\\" in name or ".." in parts or ":" in parts[0])


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, where: str) -> bytes:
    if info.file_size > limit:
        raise ModelError(
            f"{where}: {info.filename} declares {info.file_size:,} bytes, more than the "
            f"{limit:,} napari-bulbseg reads",
            "this is not a package napari-bulbseg exported; nothing was imported",
        )
    with zf.open(info) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ModelError(f"{where}: {info.filename} is larger than declared", "refused")
    return data


def _load_yaml(text: bytes, where: str) -> Any:
    try:
        import yaml

        return yaml.safe_load(text)
    except ImportError:
        pass
    except Exception as e:
        raise ModelError(f"{where}: rdf.yaml is not valid YAML ({e})", "") from e
    try:
        import ruyaml

        return ruyaml.YAML(typ="safe", pure=True).load(text)
    except ImportError as e:
        raise ModelError("Reading a package needs a YAML reader", EXTRA_HINT) from e
    except Exception as e:
        raise ModelError(f"{where}: rdf.yaml is not valid YAML ({e})", "") from e


def _describe_foreign(rdf: dict) -> str:
    weights = rdf.get("weights") if isinstance(rdf.get("weights"), dict) else {}
    arch = (weights.get("pytorch_state_dict") or {}).get("architecture") or {}
    where = arch.get("import_from") or arch.get("source") or "no pytorch_state_dict"
    return (
        f"a bioimage.io {rdf.get('type', '?')} {str(rdf.get('name', '?'))[:64]!r} (format "
        f"{rdf.get('format_version', '?')}; weights: {', '.join(map(str, weights)) or 'none'}; "
        f"architecture {arch.get('callable', '?')} from {where})"
    )


def read_package(path: str | os.PathLike) -> tuple[ModelCard, bytes]:
    """The card and safetensors weights of a package napari-bulbseg exported, all checked."""
    p = Path(path)
    where = f"The package {p.name}"
    if not p.is_file():
        raise InputError(f"No such file: {p}", "give the .zip written by 'bulbseg export'")
    if not zipfile.is_zipfile(p):
        raise InputError(f"{p} is not a zip file", "a bioimage.io package is a .zip")
    with zipfile.ZipFile(p) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        bad = [n for n in names if not _safe_name(n)]
        if bad:
            raise ModelError(
                f"{where} holds a member with an unsafe name ({bad[0]!r}, outside the package)",
                "refused; nothing was imported",
            )
        if len(set(names)) != len(names):
            raise ModelError(f"{where} holds duplicate member names", "refused")
        if sum(i.file_size for i in infos) > MAX_TOTAL_BYTES:
            raise ModelError(f"{where} declares more than {MAX_TOTAL_BYTES:,} bytes", "refused")
        by_name = {i.filename: i for i in infos}
        rdf_name = next((n for n in ("rdf.yaml", "bioimageio.yaml") if n in by_name), None)
        if rdf_name is None:
            raise ModelError(f"{where} has no rdf.yaml", "it is not a bioimage.io package")
        rdf = _load_yaml(_read(zf, by_name[rdf_name], MAX_RDF_BYTES, where), where)
        if not isinstance(rdf, dict):
            raise ModelError(f"{where}: rdf.yaml is not a description", "")
        weights = rdf.get("weights") if isinstance(rdf.get("weights"), dict) else {}
        arch = (weights.get("pytorch_state_dict") or {}).get("architecture") or {}
        if (
            rdf.get("type") != "model"
            or arch.get("import_from") != ARCH_MODULE
            or arch.get("callable") != ARCH_CALLABLE
        ):
            raise ModelError(
                f"{where} is {_describe_foreign(rdf)}, not a napari-bulbseg model",
                "napari-bulbseg imports only packages it exported (a U-Net from "
                f"{ARCH_MODULE} with its {CARD_NAME} card and {WEIGHTS_NAME} attached); run "
                "this one in a bioimage.io consumer (bioimageio.core, ilastik, deepImageJ), or "
                "fine-tune a napari-bulbseg model on your images instead",
            )
        attached = {}
        for a in rdf.get("attachments") or []:
            if isinstance(a, dict) and isinstance(a.get("source"), str):
                attached[a["source"]] = a.get("sha256")
        if WEIGHTS_NAME not in attached or WEIGHTS_NAME not in by_name:
            raise ModelError(
                f"{where} has its weights only in pickled PyTorch form; napari-bulbseg never "
                "unpickles files (unpickling can run arbitrary code)",
                f"export it again with napari-bulbseg, which attaches {WEIGHTS_NAME}",
            )
        if CARD_NAME not in attached or CARD_NAME not in by_name:
            raise ModelError(f"{where} has no {CARD_NAME} card attached", "export it again")
        card_bytes = _read(zf, by_name[CARD_NAME], MAX_CARD_BYTES, where)
        wbytes = _read(zf, by_name[WEIGHTS_NAME], MAX_WEIGHTS_BYTES, where)
    for name, data in ((CARD_NAME, card_bytes), (WEIGHTS_NAME, wbytes)):
        if hashlib.sha256(data).hexdigest() != attached[name]:
            raise ModelError(
                f"{where}: {name} does not match the sha256 its rdf.yaml records (changed or "
                "damaged after export)",
                "get the package again from its source; nothing was imported",
            )
    return parse_card(card_bytes, f"The card in {p.name}"), wbytes


def import_package(
    path: str | os.PathLike, registry: Any = None, make_current: bool = False
) -> str:
    """Register a package napari-bulbseg exported as a new registry version; return its id."""
    from .model import load_model
    from .registry import _ID_RE, Registry

    card, wbytes = read_package(path)
    registry = registry if registry is not None else Registry()
    registry.check_writable()
    with tempfile.TemporaryDirectory(prefix="bulbseg-import-") as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        (folder / CARD_NAME).write_text(card.to_json(), encoding="utf-8")
        (folder / card.weights.get("file", WEIGHTS_NAME)).write_bytes(wbytes)
        loaded = load_model(folder)  # checks the card's sha256, shapes, finiteness
    if isinstance(card.parent, str) and _ID_RE.match(card.parent):
        card.parent = f"exported:{card.parent}"  # a version of another registry
    dtype = card.weights.get("dtype", "float32")
    return registry.save_version(loaded.model, card, dtype=dtype, make_current=make_current)
