"""MEDIAR's augmentations on real label images: alignment, flows, cell-aware, borders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage.segmentation import find_boundaries

from mediar_ray.data import transforms as T
from mediar_ray.dynamics import labels_to_flows
from mediar_ray.io import read_image
from mediar_ray.preprocess import normalize
from mediar_ray.train.config import AugmentSection

pytestmark = pytest.mark.usefixtures("single_threaded")

NO_INTENSITY = {
    "cell_aware_p": 0.0,
    "noise_p": 0.0,
    "contrast_p": 0.0,
    "smooth_p": 0.0,
    "hist_shift_p": 0.0,
    "sharpen_p": 0.0,
}


def _stem_pair(data_dir: Path, source: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    labels = sorted((data_dir / source / "labels").glob("*_label.tiff"))[index]
    stem = labels.name[: -len("_label.tiff")]
    image = next((data_dir / source / "images").glob(stem + ".*"))
    return read_image(str(image)), read_image(str(labels)).astype(np.int64)


@pytest.fixture(scope="module")
def real(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """A real DSB2018 fluorescence pair, cut to 160 x 200 so flows are quick."""
    image, labels = _stem_pair(data_dir, "dsb2018", 3)
    assert labels.max() > 50
    return image[:160, :200], labels[:160, :200]


def _rot_flows(flows: np.ndarray, k: int) -> np.ndarray:
    """Flows of np.rot90(labels, k): each 90-degree turn (rows to columns) moves the
    image and maps the vector (dy, dx) to (-dx, dy)."""
    for _ in range(k % 4):
        dy, dx = np.rot90(flows[0]), np.rot90(flows[1])
        flows = np.stack([-dx, dy])
    return flows


def _flip_flows(flows: np.ndarray, axis: int) -> np.ndarray:
    """Flows of np.flip(labels, axis): flipped, and the component along axis negated."""
    out = np.stack([np.flip(flows[0], axis), np.flip(flows[1], axis)])
    out[axis] *= -1
    return out


def _assert_flows_match(actual: np.ndarray, expected: np.ndarray, labels: np.ndarray) -> None:
    """Recomputed flows equal the transformed ones, up to the few cells whose centre
    pixel is a tie (the pixel nearest the median may become its mirror twin) and float
    rounding of the diffusion far from the centre: >= 95 % of cell pixels agree to 0.1,
    and the mean cosine over all cell pixels is > 0.99."""
    cells = labels > 0
    err = np.abs(actual - expected).max(axis=0)[cells]
    cos = (actual * expected).sum(axis=0)[cells]
    assert (err < 0.1).mean() >= 0.95, (err < 0.1).mean()
    assert cos.mean() > 0.99, cos.mean()


# Each spatial transform's possible outcomes: name -> (labels op, image op, flows op).
SPATIAL = {
    "flip": (
        T.axis_flip,
        {
            f"axis{a}": (
                lambda lab, a=a: np.flip(lab, a),
                lambda img, a=a: np.flip(img, a + 1),
                lambda fl, a=a: _flip_flows(fl, a),
            )
            for a in (0, 1)
        },
    ),
    "rot90": (
        T.rotate90,
        {
            f"k{k}": (
                lambda lab, k=k: np.rot90(lab, k),
                lambda img, k=k: np.rot90(img, k, axes=(1, 2)),
                lambda fl, k=k: _rot_flows(fl, k),
            )
            for k in (1, 2, 3)
        },
    ),
}


@pytest.mark.parametrize("name", sorted(SPATIAL))
def test_spatial_transform_flows_equal_transformed_flows(real, name: str) -> None:
    """Over seeded draws every outcome of the transform occurs; the image moves with
    the labels, and flows recomputed from the moved labels equal the original flows
    moved the same way (vectors flipped/rotated too)."""
    image, labels = real
    img = normalize(image)
    flows = labels_to_flows(labels)
    transform, outcomes = SPATIAL[name]
    seen = set()
    for seed in range(16):
        img_t, lab_t = transform(img, labels, np.random.default_rng(seed))
        key = next(
            k for k, (lab_op, _, _) in outcomes.items() if np.array_equal(lab_t, lab_op(labels))
        )
        _, img_op, flow_op = outcomes[key]
        assert np.array_equal(img_t, img_op(img))
        if key not in seen:
            seen.add(key)
            recomputed = T.targets(np.ascontiguousarray(lab_t))["flows"]
            _assert_flows_match(recomputed, flow_op(flows), lab_t)
    assert seen == set(outcomes)


def test_flow_check_detects_an_unnegated_flip(real) -> None:
    """The comparison above can fail: flows flipped without negating do not match."""
    _, labels = real
    flows = labels_to_flows(labels)
    flipped = np.flip(labels, 1)
    wrong = np.stack([np.flip(flows[0], 1), np.flip(flows[1], 1)])
    with pytest.raises(AssertionError):
        _assert_flows_match(labels_to_flows(np.ascontiguousarray(flipped)), wrong, flipped)


def _encode(labels: np.ndarray) -> tuple[np.ndarray, float]:
    """A synthetic (3, H, W) image whose value is the label id / (max + 1)."""
    scale = float(labels.max() + 1)
    return np.repeat((labels / scale).astype(np.float32)[None], 3, axis=0), scale


def _decode(image: np.ndarray, scale: float) -> np.ndarray:
    """Labels back from an :func:`_encode` image; asserts every pixel is a pure code."""
    codes = image[0] * scale
    assert np.abs(codes - np.round(codes)).max() < 1e-3, "image values were mixed/changed"
    return np.round(codes).astype(np.int64)


def test_crop_flip_rotate_keep_image_and_targets_aligned(real) -> None:
    """Through augment_sample (no zoom, no intensity changes): the labels read back from
    the output image give exactly the output's cell mask and flows."""
    _, labels = real
    img, scale = _encode(labels)
    cfg = AugmentSection.from_dict(
        {"crop": 96, "zoom_p": 0.0, "flip_p": 1.0, "rotate_p": 1.0, **NO_INTENSITY}
    )
    for seed in range(3):
        out = T.augment_sample(img, labels, np.random.default_rng(seed), cfg)
        lab = _decode(out["image"], scale)
        assert set(np.unique(lab)) <= set(np.unique(labels))
        assert np.array_equal(out["cell"], (lab > 0).astype(np.float32))
        np.testing.assert_allclose(out["flows"], labels_to_flows(lab), atol=1e-6)
        assert (out["valid"] == 1).all()


