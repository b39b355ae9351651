"""Tests for napari_bulbseg.io: formats, axes, pixel size, laziness, pairs, masks, atomic writes."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_bulbseg import io
from napari_bulbseg.errors import InputError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _rand(rng: np.random.Generator, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    if np.dtype(dtype).kind == "f":
        return rng.random(shape).astype(dtype)
    hi = np.iinfo(dtype).max
    return rng.integers(0, hi, shape, dtype=dtype, endpoint=True)


# ------------------------------------------------------------------------------------------
# formats and axes


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("lazy", [False, True])
def test_2d_round_trip(tmp_path, rng, dtype, lazy):
    img = _rand(rng, (23, 31), dtype)
    p = tmp_path / "img.tif"
    tifffile.imwrite(p, img)
    st = io.read_stack(p, lazy=lazy)
    assert st.axes == "ZYX" and st.source_axes == "YX"
    assert st.shape == (1, 23, 31) and st.dtype == dtype
    assert st.lazy is lazy and isinstance(st.data, io.LazyStack) is lazy
    np.testing.assert_array_equal(st.plane(0), img)
    np.testing.assert_array_equal(io.read_image(p), img)
    assert st.rgb is False and st.pixel_size is None and st.unit == ""
    st.close()


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_zyx_with_axes_metadata(tmp_path, rng, compression):
    vol = _rand(rng, (5, 12, 14), np.uint16)
    p = tmp_path / "vol.tif"
    tifffile.imwrite(p, vol, metadata={"axes": "ZYX"}, compression=compression)
    for lazy in (False, True):
        st = io.read_stack(p, lazy=lazy)
        assert st.source_axes == "ZYX" and st.axes == "ZYX"
        assert st.notes == ()  # named axis: nothing assumed
        np.testing.assert_array_equal(np.asarray(st.data), vol)
        st.close()


def test_unnamed_3d_axis_is_slices_and_noted(tmp_path, rng):
    vol = _rand(rng, (5, 10, 11), np.uint8)
    p = tmp_path / "q.tif"
    tifffile.imwrite(p, vol, photometric="minisblack")  # tifffile records shape only -> axes 'QYX'
    st = io.read_stack(p)
    assert st.source_axes == "QYX"
    np.testing.assert_array_equal(st.data, vol)
    assert any("slice" in n for n in st.notes)


def test_ambiguous_4d_raises(tmp_path, rng):
    p = tmp_path / "amb.tif"
    data = _rand(rng, (2, 5, 8, 9), np.uint8)
    tifffile.imwrite(p, data, photometric="minisblack")  # shape recorded, axes 'QQYX'
    with pytest.raises(InputError, match=r"2 stacked dimensions .*\(2, 5, 8, 9\)") as exc:
        io.read_stack(p)
    assert "ImageJ" in exc.value.hint or "OME" in exc.value.hint


def test_plain_page_sequence_is_slices(tmp_path, rng):
    p = tmp_path / "pages.tif"
    data = _rand(rng, (2, 5, 8, 9), np.uint8)
    tifffile.imwrite(p, data, shaped=False, photometric="minisblack")  # just 10 pages: 'IYX'
    st = io.read_stack(p)
    assert st.source_axes == "IYX" and st.shape == (10, 8, 9)
    np.testing.assert_array_equal(st.data, data.reshape(10, 8, 9))
    assert any("'I'" in n for n in st.notes)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_imagej_hyperstack_tzcyx(tmp_path, rng, compression):
    t, z, c, y, x = 2, 3, 4, 10, 12
    hs = _rand(rng, (t, z, c, y, x), np.uint16)
    p = tmp_path / "hyper stack.tif"
    tifffile.imwrite(
        p,
        hs,
        imagej=True,
        compression=compression,
        resolution=(1 / 0.5, 1 / 0.25),  # (x, y) pixels per unit
        metadata={"axes": "TZCYX", "spacing": 2.5, "unit": "micron"},
    )
    expected = hs.transpose(0, 1, 3, 4, 2).reshape(t * z, y, x, c)
    for lazy in (False, True):
        st = io.read_stack(p, lazy=lazy)
        assert st.source_axes == "TZCYX" and st.axes == "ZYXC"
        assert st.shape == (t * z, y, x, c) and st.rgb is False
        np.testing.assert_array_equal(np.asarray(st.data), expected)
        # slice t*nZ + z is time point t, depth z
        np.testing.assert_array_equal(st.plane(1 * z + 2), np.moveaxis(hs[1, 2], 0, -1))
        assert st.pixel_size == pytest.approx((0.25, 0.5), rel=1e-6)
        assert st.z_spacing == pytest.approx(2.5) and st.unit == "µm"
        assert st.scale == pytest.approx((2.5, 0.25, 0.5), rel=1e-6)
        st.close()


def test_ome_tiff_physical_sizes(tmp_path, rng):
    vol = _rand(rng, (3, 2, 10, 12), np.uint16)
    p = tmp_path / "cells.ome.tif"
    tifffile.imwrite(
        p,
        vol,
        metadata={
            "axes": "ZCYX",
            "PhysicalSizeX": 0.3,
            "PhysicalSizeY": 0.4,
            "PhysicalSizeZ": 500.0,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeYUnit": "µm",
            "PhysicalSizeZUnit": "nm",
        },
    )
    st = io.read_stack(p)
    assert st.source_axes == "ZCYX" and st.axes == "ZYXC"
    np.testing.assert_array_equal(st.data, np.moveaxis(vol, 1, -1))
    assert st.pixel_size == pytest.approx((0.4, 0.3))
    assert st.unit == "µm"
    assert st.z_spacing == pytest.approx(0.5)  # 500 nm converted to the XY unit


@pytest.mark.parametrize("samples", [3, 4])
def test_rgb_and_rgba_tiff(tmp_path, rng, samples):
    img = _rand(rng, (9, 11, samples), np.uint8)
    p = tmp_path / "colour.tif"
    tifffile.imwrite(p, img, photometric="rgb")
    st = io.read_stack(p)
    assert st.source_axes == "YXS" and st.axes == "ZYXC" and st.rgb is True
    np.testing.assert_array_equal(st.plane(0), img)  # TIFF alpha is kept


def test_planar_rgb_tiff_channel_last(tmp_path, rng):
    img = _rand(rng, (3, 9, 11), np.uint8)
    p = tmp_path / "planar.tif"
    tifffile.imwrite(p, img, photometric="rgb", planarconfig="separate")
    st = io.read_stack(p, lazy=True)
    assert st.source_axes == "SYX" and st.rgb is True
    np.testing.assert_array_equal(st.plane(0), np.moveaxis(img, 0, -1))


def test_imagej_channels_are_not_rgb(tmp_path, rng):
    img = _rand(rng, (3, 9, 11), np.uint8)
    p = tmp_path / "chan.tif"
    tifffile.imwrite(p, img, imagej=True, metadata={"axes": "CYX"})
    st = io.read_stack(p)
    assert st.axes == "ZYXC" and st.rgb is False
    np.testing.assert_array_equal(st.plane(0), np.moveaxis(img, 0, -1))


def test_png_grey_rgb_and_opaque_rgba(tmp_path, rng):
    from PIL import Image

    grey = _rand(rng, (13, 17), np.uint8)
    grey16 = _rand(rng, (13, 17), np.uint16)
    rgba = _rand(rng, (13, 17, 4), np.uint8)
    rgba[..., 3] = 255
    translucent = rgba.copy()
    translucent[0, 0, 3] = 10
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "c.png")
    Image.fromarray(translucent, mode="RGBA").save(tmp_path / "t.png")

    np.testing.assert_array_equal(io.read_image(tmp_path / "g.png"), grey)
    np.testing.assert_array_equal(io.read_image(tmp_path / "g16.png"), grey16)
    st = io.read_stack(tmp_path / "c.png")
    assert st.rgb is True and st.shape == (1, 13, 17, 3)  # opaque alpha dropped
    np.testing.assert_array_equal(st.plane(0), rgba[..., :3])
    assert any("alpha" in n for n in st.notes)
    kept = io.read_image(tmp_path / "t.png")
    np.testing.assert_array_equal(kept, translucent)  # real transparency is kept


def test_jpeg_reads(tmp_path):
    from PIL import Image

    img = np.full((16, 16), 100, np.uint8)
    Image.fromarray(img).save(tmp_path / "x.jpg", quality=95)
    out = io.read_image(tmp_path / "x.jpg")
    assert out.shape == (16, 16) and abs(int(out.mean()) - 100) <= 2


@pytest.mark.parametrize("lazy", [False, True])
def test_folder_of_pngs_natural_order(tmp_path, rng, lazy):
    from PIL import Image

    planes = [_rand(rng, (8, 9), np.uint8) for _ in range(11)]
    folder = tmp_path / "slices"
    folder.mkdir()
    for i, pl in enumerate(planes):
        Image.fromarray(pl).save(folder / f"slice_{i}.png")  # slice_10 sorts after slice_9
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"junk")
    st = io.read_stack(folder, lazy=lazy)
    assert st.shape == (11, 8, 9) and st.lazy is lazy
    np.testing.assert_array_equal(np.asarray(st.data), np.stack(planes))
    np.testing.assert_array_equal(st.plane(10), planes[10])


def test_folder_with_mismatched_slice_raises(tmp_path, rng):
    from PIL import Image

    folder = tmp_path / "slices"
    folder.mkdir()
    Image.fromarray(_rand(rng, (8, 9), np.uint8)).save(folder / "a1.png")
    Image.fromarray(_rand(rng, (8, 10), np.uint8)).save(folder / "a2.png")
    with pytest.raises(InputError, match=r"a2\.png"):
        io.read_stack(folder, lazy=False)


def test_read_image_rejects_stack(tmp_path, rng):
    p = tmp_path / "vol.tif"
    tifffile.imwrite(p, _rand(rng, (3, 5, 6), np.uint8), metadata={"axes": "ZYX"})
    with pytest.raises(InputError, match="3 slices"):
        io.read_image(p)


# ------------------------------------------------------------------------------------------
# laziness


@pytest.fixture
def page_counter(monkeypatch):
    """Record the index of every TIFF page whose pixel data tifffile decodes."""
    read: list[int] = []
    original = tifffile.TiffPage.asarray  # TiffFrame.asarray delegates to it

    def counting(self, *a, **k):
        read.append(self.index)
        return original(self, *a, **k)

    monkeypatch.setattr(tifffile.TiffPage, "asarray", counting)
    return read


def test_lazy_compressed_reads_only_requested_pages(tmp_path, rng, page_counter):
    z, c = 20, 2
    vol = _rand(rng, (z, c, 16, 16), np.uint16)
    p = tmp_path / "big.tif"
    tifffile.imwrite(p, vol, imagej=True, compression="zlib", metadata={"axes": "ZCYX"})
    st = io.read_stack(p, lazy=True)
    assert st.lazy and isinstance(st.data, io.LazyStack)
    assert page_counter == []  # opening reads no pixel data
    np.testing.assert_array_equal(st.plane(7), np.moveaxis(vol[7], 0, -1))
    assert sorted(page_counter) == [14, 15]  # the two channel pages of slice 7, nothing else
    page_counter.clear()
    np.testing.assert_array_equal(st.data[3:5, 2:4], np.moveaxis(vol[3:5, :, 2:4], 1, -1))
    assert sorted(page_counter) == [6, 7, 8, 9]
    st.close()


def test_lazy_memmap_backed_for_uncompressed(tmp_path, rng, page_counter):
    vol = _rand(rng, (6, 10, 12), np.uint16)
    p = tmp_path / "raw.tif"
    tifffile.imwrite(p, vol, metadata={"axes": "ZYX"})
    st = io.read_stack(p, lazy=True)
    assert "memory-mapped" in st.data.description
    np.testing.assert_array_equal(st.plane(4), vol[4])
    assert page_counter == []  # no page decoding: straight from the mapping
    assert st.data.planes_read == 1


@pytest.mark.parametrize("lazy", [False, True])
def test_big_endian_tiff(tmp_path, rng, lazy):
    vol = _rand(rng, (3, 6, 7), np.uint16)
    p = tmp_path / "be.tif"
    tifffile.imwrite(p, vol, byteorder=">", metadata={"axes": "ZYX"})
    st = io.read_stack(p, lazy=lazy)
    assert st.dtype == np.dtype("=u2")
    np.testing.assert_array_equal(np.asarray(st.data), vol)
    np.testing.assert_array_equal(st.plane(2), vol[2])


def test_lazy_none_decides_by_size(tmp_path, rng, monkeypatch):
    vol = _rand(rng, (4, 32, 32), np.uint8)  # 4 KiB
    p = tmp_path / "v.tif"
    tifffile.imwrite(p, vol, metadata={"axes": "ZYX"})
    assert io.read_stack(p).lazy is False
    monkeypatch.setattr(io.memory, "_available_memory", lambda: 8 * 1024)  # 1/4 = 2 KiB < 4 KiB
    st = io.read_stack(p)
    assert st.lazy is True
    np.testing.assert_array_equal(np.asarray(st.data), vol)
    monkeypatch.setattr(io.memory, "LAZY_MAX_BYTES", 1024)
    monkeypatch.setattr(io.memory, "_available_memory", lambda: 1024**4)
    assert io.read_stack(p).lazy is True  # above the absolute cap


def test_lazy_stack_indexing(tmp_path, rng):
    vol = _rand(rng, (7, 5, 6, 3), np.uint8)
    p = tmp_path / "rgbstack.tif"
    tifffile.imwrite(p, vol, photometric="rgb", metadata={"axes": "ZYXS"}, compression="zlib")
    st = io.read_stack(p, lazy=True)
    d = st.data
    assert d.shape == vol.shape and d.ndim == 4 and len(d) == 7 and d.dtype == np.uint8
    np.testing.assert_array_equal(d[-1], vol[-1])
    np.testing.assert_array_equal(d[2, 1:3, ::2], vol[2, 1:3, ::2])
    np.testing.assert_array_equal(d[::3], vol[::3])
    np.testing.assert_array_equal(d[[5, 0]], vol[[5, 0]])
    mask = np.zeros(7, bool)
    mask[[1, 6]] = True
    np.testing.assert_array_equal(d[mask], vol[mask])
    np.testing.assert_array_equal(d[..., 0], vol[..., 0])
    np.testing.assert_array_equal(d[1, ..., 2], vol[1, ..., 2])
    np.testing.assert_array_equal(np.asarray(d, dtype=np.float32), vol.astype(np.float32))
    with pytest.raises(IndexError):
        d[7]
    st.close()


# ------------------------------------------------------------------------------------------
# writing


def test_write_tiff_imagej_round_trip(tmp_path, rng):
    vol = _rand(rng, (4, 10, 12, 2), np.uint16)
    p = tmp_path / "out.tif"
    assert io.write_tiff(p, vol, pixel_size=(0.25, 0.5), z_spacing=2.0) == p
    with tifffile.TiffFile(p) as tif:
        assert tif.is_imagej and tif.pages[0].compression == 8  # ADOBE_DEFLATE (zlib)
    st = io.read_stack(p)
    assert st.axes == "ZYXC" and st.rgb is False
    np.testing.assert_array_equal(st.data, vol)
    assert st.pixel_size == pytest.approx((0.25, 0.5), rel=1e-6)
    assert st.z_spacing == pytest.approx(2.0) and st.unit == "µm"


def test_write_tiff_rgb_and_stack_input(tmp_path, rng):
    img = _rand(rng, (1, 10, 12, 3), np.uint8)
    p = tmp_path / "rgb.tif"
    io.write_tiff(p, img, pixel_size=0.7, unit="nm")
    st = io.read_stack(p)
    assert st.rgb is True and st.unit == "nm"
    assert st.pixel_size == pytest.approx((0.7, 0.7), rel=1e-6)
    np.testing.assert_array_equal(st.data, img)
    p2 = tmp_path / "copy.tif"
    io.write_tiff(p2, st)  # a Stack carries its own metadata
    st2 = io.read_stack(p2)
    assert (st2.rgb, st2.unit) == (True, "nm")
    assert st2.pixel_size == pytest.approx(st.pixel_size, rel=1e-6)


@pytest.mark.parametrize("name", ["f64.tif", "f64.ome.tif"])
def test_write_tiff_non_imagej_dtype_keeps_metadata(tmp_path, rng, name):
    vol = rng.random((3, 2, 6, 7))  # float64: not an ImageJ type
    p = tmp_path / name
    io.write_tiff(p, vol, axes="ZCYX", pixel_size=(0.1, 0.2), z_spacing=1.5)
    st = io.read_stack(p)
    assert st.dtype == np.float64 and st.axes == "ZYXC"
    np.testing.assert_array_equal(st.data, np.moveaxis(vol, 1, -1))
    assert st.pixel_size == pytest.approx((0.1, 0.2), rel=1e-6)
    assert st.z_spacing == pytest.approx(1.5) and st.unit == "µm"
    with tifffile.TiffFile(p) as tif:
        assert tif.is_ome is name.endswith(".ome.tif")


def test_write_tiff_rejects_bad_input(tmp_path):
    with pytest.raises(InputError, match="complex"):
        io.write_tiff(tmp_path / "c.tif", np.zeros((4, 4), np.complex64))
    with pytest.raises(InputError, match="axes"):
        io.write_tiff(tmp_path / "a.tif", np.zeros((4, 4, 4)), axes="ZY")
    with pytest.raises(InputError, match="pixel size"):
        io.write_tiff(tmp_path / "p.tif", np.zeros((4, 4), np.uint8), pixel_size=(1, 2, 3))
    with pytest.raises(InputError, match=r"\.tif"):
        io.write_tiff(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_write_mask_round_trip_tif_and_png(tmp_path, rng):
    mask = rng.random((3, 20, 22)) > 0.6
    p = io.write_mask(tmp_path / "m.tif", mask)
    raw = tifffile.imread(p)
    assert raw.dtype == np.uint8 and set(np.unique(raw)) == {0, 255}
    with tifffile.TiffFile(p) as tif:
        assert tif.pages[0].compression != 1  # compressed
    back = io.read_mask(p)
    assert back.dtype == np.uint8 and back.shape == (3, 20, 22)
    np.testing.assert_array_equal(back, mask.astype(np.uint8))
    p2 = io.write_mask(tmp_path / "m.png", mask[0].astype(np.uint8))
    np.testing.assert_array_equal(io.read_mask(p2), mask[0])


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "mask.tif"
    old = np.zeros((8, 8), bool)
    old[2:4, 2:4] = True
    io.write_mask(p, old)
    before = p.read_bytes()
    real_imwrite = tifffile.imwrite

    def half_then_fail(fh, data, **kw):
        real_imwrite(fh, data, **kw)  # the temp file is fully written ...
        raise OSError(28, "No space left on device")  # ... then the disk "fills up"

    monkeypatch.setattr(io.writing.tifffile, "imwrite", half_then_fail)
    with pytest.raises(InputError, match="No space left") as exc:
        io.write_mask(p, np.ones((8, 8), bool))
    assert "unchanged" in exc.value.hint
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["mask.tif"]  # temp file removed

    def boom(fh, data, **kw):
        fh.write(b"partial")
        raise RuntimeError("bug")

    monkeypatch.setattr(io.writing.tifffile, "imwrite", boom)
    with pytest.raises(RuntimeError):
        io.write_tiff(p, np.ones((8, 8), np.uint8))
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["mask.tif"]


def test_write_to_read_only_folder(tmp_path, monkeypatch):
    def deny(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(__import__("tempfile"), "mkstemp", deny)
    with pytest.raises(InputError, match="Permission denied") as exc:
        io.write_mask(tmp_path / "m.tif", np.zeros((4, 4), bool))
    assert "permission" in exc.value.hint


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_write_to_read_only_folder_real(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(InputError, match="Cannot write"):
            io.write_tiff(ro / "x.tif", np.zeros((4, 4), np.uint8))
    finally:
        ro.chmod(0o700)


def test_unicode_and_space_paths(tmp_path, rng):
    folder = tmp_path / "données brutes µ"
    img = _rand(rng, (6, 7), np.uint16)
    p = io.write_tiff(folder / "Zelle Nr 1 – ß.tif", img, pixel_size=(0.5, 0.5))
    np.testing.assert_array_equal(io.read_image(p), img)
    assert io.read_stack(p, lazy=True).pixel_size == pytest.approx((0.5, 0.5))


# ------------------------------------------------------------------------------------------
# masks


@pytest.mark.parametrize(
    "values",
    [[0, 1], [0, 255], [0, 1, 255], [0], [255]],
)
def test_read_mask_accepts_binary_encodings(tmp_path, values):
    arr = np.array(values * 12, np.uint8)[:12].reshape(3, 4)
    p = tmp_path / "m.tif"
    tifffile.imwrite(p, arr)
    out = io.read_mask(p)
    assert out.dtype == np.uint8 and out.shape == (3, 4)
    np.testing.assert_array_equal(out, (arr > 0).astype(np.uint8))


def test_read_mask_bool_png_and_real_mask(tmp_path):
    from PIL import Image

    b = np.zeros((5, 6), bool)
    b[1:3, 2:5] = True
    Image.fromarray(b).save(tmp_path / "b.png")  # 1-bit PNG
    np.testing.assert_array_equal(io.read_mask(tmp_path / "b.png"), b)
    tifffile.imwrite(tmp_path / "b.tif", b)
    np.testing.assert_array_equal(io.read_mask(tmp_path / "b.tif"), b)
    rgb = np.repeat((b * 255).astype(np.uint8)[..., None], 3, axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(io.read_mask(tmp_path / "rgb.png"), b)


@pytest.mark.parametrize(
    ("arr", "hint"),
    [
        (np.arange(12, dtype=np.uint16).reshape(3, 4), "labels > 0"),  # instance labels
        (np.array([[0, 2], [2, 0]], np.uint8), "labels > 0"),
        (np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4), "threshold"),  # probabilities
    ],
)
def test_read_mask_rejects_non_binary(tmp_path, arr, hint):
    p = tmp_path / "bad.tif"
    tifffile.imwrite(p, arr)
    with pytest.raises(InputError, match="not a binary mask") as exc:
        io.read_mask(p)
    assert hint in exc.value.hint
    assert "bad.tif" in exc.value.message


def test_read_mask_rejects_colour(tmp_path, rng):
    p = tmp_path / "colour.tif"
    tifffile.imwrite(p, _rand(rng, (5, 5, 3), np.uint8), photometric="rgb")
    with pytest.raises(InputError, match="colour"):
        io.read_mask(p)


def test_to_binary_mask_float_exact_values_ok():
    out = io.to_binary_mask(np.array([0.0, 1.0, 255.0], np.float32))
    np.testing.assert_array_equal(out, [0, 1, 1])
    assert out.dtype == np.uint8


# ------------------------------------------------------------------------------------------
# image/mask pairs


def _touch_png(path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)


def test_list_pairs_mixed_extensions_and_root(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("img10", "img2", "img1"):
        tifffile.imwrite(tmp_path / "images" / f"{name}.tif", np.zeros((4, 4), np.uint8))
        _touch_png(tmp_path / "masks" / f"{name}.png")
    tifffile.imwrite(tmp_path / "images" / "x.ome.tif", np.zeros((4, 4), np.uint8))
    _touch_png(tmp_path / "masks" / "x.png")
    (tmp_path / "masks" / "README.txt").write_text("ignored")
    pairs = io.list_pairs(tmp_path)
    assert [(a.name, b.name) for a, b in pairs] == [
        ("img1.tif", "img1.png"),
        ("img2.tif", "img2.png"),
        ("img10.tif", "img10.png"),
        ("x.ome.tif", "x.png"),
    ]
    assert io.list_pairs(tmp_path / "images", tmp_path / "masks") == pairs


def test_list_pairs_missing_partner(tmp_path):
    img, msk = tmp_path / "im", tmp_path / "mk"
    img.mkdir()
    msk.mkdir()
    for i in range(8):
        _touch_png(img / f"a{i}.png")
    for i in range(1, 9):
        _touch_png(msk / f"a{i}.png")
    with pytest.raises(InputError) as exc:
        io.list_pairs(img, msk)
    msg = exc.value.message
    assert "a0" in msg and "a8" in msg and "1 image(s) without a mask" in msg


def test_list_pairs_bad_layouts(tmp_path):
    with pytest.raises(InputError, match="images/ and masks/"):
        io.list_pairs(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(InputError, match="no images"):
        io.list_pairs(tmp_path)
    _touch_png(tmp_path / "images" / "a.png")
    tifffile.imwrite(tmp_path / "images" / "a.tif", np.zeros((4, 4), np.uint8))
    _touch_png(tmp_path / "masks" / "a.png")
    with pytest.raises(InputError, match="two files"):
        io.list_pairs(tmp_path)


@pytest.mark.realdata
def test_list_pairs_real_bbbc039_val():
    root = DATA / "bbbc039" / "val"
    if not root.is_dir():
        pytest.skip(f"real data not found at {root}")
    pairs = io.list_pairs(root)
    assert len(pairs) == 50
    assert all(a.stem == b.stem and a.suffix == ".tif" and b.suffix == ".png" for a, b in pairs)
    img_path, mask_path = pairs[0]
    st = io.read_stack(img_path)
    assert st.shape == (1, 520, 696) and st.dtype == np.uint16
    mask = io.read_mask(mask_path)
    assert mask.shape == (520, 696) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1}


@pytest.mark.realdata
def test_real_dsb_rgba_png_becomes_rgb():
    folder = DATA / "dsb2018-stained" / "images"
    if not folder.is_dir():
        pytest.skip(f"real data not found at {folder}")
    first = sorted(folder.glob("*.png"))[0]
    st = io.read_stack(first)
    assert st.rgb is True and st.shape == (1, 256, 320, 3)


# ------------------------------------------------------------------------------------------
# bad input -> InputError


def test_missing_and_empty_and_unknown_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        io.read_stack(tmp_path / "nope.tif")
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        io.read_stack(empty)
    text = tmp_path / "fake.tif"
    text.write_text("hello, I am not an image")
    with pytest.raises(InputError, match="not a TIFF"):
        io.read_stack(text)
    with pytest.raises(InputError, match="not a TIFF"):
        io.read_mask(text)


def test_corrupt_tiff_header(tmp_path):
    p = tmp_path / "hdr.tif"
    p.write_bytes(b"II*\x00" + b"\xff" * 20)
    with pytest.raises(InputError, match=r"hdr\.tif"):
        io.read_stack(p)


@pytest.mark.parametrize(
    ("compression", "lazy"), [(None, False), (None, True), ("zlib", False), ("zlib", True)]
)
def test_truncated_tiff(tmp_path, rng, compression, lazy):
    p = tmp_path / "cut.tif"
    tifffile.imwrite(
        p, _rand(rng, (6, 32, 32), np.uint16), compression=compression, metadata={"axes": "ZYX"}
    )
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match=r"cut\.tif") as exc:
        io.read_stack(p, lazy=lazy)
    assert "truncat" in str(exc.value)


def test_corrupt_compressed_strip(tmp_path, rng):
    p = tmp_path / "bad strips.tif"
    tifffile.imwrite(
        p, _rand(rng, (5, 16, 16), np.uint8), compression="zlib", photometric="minisblack"
    )
    with tifffile.TiffFile(p) as tif:
        off, cnt = tif.pages[2].dataoffsets[0], tif.pages[2].databytecounts[0]
    raw = bytearray(p.read_bytes())
    raw[off : off + cnt] = b"\x55" * cnt
    p.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="decode") as exc:
        io.read_stack(p, lazy=False)
    assert "damaged" in exc.value.hint
    st = io.read_stack(p, lazy=True)
    np.asarray(st.plane(0))  # undamaged pages still read
    with pytest.raises(InputError, match="page 2"):
        st.plane(2)
    st.close()


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_absurd_declared_size(tmp_path, compression):
    p = tmp_path / "huge.tif"
    tifffile.imwrite(p, np.zeros((20, 30), np.uint8), compression=compression)
    with tifffile.TiffFile(p) as tif:
        offsets = [tif.pages[0].tags[n].valueoffset for n in ("ImageWidth", "ImageLength")]
    raw = bytearray(p.read_bytes())
    for v in offsets:  # turn the SHORT tags into LONG 2**31 - 16
        raw[v - 6 : v - 4] = struct.pack("<H", 4)
        raw[v : v + 4] = struct.pack("<I", 0x7FFFFFF0)
    p.write_bytes(bytes(raw))
    for lazy in (None, True, False):
        with pytest.raises(InputError, match=r"huge\.tif"):
            io.read_stack(p, lazy=lazy)


def test_complex_tiff_rejected(tmp_path, rng):
    p = tmp_path / "cplx.tif"
    tifffile.imwrite(p, (rng.random((5, 6)) + 1j).astype(np.complex64))
    with pytest.raises(InputError, match="complex") as exc:
        io.read_stack(p)
    assert exc.value.hint


# ------------------------------------------------------------------ second red-team pass


def test_fifo_is_refused_not_read_forever(tmp_path):
    fifo = tmp_path / "pipe.tif"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        io.read_stack(fifo)  # used to block forever in open()


@pytest.mark.parametrize("lazy", [False, True])
def test_folder_of_mixed_pixel_types_is_refused_lazy_or_not(tmp_path, lazy):
    d = tmp_path / "slices"
    d.mkdir()
    tifffile.imwrite(d / "s1.tif", np.full((8, 8), 60000, np.uint16))
    tifffile.imwrite(d / "s2.tif", np.full((8, 8), 0.75, np.float32))
    with pytest.raises(InputError, match="pixel type float32"):
        st = io.read_stack(d, lazy=lazy)
        np.asarray(st.data[1])  # lazy: used to come back cast to 0


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    from PIL import Image

    cmyk = np.zeros((40, 40, 4), np.uint8)
    cmyk[..., 3] = 230  # dark background (much black ink)
    cmyk[10:30, 10:30, 3] = 0  # a bright (white) square
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(cmyk, mode="CMYK").save(path, quality=95)
    st = io.read_stack(path)
    assert st.data.shape == (1, 40, 40, 3) and st.rgb
    assert any("CMYK" in n for n in st.notes)
    lum = np.asarray(st.data[0], np.float32).mean(axis=-1)
    assert lum[15:25, 15:25].mean() > 200 and lum[:5, :5].mean() < 60


def test_file_name_rules_are_written_once(tmp_path):
    from napari_bulbseg import io as bio

    assert bio.is_mask_name(tmp_path / "cells_mask.ome.tif")
    assert bio.is_mask_name(tmp_path / "masks" / "cells.tif")
    assert not bio.is_mask_name(tmp_path / "cells.tif")
    assert bio.prediction_names(tmp_path / "a.ome.tif") == ["a_prob.tif", "a_mask.tif"]
    assert bio.prediction_names("a.tif", write_prob=False) == ["a_mask.tif"]
    for name in ("x.tif", "x_mask.tif", "x_gt.tif", "x-mask.png", "x_pred.tif", "x_labels.tif"):
        assert bio.image_stem_of_mask(tmp_path / name) == "x", name
    assert bio.image_stem_of_mask("_mask.tif") == "_mask"  # nothing left: the name is kept
    # evaluate's pairing: exact names first, then names without a mask ending
    preds = [Path(n) for n in ("p/a_mask.tif", "p/b_pred.tif", "p/s_gt_mask.tif", "p/x.tif")]
    truths = [Path(n) for n in ("t/a_gt.tif", "t/b.tif", "t/s_gt.tif", "t/none.tif")]
    pairs, missing = bio.pair_masks(preds, truths)
    assert [(n, t.name, p.name) for n, t, p in pairs] == [
        ("a", "a_gt.tif", "a_mask.tif"),
        ("b", "b.tif", "b_pred.tif"),
        ("s", "s_gt.tif", "s_gt_mask.tif"),
    ]
    assert missing == [Path("t/none.tif")]
    (tmp_path / "out").mkdir()
    for n in ("b_prob.tif", "a_prob.tif", "a_mask.tif"):
        (tmp_path / "out" / n).write_bytes(b"")
    assert [p.name for p in bio.prob_files(tmp_path / "out")] == ["a_prob.tif", "b_prob.tif"]
