"""Per-cell measurements of a slide, computed chunk by chunk and merged exactly.

A slide's final labels are written one chunk at a time, by tasks that each hold one chunk.
Each such task calls :func:`measure_chunk` on its chunk: the result, a
:class:`CellPartials`, holds for every cell id present only *additive* quantities (pixel
count, integer sums of coordinates and of their products, sums of probability and
intensity) and *extremal* ones (bounding box, maxima, minima). Partials of the same cell
from different chunks combine with :func:`merge_partials`, exactly: coordinate moments
are integers (int64), so the merged moments are those of the whole cell whatever the
order of merging; float sums are float64. :func:`finalize` turns partials into one row
per cell with what :func:`skimage.measure.regionprops` gives from the same moments
(centroid, area, bounding box, axis lengths, eccentricity, orientation, extent,
equivalent diameter) plus the mean and maximum cell probability and the mean, minimum
and maximum intensity of every image channel.

Only the cells that lie in several chunks need a merge. :func:`cells_in_several_chunks`
finds them exactly from the ids present in each chunk (which the stitching step already
knows), and :func:`split_partials` separates a chunk's complete cells (finalised and
written by the chunk's own task) from its shared ones (sent on to be merged).

Coordinates
-----------
Processing pixels are those of the resolution the slide was segmented at; pixel (i, j)
has its centre at (i, j), as in scikit-image. A slide's level 0 is ``scale = (sy, sx)``
times finer; the centre of processing pixel ``p`` lies at level-0 pixel coordinate
``(p + 0.5) * s - 0.5`` (so both conventions agree when ``s = 1``). Micrometres are
level-0 coordinates times the level-0 pixel size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Iterable

import numpy as np

__all__ = [
    "CellPartials",
    "cells_in_several_chunks",
    "finalize",
    "measure_chunk",
    "merge_partials",
    "split_partials",
    "take_rows",
    "touches_neighbour",
]

_MOMENTS = ("sy", "sx", "syy", "sxx", "syx")


@dataclass
class CellPartials:
    """Additive and extremal measurements of a set of cells (one row per id).

    All arrays have ``k`` rows, sorted by ``ids`` (unique). Coordinates are slide-wide
    processing pixels.

    Attributes
    ----------
    ids : (k,) uint32
        Cell ids (the values of the final label image).
    count : (k,) int64
        Pixel count.
    bbox : (k, 4) int64
        ``y0, x0, y1, x1``: first row/column and one past the last.
    moments : (k, 5) int64
        Sums of ``dy, dx, dy*dy, dx*dx, dy*dx`` over the cell's pixels, where
        ``dy = y - bbox[:, 0]`` and ``dx = x - bbox[:, 1]`` (exact integers, small
        because they are taken from the box corner).
    prob_sum : (k,) float64
        Sum of the cell probability ``sigmoid(logit)`` (NaN when no logit was given).
    logit_max : (k,) float64
        Largest logit (NaN when no logit was given).
    int_sum, int_min, int_max : (k, C) float64
        Per image channel: sum, minimum and maximum of the finite pixel values (C = 0
        when no image was given; min and max NaN when a channel has none).
    int_count : (k, C) int64
        Per image channel: how many of the cell's pixels are finite (NaN and infinite
        pixels, e.g. a float image's masked areas, are left out of the intensities).
    """

    ids: np.ndarray
    count: np.ndarray
    bbox: np.ndarray
    moments: np.ndarray
    prob_sum: np.ndarray
    logit_max: np.ndarray
    int_sum: np.ndarray
    int_min: np.ndarray
    int_max: np.ndarray
    int_count: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.size)

    @property
    def channels(self) -> int:
        """Number of image channels ``C`` the intensities were measured on (0: none)."""
        return int(self.int_sum.shape[1])

    def take(self, index: np.ndarray) -> "CellPartials":
        """The rows ``index`` (an integer or boolean index) of every field."""
        return CellPartials(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def empty(cls, channels: int = 0) -> "CellPartials":
        """Partials of no cell (``k = 0``).

        Parameters
        ----------
        channels : int
            Number of image channels ``C`` of the intensity fields.

        Returns
        -------
        CellPartials
            Every field a zero-row array of its documented dtype; the intensity
            fields are (0, C).
        """
        return cls(
            ids=np.zeros(0, np.uint32),
            count=np.zeros(0, np.int64),
            bbox=np.zeros((0, 4), np.int64),
            moments=np.zeros((0, 5), np.int64),
            prob_sum=np.zeros(0),
            logit_max=np.zeros(0),
            int_sum=np.zeros((0, channels)),
            int_min=np.zeros((0, channels)),
            int_max=np.zeros((0, channels)),
            int_count=np.zeros((0, channels), np.int64),
        )


def _segments(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths of the runs of equal values of a sorted 1-d array."""
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return starts, np.diff(np.r_[starts, keys.size])


