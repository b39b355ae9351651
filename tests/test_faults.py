"""Faults: killed processes, full disks, NaN losses, cancellation at every step, GPU out of memory.

Each test checks what the user would see *and* what survives: earlier model versions, the
registry's pointer, saved corrections, and that no file is left looking complete when it is not.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import discs, tiny_config
from napari_bulbseg import inference, training
from napari_bulbseg import io as bio
from napari_bulbseg.cli import main
from napari_bulbseg.errors import CancelledError, InputError, TrainingError
from napari_bulbseg.events import Progress, drain
from napari_bulbseg.inference import PredictOptions, iter_predict
from napari_bulbseg.model import ModelCard, UNet, UNetConfig, load_model
from napari_bulbseg.outputs import MANIFEST
from napari_bulbseg.registry import Registry
from napari_bulbseg.training import iter_train

SENTINEL = np.float16(-1.0)


# ----------------------------------------------------------------------------------- helpers


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders)."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = None if p.is_dir() else p.read_bytes()
    return out


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A user data dir with one model version (v001, current) and saved corrections."""
    h = tmp_path / "home dir ß"
    monkeypatch.setenv("NAPARI_BULBSEG_HOME", str(h))
    torch.manual_seed(0)
    reg = Registry(h / "models")
    assert reg.save_version(UNet(UNetConfig(1, 1, 4, 2)), ModelCard(name="base")) == "v001"
    corr = np.zeros((3, 40, 40), bool)
    corr[1, 5:20, 5:25] = True  # an hour of painting
    bio.write_mask(h / "corrections" / "stack-abc" / "corrections.tif", corr)
    (h / "corrections" / "stack-abc" / "state.json").write_text('{"reviewed": [1]}')
    return h


def assert_home_intact(h: Path, before: dict[str, bytes | None]) -> None:
    reg = Registry(h / "models")
    after = tree(h)
    leftovers = sorted(set(after) - set(before))
    # an interrupted save may leave only a hidden temporary folder, never a version
    assert all(Path(p).parts[1].startswith(".") for p in leftovers), leftovers
    assert {k: v for k, v in after.items() if k in before} == before
    assert reg.current() == "v001"
    assert [v.id for v in reg.list_versions(include_bundled=False)] == ["v001"]
    assert all(v.ok for v in reg.list_versions(include_bundled=False))
    reg.load("v001")  # hash and shapes still check out
    mask = bio.read_mask(h / "corrections" / "stack-abc" / "corrections.tif")
    assert mask.shape == (3, 40, 40) and mask[1].sum() == 15 * 20