@pytest.mark.parametrize("factor", [0.25, 0.6, 1.4])
def test_zoom_keeps_ids_and_pure_pixels_agree(real, factor: float) -> None:
    """Zoomed labels hold only original ids (nearest neighbour), and wherever the
    area-interpolated image is unmixed (it shows one cell's code), the label is that
    cell. Channel 0 is a random code per id, channel 1 its square: a mixture of codes
    has channel 1 > channel 0 squared, so mixed pixels are recognised."""
    _, labels = real
    codes = np.random.default_rng(1).uniform(0.2, 1.0, labels.max() + 1)
    codes[0] = 0.0
    img = np.stack([codes[labels], codes[labels] ** 2, np.zeros(labels.shape)])
    img_z, lab_z = T.zoom_crop(img.astype(np.float32), labels, 64, factor, np.random.default_rng(5))
    assert img_z.shape == (3, 64, 64) and lab_z.shape == (64, 64)
    assert set(np.unique(lab_z)) <= set(np.unique(labels))
    value = img_z[0].astype(np.float64)
    nearest_id = np.abs(value[..., None] - codes).argmin(axis=-1)
    pure = (np.abs(img_z[1] - value**2) < 1e-6) & (np.abs(codes[nearest_id] - value) < 1e-5)
    assert pure.mean() > 0.3
    disagree = (nearest_id != lab_z) & pure
    assert disagree.mean() < 0.005, disagree.mean()


