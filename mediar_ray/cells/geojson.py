"""Cell outlines as GeoJSON for QuPath, written piece by piece.

Each cell becomes one Feature: a Polygon in level-0 pixel coordinates (x right, y down,
the slide's top-left corner at 0, 0; a pixel spans one unit), and QuPath's detection
conventions in ``properties``: ``objectType: "detection"``, the cell's table row under
``measurements`` (name -> number; unknown values left out), an optional
``classification``. The Feature's ``id`` is a UUID derived from the slide name and cell
id, so a re-import replaces rather than duplicates.

The outline of a cell (:mod:`mediar_ray.cells.outline`) is one Polygon along pixel
edges, holes kept as interior rings, covering exactly the cell's pixels; a label in
several pieces is joined into one by one-pixel bridges first (a MultiPolygon cannot be
edited in QuPath). Polygons are valid for shapely, with the exterior ring
counter-clockwise and holes clockwise (RFC 7946).

Writing: a task that holds a chunk turns the chunk's complete cells into features
(:func:`features`) and stages them (:func:`write_piece`); the cells that span chunks are
drawn from a label region that holds them whole (:func:`outline_regions` groups them);
:func:`write_feature_collection` then streams the pieces into ``OUTPUT/<stem>.geojson``
(or ``.geojson.gz``) one at a time, so no process holds a slide's cells.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import uuid
from typing import Any, Iterable, Iterator

import fsspec
import numpy as np

from mediar_ray.cells.outline import outlines

__all__ = ["features", "outline_regions", "write_feature_collection", "write_piece"]

_NAMESPACE = uuid.UUID("8d7f3c1e-4b1a-5c57-9a0e-6d2f0f6b8a10")  # fixed: stable feature ids
_SKIP = {"bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"}  # the geometry says it


def _measurements(columns: dict[str, np.ndarray]) -> list[dict[str, int | float]]:
    """Per row, measurement name -> value: every column but the box, per-channel columns
    as ``<name>_<channel>``, floats rounded to 4 decimals, unknown (NaN) values left out
    (QuPath reads measurements as numbers)."""
    names, values = [], []
    for name, col in columns.items():
        col = np.asarray(col)
        if name in _SKIP:
            continue
        parts = (
            [(name, col)]
            if col.ndim == 1
            else [(f"{name}_{c}", col[:, c]) for c in range(col.shape[1])]
        )
        for part_name, v in parts:
            names.append(part_name)
            values.append(np.round(v, 4).tolist() if v.dtype.kind == "f" else v.tolist())
    return [{n: v for n, v in zip(names, row) if v == v} for row in zip(*values)]  # NaN != NaN


def _coordinate(values: np.ndarray, scale: float) -> list:
    """Edge coordinates (processing pixels) -> level-0 pixels, as JSON numbers."""
    if float(scale).is_integer():
        return (values * int(scale)).tolist()
    return np.round(values * float(scale), 3).tolist()


def features(
    labels: np.ndarray,
    origin: tuple[int, int],
    columns: dict[str, np.ndarray],
    scale: tuple[float, float] = (1.0, 1.0),
    slide: str | None = None,
    classification: dict[str, Any] | None = None,
) -> Iterator[str]:
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
    ids = np.asarray(columns["id"])
    box = np.stack(
        [np.asarray(columns[k]) for k in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")], axis=1
    ) - (oy, ox, oy, ox)
    outside = (box[:, 0] < 0) | (box[:, 1] < 0) | (box[:, 2] > h) | (box[:, 3] > w)
    if outside.any():
        raise ValueError(
            f"cells {ids[outside][:5].tolist()}...: their boxes are not inside "
            f"the label region given ({h} x {w} px at {origin})"
        )
    outlined = outlines(lab, ids)
    for cell, measurements in zip(ids.tolist(), _measurements(columns)):
        rings = []
        for ring in outlined[cell]:
            ys = _coordinate(ring[:, 0] + oy, scale[0])
            xs = _coordinate(ring[:, 1] + ox, scale[1])
            coords = [[x, y] for x, y in zip(xs, ys)]
            rings.append(coords + coords[:1])
        properties: dict[str, Any] = {"objectType": "detection"}
        if classification:
            properties["classification"] = classification
        properties["measurements"] = measurements
        feature: dict[str, Any] = {"type": "Feature"}
        if slide is not None:
            feature["id"] = str(uuid.uuid5(_NAMESPACE, f"{slide}/{cell}"))
        feature["geometry"] = {"type": "Polygon", "coordinates": rings}
        feature["properties"] = properties
        yield json.dumps(feature, separators=(",", ":"))


def write_piece(url: str, texts: Iterable[str]) -> int:
    r"""Stage Feature texts as one piece (features separated by ``,\n``); returns how
    many. Rewriting a piece (a retried task) replaces it."""
    texts = list(texts)
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w", encoding="utf-8") as f:
        f.write(",\n".join(texts))
    return len(texts)


def write_feature_collection(url: str, pieces: Iterable[str]) -> None:
    """Stream the staged pieces (URLs, in order) into one FeatureCollection at ``url``
    (gzip-compressed, level 6, when it ends with ``.gz``), one piece at a time."""
    from mediar_ray.io import atomic_open

    # A killed writer leaves no truncated file at ``url`` (readers would fail on it).
    with atomic_open(url, "wb") as raw, contextlib.ExitStack() as stack:
        binary = raw
        if url.endswith(".gz"):  # level 6: a third of level 9's time, nearly its size
            binary = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6))
        out = stack.enter_context(io.TextIOWrapper(binary, encoding="utf-8"))
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


def outline_regions(
    columns: dict[str, np.ndarray], tile: int
) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
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
        region = (
            int(y0[rows].min()),
            int(y1[rows].max()),
            int(x0[rows].min()),
            int(x1[rows].max()),
        )
        groups.append((region, rows))
    return groups