def _child(code: str, home: Path) -> subprocess.Popen:
    env = {**os.environ, "NAPARI_BULBSEG_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


_TRAIN_CHILD = """
    import sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_faults import discs, tiny_config
    from napari_bulbseg import model as model_mod
    from napari_bulbseg.registry import Registry
    from napari_bulbseg.training import iter_train

    if {slow_save}:
        real = model_mod._fsync_write
        def slow(path, data):
            real(path, data)
            print("SAVING", flush=True)
            time.sleep(120)
        model_mod._fsync_write = slow
    reg = Registry()
    base = reg.load("current")
    cfg = tiny_config(epochs={epochs}, steps_per_epoch=5)
    for ev in iter_train(cfg, discs(6, seed=1), base=base, registry=reg):
        print("event", ev.kind, ev.step, flush=True)
    print("DONE", flush=True)
"""


def _kill_when(proc: subprocess.Popen, marker: str, count: int, timeout: float = 60) -> list[str]:
    lines: list[str] = []
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < timeout:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if sum(marker in ln for ln in lines) >= count:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    return lines


# ---------------------------------------------------------------------------- killed training


@pytest.mark.slow
def test_training_killed_mid_epoch_keeps_everything(home):
    before = tree(home)
    tests_dir = str(Path(__file__).parent)
    proc = _child(_TRAIN_CHILD.format(tests=tests_dir, slow_save=False, epochs=50), home)
    lines = _kill_when(proc, "event step", 3)
    assert proc.returncode == -signal.SIGKILL, lines
    assert sum("event step" in ln for ln in lines) >= 3 and "DONE" not in lines
    assert_home_intact(home, before)


@pytest.mark.slow
def test_training_killed_while_saving_leaves_no_half_version(home):
    before = tree(home)
    tests_dir = str(Path(__file__).parent)
    proc = _child(_TRAIN_CHILD.format(tests=tests_dir, slow_save=True, epochs=1), home)
    lines = _kill_when(proc, "SAVING", 1)
    assert proc.returncode == -signal.SIGKILL and "SAVING" in lines, lines
    assert_home_intact(home, before)
    # the next save still gets a clean, complete new version
    reg = Registry(home / "models")
    vid = reg.save_version(UNet(UNetConfig(1, 1, 4, 2)), ModelCard(name="next"))
    assert vid == "v002" and reg.load(vid).card.name == "next"


# ---------------------------------------------------------------------------- disk full

_DISK_FULL_CHILD = """
    import json, resource, signal, sys
    import numpy as np, torch
    from napari_bulbseg import io as bio
    from napari_bulbseg.errors import BulbsegError
    from napari_bulbseg.metrics import stack_metrics, write_metrics_csv
    from napari_bulbseg.model import ModelCard, UNet, UNetConfig
    from napari_bulbseg.registry import Registry

    home = {home!r}
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit raise EFBIG instead
    limit = 16 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    out = {{}}

    def attempt(name, fn):
        try:
            fn()
            out[name] = "no error"
        except BulbsegError as e:
            out[name] = ["BulbsegError", type(e).__name__, str(e)]
        except OSError as e:
            out[name] = ["OSError", e.errno, str(e)]

    torch.manual_seed(1)
    big = UNet(UNetConfig(1, 1, 8, 3))  # ~90 kB of weights > 16 kB
    attempt("model", lambda: Registry().save_version(big, ModelCard(name="big")))
    rng = np.random.default_rng(0)
    noisy = rng.random((4, 256, 256)) > 0.5  # incompressible: ~32 kB compressed > 16 kB
    attempt(
        "corrections",
        lambda: bio.write_mask(home + "/corrections/stack-abc/corrections.tif", noisy),
    )
    sm = stack_metrics(np.zeros((400, 4, 4)), np.zeros((400, 4, 4)))  # a ~40 kB CSV
    attempt("csv", lambda: write_metrics_csv(home + "/corrections/m.csv", sm))
    print(json.dumps(out))
"""


@pytest.mark.slow
def test_disk_full_while_saving_model_corrections_and_csv(home):
    (home / "corrections" / "m.csv").write_text("old metrics\n")
    before = tree(home)
    proc = _child(_DISK_FULL_CHILD.format(home=str(home)), home)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    res = json.loads(stdout.strip().splitlines()[-1])
    # model: the OSError (EFBIG) propagates; the temporary folder is removed
    assert res["model"][0] == "OSError" and res["model"][1] == 27, res  # EFBIG
    # corrections: a clear InputError that says the old file was left unchanged
    kind, cls, msg = res["corrections"]
    assert kind == "BulbsegError" and cls == "InputError", res
    assert "File too large" in msg and "left unchanged" in msg
    # the CSV, like the corrections: a clear InputError, the old file left unchanged
    assert res["csv"][0] == "BulbsegError" and res["csv"][1] == "InputError", res
    assert tree(home) == before  # byte for byte: no new, half-written or temporary file


def test_cli_reports_a_full_disk_in_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    img = bio.write_tiff(tmp_path / "a.tif", np.arange(256, dtype=np.uint16).reshape(16, 16))
    out = tmp_path / "out"
    argv = ["predict", str(img), "-o", str(out), "--model", str(tiny_model_dir), "--device", "cpu"]
    assert main(argv) == 0  # a previous run's mask: ours, so a re-run may replace it
    capsys.readouterr()
    previous = (out / "a_mask.tif").read_bytes()

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bio.writing.tifffile, "imwrite", full)
    rc = main(
        ["predict", str(img), "-o", str(out), "--model", str(tiny_model_dir), "--device", "cpu"]
    )
    err = capsys.readouterr().err
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("bulbseg: error:") and "No space left" in line and "unchanged" in line
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "a_mask.tif", "a_prob.tif"]
    assert (out / "a_mask.tif").read_bytes() == previous


def test_cli_train_full_disk_message(tmp_path, capsys, monkeypatch, home):
    from napari_bulbseg import cli as cli_mod

    def full(args):
        raise OSError(27, "File too large", str(home / "models" / ".v002.x.tmp"))

    monkeypatch.setattr(cli_mod, "cmd_train", full)
    rc = main(["train", "--images", "i", "--masks", "m"])
    line = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in line
    assert line.startswith("bulbseg: error: the disk is full") and "intact" in line


# ---------------------------------------------------------------------------- NaN loss


def test_nan_loss_mid_run_saves_nothing(home, monkeypatch):
    reg = Registry(home / "models")
    before = tree(home)
    real = training.make_loss
    calls = {"n": 0}

    def poisoned(name, **params):
        fn = real(name, **params)

        def loss(*args):
            calls["n"] += 1
            value = fn(*args)
            return value * float("nan") if calls["n"] >= 3 else value

        return loss

    monkeypatch.setattr(training, "make_loss", poisoned)
    events = []
    gen = iter_train(tiny_config(steps_per_epoch=5), discs(6), base=reg.load("v001"), registry=reg)
    with pytest.raises(TrainingError, match=r"became nan at step 3") as exc:
        for ev in gen:
            events.append(ev)
    assert "learning rate" in exc.value.hint
    assert [e.step for e in events if e.kind in ("step", "probe")] == [1, 2]
    assert_home_intact(home, before)


