"""Which torch device to run on: one rule for prediction, training and the command line."""

from __future__ import annotations

import torch

from .errors import InputError


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def select_device(pref: str | torch.device = "auto") -> torch.device:
    """The torch device to predict on: ``"auto"`` picks CUDA, then Apple MPS, then the CPU."""
    if isinstance(pref, torch.device):
        pref = str(pref)
    if not isinstance(pref, str):
        raise InputError(f"Invalid device {pref!r}", "use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    name = pref.strip().lower()
    if name in ("", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "gpu":
        name = "cuda"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = torch.__version__
            why = (
                "this PyTorch build has no CUDA support"
                if torch.version.cuda is None
                else "no CUDA GPU is visible (driver missing, or CUDA_VISIBLE_DEVICES hides it)"
            )
            raise InputError(
                f"CUDA was requested but is not available: {why} (torch {build})",
                "install a CUDA build of PyTorch (https://pytorch.org/get-started/locally/), "
                "or use device 'auto' or 'cpu' (--device cpu on the command line)",
            )
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise InputError(f"Invalid CUDA device {pref!r}", "use 'cuda' or 'cuda:N'") from e
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise InputError(
                f"CUDA device {dev.index} does not exist ({n} visible)",
                f"use cuda:0 … cuda:{n - 1}",
            )
        return dev
    if name == "mps":
        if not _mps_available():
            raise InputError(
                "Apple MPS was requested but is not available",
                "it needs an Apple-silicon Mac and a recent PyTorch; use 'auto' or 'cpu'",
            )
        return torch.device("mps")
    raise InputError(f"Unknown device {pref!r}", "use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
