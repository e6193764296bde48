"""A slide at its processing resolution: region reads through open readers kept per
process, and block means for thumbnails.

Every stage reads the slide the same way: a region of the *processing image* (the
slide's chosen pyramid level resampled by the plan's scale,
:func:`mediar_ray.scale.read_resampled`), from a reader opened in this process. Readers
hold files and cannot be pickled, so each worker process opens its own and keeps the last
few open (a model actor infers many tiles of the same slide).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from mediar_ray.sources import SlideSource, open_slide

__all__ = ["block_means", "open_source", "read_processing"]

_OPEN: "OrderedDict[tuple[str, str], SlideSource]" = OrderedDict()
#: Readers kept open per process (least recently used closed first).
KEEP_OPEN = 2


def open_source(url: str, reader: str = "auto") -> SlideSource:
    """The slide ``url`` opened with ``reader`` in this process (kept open, LRU)."""
    key = (url, reader)
    if key in _OPEN:
        _OPEN.move_to_end(key)
        return _OPEN[key]
    source = open_slide(url, reader)
    _OPEN[key] = source
    while len(_OPEN) > KEEP_OPEN:
        _, old = _OPEN.popitem(last=False)
        old.close()
    return source


def read_processing(plan: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Pixels ``[y0:y1, x0:x1]`` of a plan's processing image, (h, w) or (h, w, C) in the
    slide's dtype; tiles of it are bit-identical to the same pixels of the whole."""
    from mediar_ray.scale import read_resampled

    source = open_source(plan.url, plan.reader)
    return read_resampled(source, plan.level, plan.scale, y0, y1, x0, x1)


def block_means(region: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor`` x ``factor`` blocks of a region (the last blocks may be cut).

    Parameters
    ----------
    region : ndarray, (h, w) or (h, w, C), any real dtype
    factor : int >= 1

    Returns
    -------
    ndarray float32, (ceil(h / factor), ceil(w / factor)) or with C
        Each value averages the pixels of its block that lie in the region. Regions whose
        origins are multiples of ``factor`` give blocks of the whole image exactly (up to
        float rounding), so a thumbnail can be assembled from tiles.
    """
    a = np.asarray(region, np.float64)
    h, w = a.shape[:2]
    ny, nx = -(-h // factor), -(-w // factor)
    pad = ((0, ny * factor - h), (0, nx * factor - w)) + ((0, 0),) * (a.ndim - 2)
    blocks = (ny, factor, nx, factor) + a.shape[2:]
    sums = np.pad(a, pad).reshape(blocks).sum(axis=(1, 3))
    counts = np.pad(np.ones((h, w)), pad[:2]).reshape(blocks[:4]).sum(axis=(1, 3))
    counts = counts.reshape(counts.shape + (1,) * (a.ndim - 2))
    return (sums / counts).astype(np.float32)
