"""Cell outlines as GeoJSON for QuPath, written piece by piece.

Each cell becomes one Feature: a Polygon in level-0 pixel coordinates (x right, y down,
the slide's top-left corner at 0, 0; a pixel spans one unit), and QuPath's detection
conventions in ``properties``: ``objectType: "detection"``, the cell's table row under
``measurements`` (name -> number; unknown values left out), an optional
``classification``. The Feature's ``id`` is a UUID derived from the slide name and cell
id, so a re-import replaces rather than duplicates.

The outline of a cell is the boundary, along pixel edges, of its largest 4-connected
piece with its holes filled: for a connected cell without holes the polygon covers
exactly the cell's pixels. It is always one simple Polygon (valid for shapely), with
collinear vertices dropped and the exterior ring counter-clockwise (RFC 7946).

Writing: a task that holds a chunk turns the chunk's complete cells into features
(:func:`features`) and stages them (:func:`write_piece`); the cells that span chunks are
drawn from a label region that holds them whole (:func:`outline_regions` groups them);
:func:`write_feature_collection` then streams the pieces into ``OUTPUT/<stem>.geojson``
(or ``.geojson.gz``) one at a time, so no process holds a slide's cells.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Iterable, Iterator

import fsspec
import numpy as np
from scipy import ndimage

__all__ = [
    "features", "outline", "outline_regions", "write_feature_collection", "write_piece",
]

_NAMESPACE = uuid.UUID("8d7f3c1e-4b1a-5c57-9a0e-6d2f0f6b8a10")  # fixed: stable feature ids
_SKIP = {"bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"}  # the geometry says it


def _largest_piece_filled(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected piece of ``mask`` (the first in raster order on ties),
    with every hole (background not 4-connected to the outside) filled."""
    pieces, n = ndimage.label(mask)  # default structure: 4-connectivity
    if n > 1:
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        mask = pieces == int(np.argmax(sizes))
    background, _ = ndimage.label(~np.pad(mask, 1))
    return (background != background[0, 0])[1:-1, 1:-1]


def outline(mask: np.ndarray) -> np.ndarray:
    """Outline of a cell mask along pixel edges.

    Parameters
    ----------
    mask : (h, w) bool
        The cell's pixels (any number of pieces; holes allowed).

    Returns
    -------
    (k, 2) int64
        Corner vertices (row, column) of the boundary of the largest 4-connected piece
        with holes filled, in edge coordinates (pixel (i, j) spans rows i..i+1, columns
        j..j+1), in order with the cell on the right when walking with rows pointing down
        (counter-clockwise for x, y = column, row with y up); the ring is not closed.
    """
    m = _largest_piece_filled(np.asarray(mask, bool))
    if not m.any():
        return np.zeros((0, 2), np.int64)
    h, w = m.shape
    p = np.pad(m, 1)
    inner = p[1:-1, 1:-1]
    stride = w + 1
    starts, ends = [], []
    # Edges between a cell pixel (i, j) and a non-cell neighbour, directed so that the
    # cell lies on the right: top edges run east, right south, bottom west, left north.
    for outside, (sy, sx), (ey, ex) in (
        (~p[:-2, 1:-1], (0, 0), (0, 1)), (~p[1:-1, 2:], (0, 1), (1, 1)),
        (~p[2:, 1:-1], (1, 1), (1, 0)), (~p[1:-1, :-2], (1, 0), (0, 0)),
    ):
        i, j = np.nonzero(inner & outside)
        starts.append((i + sy) * stride + j + sx)
        ends.append((i + ey) * stride + j + ex)
    start_ids, end_ids = np.concatenate(starts), np.concatenate(ends)
    # A hole-free 4-connected set has no vertex where two of its pixels meet only at a
    # corner, so every boundary vertex has exactly one outgoing edge: a single cycle.
    nxt = dict(zip(start_ids.tolist(), end_ids.tolist()))
    first = int(starts[0][0])  # top-left corner of the first pixel in raster order
    ring = [first]
    v = nxt[first]
    while v != first:
        ring.append(v)
        v = nxt[v]
    if len(ring) != start_ids.size:
        raise AssertionError("outline: boundary is not a single cycle")
    pts = np.stack(np.divmod(np.asarray(ring, np.int64), stride), axis=1)
    step = np.roll(pts, -1, axis=0) - pts
    corner = np.any(step != np.roll(step, 1, axis=0), axis=1)
    return pts[corner]


def _number(v: Any) -> int | float | None:
    if isinstance(v, (np.integer, int)):
        return int(v)
    v = float(v)
    return None if v != v else round(v, 4)


def _measurements(columns: dict[str, np.ndarray], i: int) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for name, values in columns.items():
        if name in _SKIP:
            continue
        v = values[i]
        if np.ndim(v) == 1:  # per-channel columns
            for c, x in enumerate(v):
                if (num := _number(x)) is not None:
                    out[f"{name}_{c}"] = num
        elif (num := _number(v)) is not None:
            out[name] = num
    return out