def test_zoom_labels_are_not_shifted_against_the_image(data_dir: Path) -> None:
    """Downsampling by 4: the label foreground's centroid stays within a quarter output
    pixel of the image's (area-averaged) foreground mass (plain floor-nearest labels sit
    ~0.4 px off, towards the bottom right)."""
    shifts = []
    for i in range(4):
        _, labels = _stem_pair(data_dir, "usiigaci_phase", i)
        fg = (labels > 0).astype(np.float32)[None]
        img_z, lab_z = T.zoom_crop(fg, labels, 256, 0.25, np.random.default_rng(0))
        yy, xx = np.mgrid[:256, :256]
        mass, mask = img_z[0], lab_z > 0
        shifts.append(
            (
                np.sum(mass * yy) / mass.sum() - yy[mask].mean(),
                np.sum(mass * xx) / mass.sum() - xx[mask].mean(),
            )
        )
    assert np.abs(np.mean(shifts, axis=0)).max() < 0.25, np.mean(shifts, axis=0)


def test_public_samples_get_spatial_transforms_only(real) -> None:
    """MEDIAR's public (replay) pipeline: no zoom and no intensity change, even with
    every probability at 1; boundary exclusion applies."""
    _, labels = real
    img, scale = _encode(labels)
    every = {k: 1.0 for k in NO_INTENSITY}
    cfg = AugmentSection.from_dict(
        {"crop": 96, "zoom_p": 1.0, "flip_p": 1.0, "rotate_p": 1.0, **every}
    )
    out = T.augment_sample(img, labels, np.random.default_rng(0), cfg, public=True)
    lab = _decode(out["image"], scale)
    assert np.array_equal(out["valid"] == 0, T.excluded_pixels(lab))
    assert (out["valid"] == 0).any()
    main = T.augment_sample(img, labels, np.random.default_rng(0), cfg)
    with pytest.raises(AssertionError):
        _decode(main["image"], scale)  # the main-data sample was changed


def test_cell_aware_intensity_per_cell_factors(real) -> None:
    image, labels = real
    img = 0.5 * normalize(image) + 0.1  # every pixel > 0, so every change is visible
    ids = np.unique(labels)[1:]
    out = T.cell_aware_intensity(img, labels, np.random.default_rng(7), 0.4, (1.0, 1.7))
    np.testing.assert_array_equal(out[:, labels == 0], img[:, labels == 0])
    factors = {}
    for i in ids:
        ratio = out[:, labels == i] / img[:, labels == i]
        assert np.ptp(ratio) < 1e-5, f"cell {i} not scaled by one factor"
        factors[i] = float(ratio.mean())
    changed = [f for f in factors.values() if abs(f - 1.0) > 1e-6]
    assert len(changed) == round(0.4 * len(ids))
    assert all(1.0 <= f <= 1.7 + 1e-6 for f in changed)
    assert len(np.unique(np.round(changed, 6))) == len(changed), "cells share a factor"
    assert max(factors.values()) > 1.0 + 1e-3 and out.max() > img.max()  # not clipped


def test_cell_aware_probability_in_augment_sample(real) -> None:
    """With cell_aware_p = 0.25 about a quarter of the samples change (and only the
    cells); the rest leave the image untouched."""
    _, labels = real
    img, scale = _encode(labels)
    cfg = AugmentSection.from_dict(
        {
            "crop": 64,
            "zoom_p": 0.0,
            "flip_p": 0.0,
            "rotate_p": 0.0,
            **NO_INTENSITY,
            "cell_aware_p": 0.25,
        }
    )
    n, hit = 120, 0
    for seed in range(n):
        rng = np.random.default_rng(seed)
        out = T.augment_sample(img, labels, rng, cfg)
        codes = out["image"][0] * scale
        hit += bool(np.abs(codes - np.round(codes)).max() > 1e-3)
    assert abs(hit / n - 0.25) < 0.1, hit / n