def measure_chunk(
    labels: np.ndarray,
    origin: tuple[int, int],
    logit: np.ndarray | None = None,
    image: np.ndarray | None = None,
) -> CellPartials:
    """Partial measurements of every cell present in one chunk.

    Parameters
    ----------
    labels : (h, w) array of unsigned int
        Final cell ids of the chunk core (0 = background).
    origin : (int, int)
        Slide coordinates (y0, x0), in processing pixels, of ``labels[0, 0]``.
    logit : (h, w) float array, optional
        Cell logit over the same pixels; probability = sigmoid(logit).
    image : (h, w) or (h, w, C) array, optional
        Image pixels over the same pixels, any real dtype.

    Returns
    -------
    CellPartials
        One row per id present, sorted by id.

    Examples
    --------
    >>> import numpy as np
    >>> labels = np.array([[1, 1, 0], [1, 0, 2], [0, 0, 2]], np.uint32)
    >>> rows = finalize(measure_chunk(labels, (0, 0)))
    >>> rows["id"].tolist(), rows["area"].tolist(), rows["centroid_x"].tolist()
    ([1, 2], [3, 2], [0.3333333333333333, 2.0])
    """
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be 2-d (h, w), got shape {lab.shape}")
    img = None if image is None else np.asarray(image)
    if img is not None:
        img = img[..., None] if img.ndim == 2 else img
        if img.shape[:2] != lab.shape:
            raise ValueError(f"image shape {img.shape} does not match labels {lab.shape}")
    if logit is not None and np.shape(logit) != lab.shape:
        raise ValueError(f"logit shape {np.shape(logit)} does not match labels {lab.shape}")
    channels = 0 if img is None else img.shape[2]
    ys, xs = np.nonzero(lab)  # raster order
    if ys.size == 0:
        return CellPartials.empty(channels)
    pixel_ids = lab[ys, xs]
    # A stable sort keeps each cell's pixels in raster order: its first row is its top.
    order = np.argsort(pixel_ids, kind="stable")
    ys, xs, pixel_ids = ys[order].astype(np.int64), xs[order].astype(np.int64), pixel_ids[order]
    starts, count = _segments(pixel_ids)
    y_top, y_bottom = ys[starts], ys[starts + count - 1]
    x_left = np.minimum.reduceat(xs, starts)
    x_right = np.maximum.reduceat(xs, starts)
    dy, dx = ys - np.repeat(y_top, count), xs - np.repeat(x_left, count)
    moments = np.stack(
        [np.add.reduceat(v, starts) for v in (dy, dx, dy * dy, dx * dx, dy * dx)], axis=1
    )
    oy, ox = int(origin[0]), int(origin[1])
    bbox = np.stack([y_top + oy, x_left + ox, y_bottom + 1 + oy, x_right + 1 + ox], axis=1)
    k = starts.size
    if logit is None:
        prob_sum, logit_max = np.full(k, np.nan), np.full(k, np.nan)
    else:
        values = np.asarray(logit)[ys, xs].astype(np.float64)
        prob_sum = np.add.reduceat(1.0 / (1.0 + np.exp(-values)), starts)
        logit_max = np.maximum.reduceat(values, starts)
    if img is None:
        int_sum = int_min = int_max = np.zeros((k, 0))
        int_count = np.zeros((k, 0), np.int64)
    else:
        pixels = img[ys, xs].astype(np.float64)  # (n, C)
        finite = np.isfinite(pixels)
        # Non-finite pixels count nowhere: 0 in the sum, NaN (ignored by fmin/fmax) in
        # the extremes, and not in the count the mean divides by.
        int_sum = np.add.reduceat(np.where(finite, pixels, 0.0), starts, axis=0)
        masked = np.where(finite, pixels, np.nan)
        int_min = np.fmin.reduceat(masked, starts, axis=0)
        int_max = np.fmax.reduceat(masked, starts, axis=0)
        int_count = np.add.reduceat(finite.astype(np.int64), starts, axis=0)
    return CellPartials(
        ids=pixel_ids[starts].astype(np.uint32),
        count=count.astype(np.int64),
        bbox=bbox,
        moments=moments,
        prob_sum=prob_sum,
        logit_max=logit_max,
        int_sum=int_sum,
        int_min=int_min,
        int_max=int_max,
        int_count=int_count,
    )


