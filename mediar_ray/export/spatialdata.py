"""A slide output as a SpatialData store (``mediar-ray to-spatialdata``), for the scverse
tools (scanpy, squidpy, napari-spatialdata) and pipelines such as sopa.

The store holds, all in the coordinate system ``global`` = the slide's micrometres (the
NGFF frame of the output: micrometres from the centre of the first level-0 pixel; level-0
pixels when the slide's pixel size is unknown):

- ``images/image``: the viewing image and its pyramid;
- ``labels/cells`` (uint32 cell ids) and ``labels/tissue`` (when the job used a mask);
- ``shapes/cell_outlines``: one polygon per cell along its pixel edges
  (:mod:`mediar_ray.cells.outline`, as in the GeoJSON), indexed by cell id;
- ``tables/table``: AnnData with one row per cell: ``obs`` the cell table's scalar
  columns, ``X`` the per-channel intensities (``intensity_{mean,min,max}_<c>``),
  ``obsm["spatial"]`` the centroids (x, y) in ``global``; it annotates ``labels/cells``
  (``region`` "cells", ``region_key`` "region", ``instance_key`` "id").

Nothing holds a slide's labels or polygons whole: images and labels are written by dask
chunk by chunk, and outlines are traced region by region (the cells whose box starts in
one chunk of the labels at a time) and appended to the GeoParquet file as they come.
The table (one row per cell) is held in memory: about 250 bytes a cell.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pandas as pd

from mediar_ray.errors import UserError
from mediar_ray.export.output import Pyramid, SlideOutput, open_output, read_cells
from mediar_ray.io import safe_url

__all__ = ["ExportSummary", "cell_polygons", "to_spatialdata"]

log = logging.getLogger("mediar_ray.export")

COORDINATES = "global"
OUTLINES = "cell_outlines"
TABLE = "table"
#: Columns that go to ``X`` (floats per channel); every other column goes to ``obs``.
X_PREFIXES = ("intensity_mean_", "intensity_min_", "intensity_max_")


@dataclass
class ExportSummary:
    """What :func:`to_spatialdata` wrote."""

    dest: str
    cells: int
    shapes: int
    labels: list[str]
    coordinate_system: str
    unit: str | None


def _require() -> Any:
    try:
        import spatialdata
    except ImportError as err:
        raise UserError(
            f"to-spatialdata needs spatialdata and anndata ({err.name} is "
            'missing): pip install "mediar_ray[spatialdata]"'
        ) from None
    return spatialdata


def _transform(scale: tuple[float, float], shift: tuple[float, float], axes=("y", "x")):
    """SpatialData transformation: pixel centre i -> shift + i * scale (NGFF order:
    scale first, then translation)."""
    from spatialdata.transformations import Scale, Sequence, Translation

    order = [0, 1] if axes == ("y", "x") else [1, 0]
    return Sequence(
        [
            Scale([scale[k] for k in order], axes=axes),
            Translation([shift[k] for k in order], axes=axes),
        ]
    )


def _image_element(p: Pyramid, channels: int) -> Any:
    from spatialdata.models import Image2DModel

    level0 = p.levels[0] if p.channel else p.levels[0][None]
    c_coords = ["r", "g", "b"] if channels == 3 and level0.dtype.kind == "u" else None
    return Image2DModel.parse(
        level0,
        dims=("c", "y", "x"),
        c_coords=c_coords,
        scale_factors=[2] * (len(p.levels) - 1) or None,
        transformations={COORDINATES: _transform(p.scale[0], p.translation[0])},
    )


def _labels_element(p: Pyramid) -> Any:
    from spatialdata.models import Labels2DModel

    return Labels2DModel.parse(
        p.levels[0],
        dims=("y", "x"),
        scale_factors=[2] * (len(p.levels) - 1) or None,
        transformations={COORDINATES: _transform(p.scale[0], p.translation[0])},
    )


def _table_element(out: SlideOutput, cells: pd.DataFrame) -> Any:
    import anndata as ad
    from spatialdata.models import TableModel

    x_cols = [c for c in cells.columns if c.startswith(X_PREFIXES)]
    obs = cells.drop(columns=x_cols)
    obs.index = pd.Index(obs["id"].astype(str).to_numpy(), name="cell")
    obs["region"] = pd.Categorical(["cells"] * len(obs))
    # Centroids in the labels' frame: centre of processing pixel i is shift + i * scale.
    (sy, sx), (ty, tx) = out.cells.scale[0], out.cells.translation[0]
    spatial = np.stack(
        [
            tx + sx * cells["centroid_x"].to_numpy(np.float64),
            ty + sy * cells["centroid_y"].to_numpy(np.float64),
        ],
        axis=1,
    )
    adata = ad.AnnData(
        X=cells[x_cols].to_numpy(np.float64),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(x_cols, dtype=object)),
        obsm={"spatial": spatial},
    )
    return TableModel.parse(adata, region="cells", region_key="region", instance_key="id")


def cell_polygons(
    labels: np.ndarray, origin: tuple[int, int], ids: np.ndarray
) -> tuple[np.ndarray, list]:
    """Outlines of the cells ``ids`` of a label region as shapely Polygons.

    Parameters
    ----------
    labels : (h, w) array of unsigned int
        Final labels of a region holding every pixel of these cells.
    origin : (int, int)
        Slide coordinates (y0, x0), processing pixels, of ``labels[0, 0]``.
    ids : (k,) array of int
        The cells to outline.

    Returns
    -------
    (ids, polygons)
        The ids (int64, in the order given) and one Polygon per cell, (x, y) in
        processing-pixel edge coordinates (pixel (i, j) spans x in [j, j + 1], y in
        [i, i + 1]).
    """
    import shapely

    from mediar_ray.cells.outline import outlines

    oy, ox = origin
    rings = outlines(labels, ids)
    polys = []
    for cell in np.asarray(ids).tolist():
        xy = [
            np.stack([r[:, 1] + ox, r[:, 0] + oy], axis=1).astype(np.float64) for r in rings[cell]
        ]
        polys.append(shapely.Polygon(xy[0], xy[1:]))
    return np.asarray(ids, np.int64), polys


def _outline_batches(out: SlideOutput, cells: pd.DataFrame) -> Iterator[tuple[np.ndarray, list]]:
    """(ids, polygons) region by region: the cells whose box starts in one chunk of the
    labels, read from a region that holds them whole."""
    from mediar_ray.cells.geojson import outline_regions

    labels = out.cells.levels[0]
    tile = int(labels.chunksize[0])
    columns = {k: cells[k].to_numpy() for k in ("id", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")}
    for (y0, y1, x0, x1), rows in outline_regions(columns, tile):
        region = np.asarray(labels[y0:y1, x0:x1])
        yield cell_polygons(region, (y0, x0), columns["id"][rows])


def _append_outlines(dest: str, batches: Iterator[tuple[np.ndarray, list]]) -> int:
    """Stream further polygons into ``shapes/<OUTLINES>/shapes.parquet`` (written by
    SpatialData with the first batch, whose schema and GeoParquet metadata are kept;
    the bounding box, known only at the end, is left out: it is optional)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    fs, root = fsspec.core.url_to_fs(dest)
    path = f"{root}/shapes/{OUTLINES}/shapes.parquet"
    with fs.open(path, "rb") as f:
        first = pq.read_table(f)
    meta = dict(first.schema.metadata)
    geo = json.loads(meta[b"geo"])
    geo["columns"]["geometry"].pop("bbox", None)
    meta[b"geo"] = json.dumps(geo).encode()
    schema = first.schema.with_metadata(meta)
    n = first.num_rows
    with fs.open(path + ".part", "wb") as f, pq.ParquetWriter(f, schema) as writer:
        writer.write_table(first.cast(schema))
        for ids, polys in batches:
            wkb = pa.array(shapely.to_wkb(polys), pa.binary())
            arrays = [
                wkb if name == "geometry" else pa.array(ids, pa.int64()) for name in schema.names
            ]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
            n += len(ids)
    fs.mv(path + ".part", path)
    return n