def test_border_pixels_match_skimage_inner_boundaries(data_dir: Path) -> None:
    for source, index in (
        ("dsb2018", 0),
        ("dsb2018", 40),
        ("usiigaci_phase", 2),
        ("stardist_nuclei", 0),
    ):
        _, labels = _stem_pair(data_dir, source, index)
        expected = find_boundaries(labels, mode="inner", connectivity=1)
        got = T.border_pixels(labels)
        assert got.any()
        np.testing.assert_array_equal(got, expected)
        part = np.ascontiguousarray(labels[:128, :128])
        valid = T.targets(part, boundary_exclusion=True)["valid"]
        area = np.bincount(part.ravel())[part]
        inner = find_boundaries(part, mode="inner", connectivity=1)
        np.testing.assert_array_equal(valid == 0, inner & (area >= 196))
        assert (inner & (area < 196)).any() or source != "dsb2018"


def test_border_pixels_hand_made_cases() -> None:
    square = np.zeros((7, 7), int)
    square[2:5, 2:5] = 1  # 3 x 3 cell: its ring of 8 is border, the centre is not
    expected = square.astype(bool).copy()
    expected[3, 3] = False
    np.testing.assert_array_equal(T.border_pixels(square), expected)

    touching = np.zeros((4, 6), int)
    touching[:, :3], touching[:, 3:] = 1, 2  # two cells filling the image, meeting at x=2|3
    expected = np.zeros((4, 6), bool)
    expected[:, 2:4] = True  # only the shared interface; the image edge is no border
    np.testing.assert_array_equal(T.border_pixels(touching), expected)

    line = np.zeros((5, 5), int)
    line[2, 1:4] = 3  # a one-pixel-wide cell is all border
    np.testing.assert_array_equal(T.border_pixels(line), line > 0)
    assert not T.border_pixels(np.zeros((4, 4), int)).any()


def test_boundary_exclusion_spares_small_cells() -> None:
    """Under boundary exclusion a 20 x 20 cell loses its ring of 76 border pixels, a
    13 x 13 one (169 < 196 px, MEDIAR's limit) keeps all its pixels; without boundary
    exclusion everything counts."""
    labels = np.zeros((40, 60), int)
    labels[5:25, 5:25] = 1
    labels[5:18, 35:48] = 2
    valid = T.targets(labels, boundary_exclusion=True)["valid"]
    assert (valid[labels == 1] == 0).sum() == 76
    assert (valid[labels == 2] == 1).all() and (valid[labels == 0] == 1).all()
    np.testing.assert_array_equal(valid == 0, T.border_pixels(labels) & (labels == 1))
    assert (T.targets(labels)["valid"] == 1).all()
    assert T.excluded_pixels(labels, min_area=0)[labels == 2].sum() == 48


def test_gaussian_smooth_follows_monai_axes() -> None:
    """sigma in [1, 2] along rows (MONAI's sigma_x, the first spatial axis) and in
    [0.25, 1.5] along columns, measured from the blurred impulse."""
    impulse = np.zeros((1, 41, 41), np.float32)
    impulse[0, 20, 20] = 1.0
    r = np.arange(41) - 20
    cols = []
    for seed in range(20):
        out = T.gaussian_smooth(impulse, np.random.default_rng(seed))[0]
        sy = np.sqrt((out.sum(axis=1) * r**2).sum() / out.sum())
        sx = np.sqrt((out.sum(axis=0) * r**2).sum() / out.sum())
        assert 0.95 <= sy <= 2.05 and 0.2 <= sx <= 1.6, (sy, sx)
        cols.append(sx)
    assert min(cols) < 0.9  # would be impossible with the ranges swapped


