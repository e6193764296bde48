"""Prediction preprocessing against the original, and its tile-by-tile form."""

from __future__ import annotations

import numpy as np
import pytest

from mediar_ray.io import read_image
from mediar_ray.preprocess import IntensityAccumulator, intensity_stats, normalize

FIXTURE_IMAGES = ["phase_gray_uint16", "tissue_rgb_uint8"]


@pytest.mark.parametrize("name", FIXTURE_IMAGES)
def test_normalize_matches_original(ref_dir, name):
    out = normalize(read_image(str(ref_dir / f"{name}.tif")))
    ref = np.load(ref_dir / f"{name}.preprocessed.npy")
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize(
    "path",
    ["usiigaci_phase/images/train_set1.tif", "stardist_nuclei/images/img2d.tif",
     "dsb2018/images/0121d6759c5adb290c8e828fc882f37dfaf3663ec885c663859948c154a443ed.png"],
)
def test_tilewise_normalisation_equals_whole_image(data_dir, path):
    image = read_image(str(data_dir / path))
    whole = normalize(image)
    acc = IntensityAccumulator()
    tiles = [(y, x) for y in range(0, image.shape[0], 97) for x in range(0, image.shape[1], 131)]
    for y, x in tiles:
        acc.update(image[y : y + 97, x : x + 131])
    stats = acc.stats()
    assert stats == intensity_stats(image)
    nz = image[image != 0].astype(np.float32)
    assert stats.lo == np.percentile(nz, 0) and stats.hi == np.percentile(nz, 99.5)
    for y, x in tiles[:: max(len(tiles) // 7, 1)]:
        tile = normalize(image[y : y + 97, x : x + 131], stats)
        np.testing.assert_array_equal(tile, whole[:, y : y + 97, x : x + 131])


def test_percentiles_of_unusual_distributions():
    rng = np.random.default_rng(0)
    for values in (rng.integers(0, 3, 1001), rng.integers(0, 65535, 5000), np.array([7])):
        image = values.astype(np.uint16).reshape(1, -1)
        stats = intensity_stats(image)
        nz = values[values != 0].astype(np.float32)
        if nz.size:
            assert (stats.lo, stats.hi) == tuple(np.percentile(nz, [0, 99.5]))


def test_blank_image_normalises_to_zeros():
    out = normalize(np.zeros((40, 50), np.uint16))
    assert out.shape == (3, 40, 50) and not out.any()


def test_float_image_uses_nonzero_percentiles():
    rng = np.random.default_rng(1)
    image = rng.normal(100, 10, (64, 64)).astype(np.float32)
    out = normalize(image)
    assert out.shape == (3, 64, 64) and out.min() == 0.0 and out.max() == 1.0