def test_cli_nan_loss_is_one_line(home, tmp_path, capsys, monkeypatch):
    ds = tmp_path / "ds"
    for i, s in enumerate(discs(4, seed=3)):
        bio.write_tiff(ds / "images" / f"im{i}.tif", s.image)
        bio.write_mask(ds / "masks" / f"im{i}.png", s.mask)
    monkeypatch.setattr(
        training, "make_loss", lambda name, **p: lambda *a: torch.tensor(float("nan"))
    )
    before = tree(home)
    rc = main(
        [
            "train",
            "--images",
            str(ds / "images"),
            "--masks",
            str(ds / "masks"),
            "--from",
            "v001",
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--patch-size",
            "32",
        ]
    )
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("bulbseg: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err
    assert "nan" in lines[0] and "no model was saved" in lines[0]
    assert_home_intact(home, before)


# ---------------------------------------------------------------------------- cancellation


@pytest.fixture
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir)


def _stack(n=3, shape=(40, 44)):
    rng = np.random.default_rng(7)
    return rng.integers(0, 4000, (n, *shape)).astype(np.uint16)


@pytest.mark.parametrize("batch_size", [1, 3])  # 3: batches that straddle two slices
def test_cancel_predict_after_every_event(loaded, batch_size):
    """Closing the generator after event k: finished slices are complete, the rest untouched."""
    stack = _stack(3, (24, 32))
    opts = PredictOptions(tile=24, overlap=8, batch_size=batch_size, device="cpu")
    full = drain(iter_predict(loaded, stack, opts))
    events = list(iter_predict(loaded, stack, opts, out=np.zeros(stack.shape, np.float16)))
    assert len(events) >= 2
    for k in range(len(events) + 1):
        out = np.full(stack.shape, SENTINEL, np.float16)
        gen = iter_predict(loaded, stack, opts, out=out)
        seen = [next(gen) for _ in range(k)]
        gen.close()  # what worker.quit() / Ctrl-C amounts to
        reported = [re.search(r"\((\d+)/\d+\)", e.message) for e in seen]
        n_done = max([int(m.group(1)) for m in reported if m] or [0])
        complete = 0
        for z in range(stack.shape[0]):
            if (out[z] == SENTINEL).all():
                continue
            np.testing.assert_array_equal(out[z], full[z])  # never a half-written slice
            complete += 1
        assert complete == n_done, (k, complete, n_done)
        with pytest.raises(StopIteration):
            next(gen)  # a closed job never hands out a result