def test_intensity_transforms_keep_range_ends_and_order(real) -> None:
    image, _ = real
    img = normalize(image)
    for fn in (T.contrast, T.histogram_shift):
        out = fn(img, np.random.default_rng(2))
        assert out.dtype == np.float32 and out.shape == img.shape
        assert np.isclose(out.min(), img.min(), atol=1e-5)
        assert np.isclose(out.max(), img.max(), atol=1e-5)
        order = np.argsort(img.ravel(), kind="stable")
        assert (np.diff(out.ravel()[order]) >= -1e-6).all()  # monotonic remap
    noisy = T.gaussian_noise(img, np.random.default_rng(3))
    assert 0 < (noisy - img).std() <= 0.1 + 1e-3
    a = T.gaussian_sharpen(img, np.random.default_rng(4))
    b = T.gaussian_sharpen(img, np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    assert a.shape == img.shape and a.dtype == np.float32 and not np.allclose(a, img)


def _orientation(out: np.ndarray) -> np.ndarray:
    """Signs of d(row code, column code) / d(output row, column) of an output of the
    :func:`_coordinate_image`: the identity for an unturned crop, a matrix of
    determinant -1 for a reflection."""
    grads = np.array([[np.diff(out[c], axis=a).mean() for a in (0, 1)] for c in (0, 1)])
    return np.sign(np.round(grads / np.abs(grads).max(), 3))


def _was_resized(out: np.ndarray, size: int) -> bool:
    """A plain crop of the :func:`_coordinate_image` holds ``size`` distinct whole
    coordinates per channel; zooming in repeats some, zooming out averages them."""
    codes = out[:2] * 127
    whole = np.abs(codes - np.round(codes)).max() < 1e-3
    return not whole or any(len(np.unique(np.round(c))) < size for c in codes)


def _coordinate_image(size: int) -> np.ndarray:
    """Channel 0 = row / (size - 1), channel 1 = column / (size - 1), channel 2 = 0.5
    (``size`` 128 for :func:`_was_resized`)."""
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    rows, cols = np.meshgrid(ramp, ramp, indexing="ij")
    return np.stack([rows, cols, np.full_like(rows, 0.5)])


def test_spatial_probabilities_match_mediar_table() -> None:
    """Default probabilities (zoom 0.5, flip 0.5, rotation 0.5) seen in the outputs: a
    zoomed crop resamples the coordinates (except a factor within ~1.5 % of 1, which
    keeps the crop as it is), a flip makes the map a reflection, and only 'no flip, no
    rotation' (0.25) leaves the orientation alone."""
    cfg = AugmentSection.from_dict({"crop": 32, **NO_INTENSITY})
    assert (cfg.zoom_p, cfg.flip_p, cfg.rotate_p) == (0.5, 0.5, 0.5)
    img, labels = _coordinate_image(128), np.zeros((128, 128), np.int64)
    n, zoomed, reflected, identity = 1000, 0, 0, 0
    for seed in range(n):
        out = T.augment_sample(img, labels, np.random.default_rng(seed), cfg)["image"]
        signs = _orientation(out)
        zoomed += _was_resized(out, 32)
        reflected += np.linalg.det(signs) < 0
        identity += np.array_equal(signs, np.eye(2))
    # Four binomial standard errors (0.016 at p = 0.5, 0.014 at 0.25), and ~2 % of the
    # zooms (factor near 1) look like none.
    assert abs(zoomed / n - 0.49) < 0.065, zoomed / n
    assert abs(reflected / n - 0.5) < 0.065, reflected / n
    assert abs(identity / n - 0.25) < 0.055, identity / n


def test_intensity_probabilities_match_mediar_table() -> None:
    """Noise, contrast, smoothing, histogram shift and sharpening at 0.25 each: an image
    comes out unchanged with probability 0.75 ** 5."""
    cfg = AugmentSection.from_dict({"crop": 32, "zoom_p": 0.0, "flip_p": 0.0, "rotate_p": 0.0})
    assert [getattr(cfg, k) for k in NO_INTENSITY] == [0.25] * 6
    img = np.random.default_rng(0).random((3, 32, 32), dtype=np.float32)
    labels = np.zeros((32, 32), np.int64)
    n = 1000
    same = sum(
        np.array_equal(T.augment_sample(img, labels, np.random.default_rng(s), cfg)["image"], img)
        for s in range(n)
    )
    assert abs(same / n - 0.75**5) < 0.055, same / n  # four standard errors


def _touching_by_dilation(labels: np.ndarray, radius: int) -> np.ndarray:
    """Reference for :func:`T.touching_pixels`: count, per pixel, the cells whose
    (2 radius + 1)-square dilation covers it; two or more is touching."""
    from scipy import ndimage

    square = np.ones((2 * radius + 1,) * 2, bool)
    covered = np.zeros(labels.shape, int)
    for cell in np.unique(labels[labels > 0]):
        covered += ndimage.binary_dilation(labels == cell, square)
    return covered >= 2


def test_touching_pixels_match_per_cell_dilation(data_dir: Path) -> None:
    """On real crowded nuclei the seams found with two rank filters equal those found
    cell by cell; there are some, and they are a small part of the image."""
    for source, index in (("dsb2018", 0), ("dsb2018", 40), ("nuinsseg", 10)):
        _, labels = _stem_pair(data_dir, source, index)
        for radius in (1, 2):
            got = T.touching_pixels(labels, radius)
            np.testing.assert_array_equal(got, _touching_by_dilation(labels, radius))
        assert 0 < got.mean() < 0.2, (source, got.mean())


def test_pixel_weights_hand_made_cases() -> None:
    """A 3 x 3 cell (9 px) under small_area 36 weighs sqrt(36 / 9) = 2; a 2 x 2 one
    (4 px) would weigh 3 and is capped at 2.5; a 7 x 7 one (49 px) is not small. The two
    cells one pixel apart get the touching weight on both sides of their gap."""
    labels = np.zeros((12, 20), int)
    labels[1:4, 1:4] = 1  # 9 px
    labels[1:4, 5:8] = 2  # 9 px, one-pixel gap to cell 1 (column 4)
    labels[8:10, 9:11] = 3  # 4 px, alone
    labels[2:9, 15:20][:7] = 4  # 7 x 5 = 35 px, alone
    off = T.pixel_weights(labels)
    assert off.dtype == np.float32 and (off == 1).all()
    w = T.pixel_weights(labels, small_area=36, small_max=2.5)
    assert np.allclose(w[labels == 1], 2.0) and np.allclose(w[labels == 3], 2.5)
    assert np.allclose(w[labels == 4], np.sqrt(36 / 35)) and (w[labels == 0] == 1).all()
    w = T.pixel_weights(labels, small_area=36, small_max=2.5, touching=4.0)
    seam = T.touching_pixels(labels)
    assert seam[1:4, 4].all() and not seam[labels == 3].any() and not seam[labels == 4].any()
    np.testing.assert_allclose(w[seam & (labels == 0)], 4.0)
    np.testing.assert_allclose(w[seam & (labels == 1)], 8.0)
    np.testing.assert_allclose(w[~seam], T.pixel_weights(labels, 36, 2.5)[~seam])


def test_loss_weights_reach_augment_sample_only_when_asked(real) -> None:
    """With the defaults (MEDIAR's loss) every pixel weighs 1; with the weights on, the
    same seeded draw gives the same targets, and the weights are >= 1 everywhere, above
    the touching weight on some pixels (small cells at a seam) and >= it on few."""
    image, labels = real
    img = normalize(image)
    plain = T.augment_sample(
        img, labels, np.random.default_rng(7), AugmentSection(crop=128, **NO_INTENSITY)
    )
    assert (plain["valid"] == 1).all()
    cfg = AugmentSection(crop=128, small_cell_area=400, touching_weight=5.0, **NO_INTENSITY)
    weighted = T.augment_sample(img, labels, np.random.default_rng(7), cfg)
    np.testing.assert_array_equal(weighted["cell"], plain["cell"])
    np.testing.assert_array_equal(weighted["flows"], plain["flows"])
    assert weighted["valid"].min() == 1.0 and weighted["valid"].max() > 5.0
    heavy = weighted["valid"] >= 5.0
    assert 0 < heavy.mean() < 0.2


@pytest.fixture(scope="module")
def he_image(data_dir: Path) -> np.ndarray:
    """A real NuInsSeg H&E field, normalised, cut to 128 x 128: (3, 128, 128) float32."""
    image, _ = _stem_pair(data_dir, "nuinsseg", 0)
    return normalize(image)[:, :128, :128]


def _stains(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) stain densities of a (3, H, W) RGB image in [0, 1] (OD = -ln RGB)."""
    from skimage.color import hed_from_rgb

    return -np.log(np.maximum(np.moveaxis(image, 0, -1), 1e-6).astype(np.float64)) @ hed_from_rgb


def test_stain_jitter_is_identity_at_zero_and_leaves_grey_images(he_image, real) -> None:
    same = T.stain_jitter(he_image, np.random.default_rng(0), scale=0.0, shift=0.0)
    lit = he_image > 1e-6  # zeros come back as 1e-6, the floor of the logarithm
    np.testing.assert_allclose(same[lit], he_image[lit], atol=1e-5)
    grey = normalize(real[0])
    assert np.array_equal(grey[0], grey[2])  # DSB2018 fluorescence: three equal channels
    assert T.stain_jitter(grey, np.random.default_rng(0), 0.3, 0.1) is grey


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stain_jitter_scales_and_shifts_each_stain(he_image, seed: int) -> None:
    """Unmixing the jittered image gives each stain's density as a * density + b, with
    a in [1 - scale, 1 + scale] and b in [-shift, shift]: fit on pixels not clipped."""
    scale, shift = 0.3, 0.1
    out = T.stain_jitter(he_image, np.random.default_rng(seed), scale, shift)
    assert out.shape == he_image.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert np.abs(out - he_image).mean() > 1e-3
    ok = ((he_image > 1e-3) & (out > 1e-3) & (out < 1 - 1e-3)).all(axis=0)
    before, after = _stains(he_image)[ok], _stains(out)[ok]
    for c in range(3):
        a, b = np.polyfit(before[:, c], after[:, c], 1)
        assert 1 - scale - 1e-4 <= a <= 1 + scale + 1e-4, (c, a)
        assert -shift - 1e-4 <= b <= shift + 1e-4, (c, b)
        assert np.abs(a * before[:, c] + b - after[:, c]).max() < 1e-3


def test_stain_jitter_in_augment_sample_only_when_asked(he_image) -> None:
    labels = np.zeros(he_image.shape[1:], np.int64)
    plain = {"crop": 128, "zoom_p": 0.0, "flip_p": 0.0, "rotate_p": 0.0, **NO_INTENSITY}
    off = AugmentSection.from_dict(plain)
    assert off.stain_p == 0.0  # MEDIAR's recipe: no stain jitter unless a config asks
    on = AugmentSection.from_dict({**plain, "stain_p": 1.0, "stain_scale": 0.3})
    rng = np.random.default_rng
    assert np.array_equal(T.augment_sample(he_image, labels, rng(0), off)["image"], he_image)
    jittered = T.augment_sample(he_image, labels, rng(0), on)["image"]
    assert np.abs(jittered - he_image).mean() > 1e-3
    with pytest.raises(ValueError, match="stain_p"):
        AugmentSection.from_dict({"stain_p": 1.5})