def _nullable_strings() -> contextlib.AbstractContextManager:
    """Anndata refuses pandas' string arrays (the default for str under pandas 3)
    unless told that readers are anndata >= 0.11."""
    import anndata as ad

    if hasattr(ad.settings, "allow_write_nullable_strings"):
        return ad.settings.override(allow_write_nullable_strings=True)
    return contextlib.nullcontext()


def to_spatialdata(source: str, dest: str, *, overwrite: bool = False) -> ExportSummary:
    """Write the slide output ``source`` (``OUTPUT/<name>.zarr``) as a SpatialData store.

    Parameters
    ----------
    source : str
        A complete slide output of ``mediar-ray segment-slides`` (its cell table under
        the same output root).
    dest : str
        The store to write (a new ``.zarr`` folder; local path).
    overwrite : bool
        Replace ``dest`` if it exists.

    Returns
    -------
    ExportSummary

    Raises
    ------
    UserError
        spatialdata is not installed, ``source`` is not a complete output, or ``dest``
        exists (without ``overwrite``) or lies inside ``source``.
    """
    sd = _require()
    import geopandas as gpd
    from spatialdata.models import ShapesModel

    out = open_output(source)
    fs, dest_path = fsspec.core.url_to_fs(dest)
    src_path = fsspec.core.url_to_fs(out.url)[1]
    if dest_path.rstrip("/").startswith(src_path.rstrip("/") + "/") or dest_path.rstrip(
        "/"
    ) == src_path.rstrip("/"):
        raise UserError(
            f"{safe_url(dest)}: the SpatialData store cannot go inside the slide "
            "output it reads; give a path outside OUTPUT/<name>.zarr"
        )
    if fs.exists(dest_path):
        if not overwrite:
            raise UserError(f"{safe_url(dest)} exists; remove it or pass --overwrite")
        fs.rm(dest_path, recursive=True)
    cells = read_cells(out)
    log.info("%s: %d cells", out.name, len(cells))
    elements: dict[str, dict[str, Any]] = {
        "images": {"image": _image_element(out.image, out.channels)},
        "labels": {
            name: _labels_element(p)
            for name, p in out.labels.items()
            if name in ("cells", "tissue")
        },
        "tables": {TABLE: _table_element(out, cells)},
        "shapes": {},
    }
    batches = _outline_batches(out, cells)
    first = next(batches, None)
    if first is not None:
        (sy, sx), (ty, tx) = out.cells.scale[0], out.cells.translation[0]
        # Edge coordinates: pixel i's centre is at i + 0.5, so shift by half a pixel.
        edge = _transform((sy, sx), (ty - sy / 2, tx - sx / 2))
        frame = gpd.GeoDataFrame({"geometry": first[1]}, index=pd.Index(first[0]))
        elements["shapes"][OUTLINES] = ShapesModel.parse(frame, transformations={COORDINATES: edge})
    sdata = sd.SpatialData(**elements)
    with _nullable_strings():
        sdata.write(dest_path)
    shapes = _append_outlines(dest, batches) if first is not None else 0
    return ExportSummary(
        dest=dest,
        cells=len(cells),
        shapes=shapes,
        labels=sorted(elements["labels"]),
        coordinate_system=COORDINATES,
        unit=out.cells.unit,
    )
