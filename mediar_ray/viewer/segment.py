"""What the "Segment cells (MEDIAR)" widget runs, free of Qt: a generator of progress
steps that ends with the labels and their per-cell features.

An image up to :data:`WHOLE_IMAGE_MAX_SIDE` pixels a side goes through
:func:`mediar_ray.segment.segment_image` exactly as ``mediar-ray segment`` runs it (same
normalisation, windows, TTA and flow tracking), then :mod:`mediar_ray.cells.measure`
measures its cells as the slide job does. A larger one goes through the slide job itself
(:func:`mediar_ray.pipeline.run_slides` on a local Ray, tiles of ``tile`` pixels with
halos, stitched): the image is written tile by tile as a tiled TIFF into a temporary
folder (a dask layer is never loaded whole), and the labels (as a numpy array, the
layer's size in uint32) and the cell rows are read back before the folder is removed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mediar_ray.errors import UserError
from mediar_ray.pipeline.options import PRECISIONS  # the choices of --precision

__all__ = ["PRECISIONS", "Progress", "SegmentRequest", "WidgetResult", "run_segmentation"]

#: Largest side (pixels) segmented in one pass; above it the tiled slide path runs.
WHOLE_IMAGE_MAX_SIDE = 4096


@dataclass
class SegmentRequest:
    """The widget's options. ``weights`` empty: the bundled model; ``roi_size`` None:
    the weights' own window; ``tile`` for the tiled path (slide-job tile side)."""

    weights: list[str] = field(default_factory=list)
    tta: bool = False
    precision: str = "auto"
    roi_size: int | None = None
    device: str = "cpu"
    tile: int = 1024
    max_side: int = WHOLE_IMAGE_MAX_SIDE


@dataclass
class Progress:
    """Step ``done`` of ``total``, with what runs next."""

    done: int
    total: int
    message: str


@dataclass
class WidgetResult:
    """labels: (H, W) uint32 (numpy, or dask for the tiled path); features: one row per
    cell with an ``index`` column equal to its label id (napari's convention)."""

    labels: Any
    features: pd.DataFrame
    tiled: bool


def _check_2d(image: Any, rgb: bool) -> None:
    """A napari image layer's data must be what :func:`mediar_ray.io.read_image` returns:
    (H, W) or (H, W, C)."""
    if not (image.ndim == 2 or (image.ndim == 3 and rgb)):
        raise UserError(
            f"image layer of shape {image.shape}: the widget segments a 2-D "
            "image (grey, or RGB); pick a 2-D layer or slice out one plane"
        )


def _tiles(image: Any, tile: int) -> Iterator[np.ndarray]:
    """The image's tiles in TIFF order (rows of tiles), each read on its own (a dask
    layer is never loaded whole) and zero-padded to ``tile`` x ``tile``."""
    h, w = image.shape[:2]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            block = np.asarray(image[y : y + tile, x : x + tile])
            pad = [(0, tile - block.shape[0]), (0, tile - block.shape[1])]
            yield np.pad(block, pad + [(0, 0)] * (block.ndim - 2))


def features_of(labels: np.ndarray, image: np.ndarray, logit: np.ndarray) -> pd.DataFrame:
    """The cell table's rows for whole-image labels, measured as the slide job measures
    its chunks (:func:`mediar_ray.cells.measure.measure_chunk` then ``finalize``)."""
    from mediar_ray.cells.measure import finalize, measure_chunk
    from mediar_ray.cells.table import cells_table
    from mediar_ray.export.output import flatten_channels

    rows = finalize(measure_chunk(labels, (0, 0), logit=logit, image=image))
    frame = flatten_channels(cells_table(rows).to_pandas())
    frame.insert(0, "index", frame["id"].astype("int64"))
    return frame


def _whole(image: np.ndarray, req: SegmentRequest) -> Iterator[Progress | WidgetResult]:
    from mediar_ray.segment import load_models, segment_image

    yield Progress(1, 3, "loading the model")
    models = load_models(req.weights or None, device=req.device)
    yield Progress(2, 3, "segmenting")
    result = segment_image(
        image,
        models,
        tta=req.tta,
        device=req.device,
        roi_size=req.roi_size,
        precision=req.precision,
    )
    yield Progress(3, 3, "measuring cells")
    yield WidgetResult(result.labels, features_of(result.labels, image, result.raw[2]), tiled=False)


def _tiled(image: Any, req: SegmentRequest) -> Iterator[Progress | WidgetResult]:
    import logging

    import ray
    import tifffile
    import zarr

    from mediar_ray.export.output import open_output, read_cells
    from mediar_ray.pipeline import SlideOptions, run_slides
    from mediar_ray.segment import resolve_weights

    opts = SlideOptions(
        weights=resolve_weights(req.weights or None),
        tta=req.tta,
        roi_size=req.roi_size,
        tile_size=req.tile,
        tissue="off",
        device=req.device,
        precision=req.precision,
    )
    with tempfile.TemporaryDirectory(prefix="mediar_napari_") as tmp:
        yield Progress(1, 4, "writing the layer as a tiled TIFF")
        path = f"{tmp}/layer.tif"
        tifffile.imwrite(
            path,
            _tiles(image, 256),
            shape=image.shape,
            dtype=image.dtype,
            tile=(256, 256),
            photometric="rgb" if image.ndim == 3 else "minisblack",
        )
        yield Progress(2, 4, "running the slide job's tiled path on a local Ray")
        started = not ray.is_initialized()
        if started:
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
        try:
            report = run_slides([path], f"{tmp}/out", opts)
        finally:
            if started:
                ray.shutdown()
        if report["failed"]:
            raise RuntimeError(f"segmentation failed: {report['failed']['layer']}")
        yield Progress(3, 4, "reading the labels and cells")
        out = open_output(f"{tmp}/out/layer.zarr")
        features = read_cells(out)
        features.insert(0, "index", features["id"].astype("int64"))
        # The folder goes away: keep the labels in memory (the image's own size).
        labels = np.asarray(zarr.open_array(f"{tmp}/out/layer.zarr/labels/cells/0", mode="r"))
        yield Progress(4, 4, "done")
    yield WidgetResult(labels, features, tiled=True)


def run_segmentation(
    image: Any, req: SegmentRequest, *, rgb: bool = False
) -> Iterator[Progress | WidgetResult]:
    """Segment a napari image layer's data, yielding :class:`Progress` between steps
    (where a napari worker may stop) and the :class:`WidgetResult` last.

    Parameters
    ----------
    image : array-like, (H, W) or (H, W, C)
        The layer's data (RGB when ``rgb``), any real dtype: numpy, or dask (a large
        layer is then read tile by tile into the slide job's input).
    req : SegmentRequest
        Model, TTA, precision, window size, device.
    rgb : bool
        The layer is RGB(A): its last axis is channels.
    """
    _check_2d(image, rgb)
    if max(image.shape[:2]) <= req.max_side:
        yield from _whole(np.asarray(image), req)
    else:
        yield from _tiled(image, req)
