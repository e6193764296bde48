"""Region reads of slides: SVS level 0, channels-first OME-TIFF, grey TIFF, PNG."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from mediar_ray.io import ImageReadError, read_image
from mediar_ray.pipeline.source import SlideReader


def test_svs_regions_equal_the_whole_level(data_dir):
    path = str(data_dir / "slides/CMU-1-Small-Region.svs")
    whole = read_image(path)
    with SlideReader(path) as reader:
        assert reader.shape == (2967, 2220) and reader.channels == 3
        np.testing.assert_array_equal(reader[1000:1300, 700:1100], whole[1000:1300, 700:1100])


def test_channels_first_ome_tiff_and_png(tmp_path):
    cyx = np.random.default_rng(0).random((2, 40, 50)).astype(np.float32)
    tifffile.imwrite(tmp_path / "c.ome.tif", cyx, metadata={"axes": "CYX"}, ome=True)
    with SlideReader(str(tmp_path / "c.ome.tif")) as reader:
        assert reader.shape == (40, 50) and reader.channels == 2
        np.testing.assert_array_equal(reader[5:9, 10:20], np.moveaxis(cyx, 0, -1)[5:9, 10:20])
    rgb = (np.random.default_rng(1).random((30, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    with SlideReader(str(tmp_path / "x.png")) as reader:
        assert reader.shape == (30, 40) and reader.channels == 3
        np.testing.assert_array_equal(reader[3:7, 4:9], rgb[3:7, 4:9])


def test_unreadable_slide_names_the_file(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 10)
    with pytest.raises(ImageReadError, match="broken.svs"):
        SlideReader(str(bad))
