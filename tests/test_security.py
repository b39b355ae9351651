"""Security: no code execution from files, writes only where the user pointed, no network.

Extends ``test_imports.test_no_pickle_paths_in_package`` (torch.load / pickle) with the other
ways a data file can become code: ``numpy.load(allow_pickle=True)``, ``eval``, ``exec``,
``marshal``, unsafe YAML, ``shell=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import socket
from pathlib import Path

import numpy as np
import pytest

import napari_bulbseg
from napari_bulbseg import io
from napari_bulbseg.cli import main
from napari_bulbseg.errors import ModelError
from napari_bulbseg.model import CARD_NAME, WEIGHTS_NAME, load_model
from napari_bulbseg.outputs import MANIFEST

PKG = Path(napari_bulbseg.__file__).parent

# patterns over the token stream (tokens joined by one space, comments and strings dropped)
FORBIDDEN = {
    "torch.load": r"\btorch \. load \(",
    "pickle": r"\b(import|from) (c?pickle|dill|joblib|shelve)\b|\bpickle \. loads? \(",
    "weights_only=False": r"\bweights_only = False\b",
    "numpy.load with allow_pickle": r"\ballow_pickle = True\b",
    "eval(": r"(?<!\. )\beval \(",
    "exec(": r"(?<!\. )\bexec \(",
    "marshal": r"\bmarshal \. loads? \(",
    "unsafe yaml": r"\byaml \. (unsafe_)?load \((?![^\n]*SafeLoader)",
    "shell=True": r"\bshell = True\b",
    "__import__": r"(?<!\. )\b__import__ \(",
}


def _strip_comments_and_docstrings(text: str) -> str:
    """The source's tokens joined by single spaces, without comments and string literals
    (so prose or messages that mention eval( are fine); one line per logical line."""
    import io as _io
    import tokenize

    lines, cur = [], []
    for tok in tokenize.generate_tokens(_io.StringIO(text).readline):
        if tok.type in (tokenize.NEWLINE, tokenize.NL):
            if cur:
                lines.append(" ".join(cur))
            cur = []
        elif tok.type not in (tokenize.COMMENT, tokenize.STRING, tokenize.INDENT, tokenize.DEDENT):
            if tok.string:
                cur.append(tok.string)
    if cur:
        lines.append(" ".join(cur))
    return "\n".join(lines)


def test_package_has_no_code_execution_from_data():
    sources = sorted(PKG.rglob("*.py"))
    assert len(sources) > 15  # the scan sees the whole package
    hits = []
    for path in sources:
        code = _strip_comments_and_docstrings(path.read_text(encoding="utf-8"))
        for what, pattern in FORBIDDEN.items():
            for m in re.finditer(pattern, code, re.M):
                line = code[code.rfind("\n", 0, m.start()) + 1 : code.find("\n", m.end())]
                hits.append(f"{path.relative_to(PKG)}: {what}: {line[:80]}")
    assert hits == []


def test_scanner_catches_what_it_looks_for():
    """The patterns above do match the constructs (a scanner that finds nothing proves nothing)."""
    bad = {
        "torch.load": "w = torch.load(path)",
        "pickle": "import pickle",
        "numpy.load with allow_pickle": "np.load(p, allow_pickle=True)",
        "eval(": "x = eval(text)",
        "exec(": "exec(code)",
        "marshal": "marshal.loads(b)",
        "unsafe yaml": "yaml.load(fh)",
        "shell=True": "subprocess.run(cmd, shell=True)",
    }
    for what, line in bad.items():
        assert re.search(FORBIDDEN[what], _strip_comments_and_docstrings(line), re.M), what
    fine = (
        "model.eval()\n# eval( in a comment\ns = 'exec(' \nyaml.load(f, Loader=yaml.SafeLoader)\n"
        "import pickletools_like\nnet.eval().to(dev)\n"
    )
    code = _strip_comments_and_docstrings(fine)
    assert not any(re.search(p, code, re.M) for p in FORBIDDEN.values())


def test_loading_a_model_never_unpickles(tiny_model_dir, monkeypatch):
    import torch

    def trap(*a, **k):
        raise AssertionError("unpickling attempted")

    for mod, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, name, trap)
    loaded = load_model(tiny_model_dir)
    assert loaded.card.name == "tiny"


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/w.safetensors"])
def test_card_cannot_point_outside_its_folder(tiny_model_dir, name):
    card = json.loads((tiny_model_dir / CARD_NAME).read_text())
    card["weights"]["file"] = name
    (tiny_model_dir / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(ModelError, match="not a file inside the model folder"):
        load_model(tiny_model_dir)


def test_pickle_named_safetensors_with_valid_card_is_not_run(tmp_path, tiny_model_dir):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    w = tiny_model_dir / WEIGHTS_NAME
    w.write_bytes(pickle.dumps(Evil()))
    card = json.loads((tiny_model_dir / CARD_NAME).read_text())
    card["weights"].update(
        sha256=hashlib.sha256(w.read_bytes()).hexdigest(), bytes=w.stat().st_size
    )
    (tiny_model_dir / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(ModelError, match="unreadable"):
        load_model(tiny_model_dir)
    assert not marker.exists()


# ------------------------------------------------------------------ where the CLI writes


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root in roots:
        for p in root.rglob("*"):
            st = p.lstat()
            out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """HOME, XDG dirs, the bulbseg home and the working directory all inside tmp_path."""
    dirs = {}
    for name in ("home", "xdg_data", "xdg_config", "xdg_cache", "xdg_state", "cwd", "bulbseg"):
        dirs[name] = tmp_path / name
        dirs[name].mkdir()
    monkeypatch.setenv("HOME", str(dirs["home"]))
    monkeypatch.setenv("XDG_DATA_HOME", str(dirs["xdg_data"]))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(dirs["xdg_config"]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(dirs["xdg_cache"]))
    monkeypatch.setenv("XDG_STATE_HOME", str(dirs["xdg_state"]))
    monkeypatch.setenv("NAPARI_BULBSEG_HOME", str(dirs["bulbseg"]))
    monkeypatch.chdir(dirs["cwd"])
    return dirs


def _new_files(before: dict, after: dict) -> set[str]:
    return {p for p in after if p not in before or after[p] != before[p]}


def test_cli_predict_writes_only_into_the_output_folder(tmp_path, sandbox, tiny_model_dir, capsys):
    src = tmp_path / "data"
    io.write_tiff(src / "s1.tif", np.arange(2 * 20 * 24, dtype=np.uint16).reshape(2, 20, 24))
    io.write_tiff(src / "s2.tif", np.ones((16, 16), np.uint8))
    out = tmp_path / "results"
    before = _snapshot(tmp_path)
    rc = main(
        ["predict", str(src), "-o", str(out), "--model", str(tiny_model_dir), "--device", "cpu"]
    )
    assert rc == 0, capsys.readouterr().err
    changed = _new_files(before, _snapshot(tmp_path))
    expected = {str(out), str(out / MANIFEST)} | {
        str(out / f"{s}_{k}.tif") for s in ("s1", "s2") for k in ("mask", "prob")
    }
    assert changed == expected
    # evaluate with --csv writes that one file, nothing else
    truth = tmp_path / "truth"
    io.write_mask(truth / "s1.tif", np.zeros((2, 20, 24), bool))
    io.write_mask(truth / "s2.png", np.ones((16, 16), bool))
    before = _snapshot(tmp_path)
    rc = main(["evaluate", "--pred", str(out), "--truth", str(truth), "--csv", str(out / "m.csv")])
    assert rc == 0, capsys.readouterr().err
    assert _new_files(before, _snapshot(tmp_path)) == {str(out / "m.csv"), str(out)}


@pytest.mark.slow  # runs the demo (3 slices of 520 × 696)
def test_cli_demo_and_info_write_only_where_asked(tmp_path, sandbox, tiny_model_dir, capsys):
    out = tmp_path / "demo out"
    before = _snapshot(tmp_path)
    assert main(["info", str(tiny_model_dir)]) == 0
    assert _new_files(before, _snapshot(tmp_path)) == set()
    rc = main(["demo", "-o", str(out), "--model", str(tiny_model_dir), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    changed = _new_files(before, _snapshot(tmp_path))
    assert changed == {str(out), str(out / MANIFEST)} | {
        str(out / n) for n in ("probabilities.tif", "mask.tif", "metrics.csv", "overview.png")
    }


# ------------------------------------------------------------------ no network


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted during a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_network_trap_works(no_network):
    with pytest.raises(OSError, match="network"):
        socket.create_connection(("example.org", 80))
    assert no_network


@pytest.mark.slow  # runs the demo (3 slices of 520 × 696)
def test_cli_works_without_network(tmp_path, sandbox, tiny_model_dir, no_network, capsys):
    img = io.write_tiff(tmp_path / "a.tif", np.arange(400, dtype=np.uint16).reshape(20, 20))
    out = tmp_path / "o"
    assert main(["info", str(tiny_model_dir)]) == 0
    assert main(["predict", str(img), "-o", str(out), "--model", str(tiny_model_dir)]) == 0
    assert main(["demo", "-o", str(tmp_path / "d"), "--model", str(tiny_model_dir)]) == 0
    io.write_mask(tmp_path / "t" / "a.tif", np.zeros((20, 20), bool))
    assert main(["evaluate", "--pred", str(out), "--truth", str(tmp_path / "t")]) == 0
    assert no_network == []
    assert "error" not in capsys.readouterr().err


def _resave(src, dst, change):
    """Copy a model folder with its weights changed by ``change`` and a card that matches."""
    import hashlib
    import json

    from safetensors.torch import load_file, save

    tensors = load_file(str(src / "weights.safetensors"))
    change(tensors)
    payload = save(tensors, metadata={"format": "1"})
    dst.mkdir()
    (dst / "weights.safetensors").write_bytes(payload)
    card = json.loads((src / "model.json").read_text())
    card["weights"].update(sha256=hashlib.sha256(payload).hexdigest(), bytes=len(payload))
    (dst / "model.json").write_text(json.dumps(card))
    return dst


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_weights_behind_a_valid_card_are_refused(tmp_path, tiny_model_dir, capsys, value):
    from napari_bulbseg.errors import ModelError
    from napari_bulbseg.model import load_model

    def poison(t):
        k = sorted(t)[0]
        t[k] = t[k].clone()
        t[k].view(-1)[0] = value

    bad = _resave(tiny_model_dir, tmp_path / "bad", poison)
    with pytest.raises(ModelError, match="NaN or infinite"):
        load_model(bad)
    img = io.write_tiff(tmp_path / "a.tif", np.zeros((32, 32), np.uint16))
    rc = main(["predict", str(img), "-o", str(tmp_path / "out"), "--model", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "NaN or infinite" in err and "earlier version" in err
    assert not (tmp_path / "out" / "a_mask.tif").exists()


def test_weights_hash_is_streamed_before_reading(tmp_path, tiny_model_dir, monkeypatch):
    """A card without weights.bytes and a replaced weights file: refused before read_bytes."""
    import json
    import shutil
    from pathlib import Path

    from napari_bulbseg.errors import ModelError
    from napari_bulbseg.model import load_model

    m = tmp_path / "m"
    shutil.copytree(tiny_model_dir, m)
    card = json.loads((m / "model.json").read_text())
    card["weights"].pop("bytes", None)
    (m / "model.json").write_text(json.dumps(card))
    with open(m / "weights.safetensors", "r+b") as fh:
        fh.truncate(64 << 20)  # sparse: 64 MiB of zeros
    read_whole = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read_whole.append(self) or real(self))
    with pytest.raises(ModelError, match="do not match their card"):
        load_model(m)
    assert not [p for p in read_whole if p.name == "weights.safetensors"]
