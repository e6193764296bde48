"""What a slide leaves besides its labels: pyramids, NGFF 0.5 metadata with physical
scales, and the QC image.

Grids, all tied to the processing image (the slide's chosen level resampled by the plan's
scale; pixel ``i`` covers processing pixels ``[i, i + 1)``):

- labels level k: every 2**k-th processing pixel (nearest neighbour);
- viewing image level j: 4 x 2**j processing pixels per pixel, read from the slide's own
  pyramid where it has a level that coarse (else resampled from a finer one), then
  every second pixel per further level; with ``--copy-image`` it is the processing image
  itself and its pyramid, like the labels';
- tissue mask: ``thumb_factor`` processing pixels per pixel (block means);
- labels on level 0 (``--labels-level0``): the slide's level-0 grid.

Each grid's NGFF scale and translation are in micrometres from the centre of the slide's
first level-0 pixel when the pixel size is known, else in level-0 pixels without a unit.
"""

from __future__ import annotations

import io
import math

import fsspec
import numpy as np
import zarr

from mediar_ray.io import safe_url
from mediar_ray.pipeline import stages
from mediar_ray.pipeline.layout import multiscales, tile_grid
from mediar_ray.pipeline.stages import SlidePlan
from mediar_ray.pipeline.tasks import fan_out

__all__ = ["build_outputs", "grid_transform"]

#: Processing pixels per pixel of the viewing image's first level (without --copy-image).
VIEW_DOWNSAMPLE = 4
#: Largest side of the QC image.
QC_MAX_SIDE = 1024


def grid_transform(plan: SlidePlan, factor: float, block: bool) -> tuple[list[float], list[float]]:
    """(scale, translation) along (y, x) of a grid with ``factor`` processing pixels per
    pixel: a block grid (pixel i averages processing pixels [i f, (i + 1) f)) or a
    nearest grid (pixel i is processing pixel i f)."""
    sy, sx = plan.to_level0  # level-0 pixels per processing pixel
    unit = plan.mpp if plan.mpp is not None else (1.0, 1.0)
    scale, shift = [], []
    for s, m in ((sy, unit[0]), (sx, unit[1])):
        # A processing pixel's centre in level-0 pixel units is i s + (s - 1) / 2.
        first = (s - 1) / 2 + ((factor - 1) * s / 2 if block else 0.0)
        scale.append(s * factor * m)
        shift.append(first * m)
    return scale, shift


def _pyramid(first: tuple[list[float], list[float]], levels: int) -> list:
    """Transforms of levels made by taking every second pixel: the scale doubles, the
    first pixel's centre stays."""
    scale, shift = first
    return [([v * 2**k for v in scale], shift) for k in range(levels)]


def _create(prefix: str, key: str, shape: tuple, chunks: tuple, dtype: str, names: list) -> str:
    zarr.open_group(prefix, mode="a", zarr_format=3).create_array(
        key,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=0,
        dimension_names=names,
        overwrite=True,
    )
    return f"{prefix}/{key}"


def _levels_to_one_chunk(shape: tuple[int, ...], tile: int) -> int:
    """Levels of a pyramid halving ``shape``'s last two axes until one chunk holds it."""
    h, w = shape[-2:]
    levels = 1
    while max(h, w) > tile:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        levels += 1
    return levels


def _halve(plan: SlidePlan, prefix: str, lead: tuple, levels: int, cpus: float) -> None:
    """Levels 1 .. ``levels`` - 1 of ``prefix``, each every second pixel of the one before
    (down to 1 px a side: NGFF wants as many label levels as image levels)."""
    src = zarr.open_array(f"{prefix}/0", mode="r")
    h, w = src.shape[-2:]
    for level in range(1, levels):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        dst = _create(
            prefix,
            str(level),
            lead + (h, w),
            lead + (plan.tile, plan.tile),
            str(src.dtype),
            list(src.metadata.dimension_names),
        )
        fan_out(
            stages.downsample_chunk,
            [(f"{prefix}/{level - 1}", dst, t) for t in tile_grid((h, w), plan.tile)],
            cpus,
        )