def merge_partials(parts: Iterable[CellPartials]) -> CellPartials:
    """Combine partials of the same cells (from different chunks) exactly.

    Rows with the same id are merged: counts and sums added, boxes joined, extremes
    kept, and the coordinate moments moved to the joined box's corner before adding
    (integer arithmetic, so the result does not depend on the order of merging).
    """
    parts = [p for p in parts if len(p)]
    if not parts:
        return CellPartials.empty()
    if len({p.channels for p in parts}) > 1:
        raise ValueError("partials with different numbers of image channels cannot merge")
    cat = CellPartials(
        **{
            f.name: np.concatenate([getattr(p, f.name) for p in parts])
            for f in fields(CellPartials)
        }
    )
    cat = cat.take(np.argsort(cat.ids, kind="stable"))
    starts, sizes = _segments(cat.ids)
    if starts.size == len(cat):
        return cat  # every id once: nothing to merge
    y0 = np.minimum.reduceat(cat.bbox[:, 0], starts)
    x0 = np.minimum.reduceat(cat.bbox[:, 1], starts)
    y1 = np.maximum.reduceat(cat.bbox[:, 2], starts)
    x1 = np.maximum.reduceat(cat.bbox[:, 3], starts)
    n = cat.count
    sy, sx, syy, sxx, syx = cat.moments.T
    # Shift each row's moments from its own box corner to the joined one: with
    # y = y0 + d + dy, sum (d + dy)^2 = syy + 2 d sy + n d^2, and so on.
    dy = cat.bbox[:, 0] - np.repeat(y0, sizes)
    dx = cat.bbox[:, 1] - np.repeat(x0, sizes)
    shifted = np.stack(
        [
            sy + n * dy,
            sx + n * dx,
            syy + 2 * dy * sy + n * dy * dy,
            sxx + 2 * dx * sx + n * dx * dx,
            syx + dy * sx + dx * sy + n * dy * dx,
        ],
        axis=1,
    )
    return CellPartials(
        ids=cat.ids[starts],
        count=np.add.reduceat(n, starts),
        bbox=np.stack([y0, x0, y1, x1], axis=1),
        moments=np.add.reduceat(shifted, starts, axis=0),
        prob_sum=np.add.reduceat(cat.prob_sum, starts),
        logit_max=np.maximum.reduceat(cat.logit_max, starts),
        int_sum=_reduce(np.add, cat.int_sum, starts),
        int_min=_reduce(np.fmin, cat.int_min, starts),
        int_max=_reduce(np.fmax, cat.int_max, starts),
        int_count=_reduce(np.add, cat.int_count, starts).astype(np.int64),
    )


