"""Processing resolution on the real SVS: tile-exact resampling, level choice on a real
pyramid, per-slide pixel sizes."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from mediar_ray.scale import (
    choose_level,
    load_mpp_table,
    lookup_mpp,
    processing_shape,
    processing_transform,
    read_resampled,
    slide_mpp,
    thumbnail_level,
)
from mediar_ray.sources import SlideSource, open_slide

SVS = "slides/CMU-1-Small-Region.svs"


class LoggedSource(SlideSource):
    """A real slide whose region reads are recorded (to check what a resample reads)."""

    def __init__(self, source: SlideSource) -> None:
        self.source, self.reads = source, []
        self.url, self.levels = source.url, source.levels
        self.channels, self.dtype, self.mpp = source.channels, source.dtype, source.mpp

    def read_region(self, level, y0, y1, x0, x1):
        self.reads.append((level, y0, y1, x0, x1))
        return self.source.read_region(level, y0, y1, x0, x1)


@pytest.fixture(scope="module")
def svs(data_dir):
    with open_slide(str(data_dir / SVS)) as source:
        yield source


def whole_image(source, level, scale):
    """The whole processing image in one read."""
    h, w = processing_shape(source.levels[level].shape, scale)
    return read_resampled(source, level, scale, 0, h, 0, w)


def tiled(source, level, scale, tile):
    """The processing image assembled from tiles of ``tile`` px, each read on its own."""
    h, w = processing_shape(source.levels[level].shape, scale)
    out = np.zeros((h, w, source.channels), source.dtype)
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            out[y0:y1, x0:x1] = read_resampled(source, level, scale, y0, y1, x0, x1)
    return out


@pytest.mark.parametrize(
    "scale, tile", [(2.0, 317), (3.0, 200), (1.37, 301), (2.5, 256), (0.7, 613)]
)
def test_tiles_equal_the_whole_resample_bit_for_bit(svs, scale, tile):
    h, w = processing_shape(svs.shape, scale)
    whole = read_resampled(svs, 0, scale, 0, h, 0, w)
    assert whole.shape == (h, w, 3) and whole.dtype == np.uint8
    np.testing.assert_array_equal(tiled(svs, 0, scale, tile), whole)
    # Overlapping regions at odd offsets (a halo read by the engine) agree too.
    rng = np.random.default_rng(int(scale * 100))
    for _ in range(5):
        y0, x0 = int(rng.integers(0, h - 40)), int(rng.integers(0, w - 40))
        y1 = int(rng.integers(y0 + 1, min(y0 + 400, h) + 1))
        x1 = int(rng.integers(x0 + 1, min(x0 + 400, w) + 1))
        np.testing.assert_array_equal(
            read_resampled(svs, 0, scale, y0, y1, x0, x1), whole[y0:y1, x0:x1]
        )


def test_area_downsampling_by_two_is_block_means(svs):
    level0 = svs.read_region(0, 0, svs.shape[0], 0, svs.shape[1]).astype(np.float64)
    h, w = processing_shape(svs.shape, 2.0)
    assert (h, w) == (-(-svs.shape[0] // 2), -(-svs.shape[1] // 2))  # nothing left out
    out = read_resampled(svs, 0, 2.0, 0, h, 0, w)
    eh, ew = svs.shape[0] // 2, svs.shape[1] // 2
    blocks = level0[: 2 * eh, : 2 * ew].reshape(eh, 2, ew, 2, 3).mean(axis=(1, 3))
    np.testing.assert_array_equal(out[:eh, :ew], np.rint(blocks).astype(np.uint8))
    assert svs.shape[0] % 2 == 1  # 2967 rows: the last output row covers one level row
    edge = level0[-1, : 2 * ew].reshape(ew, 2, 3).mean(axis=1)
    np.testing.assert_array_equal(out[-1, :ew], np.rint(edge).astype(np.uint8))


@pytest.mark.parametrize("scale", [2.0, 1.37, 0.7])
def test_a_region_reads_only_its_footprint(svs, scale):
    logged = LoggedSource(svs)
    y0, y1, x0, x1 = 300, 420, 500, 700
    read_resampled(logged, 0, scale, y0, y1, x0, x1)
    assert len(logged.reads) == 1
    _, ry0, ry1, rx0, rx1 = logged.reads[0]
    # The footprint [y0 * s, y1 * s), plus one pixel of bilinear support each side.
    assert y0 * scale - 1 <= ry0 and ry1 <= y1 * scale + 2
    assert x0 * scale - 1 <= rx0 and rx1 <= x1 * scale + 2


def test_scale_one_reads_the_level_unchanged(svs):
    np.testing.assert_array_equal(
        read_resampled(svs, 0, 1.0, 10, 90, 20, 70), svs.read_region(0, 10, 90, 20, 70)
    )


@pytest.fixture(scope="module")
def pyramid(svs, tmp_path_factory):
    """The real SVS as a tiled pyramidal OME-TIFF (3 levels in SubIFDs, 0.25 um/px),
    its coarser levels area-averaged from level 0."""
    path = tmp_path_factory.mktemp("pyramid") / "cmu1_pyramid.ome.tif"
    levels = [whole_image(svs, 0, s) for s in (1.0, 2.0, 4.0)]
    mpp = 0.25
    options = dict(
        tile=(256, 256), photometric="rgb", compression="zlib", resolutionunit="CENTIMETER"
    )
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(
            levels[0],
            subifds=len(levels) - 1,
            resolution=(1e4 / mpp, 1e4 / mpp),
            metadata={
                "axes": "YXS",
                "PhysicalSizeX": mpp,
                "PhysicalSizeY": mpp,
                "PhysicalSizeXUnit": "µm",
                "PhysicalSizeYUnit": "µm",
            },
            **options,
        )
        for k, data in enumerate(levels[1:], start=1):
            px = mpp * 2**k
            tif.write(data, subfiletype=1, resolution=(1e4 / px, 1e4 / px), **options)
    return str(path), levels


def test_choose_level_on_a_real_pyramid(pyramid, tmp_path):
    path, written = pyramid
    table_csv = tmp_path / "mpp.csv"
    table_csv.write_text("slide,mpp\ncmu1_pyramid.ome.tif,0.25\n")
    with open_slide(path) as source:
        assert [lv.shape for lv in source.levels] == [a.shape[:2] for a in written]
        assert slide_mpp(source, path, None, None) == (0.25, 0.25)  # the OME metadata
        mpp0 = slide_mpp(source, path, None, load_mpp_table(str(table_csv)))
        assert mpp0 == (0.25, 0.25)
        ds1, ds2 = source.levels[1].downsample, source.levels[2].downsample
        assert ds1 != (2.0, 2.0)  # 2967 rows -> 1484: the real pyramid is not exact
        levels = source.levels
        assert choose_level(levels, mpp0, None) == (0, 1.0)
        assert choose_level(levels, mpp0, 0.25) == (0, 1.0)
        assert choose_level(levels, mpp0, 0.5) == (1, 1.0)  # 0.49992 um: no resampling pass
        assert choose_level(levels, mpp0, 0.995) == (2, 1.0)  # level 2 within 1% of it
        level, scale = choose_level(levels, mpp0, 0.98)  # level 2 would be 2% coarser
        assert level == 1 and scale == pytest.approx(0.98 / (0.125 * sum(ds1)))
        level, scale = choose_level(levels, mpp0, 0.6)
        assert level == 1 and scale == pytest.approx(0.6 / (0.125 * sum(ds1)))
        level, scale = choose_level(levels, mpp0, 3.0)
        assert level == 2 and scale == pytest.approx(3.0 / (0.125 * sum(ds2)))
        assert choose_level(levels, mpp0, 0.2) == (0, pytest.approx(0.8))  # upsampling

        # Reading level 1 at 0.6 um/px tiles exactly, and shows what level 0 at 0.6 um/px
        # shows (same grid, same place: only the averaging differs).
        level, scale = choose_level(levels, mpp0, 0.6)
        h, w = processing_shape(levels[level].shape, scale)
        whole = read_resampled(source, level, scale, 0, h, 0, w)
        np.testing.assert_array_equal(tiled(source, level, scale, 250), whole)
        direct = read_resampled(source, 0, 0.6 / 0.25, 0, h, 0, w)
        assert processing_shape(levels[0].shape, 2.4) == (h, w)
        # Aligned: no one-pixel shift brings the two anywhere near as close as no shift.
        core = direct[1:-1, 1:-1].astype(float)
        diff = {
            (dy, dx): np.abs(whole[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx] - core).mean()
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        }
        others = min(v for k, v in diff.items() if k != (0, 0))
        assert diff[0, 0] < 0.5 * others  # a half-pixel offset would not pass this
        # The tissue thumbnail of a level-0 run at 16x: read from level 2, 4x more.
        k, s = thumbnail_level(levels, 0, 1.0, 16.0)
        assert k == 2 and s == pytest.approx(16 / np.mean(ds2))
        th, tw = processing_shape(levels[k].shape, s)
        assert abs(th - levels[0].shape[0] / 16) <= 1 and abs(tw - levels[0].shape[1] / 16) <= 1
        t = processing_transform(mpp0, levels[level], scale)
        assert t["scale"] == pytest.approx([0.6 * d / np.mean(ds1) for d in ds1])


def test_unknown_pixel_size_with_a_target_is_a_clear_error():
    from mediar_ray.sources import Level

    levels = [Level((100, 100), (1.0, 1.0))]
    with pytest.raises(ValueError, match=r"s3://lab/a\.svs: .*unknown.*--mpp.*slide,mpp"):
        choose_level(levels, None, 0.5, slide="s3://KEY:SECRET@lab/a.svs")
    try:
        choose_level(levels, None, 0.5, slide="s3://KEY:SECRET@lab/a.svs")
    except ValueError as err:
        assert "SECRET" not in str(err)


def test_mpp_table_matches_and_precedence(svs, data_dir, tmp_path):
    csv_path = tmp_path / "mpp.csv"
    csv_path.write_text(
        "slide,mpp\n"
        "CMU-1-Small-Region,0.499\n"
        "\n# a comment\n"
        "s3://bucket/other/slide_b.ome.tif,0.25\n"
        "slide_c.ndpi, 0.23\n"
    )
    table = load_mpp_table(str(csv_path))
    assert table == {
        "CMU-1-Small-Region": 0.499,
        "s3://bucket/other/slide_b.ome.tif": 0.25,
        "slide_c.ndpi": 0.23,
    }
    assert lookup_mpp(table, str(data_dir / SVS)) == 0.499  # name without extension
    assert lookup_mpp(table, "s3://bucket/other/slide_b.ome.tif") == 0.25  # full URL
    assert lookup_mpp(table, "s3://elsewhere/slide_b.ome.tif") is None
    assert lookup_mpp(table, "gs://x/y/slide_c.ndpi") == 0.23  # file name
    url = str(data_dir / SVS)
    assert slide_mpp(svs, url, 0.3, table) == (0.3, 0.3)  # --mpp wins
    assert slide_mpp(svs, url, None, table) == (0.499, 0.499)  # then the table
    expected = None if svs.mpp is None else tuple(svs.mpp)  # then the file's metadata
    assert slide_mpp(svs, url, None, {}) == expected


@pytest.mark.parametrize(
    "text, line, what",
    [
        ("slide,mpp\na.svs,0.5\nb.svs\n", 3, "two columns"),
        ("a.svs,0.5\nb.svs,-1\n", 2, "positive"),
        ("a.svs,0.5\nb.svs,abc\n", 2, "positive"),
        ("a.svs,0.5\na.svs,0.4\n", 2, "twice"),
    ],
)
def test_bad_mpp_table_rows_name_file_and_line(tmp_path, text, line, what):
    path = tmp_path / "table.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"table\.csv, line {line}: .*{what}"):
        load_mpp_table(str(path))
    with pytest.raises(ValueError, match="missing.csv: pixel-size table not found"):
        load_mpp_table(str(tmp_path / "missing.csv"))
