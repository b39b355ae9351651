"""A stack split into slice ranges on a real dask.distributed LocalCluster (2 processes × 1
thread): the ranges merge into the same outputs as single-process predict, recorded once."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_bulbseg import cluster as cluster_mod
from napari_bulbseg.cli import main
from napari_bulbseg.cohort import (
    STAGING,
    ModelRef,
    RunLog,
    merge_parts,
    predict_file,
    predict_range,
    slice_ranges,
)
from napari_bulbseg.outputs import MANIFEST

distributed = pytest.importorskip("distributed")
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
#: 8 slices in 2 ranges of 4 (one tile per slice: the same batches of 4 as the whole stack);
#: 9 slices in 3 ranges of 3 (other batches than the whole stack's)
STACKS = {"aligned": 8, "odd": 9, "small": 3}
PIXEL_UM = 0.65


def _write_stack(path: Path, data: np.ndarray) -> None:
    tifffile.imwrite(
        path,
        data,
        imagej=True,
        resolution=(1 / PIXEL_UM, 1 / PIXEL_UM),
        metadata={"axes": "ZYX", "unit": "um"},
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three stacks (8, 9 and 3 slices), a tiny model, a threshold that cuts its probabilities
    in half, and the single-process outputs."""
    import torch

    from napari_bulbseg.inference import PredictOptions, predict
    from napari_bulbseg.model import ModelCard, UNet, UNetConfig, load_model, save_model

    root = tmp_path_factory.mktemp("split")
    torch.manual_seed(0)
    model = save_model(root / "model", UNet(UNetConfig(1, 1, 8, 3)), ModelCard(name="tiny"))
    rng = np.random.default_rng(1)
    images = root / "in"
    images.mkdir()
    for name, z in STACKS.items():
        blobs = rng.integers(100, 4000, (z, 6, 7)).repeat(10, axis=1).repeat(10, axis=2)
        _write_stack(
            images / f"{name}.tif", (blobs + rng.integers(0, 300, blobs.shape)).astype(np.uint16)
        )
    # a threshold at the median probability: masks with both classes, not all foreground
    p = predict(
        load_model(model), tifffile.imread(images / "odd.tif"), PredictOptions(device="cpu")
    )
    threshold = f"{float(np.median(p)):.4f}"
    opts = ["--model", str(model), "--device", "cpu", "--threshold", threshold]
    ref = root / "ref"
    with _one_torch_thread():
        assert main(["predict", str(images), "-o", str(ref), *opts]) == 0
    return root, images, opts, ref