def _reduce(ufunc: np.ufunc, values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    if values.shape[1] == 0:
        return np.zeros((starts.size, 0))
    return ufunc.reduceat(values, starts, axis=0)


def cells_in_several_chunks(chunk_ids: Iterable[np.ndarray]) -> np.ndarray:
    """Ids present in more than one chunk (sorted uint32).

    ``chunk_ids`` gives, for each chunk, the unique ids present in it. These are exactly
    the cells whose partials must be merged; every other cell is complete in the one
    chunk that holds it, even if its box touches the chunk's edge.
    """
    arrays = [np.unique(np.asarray(a, np.uint32)) for a in chunk_ids]
    if not arrays:
        return np.zeros(0, np.uint32)
    ids, seen = np.unique(np.concatenate(arrays), return_counts=True)
    return ids[seen > 1].astype(np.uint32)


def split_partials(partials: CellPartials, shared: np.ndarray) -> tuple[CellPartials, CellPartials]:
    """``(complete, partial)``: the rows whose id is not / is in ``shared`` (the sorted
    ids of :func:`cells_in_several_chunks`)."""
    mask = np.isin(partials.ids, np.asarray(shared, np.uint32))
    return partials.take(~mask), partials.take(mask)


def touches_neighbour(
    partials: CellPartials, core: tuple[int, int, int, int], shape: tuple[int, int]
) -> np.ndarray:
    """Boolean mask of the cells whose box reaches an edge of the chunk ``core``
    (``y0, y1, x0, x1``) beyond which the slide (``shape``) goes on.

    A geometric test that needs no knowledge of other chunks. Cells it leaves out are
    complete in the chunk only if they are connected: a label with a second piece in
    another chunk is missed, which :func:`cells_in_several_chunks` does not miss.
    """
    y0, y1, x0, x1 = core
    h, w = shape
    b = partials.bbox
    return (
        ((b[:, 0] == y0) & (y0 > 0))
        | ((b[:, 2] == y1) & (y1 < h))
        | ((b[:, 1] == x0) & (x0 > 0))
        | ((b[:, 3] == x1) & (x1 < w))
    )


def _exact_central(n: np.ndarray, s2: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``n * s2 - a * b`` for int64 arrays, exactly, as float64 (Python integers where
    int64 could overflow, i.e. for cells of millions of pixels)."""
    big = 2.0**62
    safe = (np.abs(n.astype(float) * s2) < big) & (np.abs(a.astype(float) * b) < big)
    out = (n * s2 - a * b).astype(np.float64)
    for i in np.flatnonzero(~safe):
        out[i] = float(int(n[i]) * int(s2[i]) - int(a[i]) * int(b[i]))
    return out


def finalize(
    partials: CellPartials,
    scale: tuple[float, float] = (1.0, 1.0),
    pixel_size_um: tuple[float, float] | None = None,
) -> dict[str, np.ndarray]:
    """One row per cell: the columns of the cell table (see :mod:`mediar_ray.cells.table`).

    Parameters
    ----------
    partials : CellPartials
        Complete measurements (every pixel of each cell included).
    scale : (float, float)
        Level-0 pixels per processing pixel, (sy, sx).
    pixel_size_um : (float, float) or None
        Level-0 pixel size in micrometres (y, x), or None when unknown (the micrometre
        columns are then NaN).

    Returns
    -------
    dict of str -> ndarray
        Column name -> (k,) array (``(k, C)`` for the per-channel intensity columns).
        Lengths are in processing pixels, angles in radians (scikit-image's conventions:
        ``orientation`` is the angle between the row axis and the major axis).
    """
    p = partials
    n = p.count
    nf = n.astype(np.float64)
    sy, sx, syy, sxx, syx = (p.moments[:, i] for i in range(5))
    y0, x0, y1, x1 = (p.bbox[:, i] for i in range(4))
    with np.errstate(invalid="ignore", divide="ignore"):
        cy, cx = y0 + sy / nf, x0 + sx / nf
        # n^2 times the central second moments per pixel, exact integers.
        num_yy, num_xx = _exact_central(n, syy, sy, sy), _exact_central(n, sxx, sx, sx)
        num_yx = _exact_central(n, syx, sy, sx)
        # scikit-image's inertia tensor [[a, b], [b, c]]: a = var(x), c = var(y), b = -cov.
        a, c, b = num_xx / (nf * nf), num_yy / (nf * nf), -num_yx / (nf * nf)
        half, disc = (a + c) / 2, np.hypot((a - c) / 2, b)
        l1, l2 = np.clip(half + disc, 0, None), np.clip(half - disc, 0, None)
        ecc = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / l1, 0, None)), 0.0)
        orientation = np.where(
            num_xx == num_yy,
            np.where(b < 0, math.pi / 4, -math.pi / 4),
            0.5 * np.arctan2(-2 * b, c - a),
        )
        prob_mean = p.prob_sum / nf
        int_mean = p.int_sum / p.int_count  # finite pixels only (NaN: none finite)
    sy_, sx_ = float(scale[0]), float(scale[1])
    ly, lx = (cy + 0.5) * sy_ - 0.5, (cx + 0.5) * sx_ - 0.5
    if pixel_size_um is None:
        um_y = um_x = area_um2 = np.full(len(p), np.nan)
    else:
        py, px = float(pixel_size_um[0]), float(pixel_size_um[1])
        um_y, um_x, area_um2 = ly * py, lx * px, nf * sy_ * sx_ * py * px
    return {
        "id": p.ids.astype(np.uint32),
        "area": n.astype(np.int64),
        "area_um2": area_um2,
        "centroid_y": cy,
        "centroid_x": cx,
        "centroid_y_level0": ly,
        "centroid_x_level0": lx,
        "centroid_y_um": um_y,
        "centroid_x_um": um_x,
        "bbox_y0": y0,
        "bbox_x0": x0,
        "bbox_y1": y1,
        "bbox_x1": x1,
        "equivalent_diameter": np.sqrt(4 * nf / math.pi),
        "axis_major_length": 4 * np.sqrt(l1),
        "axis_minor_length": 4 * np.sqrt(l2),
        "eccentricity": ecc,
        "orientation": orientation,
        "extent": nf / ((y1 - y0) * (x1 - x0)),
        "prob_mean": prob_mean,
        "prob_max": 1.0 / (1.0 + np.exp(-p.logit_max)),
        "intensity_mean": int_mean,
        "intensity_min": p.int_min,
        "intensity_max": p.int_max,
    }


def take_rows(columns: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    """The rows ``index`` (integer or boolean) of every column of :func:`finalize`."""
    return {name: np.asarray(values)[index] for name, values in columns.items()}
