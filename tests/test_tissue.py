"""Tissue masks of real slides and images on glass, window tests, user masks."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from mediar_ray.io import read_image
from mediar_ray.scale import processing_shape, read_resampled
from mediar_ray.sources import open_slide
from mediar_ray.tissue import (
    detect_kind,
    load_mask,
    resize_mask,
    tissue_mask,
    tissue_skip,
    window_touches_tissue,
)

SVS = "slides/CMU-1-Small-Region.svs"
THUMB = 16  # level-0 pixels per thumbnail pixel of the glass slide


def on_glass(image: np.ndarray, factor: float, fill) -> tuple[np.ndarray, tuple[int, int]]:
    """``image`` placed on a canvas ``factor`` times its area filled with ``fill``
    (glass), off centre; returns the canvas and the image's top-left corner."""
    h, w = image.shape[:2]
    side = np.sqrt(factor)
    canvas = np.full((int(h * side), int(w * side)) + image.shape[2:], fill, image.dtype)
    y, x = (canvas.shape[0] - h) // 3, (canvas.shape[1] - w) * 2 // 3
    canvas[y : y + h, x : x + w] = image
    return canvas, (y, x)


def thumbnail_of(array: np.ndarray, path, factor: float) -> np.ndarray:
    """Write ``array`` as a tiled TIFF slide and read its thumbnail the way the engine
    would: the whole slide area-averaged by ``factor``."""
    tifffile.imwrite(
        path,
        array,
        tile=(256, 256),
        compression="zlib",
        photometric="rgb" if array.ndim == 3 else "minisblack",
    )
    with open_slide(str(path)) as source:
        h, w = processing_shape(source.shape, factor)
        return read_resampled(source, 0, factor, 0, h, 0, w)


