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
    [
        "usiigaci_phase/images/train_set1.tif",
        "stardist_nuclei/images/img2d.tif",
        "dsb2018/images/0121d6759c5adb290c8e828fc882f37dfaf3663ec885c663859948c154a443ed.png",
    ],
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


def _with_non_finite(image: np.ndarray, case: str) -> tuple[np.ndarray, np.ndarray]:
    """A copy of ``image`` with NaN/inf values at fixed random places, and their mask."""
    bad = image.copy()
    rng = np.random.default_rng(4)
    n = 12 if case == "several" else 1
    ys, xs = rng.integers(0, image.shape[0], n), rng.integers(0, image.shape[1], n)
    values = [np.nan, np.inf, -np.inf] * 4 if case == "several" else [float(case)]
    bad[ys, xs] = np.array(values[:n], np.float32)
    return bad, ~np.isfinite(bad)


@pytest.mark.parametrize("case", ["nan", "-inf", "+inf", "several"])
def test_non_finite_values_are_background_and_out_of_the_statistics(data_dir, case):
    """One NaN used to invert the normalisation of a float image and one -inf to blank
    it. Now they are left out of the statistics and normalised to 0; everything else
    is normalised as in the clean image, whole or tile by tile."""
    clean = (
        read_image(str(data_dir / "stardist_nuclei/images/img2d.tif")).astype(np.float32) / 1000.0
    )
    bad, missing = _with_non_finite(clean, case)
    stats = intensity_stats(bad)
    finite = bad[~missing]
    nz = finite[finite != 0]
    assert stats.non_finite == int(missing.sum())
    assert (stats.lo, stats.hi) == tuple(np.percentile(nz, [0, 99.5]))
    assert (stats.vmin, stats.vmax) == (finite.min(), finite.max())
    out, ref = normalize(bad), normalize(clean)
    assert np.isfinite(out).all() and out.min() == 0.0 and out.max() == 1.0
    assert not out[:, missing].any()
    # leaving a few of 262,144 values out moves the 99.5th percentile by a hair: a value
    # near a uint8 step may move by one step
    diff = np.abs(out - ref)[:, ~missing]
    assert diff.max() <= 1.01 / 255 and (diff > 0).mean() < 0.001
    # the slide pipeline's way: tiles measured by separate accumulators, then merged
    parts = [IntensityAccumulator(), IntensityAccumulator()]
    tiles = [(y, x) for y in range(0, bad.shape[0], 97) for x in range(0, bad.shape[1], 131)]
    for i, (y, x) in enumerate(tiles):
        parts[i % 2].update(bad[y : y + 97, x : x + 131])
    parts[0].merge(parts[1])
    assert parts[0].stats() == stats
    for y, x in tiles:
        np.testing.assert_array_equal(
            normalize(bad[y : y + 97, x : x + 131], stats), out[:, y : y + 97, x : x + 131]
        )


def test_image_of_only_non_finite_and_zero_values_is_blank():
    image = np.zeros((8, 9), np.float32)
    image[2, 3], image[4, 4] = np.nan, np.inf
    stats = intensity_stats(image)
    assert stats.blank and stats.non_finite == 2
    assert not normalize(image).any() and np.isfinite(normalize(image)).all()
