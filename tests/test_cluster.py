"""Cohort prediction on a real dask.distributed LocalCluster (2 worker processes × 1 thread)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_bulbseg import cluster as cluster_mod
from napari_bulbseg.cli import main
from napari_bulbseg.cohort import RUN_LOG, STAGING, OutputLock, RunLog

distributed = pytest.importorskip("distributed")
N_FILES = 12


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """12 small stacks, a tiny model and their single-process outputs."""
    import torch

    from napari_bulbseg.model import ModelCard, UNet, UNetConfig, save_model

    root = tmp_path_factory.mktemp("cohort")
    torch.manual_seed(0)
    model = save_model(root / "model", UNet(UNetConfig(1, 1, 8, 3)), ModelCard(name="tiny"))
    rng = np.random.default_rng(0)
    images = root / "in"
    images.mkdir()
    for i in range(N_FILES):
        shape = (2, 48 + 8 * (i % 3), 56) if i % 4 else (40, 64)
        tifffile.imwrite(images / f"s{i:02d}.tif", rng.integers(0, 4000, shape).astype(np.uint16))
    ref = root / "ref"
    assert main(["predict", str(images), "-o", str(ref), *_opts(model)]) == 0
    return root, images, model, ref


@pytest.fixture(scope="module")
def client():
    local = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    c = distributed.Client(local)
    yield c
    c.close()
    local.close()


def _opts(model, *extra):
    return ["--model", str(model), "--device", "cpu", "--threshold", "0.5", *extra]


def _assert_same_as(out: Path, ref: Path, images: Path) -> None:
    for img in sorted(images.glob("*.tif")):
        for suffix in ("_prob", "_mask"):
            got = tifffile.imread(out / f"{img.stem}{suffix}.tif")
            want = tifffile.imread(ref / f"{img.stem}{suffix}.tif")
            if suffix == "_prob":
                np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
            else:
                np.testing.assert_array_equal(got, want)


def _done(out: Path) -> list[dict]:
    return [e for e in RunLog(out).entries() if e["status"] == "done"]


def test_outputs_equal_single_process_rerun_skips_changed_option_redoes(cohort, client, capsys):
    _, images, model, ref = cohort
    out = cohort[0] / "out-equal"
    argv = ["predict", str(images), "-o", str(out), *_opts(model)]
    argv += ["--scheduler", client.scheduler.address]
    assert main(argv) == 0, capsys.readouterr().err
    _assert_same_as(out, ref, images)
    done = _done(out)
    assert len(done) == N_FILES and len({e["input"] for e in done}) == N_FILES
    # the model is loaded once per worker, not once per task
    assert sum(e["model_load_s"] > 0 for e in done) <= len({e["worker"] for e in done})
    assert not (out / STAGING).exists()
    assert "12 done" in capsys.readouterr().out

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tif")}
    assert main(argv) == 0
    assert f"0 done, {N_FILES} skipped" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tif")} == mtimes
    assert len(RunLog(out).entries()) == N_FILES

    assert main([*argv[:-2], "--threshold", "0.3", *argv[-2:]]) == 0
    assert f"{N_FILES} done, 0 skipped" in capsys.readouterr().out
    for img in images.glob("*.tif"):
        prob = tifffile.imread(ref / f"{img.stem}_prob.tif")
        mask = tifffile.imread(out / f"{img.stem}_mask.tif")
        np.testing.assert_array_equal(mask > 0, prob >= 0.3)


def _slow_forward(delay: float) -> None:  # runs on the workers
    from napari_bulbseg import inference

    real = getattr(inference, "_real_forward", inference._forward)
    inference._real_forward = real

    def slow(net, x, amp):
        time.sleep(delay)
        return real(net, x, amp)

    inference._forward = slow


def test_a_worker_killed_mid_task_loses_and_duplicates_nothing(cohort, client, capsys):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    _, images, model, ref = cohort
    out = cohort[0] / "out-killed"
    client.run(_slow_forward, 0.4)
    pids = client.run(os.getpid)
    killed: dict[str, object] = {}

    def kill_one() -> None:
        deadline = time.time() + 30
        while time.time() < deadline:
            busy = {w: keys for w, keys in client.processing().items() if keys}
            if busy:
                worker, keys = next(iter(busy.items()))
                time.sleep(0.2)  # inside the slowed forward pass
                killed.update(pid=pids[worker], keys=list(keys))
                os.kill(pids[worker], signal.SIGKILL)
                return
            time.sleep(0.02)

    t = threading.Thread(target=kill_one)
    t.start()
    argv = ["predict", str(images), "-o", str(out), *_opts(model)]
    rc = main([*argv, "--scheduler", client.scheduler.address])
    t.join()
    assert rc == 0, capsys.readouterr().err
    assert killed, "no worker was killed"
    done = _done(out)
    assert len(done) == N_FILES and len({e["input"] for e in done}) == N_FILES
    # killed in its first task: the file it held was predicted again by another process
    assert not [e for e in done if e["worker"].endswith(f":{killed['pid']}")]
    _assert_same_as(out, ref, images)
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.endswith(".tmp")] and STAGING not in names
    assert len([n for n in names if n.endswith("_mask.tif")]) == N_FILES


def test_a_corrupt_file_is_named_and_the_others_finish(cohort, client, tmp_path, capsys):
    _, images, model, ref = cohort
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("s01.tif", "s02.tif"):
        (mixed / name).write_bytes((images / name).read_bytes())
    (mixed / "broken.tif").write_bytes(b"hello, not a TIFF")
    out = tmp_path / "out"
    argv = ["predict", str(mixed), "-o", str(out), *_opts(model)]
    assert main([*argv, "--scheduler", client.scheduler.address]) == 1
    printed = capsys.readouterr().out
    assert "2 done" in printed and "1 failed" in printed
    assert "broken.tif" in printed and "not a TIFF" in printed
    for name in ("s01", "s02"):
        np.testing.assert_array_equal(
            tifffile.imread(out / f"{name}_mask.tif"), tifffile.imread(ref / f"{name}_mask.tif")
        )
    assert not (out / "broken_mask.tif").exists()


def test_local_cluster_and_ctrl_c_closes_it_leaving_nothing_half_done(
    cohort, tmp_path, capsys, monkeypatch
):
    import multiprocessing

    from napari_bulbseg import cohort as cohort_mod

    _, images, model, ref = cohort
    out = tmp_path / "out"
    real = cohort_mod.commit
    calls = {"n": 0}

    def ctrl_c_on_third(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(cluster_mod, "commit", ctrl_c_on_third)
    before = set(multiprocessing.active_children())  # the other tests' cluster
    argv = ["predict", str(images), "-o", str(out), *_opts(model), "--cluster", "local:2"]
    assert main(argv) == 130
    assert "cancelled" in capsys.readouterr().err
    assert not set(multiprocessing.active_children()) - before  # its workers are gone
    lines = (out / RUN_LOG).read_text(encoding="utf-8").splitlines()
    entries = [json.loads(line) for line in lines]  # every line is whole JSON
    assert len(entries) == 2
    masks = sorted(p.name for p in out.glob("*_mask.tif"))
    assert masks == sorted(e["outputs"][-1] for e in entries)  # nothing else looks finished
    assert not (out / STAGING).exists()
    monkeypatch.setattr(cluster_mod, "commit", real)
    assert main(argv) == 0  # resumes: only the rest is predicted
    assert f"{N_FILES - 2} done, 2 skipped" in capsys.readouterr().out
    _assert_same_as(out, ref, images)


@pytest.mark.parametrize("spec", ["local:0", "local:abc", "lokal:2"])
def test_bad_cluster_spec_is_one_line(spec, cohort, tmp_path, capsys):
    _, images, model, _ = cohort
    argv = ["predict", str(images), "-o", str(tmp_path / "o"), *_opts(model), "--cluster", spec]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Invalid --cluster" in err and "local:N" in err
    assert not (tmp_path / "o").exists()


def test_unreachable_scheduler_is_one_line_within_seconds(cohort, tmp_path, capsys, monkeypatch):
    import socket

    _, images, model, _ = cohort
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    monkeypatch.setattr(cluster_mod, "CONNECT_TIMEOUT_S", 2.0)
    t0 = time.perf_counter()
    argv = ["predict", str(images), "-o", str(tmp_path / "o"), *_opts(model)]
    assert main([*argv, "--scheduler", f"tcp://127.0.0.1:{port}"]) == 2
    assert time.perf_counter() - t0 < 15
    errors = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert len(errors) == 1 and "No dask scheduler answered" in errors[0]


def test_two_runs_into_one_folder_the_second_is_refused(cohort, tmp_path, capsys):
    _, images, model, _ = cohort
    out = tmp_path / "o"
    out.mkdir()
    argv = ["predict", str(images), "-o", str(out), *_opts(model), "--scheduler", "tcp://x:1"]
    with OutputLock(out):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Another bulbseg run is writing into" in err and f"process {os.getpid()}" in err
    assert not list(out.glob("*.tif"))


def test_missing_distributed_says_how_to_install(cohort, tmp_path, capsys, monkeypatch):
    _, images, model, _ = cohort
    monkeypatch.setitem(sys.modules, "distributed", None)
    argv = ["predict", str(images), "-o", str(tmp_path / "o"), *_opts(model)]
    assert main([*argv, "--cluster", "local:2"]) == 2
    assert 'pip install "napari-bulbseg[distributed]"' in capsys.readouterr().err


def test_outputs_in_the_output_folder_are_not_read_back(cohort, tmp_path, capsys):
    _, images, model, _ = cohort
    src = tmp_path / "in"
    src.mkdir()
    (src / "s01.tif").write_bytes((images / "s01.tif").read_bytes())
    out = src / "out"
    assert main(["predict", str(src), "-o", str(out), *_opts(model)]) == 0
    assert main(["predict", str(src), str(out), "-o", str(out), *_opts(model)]) == 0
    assert "skipping 2 output(s)" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.tif")) == ["s01_mask.tif", "s01_prob.tif"]


def test_engine_imports_no_dask():
    code = (
        "import sys, napari_bulbseg.cli, napari_bulbseg.cohort, napari_bulbseg.inference\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('dask', 'distributed')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_user_guides_slurm_example_builds_its_job_script():
    """The SLURM example in docs/user-guide.md, run as written (without submitting jobs)."""
    pytest.importorskip("dask_jobqueue")
    import re
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[1] / "docs" / "user-guide.md").read_text()
    block = re.search(r"```python\n(from dask_jobqueue import SLURMCluster\n.*?)```", guide, re.S)
    assert block is not None, "the SLURM example is gone from the user guide"
    code = "\n".join(
        line for line in block.group(1).splitlines()
        if ".scale(" not in line and not line.startswith("print(")  # no sbatch here
    )  # fmt: skip
    scope: dict = {}
    exec(code, scope)  # our own documentation's example
    cluster = scope["cluster"]
    try:
        script = cluster.job_script()
        assert "#SBATCH --gres=gpu:1" in script and "#SBATCH -t 04:00:00" in script
        assert "#SBATCH --cpus-per-task=8" in script
        assert "distributed.cli.dask_worker" in script and cluster.scheduler_address in script
        assert cluster.scheduler_address.startswith("tcp://")  # what --scheduler takes
    finally:
        cluster.close()
