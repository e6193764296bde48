"""Slide readers on real data: the SVS through tifffile and OpenSlide, TIFF pyramids with
real downsamples, tiles missing from a file, alpha channels, pixel size from metadata
(issue 17), the single-image formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from mediar_ray.io import read_image
from mediar_ray.sources import READERS, SlideReadError, open_slide
from mediar_ray.sources.base import composite_alpha

SVS = "slides/CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def svs_pixels(data_dir):
    return read_image(str(data_dir / SVS))


def random_regions(shape, n, seed, max_side=700):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        h, w = rng.integers(1, max_side, size=2)
        y0, x0 = rng.integers(0, shape[0] - h), rng.integers(0, shape[1] - w)
        yield int(y0), int(y0 + h), int(x0), int(x0 + w)


def test_svs_through_tifffile_and_openslide_gives_identical_pixels(data_dir, svs_pixels):
    path = str(data_dir / SVS)
    with open_slide(path, "tifffile") as tf, open_slide(path, "openslide") as osl:
        assert (tf.reader, osl.reader) == ("tifffile", "openslide")
        for src in (tf, osl):
            assert src.shape == (2967, 2220) and src.channels == 3 and src.dtype == np.uint8
            assert len(src.levels) == 1 and src.levels[0].downsample == (1.0, 1.0)
            assert src.mpp == pytest.approx((0.499, 0.499))
        for y0, y1, x0, x1 in random_regions(tf.shape, 25, seed=0):
            a, b = tf.read_region(0, y0, y1, x0, x1), osl.read_region(0, y0, y1, x0, x1)
            assert a.shape == (y1 - y0, x1 - x0, 3)
            np.testing.assert_array_equal(a, b)
        # the whole level 0 too, and both equal tifffile's whole-image decode
        np.testing.assert_array_equal(osl.read_region(0, 0, 2967, 0, 2220), svs_pixels)
        np.testing.assert_array_equal(tf[0:2967, 0:2220], svs_pixels)


def test_auto_reader_picks_tifffile_for_svs(data_dir):
    with open_slide(str(data_dir / SVS)) as src:
        assert src.reader == "tifffile"


def write_pyramid(path, image, levels=3, **level0_kwargs):
    """A tiled JPEG pyramid in the main IFD chain (as vips and scanners write it): level k
    is level k-1 subsampled 2x, odd sizes rounded up."""
    pyramid = [image]
    for _ in range(levels - 1):
        pyramid.append(pyramid[-1][::2, ::2])
    with tifffile.TiffWriter(path) as tw:
        for k, level in enumerate(pyramid):
            tw.write(
                level,
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 95},
                subfiletype=1 if k else 0,
                **(level0_kwargs if k == 0 else {}),
            )
    return pyramid


def test_tiff_pyramid_levels_have_their_real_downsamples(data_dir, svs_pixels, tmp_path):
    path = tmp_path / "pyramid.tif"
    write_pyramid(
        path,
        svs_pixels,
        levels=3,
        resolution=(1e4 / 0.499, 1e4 / 0.499),
        resolutionunit="CENTIMETER",
    )
    with open_slide(str(path)) as tf, open_slide(str(path), "openslide") as osl:
        assert [lv.shape for lv in tf.levels] == [(2967, 2220), (1484, 1110), (742, 555)]
        assert tf.levels[1].downsample == (2967 / 1484, 2.0)
        assert tf.levels[2].downsample == (2967 / 742, 2220 / 555)
        assert [lv.shape for lv in osl.levels] == [lv.shape for lv in tf.levels]
        assert tf.mpp == pytest.approx((0.499, 0.499)) and osl.mpp == pytest.approx(tf.mpp)
        # each level is read from its own pages: level 2 equals the image written there
        # (decoded by tifffile's whole-page reader) and OpenSlide agrees at every level 0
        # pixel and at coarser levels up to JPEG decoder rounding
        with tifffile.TiffFile(path) as tif:
            level2 = tif.series[0].levels[2].asarray()
        np.testing.assert_array_equal(tf.read_region(2, 100, 300, 50, 400), level2[100:300, 50:400])
        for y0, y1, x0, x1 in random_regions(tf.shape, 5, seed=1, max_side=400):
            np.testing.assert_array_equal(
                tf.read_region(0, y0, y1, x0, x1), osl.read_region(0, y0, y1, x0, x1)
            )
        a = tf.read_region(1, 200, 600, 100, 500).astype(int)
        b = osl.read_region(1, 200, 600, 100, 500).astype(int)
        assert np.abs(a - b).mean() < 1.0


def test_tiles_missing_from_a_tiff_read_white_in_both_readers(data_dir, svs_pixels, tmp_path):
    """A scanner leaves tiles it did not scan out of the file (offset and byte count 0):
    OpenSlide shows them transparent, tifffile would fill them with 0; both must come out
    white, never black."""
    path = tmp_path / "sparse.tif"
    image = np.ascontiguousarray(svs_pixels[:768, :768])
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="zlib")
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[0]
        for name in ("TileOffsets", "TileByteCounts"):
            values = list(page.tags[name].value)
            values[4] = 0  # the middle tile of the 3 x 3 grid
            page.tags[name].overwrite(tuple(values))
    expected = image.copy()
    expected[256:512, 256:512] = 255
    for reader in ("tifffile", "openslide"):
        with open_slide(str(path), reader) as src:
            np.testing.assert_array_equal(src.read_region(0, 0, 768, 0, 768), expected)


def test_rgba_is_composited_onto_white(data_dir, tmp_path):
    """Real RGBA PNG (DSB2018, alpha constant 255): alpha cleared over a block, written as
    PNG and as a TIFF with unassociated alpha; the block comes out white, the rest the
    RGB pixels unchanged."""
    png = sorted((data_dir / "dsb2018/images").glob("*.png"))[0]
    rgba = np.asarray(Image.open(png))
    assert rgba.ndim == 3 and rgba.shape[2] == 4 and (rgba[..., 3] == 255).all()
    rgba = rgba.copy()
    rgba[10:60, 20:90, 3] = 0
    rgba[70:80, 20:90, 3] = 128
    Image.fromarray(rgba).save(tmp_path / "a.png")
    tifffile.imwrite(
        tmp_path / "a.tif", rgba, photometric="rgb", extrasamples=["unassalpha"], tile=(64, 64)
    )
    expected = rgba[..., :3].copy()
    expected[10:60, 20:90] = 255
    half = rgba[70:80, 20:90, :3] * (128 / 255) + 255 * (127 / 255)
    for name, reader in (("a.png", "pillow"), ("a.tif", "tifffile")):
        with open_slide(str(tmp_path / name)) as src:
            assert src.reader == reader and src.channels == 3
            out = src.read_region(0, 0, src.shape[0], 0, src.shape[1])
            np.testing.assert_allclose(out[70:80, 20:90], half, atol=0.51)
            out[70:80, 20:90] = expected[70:80, 20:90]
            np.testing.assert_array_equal(out, expected)


def test_composite_alpha_over_a_background_colour():
    rgba = np.array([[[10, 20, 30, 255], [0, 0, 0, 0], [200, 100, 50, 51]]], np.uint8)
    out = composite_alpha(rgba, background=(240, 230, 220))
    a = 51 / 255
    np.testing.assert_array_equal(
        out,
        [
            [
                [10, 20, 30],
                [240, 230, 220],
                np.rint(np.array([200, 100, 50]) * a + np.array([240, 230, 220]) * (1 - a)),
            ]
        ],
    )
    premultiplied = composite_alpha(np.array([[[100, 50, 0, 128]]], np.uint8), premultiplied=True)
    np.testing.assert_array_equal(premultiplied, [[[100 + 127, 50 + 127, 0 + 127]]])


def test_channels_first_ome_tiff_grey_tiff_and_png(tmp_path, data_dir):
    nuclei = read_image(str(data_dir / "stardist_nuclei/images/img2d.tif"))
    cyx = np.stack([nuclei, nuclei[::-1]])
    tifffile.imwrite(tmp_path / "c.ome.tif", cyx, metadata={"axes": "CYX"}, ome=True)
    with open_slide(str(tmp_path / "c.ome.tif")) as src:
        assert src.shape == nuclei.shape and src.channels == 2 and src.dtype == nuclei.dtype
        np.testing.assert_array_equal(src[5:90, 10:200], np.moveaxis(cyx, 0, -1)[5:90, 10:200])
    tifffile.imwrite(tmp_path / "g.tif", nuclei, tile=(128, 128))
    with open_slide(str(tmp_path / "g.tif")) as src:
        assert src.channels == 1
        np.testing.assert_array_equal(src.read_region(0, 100, 300, 7, 333), nuclei[100:300, 7:333])
    rgb = np.asarray(Image.open(sorted((data_dir / "nuinsseg/images").glob("*.png"))[0]))
    Image.fromarray(rgb).save(tmp_path / "x.png")
    with open_slide(str(tmp_path / "x.png")) as src:
        assert src.reader == "pillow" and src.shape == rgb.shape[:2] and src.channels == 3
        np.testing.assert_array_equal(src[3:70, 4:90], rgb[3:70, 4:90])


def test_a_region_outside_the_level_is_refused(data_dir):
    with open_slide(str(data_dir / SVS)) as src:
        with pytest.raises(IndexError, match="outside level 0"):
            src.read_region(0, 2900, 3000, 0, 10)
        with pytest.raises(IndexError, match="1 level"):
            src.read_region(1, 0, 1, 0, 1)


def test_unknown_reader_is_refused(data_dir):
    with pytest.raises(ValueError, match="unknown slide reader 'bioformats'"):
        open_slide(str(data_dir / SVS), "bioformats")
    assert set(READERS) == {"auto", "tifffile", "openslide", "wsidicom", "ome-zarr", "pillow"}


# ---- pixel size from metadata (issue 17, must-show 3) ------------------------------------


def test_pixel_size_of_the_svs(data_dir):
    for reader in ("tifffile", "openslide"):
        with open_slide(str(data_dir / SVS), reader) as src:
            assert src.mpp == pytest.approx((0.499, 0.499), abs=1e-9)


@pytest.mark.parametrize(
    "size,unit,um", [(0.25, "µm", 0.25), (250, "nm", 0.25), (0.0005, "mm", 0.5)]
)
def test_pixel_size_of_an_ome_tiff_with_units(tmp_path, data_dir, size, unit, um):
    nuclei = read_image(str(data_dir / "stardist_nuclei/images/img2d.tif"))
    path = tmp_path / "p.ome.tif"
    tifffile.imwrite(
        path,
        nuclei,
        ome=True,
        metadata={
            "axes": "YX",
            "PhysicalSizeX": size,
            "PhysicalSizeXUnit": unit,
            "PhysicalSizeY": 2 * size,
            "PhysicalSizeYUnit": unit,
        },
    )
    with open_slide(str(path)) as src:
        assert src.mpp == pytest.approx((2 * um, um))


@pytest.mark.parametrize(
    "unit,per_unit,um", [("INCH", 50800.0, 0.5), ("CENTIMETER", 40000.0, 0.25)]
)
def test_pixel_size_of_a_tiff_with_resolution_tags(tmp_path, data_dir, unit, per_unit, um):
    nuclei = read_image(str(data_dir / "stardist_nuclei/images/img2d.tif"))
    path = tmp_path / "r.tif"
    tifffile.imwrite(path, nuclei, resolution=(per_unit, per_unit / 2), resolutionunit=unit)
    with open_slide(str(path)) as src:
        assert src.mpp == pytest.approx((2 * um, um))  # (y, x): YResolution is half


def test_pixel_size_of_an_imagej_tiff(tmp_path, data_dir):
    nuclei = read_image(str(data_dir / "stardist_nuclei/images/img2d.tif"))
    path = tmp_path / "ij.tif"
    tifffile.imwrite(
        path, nuclei, imagej=True, resolution=(1 / 0.325, 1 / 0.325), metadata={"unit": "micron"}
    )
    with open_slide(str(path)) as src:
        assert src.mpp == pytest.approx((0.325, 0.325))


def test_pixel_size_is_none_when_the_file_does_not_say(tmp_path, data_dir):
    nuclei = read_image(str(data_dir / "stardist_nuclei/images/img2d.tif"))
    tifffile.imwrite(tmp_path / "plain.tif", nuclei)  # resolution tags 1/1, unit none
    tifffile.imwrite(tmp_path / "dpi72.tif", nuclei, resolution=(72, 72), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "plain.ome.tif", nuclei, ome=True, metadata={"axes": "YX"})
    Image.fromarray(nuclei.astype(np.uint8)).save(tmp_path / "plain.png")
    for name in ("plain.tif", "dpi72.tif", "plain.ome.tif", "plain.png"):
        with open_slide(str(tmp_path / name)) as src:
            assert src.mpp is None, name
    # a PNG that states its density (pHYs) does have a pixel size
    Image.fromarray(nuclei.astype(np.uint8)).save(tmp_path / "dense.png", dpi=(25400, 25400))
    with open_slide(str(tmp_path / "dense.png")) as src:
        assert src.mpp == pytest.approx((1.0, 1.0), rel=1e-3)


def bad_files(folder: Path, data_dir: Path) -> dict[str, Path]:
    """A corrupt or unsupported input of every format; returns file name -> path."""
    folder.mkdir()
    svs = (data_dir / SVS).read_bytes()
    made = {}
    made["._CMU-1.svs"] = folder / "._CMU-1.svs"  # macOS AppleDouble metadata
    made["._CMU-1.svs"].write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"\x00" * 500)
    made["cut.svs"] = folder / "cut.svs"  # truncated: tiles beyond the end
    made["cut.svs"].write_bytes(svs[: len(svs) // 3])
    made["fake.ndpi"] = folder / "fake.ndpi"  # TIFF header, nothing behind it
    made["fake.ndpi"].write_bytes(b"II*\x00\x08\x00\x00\x00" + b"\xff" * 100)
    made["fake.mrxs"] = folder / "fake.mrxs"
    made["fake.mrxs"].write_text("[GENERAL]\nno slide here\n")
    made["broken.png"] = folder / "broken.png"
    png = sorted((data_dir / "nuinsseg/images").glob("*.png"))[0].read_bytes()
    made["broken.png"].write_bytes(png[: len(png) // 2])
    made["bad_dicom"] = folder / "bad_dicom"
    made["bad_dicom"].mkdir()
    (made["bad_dicom"] / "x.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x01" * 200)
    made["bad.zarr"] = folder / "bad.zarr"
    zarr.open_group(str(made["bad.zarr"]), mode="w", zarr_format=3).attrs["note"] = "no image"
    made["zstack.zarr"] = folder / "zstack.zarr"
    group = zarr.open_group(str(made["zstack.zarr"]), mode="w", zarr_format=3)
    group.create_array("0", shape=(4, 32, 32), dtype="uint8")
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [
                    {"name": "z", "type": "space"},
                    {"name": "y", "type": "space"},
                    {"name": "x", "type": "space"},
                ],
                "datasets": [{"path": "0"}],
            }
        ],
    }
    return made


def test_corrupt_or_unsupported_files_of_every_format_name_themselves(data_dir, tmp_path):
    for name, path in bad_files(tmp_path / "bad", data_dir).items():
        with pytest.raises(SlideReadError) as err:
            with open_slide(str(path)) as src:  # some fail when opened, some when read
                src.read_region(0, 0, src.shape[0], 0, src.shape[1])
        assert name in str(err.value) and str(err.value).count("\n") == 0


def test_a_file_that_is_no_image_names_itself(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 10)
    with pytest.raises(SlideReadError, match="not a slide/image: .*broken.svs"):
        open_slide(str(bad))
