"""Windowed, TTA and ensemble inference against the original MEDIAR outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval

import mediar_ray.inference as inference
from mediar_ray.inference import (
    partial_extent,
    predict_partial,
    predict_raw,
    predict_region,
    window_starts,
)
from mediar_ray.io import read_image
from mediar_ray.model import load_model
from mediar_ray.pipeline.layout import tile_grid
from mediar_ray.precision import exact_fp32
from mediar_ray.preprocess import normalize

FIXTURE_IMAGES = ["phase_gray_uint16", "tissue_rgb_uint8"]


# Parity with the original MEDIAR and the exact tiling identities hold in IEEE float32:
# every call here runs fp32 (the default "auto" is bf16 on CPUs with bf16 units), and the
# module runs inside exact_fp32() (no TF32 on a GPU, "highest" float32 matmuls).
def raw32(*args, **kwargs):
    return predict_raw(*args, precision="fp32", **kwargs)


def region32(*args, **kwargs):
    return predict_region(*args, precision="fp32", **kwargs)


def partial32(*args, **kwargs):
    return predict_partial(*args, precision="fp32", **kwargs)


@pytest.fixture(autouse=True, scope="module")
def _exact_fp32():
    with exact_fp32():
        yield


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def models(ref_dir):
    params = json.loads((ref_dir / "index.json").read_text())["model_params"]
    return [load_model(str(ref_dir / f"model_{n}.pth"), **params) for n in "ab"]


@pytest.mark.parametrize("name", FIXTURE_IMAGES)
def test_single_tta_and_ensemble_match_original(ref_dir, models, name):
    image = normalize(read_image(str(ref_dir / f"{name}.tif")))
    cases = {
        "single": raw32(image, models[:1], tta=False),
        "tta": raw32(image, models[:1], tta=True),
        "ensemble_tta": raw32(image, models, tta=True),
    }
    for kind, out in cases.items():
        ref = np.load(ref_dir / f"{name}.{kind}.npy")
        assert out.shape == ref.shape and out.dtype == np.float32
        assert rel_l2(out, ref) < 1e-5, kind


@pytest.mark.parametrize("length", [512, 513, 600, 715, 716, 1000, 1024, 2967])
def test_window_grid_is_monais(length):
    interval = _get_scan_interval((length,), (512,), 1, (0.6,))
    expected = [
        int(s[0][0]) for s in dense_patch_slices((length,), (512,), interval, return_slice=False)
    ]
    assert window_starts(length, 512, 0.6) == expected


def test_regions_equal_whole_image_with_tta(models):
    """Tiles of a real image predicted separately equal the whole-image prediction."""
    rng = np.random.default_rng(0)
    image = rng.random((3, 700, 900)).astype(np.float32)  # > 1 window each way
    small = [m for m in models[:1]]
    whole = raw32(image, small, tta=True, roi_size=256)
    reads = []

    def read(y0, y1, x0, x1):
        reads.append((y1 - y0) * (x1 - x0))
        return image[:, y0:y1, x0:x1]

    for y0, y1, x0, x1 in [(0, 300, 0, 300), (300, 700, 300, 900), (123, 456, 789, 900)]:
        part = region32(read, (700, 900), (y0, y1, x0, x1), small, tta=True, roi_size=256)
        np.testing.assert_allclose(part, whole[:, y0:y1, x0:x1], rtol=0, atol=1e-6)
    # A region reads at most one window of context around itself, never the whole image.
    assert max(reads) < 700 * 900


def test_bad_input_shape_is_refused(models):
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        raw32(np.zeros((64, 64), np.float32), models[:1])


def _forward_counter(monkeypatch) -> list[int]:
    """Counts the windows every model forward sees (all callers of ``_forward``)."""
    seen = [0]
    forward = inference._forward

    def counting(model, crops, device, precision):
        seen[0] += crops.shape[0]
        return forward(model, crops, device, precision)

    monkeypatch.setattr(inference, "_forward", counting)
    return seen


@pytest.mark.parametrize(
    "source, crop, roi, tile",
    [
        # a real phase-contrast image, many windows per axis, tiles not dividing it
        ("usiigaci_phase/images/train_set1.tif", (520, 700), 256, 192),
        # a real image smaller than one window (MONAI pads it), tiles smaller than it
        ("dsb2018/images", None, 512, 96),
    ],
)
def test_partials_over_a_tile_grid_sum_to_whole_image(
    models, data_dir, monkeypatch, source, crop, roi, tile
):
    """Each tile runs only the windows it owns; the partials, added where they overlap,
    equal whole-image inference (TTA + two-model ensemble), each window run once."""
    path = data_dir / source
    if path.is_dir():  # the first real image there smaller than one window
        path = next(
            p for p in sorted(path.glob("*.png")) if max(read_image(str(p)).shape[:2]) < roi
        )
    image = read_image(str(path))
    if crop:
        image = image[: crop[0], : crop[1]]
    image = normalize(image)
    h, w = image.shape[1:]
    assert h % tile and w % tile and (h > tile and w > tile)
    seen = _forward_counter(monkeypatch)
    whole = raw32(image, models, tta=True, roi_size=roi)
    whole_windows, seen[0] = seen[0], 0
    total = np.zeros_like(whole)
    for t in tile_grid((h, w), tile):
        region = (t.y0, t.y1, t.x0, t.x1)
        part = partial32(
            lambda y0, y1, x0, x1: image[:, y0:y1, x0:x1],
            (h, w),
            region,
            models,
            tta=True,
            roi_size=roi,
        )
        y0, y1, x0, x1 = partial_extent((h, w), region, roi)
        assert part.shape == (3, y1 - y0, x1 - x0) and part.dtype == np.float32
        assert y1 - t.y1 < roi and x1 - t.x1 < roi  # spills at most one window right/down
        total[:, y0:y1, x0:x1] += part
    assert seen[0] == whole_windows  # every window of every frame and model exactly once
    assert rel_l2(total, whole) < 1e-5


def _tiled_partials(image, models, roi, tile, sw_batch_size, skip=None):
    """Sum of the partials of a tile grid; with ``skip``, also the summed WindowCounts."""
    h, w = image.shape[1:]
    total, counts = np.zeros((3, h, w), np.float32), inference.WindowCounts()
    for t in tile_grid((h, w), tile):
        region = (t.y0, t.y1, t.x0, t.x1)
        part, c = partial32(
            lambda y0, y1, x0, x1: image[:, y0:y1, x0:x1],
            (h, w),
            region,
            models,
            roi_size=roi,
            sw_batch_size=sw_batch_size,
            skip=skip,
            return_counts=True,
        )
        y0, y1, x0, x1 = partial_extent((h, w), region, roi)
        total[:, y0:y1, x0:x1] += part
        counts = inference.WindowCounts(
            counts.run + c.run, counts.skipped + c.skipped, counts.kept + c.kept
        )
    return total, counts


@pytest.mark.usefixtures("single_threaded")  # tiny forwards: 2 threads only contend
def test_windows_off_tissue_are_skipped_and_tissue_pixels_unchanged(models, data_dir, monkeypatch):
    """A real H&E region on white glass, with its tissue mask: exactly the windows
    touching tissue are kept; on tissue the prediction equals the unmasked one bit for
    bit (one window per batch, and four: batches that run are the unmasked run's);
    where only skipped windows reach, it is background (no flow, logit -10)."""
    from mediar_ray.sources import open_slide
    from mediar_ray.tissue import tissue_mask, tissue_skip

    with open_slide(str(data_dir / "slides/CMU-1-Small-Region.svs")) as source:
        he = source.read_region(0, 1000, 1048, 700, 764)
    slide = np.full((128, 160, 3), 255, np.uint8)  # white glass, tissue about a seventh
    slide[8:56, 88:152] = he
    h, w = slide.shape[:2]
    # Small windows keep the test quick; the mask is 4 px per mask pixel, margin 1.
    mask = tissue_mask(slide.reshape(h // 4, 4, w // 4, 4, 3).mean(axis=(1, 3)), margin=1)
    full = np.repeat(np.repeat(mask, 4, 0), 4, 1)
    assert full.any() and full.mean() < 0.5
    image, model, roi, tile = normalize(slide), models[:1], 64, 48
    skip, asked = tissue_skip(mask, (h, w)), []

    def recording_skip(y0, y1, x0, x1):
        asked.append(((y0, y1, x0, x1), skip(y0, y1, x0, x1)))
        return asked[-1][1]

    seen = _forward_counter(monkeypatch)
    for batch in (1, 4):
        plain, all_windows = _tiled_partials(image, model, roi, tile, batch)
        seen[0], asked[:] = 0, []
        masked, counts = _tiled_partials(image, model, roi, tile, batch, recording_skip)
        assert seen[0] == counts.run * len(model)  # skipped windows never reach a model
        assert counts.run + counts.skipped == all_windows.run == len(asked)
        keep = [not skipped for _, skipped in asked]
        for ((y0, y1, x0, x1), _), kept in zip(asked, keep):
            assert kept == full[y0:y1, x0:x1].any()  # kept exactly when touching tissue
        assert counts.kept == sum(keep) and 0 < counts.kept <= counts.run < all_windows.run
        np.testing.assert_array_equal(masked[:, full], plain[:, full])
        if batch == 4:  # batches mixing kept and skipped windows ran whole
            assert counts.run > counts.kept
        if batch == 1:  # each window its own batch: exactly the kept windows run
            assert counts.run == counts.kept
            reached = np.zeros((h, w), bool)
            for ((y0, y1, x0, x1), _), kept in zip(asked, keep):
                reached[y0:y1, x0:x1] |= kept
            assert (~reached).any()
            np.testing.assert_array_equal(masked[:2, ~reached], 0)
            np.testing.assert_allclose(masked[2, ~reached], -10, atol=1e-4)


def test_all_windows_skipped_reads_nothing_and_gives_background(models):
    def read(*_):
        raise AssertionError("a region whose windows are all skipped must not read")

    h, w = 600, 700
    total = np.zeros((3, h, w), np.float32)
    for t in tile_grid((h, w), 250):
        region = (t.y0, t.y1, t.x0, t.x1)
        part, counts = partial32(
            read, (h, w), region, models, roi_size=256, skip=lambda *_: True, return_counts=True
        )
        assert counts.run == 0
        y0, y1, x0, x1 = partial_extent((h, w), region, 256)
        total[:, y0:y1, x0:x1] += part
    np.testing.assert_array_equal(total[:2], 0)
    np.testing.assert_allclose(total[2], -10, atol=1e-5)
