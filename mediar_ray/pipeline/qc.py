"""A small overlay thumbnail (cell outlines in yellow) for a quick look at a slide."""

from __future__ import annotations

import io

import fsspec
import numpy as np
import zarr
from PIL import Image
from skimage.segmentation import find_boundaries

from mediar_ray.preprocess import normalize

__all__ = ["write_qc_png", "overlay"]


def overlay(image_hwc: np.ndarray, labels: np.ndarray, stats=None) -> np.ndarray:
    """(h, w, 3) uint8: the normalised image with label outlines in yellow."""
    rgb = (np.moveaxis(normalize(image_hwc, stats), 0, -1) * 255).astype(np.uint8)
    rgb[find_boundaries(labels, mode="inner")] = (255, 255, 0)
    return rgb


def write_qc_png(plan, levels: int, max_side: int = 1024) -> None:
    """Write ``qc.png`` from the first pyramid level no larger than ``max_side``."""
    level = levels - 1
    for k in range(levels):
        if max(plan.shape) / 2**k <= max_side:
            level = k
            break
    image = np.asarray(zarr.open_array(plan.layout.path(str(level)), mode="r")[:])
    labels = np.asarray(zarr.open_array(plan.layout.path("labels", "cells", str(level)),
                                        mode="r")[:])
    hwc = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
    buf = io.BytesIO()
    Image.fromarray(overlay(hwc, labels, plan.stats)).save(buf, format="PNG")
    with fsspec.open(plan.layout.path("qc.png"), "wb") as f:
        f.write(buf.getvalue())