def test_cancelled_cli_predict_leaves_no_finished_looking_mask(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    inputs = tmp_path / "in"
    for name in ("a", "b"):
        bio.write_tiff(inputs / f"{name}.tif", _stack(2, (24, 24)), axes="ZYX")
    out = tmp_path / "out"
    real = inference._forward
    calls = {"n": 0}

    def ctrl_c_in_second_file(net, x, amp):
        calls["n"] += 1
        if calls["n"] == 3:  # file a: 2 slices = 2 calls; b's first call is interrupted
            raise KeyboardInterrupt
        return real(net, x, amp)

    monkeypatch.setattr(inference, "_forward", ctrl_c_in_second_file)
    rc = main(
        [
            "predict",
            str(inputs),
            "-o",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--batch-size",
            "1",
            "--tile",
            "512",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 130 and "cancelled" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "a_mask.tif", "a_prob.tif"]
    assert bio.read_mask(out / "a_mask.tif").shape == (2, 24, 24)


def test_interrupt_while_writing_leaves_no_mask(tmp_path, tiny_model_dir, capsys, monkeypatch):
    img = bio.write_tiff(tmp_path / "a.tif", _stack(1, (24, 24))[0])
    out = tmp_path / "out"
    real = bio.writing.tifffile.imwrite

    def half_then_ctrl_c(fh, data, **kw):
        real(fh, data, **kw)
        if "mask" in Path(fh.name).name:
            raise KeyboardInterrupt

    monkeypatch.setattr(bio.writing.tifffile, "imwrite", half_then_ctrl_c)
    rc = main(
        ["predict", str(img), "-o", str(out), "--model", str(tiny_model_dir), "--device", "cpu"]
    )
    assert rc == 130
    # no mask, no temp file, and no probability map without its mask
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST]


def test_cancel_fine_tune_at_every_stage(home):
    reg = Registry(home / "models")
    base = reg.load("v001")
    samples = discs(5, seed=2)
    before = tree(home)
    cfg = tiny_config(epochs=2, steps_per_epoch=1)
    kinds = [e.kind for e in iter_train(cfg, samples, base=base)]  # no registry: writes nothing
    assert {"step", "validate", "epoch"} <= set(kinds)
    for k in range(len(kinds) + 1):
        gen = iter_train(cfg, samples, base=base, registry=reg)
        for _ in range(k):
            next(gen)
        gen.close()
        assert tree(home) == before, k
    # the cancel flag, raised after every event but the last two, stops the job within one
    # event with CancelledError and writes nothing either (the last two: see the test below)
    for k in range(1, len(kinds) - 1):
        _cancel_after(cfg, samples, base, reg, k)
        assert tree(home) == before, k


def _cancel_after(cfg, samples, base, reg, k: int) -> None:
    flag = {"stop": False}
    gen = iter_train(cfg, samples, base=base, registry=reg, cancel=lambda: flag["stop"])
    for _ in range(k):
        next(gen)
    flag["stop"] = True
    extra = []
    with pytest.raises(CancelledError) as exc:
        for ev in gen:  # e.g. the epoch summary after the last validation image
            extra.append(ev.kind)
    assert len(extra) <= 1, (k, extra)
    assert "nothing was saved" in exc.value.hint


@pytest.mark.parametrize("from_end", [1, 0])
def test_cancel_after_the_last_events_saves_nothing(home, from_end):
    """The flag raised after the last validation image or the final epoch event."""
    reg = Registry(home / "models")
    base = reg.load("v001")
    samples = discs(5, seed=2)
    cfg = tiny_config(epochs=1, steps_per_epoch=1)
    n = sum(1 for _ in iter_train(cfg, samples, base=base))
    before = tree(home)
    try:
        _cancel_after(cfg, samples, base, reg, n - from_end)
    finally:
        assert tree(home) == before


# ---------------------------------------------------------------------------- out of memory


def _oom() -> BaseException:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_oom_halves_the_batch_then_falls_back_to_cpu(loaded, monkeypatch):
    stack = _stack(2, (40, 40))
    opts = PredictOptions(tile=16, overlap=4, batch_size=4, device="cpu")
    want = drain(iter_predict(loaded, stack, opts))
    real = inference._forward
    state = {"on_cpu": False, "sizes": []}

    def flaky(net, x, amp):
        state["sizes"].append(x.shape[0])
        if not state["on_cpu"]:
            raise _oom()  # the "GPU" never has room, whatever the batch
        return real(net, x, amp)

    real_to_cpu = inference._Engine._to_cpu

    def to_cpu(self):
        state["on_cpu"] = True
        real_to_cpu(self)

    monkeypatch.setattr(inference, "_forward", flaky)
    monkeypatch.setattr(inference, "_can_fall_back", lambda device: not state["on_cpu"])
    monkeypatch.setattr(inference._Engine, "_to_cpu", to_cpu)
    events: list[Progress] = []
    got = drain(iter_predict(loaded, stack, opts), events.append)
    assert state["sizes"][:3] == [4, 2, 1]  # halved twice, then moved
    text = " ".join(e.message for e in events)
    assert "batch size reduced to 2" in text and "batch size reduced to 1" in text
    assert "continuing on the CPU" in text
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=1e-3)


def test_oom_everywhere_is_an_error_and_no_partial_result(loaded, monkeypatch):
    stack = _stack(3, (24, 24))
    opts = PredictOptions(tile=512, batch_size=1, device="cpu")
    real = inference._forward
    calls = {"n": 0}

    def oom_after_first_slice(net, x, amp):
        calls["n"] += 1
        if calls["n"] > 1:
            raise _oom()
        return real(net, x, amp)

    monkeypatch.setattr(inference, "_forward", oom_after_first_slice)
    out = np.full(stack.shape, SENTINEL, np.float16)
    with pytest.raises(InputError, match="Out of memory") as exc:
        drain(iter_predict(loaded, stack, opts, out=out))
    assert "smaller tile" in exc.value.hint
    assert (out[0] != SENTINEL).all() and (out[1:] == SENTINEL).all()


def test_cli_oom_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir, capsys, monkeypatch):
    img = bio.write_tiff(tmp_path / "a.tif", _stack(2, (24, 24)), axes="ZYX")
    monkeypatch.setattr(inference, "_forward", lambda net, x, amp: (_ for _ in ()).throw(_oom()))
    out = tmp_path / "out"
    rc = main(
        ["predict", str(img), "-o", str(out), "--model", str(tiny_model_dir), "--device", "cpu"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("bulbseg: error: Out of memory")
    assert list(out.iterdir()) == []