@contextlib.contextmanager
def _one_torch_thread():
    """Single-process predict with the workers' thread count (dask sets OMP_NUM_THREADS=1):
    torch's result depends on it (measured on BBBC039: 2 threads vs 1 moved 12 of 81,920
    probabilities by one float16 step), which is not what these tests compare."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def client():
    local = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    c = distributed.Client(local)
    yield c
    c.close()
    local.close()


def _f16_steps(got: np.ndarray, want: np.ndarray) -> float:
    """The largest difference in float16 steps (probabilities are stored as float16)."""
    step = np.spacing(np.abs(want).astype(np.float16)).astype(np.float64)
    return float(np.max(np.abs(got.astype(np.float64) - want) / step))


def _compare(out: Path, ref: Path, stems, exact: set[str] = frozenset()) -> dict[str, float]:
    """Masks equal; probabilities equal for ``exact`` stems (same batches), else within one
    float16 step; the same TIFF metadata. Returns the max |difference| of each stem."""
    diffs = {}
    for stem in stems:
        for suffix in ("_prob", "_mask"):
            with (
                tifffile.TiffFile(out / f"{stem}{suffix}.tif") as a,
                tifffile.TiffFile(ref / f"{stem}{suffix}.tif") as b,
            ):
                got, want = a.asarray(), b.asarray()
                assert got.shape == want.shape and got.dtype == want.dtype
                assert a.imagej_metadata == b.imagej_metadata
                pa, pb = a.pages[0].tags, b.pages[0].tags
                for tag in ("XResolution", "YResolution", "ResolutionUnit", "Compression"):
                    assert pa[tag].value == pb[tag].value, (stem, suffix, tag)
            if suffix == "_mask":
                np.testing.assert_array_equal(got, want)
                assert 0 < np.count_nonzero(got) < got.size  # both classes: a real comparison
            else:
                diffs[stem] = float(np.abs(got - want).max())
                if stem in exact:
                    np.testing.assert_array_equal(got, want)
                else:
                    assert _f16_steps(got, want) <= 1.0, stem
    return diffs


def _done(out: Path) -> list[dict]:
    return [e for e in RunLog(out).entries() if e["status"] == "done"]


def test_slice_ranges_tile_the_stack_in_near_equal_parts():
    assert slice_ranges(9, 4) == [(0, 3), (3, 6), (6, 9)]
    assert slice_ranges(8, 4) == [(0, 4), (4, 8)]
    assert slice_ranges(65, 64) == [(0, 32), (32, 65)]
    assert slice_ranges(64, 64) == [(0, 64)]
    assert slice_ranges(500, 0) == [(0, 500)]
    for n, k in [(1000, 64), (7, 2), (130, 64)]:
        r = slice_ranges(n, k)
        assert (
            r[0][0] == 0 and r[-1][1] == n and all(a[1] == b[0] for a, b in itertools.pairwise(r))
        )
        sizes = [hi - lo for lo, hi in r]
        assert max(sizes) <= k and max(sizes) - min(sizes) <= 1 and len(r) == -(-n // k)


def test_split_equals_single_process_one_record_per_file_rerun_skips(cohort, client, capsys):
    root, images, opts, ref = cohort
    out = root / "out-split"
    argv = ["predict", str(images), "-o", str(out), *opts, "--slices-per-task", "4"]
    argv += ["--scheduler", client.scheduler.address]
    assert main(argv) == 0, capsys.readouterr().err
    diffs = _compare(out, ref, STACKS, exact={"aligned", "small"})
    with capsys.disabled():
        print(f"\nmax |split - single-process| of the probabilities: {diffs}")
    done = _done(out)
    assert sorted(Path(e["input"]).stem for e in done) == sorted(STACKS)  # one record per file
    by = {Path(e["input"]).stem: e for e in done}
    ranges = {k: [p["slices"] for p in e["parts"] if p["task"] == "slices"] for k, e in by.items()}
    assert ranges == {"aligned": [[0, 4], [4, 8]], "odd": [[0, 3], [3, 6], [6, 9]], "small": []}
    assert [p["task"] for p in by["odd"]["parts"]][-1] == "merge"
    assert by["odd"]["shape"] == [9, 60, 70] and by["odd"]["outputs"] == [
        "odd_prob.tif",
        "odd_mask.tif",
    ]
    mask = tifffile.imread(out / "odd_mask.tif")
    assert by["odd"]["foreground"] == np.count_nonzero(mask)
    manifest = json.loads((out / MANIFEST).read_text())
    assert sorted(manifest["files"]) == sorted(
        f"{s}{x}.tif" for s in STACKS for x in ("_prob", "_mask")
    )
    assert not (out / STAGING).exists()
    assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".npy"))]

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tif")}
    assert main(argv) == 0
    assert f"0 done, {len(STACKS)} skipped" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tif")} == mtimes
    assert len(RunLog(out).entries()) == len(STACKS)
    # a finished file is finished whatever the split: 0 (never split) skips it too
    assert main([*argv[:-4], "--slices-per-task", "0", *argv[-2:]]) == 0
    assert f"0 done, {len(STACKS)} skipped" in capsys.readouterr().out


def test_the_engine_alone_ranges_merge_into_predict_files_outputs(cohort, tmp_path):
    """predict_range + merge_parts in this process (no cluster): the outputs of predict_file;
    a damaged part fails the file with a reason instead of merging it."""
    from napari_bulbseg.inference import PredictOptions
    from napari_bulbseg.model import load_model
    from napari_bulbseg.postprocess import PostProcess

    root, images, opts, _ = cohort
    loaded = load_model(root / "model")
    options = PredictOptions(device="cpu")
    spec = PostProcess(threshold=float(opts[opts.index("--threshold") + 1]))
    path = str(images / "odd.tif")
    whole = tmp_path / "whole"
    whole.mkdir()
    want = predict_file(path, whole, loaded, options, spec)
    staging = tmp_path / "staging"
    staging.mkdir()
    ref = ModelRef.of(loaded)
    scale = {"diameter": None, "message": None}
    parts = [
        predict_range(path, str(staging), ref, options, spec, scale, lo, hi)
        for lo, hi in [(0, 5), (5, 9)]
    ]
    assert [p.status for p in parts] == ["done", "done"]
    got = merge_parts(path, str(staging), parts[::-1], ref, options, spec)  # any order
    assert got.status == "done" and got.outputs == want.outputs and got.shape == want.shape
    assert got.foreground == want.foreground and got.options == want.options
    _compare(Path(got.staged), whole, ["odd"], exact={"odd"})

    # --no-prob: the ranges keep only their masks, the merge writes only the mask
    kw = {"write_prob": False}
    no_prob = [predict_range(path, str(staging), ref, options, spec, scale, 0, 9, **kw)]
    assert sorted(p.name for p in Path(no_prob[0].folder).iterdir()) == ["mask.npy"]
    masked = merge_parts(path, str(staging), no_prob, ref, options, spec, **kw)
    assert masked.outputs == ("odd_mask.tif",) and masked.options["write_prob"] is False
    assert sorted(p.name for p in Path(masked.staged).iterdir()) == ["odd_mask.tif"]
    np.testing.assert_array_equal(
        tifffile.imread(Path(masked.staged) / "odd_mask.tif"),
        tifffile.imread(whole / "odd_mask.tif"),
    )

    (Path(parts[1].folder) / "mask.npy").write_bytes(b"\x93NUMPY truncated")
    bad = merge_parts(path, str(staging), parts, ref, options, spec)
    assert bad.status == "failed" and "slices 5…8 is missing or damaged" in bad.error
    assert bad.staged is None and set(bad.staged_parts) == {p.folder for p in parts}
    gone = merge_parts(path, str(staging), parts[:1], ref, options, spec)  # a range missing
    assert gone.status == "failed" and "do not tile the stack" in gone.error


def _slow_forward(delay: float) -> None:  # runs on the workers
    from napari_bulbseg import inference

    real = getattr(inference, "_real_forward", inference._forward)
    inference._real_forward = real

    def slow(net, x, amp):
        time.sleep(delay)
        return real(net, x, amp)

    inference._forward = slow


def _normal_forward() -> None:  # runs on the workers
    from napari_bulbseg import inference

    inference._forward = getattr(inference, "_real_forward", inference._forward)


def test_a_worker_killed_mid_range_reruns_that_range(cohort, client, capsys):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    root, images, opts, ref = cohort
    out = root / "out-killed"
    client.run(_slow_forward, 0.5)
    pids = client.run(os.getpid)
    killed: dict[str, object] = {}

    def kill_in_a_range() -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            for worker, keys in client.processing().items():
                if any(str(k).startswith("bulbseg-slices-") for k in keys):
                    time.sleep(0.3)  # inside the slowed forward pass
                    killed.update(pid=pids[worker], keys=list(keys))
                    os.kill(pids[worker], signal.SIGKILL)
                    return
            time.sleep(0.02)

    t = threading.Thread(target=kill_in_a_range)
    t.start()
    argv = ["predict", str(images / "odd.tif"), "-o", str(out), *opts, "--slices-per-task", "3"]
    try:
        rc = main([*argv, "--scheduler", client.scheduler.address])
    finally:
        t.join()
        client.run(_normal_forward)
    assert rc == 0, capsys.readouterr().err
    assert killed, "no worker was killed"
    (entry,) = _done(out)
    slices = [p for p in entry["parts"] if p["task"] == "slices"]
    assert [p["slices"] for p in slices] == [[0, 3], [3, 6], [6, 9]]  # each range once
    assert not [p for p in entry["parts"] if p["worker"].endswith(f":{killed['pid']}")]
    _compare(out, ref, ["odd"])
    assert sorted(p.name for p in out.glob("*.tif")) == ["odd_mask.tif", "odd_prob.tif"]


def test_ctrl_c_after_the_ranges_leaves_nothing_and_the_rerun_redoes_every_range(
    cohort, client, tmp_path, capsys, monkeypatch
):
    _, images, opts, ref = cohort
    out = tmp_path / "out"

    def ctrl_c(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cluster_mod, "commit", ctrl_c)
    argv = ["predict", str(images / "aligned.tif"), "-o", str(out), *opts]
    argv += ["--slices-per-task", "4", "--scheduler", client.scheduler.address]
    assert main(argv) == 130
    interrupted = time.time()
    assert "cancelled" in capsys.readouterr().err
    assert not list(out.glob("*.tif")) and not RunLog(out).entries()
    assert not (out / STAGING).exists()  # the finished ranges went with the staging folder
    monkeypatch.undo()
    assert main(argv) == 0
    assert "1 done, 0 skipped" in capsys.readouterr().out
    (entry,) = _done(out)
    slices = [p for p in entry["parts"] if p["task"] == "slices"]
    assert len(slices) == 2 and all(p["started"] > interrupted for p in slices)  # none reused
    _compare(out, ref, ["aligned"], exact={"aligned"})


def test_bad_slices_per_task_is_refused(cohort, tmp_path, capsys):
    _, images, opts, _ = cohort
    argv = ["predict", str(images), "-o", str(tmp_path / "o"), *opts, "--slices-per-task", "-1"]
    assert main(argv) == 2
    assert "--slices-per-task" in capsys.readouterr().err


@pytest.mark.skipif(not (DATA / "bbbc039").is_dir(), reason="../shared/data/bbbc039 is absent")
def test_real_bbbc039_stack_split_equals_single_process(client, tmp_path, capsys):
    """Four BBBC039 validation images (crops) as one 4-slice stack, the bundled model,
    ``--diameter auto``: 2 ranges on 2 workers give the single-process outputs."""
    from napari_bulbseg.io import read_image

    files = sorted((DATA / "bbbc039" / "val" / "images").glob("*.tif"))[:4]
    stack = np.stack([read_image(f)[100:356, 150:470] for f in files])
    src = tmp_path / "in"
    src.mkdir()
    _write_stack(src / "bbbc039.tif", stack)
    opts = ["--device", "cpu", "--diameter", "auto"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    with _one_torch_thread():
        assert main(["predict", str(src), "-o", str(ref), *opts]) == 0
    single = capsys.readouterr().err
    argv = ["predict", str(src), "-o", str(out), *opts, "--slices-per-task", "2"]
    assert main([*argv, "--scheduler", client.scheduler.address]) == 0
    # ranges of 2 slices, batches of 4 tiles: other batches than the whole stack's, so the
    # probabilities may move by one float16 step (measured: they do not, on CPU)
    diffs = _compare(out, ref, ["bbbc039"])
    with capsys.disabled():
        print(f"\nBBBC039, 4 slices in 2 ranges, diameter auto: max |split - single| = {diffs}")
    (entry,) = _done(out)
    assert [p["task"] for p in entry["parts"]] == ["scale", "slices", "slices", "merge"]
    # the diameter was measured once, on the same slices as single-process predict did
    assert entry["scale_message"].startswith("diameter auto:") and entry["scale_message"] in single