def _coordinate(values: np.ndarray, scale: float) -> list:
    if float(scale).is_integer():
        return (values * int(scale)).tolist()
    return np.round(values * float(scale), 3).tolist()


def features(labels: np.ndarray, origin: tuple[int, int], columns: dict[str, np.ndarray],
             scale: tuple[float, float] = (1.0, 1.0), slide: str | None = None,
             classification: dict[str, Any] | None = None) -> Iterator[str]:
    """GeoJSON Feature text (one string per cell) for the cells of ``columns``.

    Parameters
    ----------
    labels : (h, w) array of unsigned int
        Final labels of a region that holds every pixel of these cells.
    origin : (int, int)
        Slide coordinates (y0, x0), processing pixels, of ``labels[0, 0]``.
    columns : dict of str -> ndarray
        The cells' rows (:func:`mediar_ray.cells.measure.finalize`); ``id`` and the
        ``bbox_*`` columns locate them, every other column becomes a measurement.
    scale : (float, float)
        Level-0 pixels per processing pixel (sy, sx).
    slide : str, optional
        Slide name, for stable Feature ids.
    classification : dict, optional
        QuPath classification for every cell, e.g. ``{"name": "Cell", "color": [r, g, b]}``.
    """
    lab = np.asarray(labels)
    oy, ox = int(origin[0]), int(origin[1])
    h, w = lab.shape
    for i, cell in enumerate(np.asarray(columns["id"]).tolist()):
        y0, x0 = int(columns["bbox_y0"][i]) - oy, int(columns["bbox_x0"][i]) - ox
        y1, x1 = int(columns["bbox_y1"][i]) - oy, int(columns["bbox_x1"][i]) - ox
        if y0 < 0 or x0 < 0 or y1 > h or x1 > w:
            raise ValueError(f"cell {cell}: its box ({y0 + oy}:{y1 + oy}, {x0 + ox}:{x1 + ox})"
                             " is not inside the label region given")
        ring = outline(lab[y0:y1, x0:x1] == cell)
        ys = _coordinate(ring[:, 0] + y0 + oy, scale[0])
        xs = _coordinate(ring[:, 1] + x0 + ox, scale[1])
        coords = [[x, y] for x, y in zip(xs, ys)]
        coords.append(coords[0])
        properties: dict[str, Any] = {"objectType": "detection"}
        if classification:
            properties["classification"] = classification
        properties["measurements"] = _measurements(columns, i)
        feature: dict[str, Any] = {"type": "Feature"}
        if slide is not None:
            feature["id"] = str(uuid.uuid5(_NAMESPACE, f"{slide}/{cell}"))
        feature["geometry"] = {"type": "Polygon", "coordinates": [coords]}
        feature["properties"] = properties
        yield json.dumps(feature, separators=(",", ":"))


def write_piece(url: str, texts: Iterable[str]) -> int:
    """Stage Feature texts as one piece (features separated by ``,\\n``); returns how
    many. Rewriting a piece (a retried task) replaces it."""
    texts = list(texts)
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w", encoding="utf-8") as f:
        f.write(",\n".join(texts))
    return len(texts)


def write_feature_collection(url: str, pieces: Iterable[str]) -> None:
    """Stream the staged pieces (URLs, in order) into one FeatureCollection at ``url``
    (gzip-compressed when it ends with ``.gz``), reading one piece at a time."""
    compression = "gzip" if url.endswith(".gz") else None
    with fsspec.open(url, "wt", compression=compression, encoding="utf-8") as out:
        out.write('{"type":"FeatureCollection","features":[\n')
        first = True
        for piece in pieces:
            with fsspec.open(piece, "rt", encoding="utf-8") as f:
                text = f.read()
            if not text:
                continue
            if not first:
                out.write(",\n")
            out.write(text)
            first = False
        out.write("\n]}\n")


def outline_regions(columns: dict[str, np.ndarray],
                    tile: int) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """Group cells that span chunks into label regions to read for their outlines.

    Cells are grouped by the chunk (of side ``tile``) holding the top-left corner of
    their box; a group's region is the union of its cells' boxes, ``(y0, y1, x0, x1)``
    in processing pixels (at most ``tile`` plus the largest cell's extent on a side).
    Returns ``[(region, row indices into columns)]``, in raster order of the chunks.
    """
    y0, x0 = np.asarray(columns["bbox_y0"]), np.asarray(columns["bbox_x0"])
    y1, x1 = np.asarray(columns["bbox_y1"]), np.asarray(columns["bbox_x1"])
    ty, tx = y0 // tile, x0 // tile
    order = np.lexsort((tx, ty))
    new = np.r_[True, (ty[order][1:] != ty[order][:-1]) | (tx[order][1:] != tx[order][:-1])]
    bounds = np.r_[np.flatnonzero(new), order.size]
    groups = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        rows = order[s:e]
        region = (int(y0[rows].min()), int(y1[rows].max()), int(x0[rows].min()),
                  int(x1[rows].max()))
        groups.append((region, rows))
    return groups