def _viewing_image(plan: SlidePlan, cpus: float) -> tuple[int, float]:
    """The viewing image's first level from the slide itself; returns its downsample
    (processing pixels per pixel) and its level count is made by the caller."""
    from mediar_ray.pipeline.view import open_source
    from mediar_ray.scale import processing_shape, thumbnail_level

    source = open_source(plan.url, plan.reader)
    k, s = thumbnail_level(source.levels, plan.level, plan.scale, VIEW_DOWNSAMPLE)
    h, w = processing_shape(source.levels[k].shape, s)
    dst = _create(
        plan.layout.root,
        "0",
        (plan.channels, h, w),
        (plan.channels, plan.tile, plan.tile),
        plan.dtype,
        ["c", "y", "x"],
    )
    fan_out(stages.view_chunk, [(plan, k, s, dst, t) for t in tile_grid((h, w), plan.tile)], cpus)
    return VIEW_DOWNSAMPLE


def _labels_level0(plan: SlidePlan, cpus: float) -> str:
    prefix = plan.layout.path("labels", "cells_level0")
    h, w = plan.source_shape
    dst = _create(prefix, "0", (h, w), (plan.tile, plan.tile), "uint32", ["y", "x"])
    src = plan.layout.path("labels", "cells", "0")
    fan_out(stages.level0_chunk, [(plan, src, dst, t) for t in tile_grid((h, w), plan.tile)], cpus)
    return prefix


def _label_attrs(plan: SlidePlan, name: str, transforms: list, unit: str | None) -> dict:
    # colors: background (0) transparent; viewers pick the cells' colours themselves.
    return {
        "version": "0.5",
        "multiscales": multiscales(name, transforms, False, unit),
        "image-label": {
            "version": "0.5",
            "source": {"image": "../../"},
            "colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}],
        },
    }


def build_outputs(plan: SlidePlan, labels_level0: bool, cpus: float) -> dict:
    """Pyramids, tissue mask metadata, level-0 labels, NGFF metadata and the QC image;
    returns what was written (levels per image, the grids' pixel sizes)."""
    unit = "micrometer" if plan.mpp is not None else None
    view = 1 if plan.copy_image else _viewing_image(plan, cpus)
    level0 = labels_level0 and plan.to_level0 != (1.0, 1.0)
    # (prefix, leading axes) of every multiscale image; NGFF 0.5 requires every label
    # image to have as many levels as the image: all get the count the largest needs.
    pyramids = [(plan.layout.root, (plan.channels,)), (plan.layout.path("labels", "cells"), ())]
    if plan.tissue:
        pyramids.append((plan.layout.path("labels", "tissue"), ()))
    if level0:
        pyramids.append((_labels_level0(plan, cpus), ()))
    n = max(
        _levels_to_one_chunk(zarr.open_array(f"{p}/0", mode="r").shape, plan.tile)
        for p, _ in pyramids
    )
    for prefix, lead in pyramids:
        _halve(plan, prefix, lead, n, cpus)
    n_labels = n_image = n
    root = zarr.open_group(plan.layout.root, mode="a", zarr_format=3)
    root.attrs["ome"] = {
        "version": "0.5",
        "multiscales": multiscales(
            plan.layout.stem,
            _pyramid(grid_transform(plan, view, block=view > 1), n_image),
            True,
            unit,
        ),
    }
    root.attrs["mediar_ray"] = {
        "source": safe_url(plan.url),
        "source_level": plan.level,
        "resampling": plan.scale,
        "um_per_level0_pixel": list(plan.mpp) if plan.mpp else None,
        "um_per_processing_pixel": list(plan.processing_mpp) if plan.mpp else None,
        "image": "full copy"
        if plan.copy_image
        else f"viewing copy, {view} processing pixels per pixel",
    }
    names = ["cells"]
    groups = {
        "cells": _label_attrs(
            plan, "cells", _pyramid(grid_transform(plan, 1, block=False), n_labels), unit
        )
    }
    if plan.tissue:
        names.append("tissue")
        groups["tissue"] = _label_attrs(
            plan, "tissue", _pyramid(grid_transform(plan, plan.thumb_factor, block=True), n), unit
        )
    if level0:
        names.append("cells_level0")
        m = plan.mpp if plan.mpp is not None else (1.0, 1.0)
        groups["cells_level0"] = _label_attrs(
            plan, "cells_level0", _pyramid(([m[0], m[1]], [0.0, 0.0]), n), unit
        )
    zarr.open_group(plan.layout.path("labels"), mode="a", zarr_format=3).attrs["ome"] = {
        "version": "0.5",
        "labels": names,
    }
    for name, attrs in groups.items():
        zarr.open_group(plan.layout.path("labels", name), mode="a", zarr_format=3).attrs["ome"] = (
            attrs
        )
    write_qc_png(plan, n_labels, view)
    return {
        "label_levels": n_labels,
        "image_levels": n_image,
        "image_downsample": view,
        "labels": names,
    }