def full_resolution(mask: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """A thumbnail-grid mask brought to level 0 (each thumbnail pixel covers a
    ``factor`` x ``factor`` block)."""
    return np.repeat(np.repeat(mask, factor, 0), factor, 1)[: shape[0], : shape[1]]


@pytest.fixture(scope="module")
def glass_slide(data_dir, tmp_path_factory):
    """The real H&E SVS on white glass (3x its area) and its tissue mask."""
    with open_slide(str(data_dir / SVS)) as source:
        he = source.read_region(0, 0, source.shape[0], 0, source.shape[1])
    slide, corner = on_glass(he, 3.0, 255)
    thumb = thumbnail_of(slide, tmp_path_factory.mktemp("glass") / "glass.tif", THUMB)
    return he, slide, corner, thumb, tissue_mask(thumb)


def test_glass_slide_mask_covers_the_tissue_not_the_glass(glass_slide):
    he, slide, (cy, cx), thumb, mask = glass_slide
    assert detect_kind(thumb) == "brightfield"
    assert mask.shape == thumb.shape[:2] and mask.dtype == bool
    full = full_resolution(mask, THUMB, slide.shape[:2])
    # Tissue: every clearly stained pixel (optical density > 0.3 in some channel:
    # nuclei, dense stroma) of the real slide is inside the mask.
    od = np.log10(256 / (he.astype(np.float64) + 1)).max(axis=2)
    stained = od > 0.3
    assert stained.sum() > 0.1 * stained.size
    inside = full[cy : cy + he.shape[0], cx : cx + he.shape[1]]
    assert inside[stained].mean() >= 0.999
    # Glass: nothing farther than the margin (2 thumbnail pixels) + 1 from the slide.
    far = np.ones(slide.shape[:2], bool)
    pad = 3 * THUMB
    far[max(cy - pad, 0) : cy + he.shape[0] + pad, max(cx - pad, 0) : cx + he.shape[1] + pad] = (
        False
    )
    assert far.mean() > 0.5 and not full[far].any()
    # Clean glass inside the real slide (white 16 x 16 blocks) is mostly left out too.
    white = he.min(axis=2) > 235
    h16, w16 = he.shape[0] // THUMB, he.shape[1] // THUMB
    blocks = white[: h16 * THUMB, : w16 * THUMB].reshape(h16, THUMB, w16, THUMB).all(axis=(1, 3))
    assert blocks.mean() > 0.2
    he_mask = full[cy : cy + h16 * THUMB, cx : cx + w16 * THUMB]
    he_mask = he_mask.reshape(h16, THUMB, w16, THUMB).all(axis=(1, 3))
    assert he_mask[blocks].mean() < 0.1  # only within the margin of tissue


@pytest.mark.parametrize(
    "source, factor, fill",
    [
        ("stardist_nuclei/images/img2d.tif", 4, "min"),  # fluorescence nuclei, uint16
        ("nuinsseg/images/human_bladder_01.png", 4, 255),  # H&E tissue, all tissue
    ],
)
def test_every_annotated_cell_is_inside_the_mask(data_dir, tmp_path, source, factor, fill):
    image = read_image(str(data_dir / source))
    labels = read_image(
        str(data_dir / source).replace("/images/", "/labels/").rsplit(".", 1)[0] + "_label.tiff"
    )
    fill = image.min() if fill == "min" else fill
    slide, (cy, cx) = on_glass(image, 3.0, fill)
    thumb = thumbnail_of(slide, tmp_path / "s.tif", factor)
    expected = "fluorescence" if image.ndim == 2 else "brightfield"
    assert detect_kind(thumb) == expected
    mask = tissue_mask(thumb)
    full = full_resolution(mask, factor, slide.shape[:2])
    cells = full[cy : cy + image.shape[0], cx : cx + image.shape[1]][labels > 0]
    assert cells.all()  # every hand-annotated cell pixel
    assert mask.mean() < 0.6  # and the glass around the image is not all tissue


def test_window_test_is_exact_and_conservative(glass_slide):
    _, slide, _, _, mask = glass_slide
    h, w = slide.shape[:2]
    full = full_resolution(mask, THUMB, (h, w))
    rng = np.random.default_rng(0)
    # Windows of 1-600 px, some reaching over the image's edges (as padded windows do).
    windows = [
        (int(y), int(y) + s, int(x), int(x) + s)
        for y, x, s in zip(
            rng.integers(-200, h, 400), rng.integers(-200, w, 400), rng.integers(1, 600, 400)
        )
        if y + s > 0 and x + s > 0
    ]
    answers = []
    for y0, y1, x0, x1 in windows:
        truth = full[max(y0, 0) : y1, max(x0, 0) : x1].any()
        answers.append(truth)
        assert window_touches_tissue(mask, THUMB, y0, y1, x0, x1) == truth
    assert 0 < np.mean(answers) < 1
    # A mask grid that does not divide the image (downsample 16.0x with a remainder):
    # never "no" where a pixel of the nearest-neighbour upsampled mask is tissue.
    skip = tissue_skip(mask, (h, w))
    ry = (np.arange(h) * mask.shape[0]) // h
    rx = (np.arange(w) * mask.shape[1]) // w
    nearest = mask[ry][:, rx]
    for y0, y1, x0, x1 in windows:
        if nearest[max(y0, 0) : y1, max(x0, 0) : x1].any():
            assert not skip(y0, y1, x0, x1)


def test_user_masks_any_format_any_resolution(glass_slide, tmp_path):
    mask = glass_slide[-1]
    shape = mask.shape
    # A 0/255 PNG at 4x the grid's resolution: back to the grid exactly.
    Image.fromarray(np.repeat(np.repeat(mask, 4, 0), 4, 1).astype(np.uint8) * 255).save(
        tmp_path / "m.png"
    )
    np.testing.assert_array_equal(load_mask(str(tmp_path / "m.png"), shape), mask)
    # A boolean TIFF at half resolution: each grid pixel takes the pixel it lies in.
    half = mask[::2, ::2]
    tifffile.imwrite(tmp_path / "m.tif", half)
    loaded = load_mask(str(tmp_path / "m.tif"), (2 * half.shape[0], 2 * half.shape[1]))
    np.testing.assert_array_equal(loaded, np.repeat(np.repeat(half, 2, 0), 2, 1))
    # zarr: a plain array, and an NGFF group (the coarsest level at least the grid's size).
    zarr.create_array(str(tmp_path / "a.zarr"), data=mask.astype(np.uint8))
    np.testing.assert_array_equal(load_mask(str(tmp_path / "a.zarr"), shape), mask)
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    group.create_array("0", data=np.repeat(np.repeat(mask, 2, 0), 2, 1)[None])
    group.create_array("1", data=mask[None])
    group.create_array("2", data=mask[None, ::2, ::2])
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{"datasets": [{"path": "0"}, {"path": "1"}, {"path": "2"}]}],
    }
    np.testing.assert_array_equal(load_mask(str(tmp_path / "g.zarr"), shape), mask)
    # Shrinking never loses tissue: a single pixel of a large mask survives.
    dot = np.zeros((1000, 1000), bool)
    dot[517, 3] = True
    small = resize_mask(dot, (10, 10))
    assert small.sum() == 1 and small[5, 0]
    with pytest.raises(ValueError, match="nothing.png"):
        load_mask(str(tmp_path / "nothing.png"), shape)
    (tmp_path / "bad.zarr").mkdir()
    with pytest.raises(ValueError, match="bad.zarr: cannot read the tissue mask"):
        load_mask(str(tmp_path / "bad.zarr"), shape)