def write_qc_png(plan: SlidePlan, n_labels: int, view: int) -> None:
    """``qc.png``: the image with cell outlines (yellow) and the tissue mask's edge
    (cyan), from the first label level no larger than :data:`QC_MAX_SIDE`."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    from mediar_ray.preprocess import normalize
    from mediar_ray.tissue import resize_mask

    k = next((k for k in range(n_labels) if max(plan.shape) / 2**k <= QC_MAX_SIDE), n_labels - 1)
    labels = np.asarray(zarr.open_array(plan.layout.path("labels", "cells", str(k)), mode="r")[:])
    image = _qc_image(plan, k, view, labels.shape)
    rgb = (np.moveaxis(normalize(image, plan.stats), 0, -1) * 255).astype(np.uint8)
    if plan.tissue:
        mask = np.asarray(zarr.open_array(plan.layout.path("labels", "tissue", "0"))[:]) > 0
        rgb[find_boundaries(resize_mask(mask, labels.shape), mode="inner")] = (0, 255, 255)
    rgb[find_boundaries(labels, mode="inner")] = (255, 255, 0)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)  # fast: a QC glance
    with fsspec.open(plan.layout.path("qc.png"), "wb") as f:
        f.write(buf.getvalue())


def _qc_image(plan: SlidePlan, k: int, view: int, shape: tuple[int, int]) -> np.ndarray:
    """(h, w[, C]) image on the grid of label level k: a level of the viewing pyramid when
    one matches it, else read from the slide (only slides of a few tiles get here)."""
    from mediar_ray.pipeline.view import open_source
    from mediar_ray.scale import processing_shape, read_resampled, thumbnail_level

    j = k - int(round(math.log2(view)))
    if j >= 0 and zarr.open_group(plan.layout.root, mode="r").get(str(j)) is not None:
        chw = np.asarray(zarr.open_array(plan.layout.path(str(j)), mode="r")[:])
    else:
        source = open_source(plan.url, plan.reader)
        lv, s = thumbnail_level(source.levels, plan.level, plan.scale, 2**k)
        h, w = processing_shape(source.levels[lv].shape, s)
        region = read_resampled(source, lv, s, 0, h, 0, w)
        chw = region[None] if region.ndim == 2 else np.moveaxis(region, -1, 0)
    out = np.zeros((chw.shape[0],) + tuple(shape), chw.dtype)  # grids may differ by a pixel
    h, w = min(shape[0], chw.shape[1]), min(shape[1], chw.shape[2])
    out[:, :h, :w] = chw[:, :h, :w]
    return out[0] if out.shape[0] == 1 else np.moveaxis(out, 0, -1)
