"""The archive's cell table: a Parquet dataset partitioned by slide.

Layout (hive partitioning, readable as one table by pandas, dask, Ray Data and DuckDB)::

    OUTPUT/cells/slide=<name>/part-<run>-<k>.parquet

One row per cell (columns: :data:`COLUMNS`); the ``slide`` column comes from the
directory name. Every file carries, in its Parquet key-value metadata under
``mediar_ray.cells``, a JSON object describing its slide (shape, level-0 scale, pixel
size, areas, channels) and the *run* that wrote it: ``run`` (a random token), ``file``
(its index), ``files`` and ``rows`` (of the whole run). A slide's partition is replaced
as a whole by :func:`commit_slide`: it writes the new run's files, then removes every
file of other runs. A reader that lists the partition in between (or after a commit was
killed) sees two runs; :func:`partition_state` detects that, and :func:`repair_partition`
keeps the newest complete run. Other slides' partitions are never touched.

The slide description (``info`` of :func:`commit_slide`) that ``mediar-ray cells`` uses:
``shape`` (processing pixels, [h, w]), ``scale`` (level-0 pixels per processing pixel,
[sy, sx]), ``pixel_size_um`` (level-0 micrometres per pixel, [y, x], or null),
``tissue_area_px`` (processing pixels of tissue, optional: densities then refer to it),
``channels``; any other JSON-able keys are kept.

Rows are staged first (:func:`write_part`, one small file per chunk, under the slide's
scratch space) so that no process holds a slide's cells; the commit streams them into
files of at most ``rows_per_file`` rows.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from typing import Any, Iterable, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "COLUMNS",
    "CELLS_DIR",
    "METADATA_KEY",
    "arrow_filesystem",
    "cells_dataset",
    "cells_schema",
    "cells_table",
    "cells_url",
    "commit_slide",
    "partition_state",
    "partition_url",
    "repair_partition",
    "slide_infos",
    "write_part",
]

CELLS_DIR = "cells"
METADATA_KEY = b"mediar_ray.cells"

_F64, _I64 = pa.float64(), pa.int64()
#: Column name, Arrow type, meaning. Lengths in processing pixels unless said otherwise.
COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("id", pa.uint32(), "cell id: its value in the slide's labels/cells image"),
    ("area", _I64, "pixels (processing resolution)"),
    ("area_um2", _F64, "square micrometres (null when the pixel size is unknown)"),
    ("centroid_y", _F64, "row of the centroid, processing pixels (pixel centres at integers)"),
    ("centroid_x", _F64, "column of the centroid, processing pixels"),
    ("centroid_y_level0", _F64, "row of the centroid, level-0 pixels"),
    ("centroid_x_level0", _F64, "column of the centroid, level-0 pixels"),
    ("centroid_y_um", _F64, "centroid_y_level0 x pixel height in micrometres (null if unknown)"),
    ("centroid_x_um", _F64, "centroid_x_level0 x pixel width in micrometres (null if unknown)"),
    ("bbox_y0", _I64, "first row of the bounding box (processing pixels)"),
    ("bbox_x0", _I64, "first column of the bounding box"),
    ("bbox_y1", _I64, "one past the last row of the bounding box"),
    ("bbox_x1", _I64, "one past the last column of the bounding box"),
    ("equivalent_diameter", _F64, "diameter of the disc of the same area"),
    ("axis_major_length", _F64, "major axis of the ellipse with the same second moments"),
    ("axis_minor_length", _F64, "minor axis of that ellipse"),
    ("eccentricity", _F64, "eccentricity of that ellipse (0 = circle)"),
    ("orientation", _F64, "radians between the row axis and the major axis (scikit-image)"),
    ("extent", _F64, "area / bounding-box area"),
    ("prob_mean", _F64, "mean cell probability, sigmoid of the model's cell logit"),
    ("prob_max", _F64, "largest cell probability"),
    ("intensity_mean", pa.list_(_F64), "mean image value per channel"),
    ("intensity_min", pa.list_(_F64), "smallest image value per channel"),
    ("intensity_max", pa.list_(_F64), "largest image value per channel"),
]


def cells_schema(info: dict[str, Any] | None = None) -> pa.Schema:
    """The table's schema; ``info`` (JSON-able) goes into its metadata under
    :data:`METADATA_KEY`."""
    schema = pa.schema(
        [pa.field(name, typ, metadata={"description": doc}) for name, typ, doc in COLUMNS]
    )
    if info is not None:
        schema = schema.with_metadata({METADATA_KEY: json.dumps(info).encode()})
    return schema


def cells_table(columns: dict[str, np.ndarray]) -> pa.Table:
    """A table of :data:`COLUMNS` from :func:`mediar_ray.cells.measure.finalize` output.

    NaN in a scalar float column becomes null (unknown); the per-channel columns
    ((k, C) arrays) become lists of C values.
    """
    arrays = []
    for name, typ, _ in COLUMNS:
        values = np.asarray(columns[name])
        if pa.types.is_list(typ):
            k, c = values.shape
            offsets = pa.array(np.arange(k + 1, dtype=np.int32) * c)
            arrays.append(pa.ListArray.from_arrays(offsets, pa.array(values.ravel(), _F64)))
        elif pa.types.is_floating(typ):
            values = values.astype(np.float64)
            arrays.append(pa.array(values, typ, mask=np.isnan(values)))
        else:
            arrays.append(pa.array(values, typ))
    return pa.Table.from_arrays(arrays, schema=cells_schema())


def arrow_filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for an fsspec URL (local, s3://, gs://, memory://...).

    Non-local URLs go through fsspec (credentials from the environment or fsspec's
    configuration, as everywhere in mediar_ray)."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def cells_url(output: str) -> str:
    """``OUTPUT/cells``: the root of the archive's cell table."""
    return f"{output.rstrip('/')}/{CELLS_DIR}"


def partition_url(output: str, slide: str) -> str:
    """``OUTPUT/cells/slide=<slide>`` (slide names are safe file names)."""
    # Hive readers URL-decode partition values: keep to characters that need no coding.
    if not re.fullmatch(r"[A-Za-z0-9._-]+", slide):
        raise ValueError(
            f"unsafe slide name {slide!r} for a cell-table partition "
            "(letters, digits, '.', '_' and '-' only)"
        )
    return f"{cells_url(output)}/slide={slide}"


def write_part(table: pa.Table, url: str) -> int:
    """Write one staged part (a chunk's rows) to ``url``; returns its row count."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table.cast(cells_schema()), f, compression="zstd")
    return table.num_rows


def _rows(url: str) -> int:
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _read(url: str) -> pa.Table:
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f).cast(cells_schema())


def _slices(parts: Iterable[str], size: int) -> Iterable[pa.Table]:
    """The rows of ``parts`` in order, regrouped into tables of ``size`` rows (the last
    one shorter); holds at most one part plus ``size`` rows."""
    pending: list[pa.Table] = []
    held = 0
    for url in parts:
        table = _read(url)
        while table.num_rows:
            take = min(size - held, table.num_rows)
            pending.append(table.slice(0, take))
            held += take
            table = table.slice(take)
            if held == size:
                yield pa.concat_tables(pending)
                pending, held = [], 0
    if held:
        yield pa.concat_tables(pending)


def _by_file(tables: Iterable[pa.Table], rows_per_file: int) -> Iterable[tuple[int, pa.Table]]:
    """``(k, rows)`` pairs: ``tables`` cut so that each piece belongs to file ``k``."""
    pos = 0
    for table in tables:
        while table.num_rows:
            k = pos // rows_per_file
            take = min((k + 1) * rows_per_file - pos, table.num_rows)
            yield k, table.slice(0, take)
            pos += take
            table = table.slice(take)


def commit_slide(
    output: str,
    slide: str,
    parts: Sequence[str],
    info: dict[str, Any],
    rows: int | None = None,
    rows_per_file: int = 1_000_000,
    row_group: int = 65_536,
) -> dict[str, Any]:
    """Replace the slide's partition by the rows of the staged ``parts``.

    Writes ``part-<run>-<k>.parquet`` files (``rows_per_file`` rows each, the last one
    shorter; one empty file for a slide without cells, so that its metadata exists),
    then removes the files of every other run. ``info`` (JSON-able: shape, scale, pixel
    size, ...) is stored in each file's metadata with the run's bookkeeping. ``rows`` is
    the total row count of ``parts`` if known (else read from their footers). Memory:
    one staged part plus ``row_group`` rows.

    Returns ``{"run", "files", "rows"}``.
    """
    if row_group < 1 or rows_per_file < 1:
        raise ValueError("row_group and rows_per_file must be positive")
    parts = sorted(parts)
    total = sum(_rows(u) for u in parts) if rows is None else int(rows)
    run = uuid.uuid4().hex[:12]
    n_files = max(1, math.ceil(total / rows_per_file))
    url = partition_url(output, slide)
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    base = {
        **info,
        "slide": slide,
        "run": run,
        "files": n_files,
        "rows": total,
        "written": time.time(),
    }
    names = [f"part-{run}-{k:05d}.parquet" for k in range(n_files)]
    try:
        _write_run(
            fs,
            root,
            names,
            _by_file(_slices(parts, row_group), rows_per_file),
            base,
            total,
            rows_per_file,
        )
    except BaseException:
        fs.rm([f"{root}/{n}" for n in names if fs.exists(f"{root}/{n}")])
        raise
    _remove_other_runs(fs, root, run)
    return {"run": run, "files": [f"{url}/{n}" for n in names], "rows": total}


def _write_run(
    fs: fsspec.AbstractFileSystem,
    root: str,
    names: list[str],
    pieces: Iterable[tuple[int, pa.Table]],
    base: dict[str, Any],
    total: int,
    rows_per_file: int,
) -> None:
    pieces = iter(pieces)
    seen = 0
    for k, name in enumerate(names):
        schema = cells_schema({**base, "file": k})
        with (
            _open_final(fs, f"{root}/{name}") as f,
            pq.ParquetWriter(f, schema, compression="zstd") as writer,
        ):
            if total == 0:
                writer.write_table(schema.empty_table())
            end = min(total, (k + 1) * rows_per_file)
            while seen < end:
                piece_file, piece = next(pieces, (None, None))
                if piece is None or piece_file != k:
                    break
                writer.write_table(piece)
                seen += piece.num_rows
    if seen != total or next(pieces, None) is not None:
        raise RuntimeError(
            f"the staged cell parts of slide {base['slide']} do not hold the "
            f"{total} rows announced; the old partition was kept"
        )


def _open_final(fs: fsspec.AbstractFileSystem, path: str):
    """Write ``path`` so that a killed writer never leaves a partial part file there
    (:func:`mediar_ray.io.atomic_open`): readers of the table skip the hidden temporary."""
    from mediar_ray.io import atomic_open

    return atomic_open(path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path))


def _listing(fs: fsspec.AbstractFileSystem, root: str, detail: bool = False) -> list:
    """``fs.ls`` without a cached listing: other processes write partitions too."""
    fs.invalidate_cache(root)
    return fs.ls(root, detail=detail)


def _remove_other_runs(fs: fsspec.AbstractFileSystem, root: str, keep: str) -> None:
    old = [
        p
        for p in _listing(fs, root)
        if p.rsplit("/", 1)[-1].startswith("part-")
        and not p.rsplit("/", 1)[-1].startswith(f"part-{keep}-")
    ]
    if old:
        fs.rm(old)


def _file_info(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    """The ``mediar_ray.cells`` metadata of one file, with its row count (footer only)."""
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
    raw = (meta.metadata or {}).get(METADATA_KEY)
    info = json.loads(raw) if raw else {}
    info["file_rows"] = meta.num_rows
    return info


def partition_state(output: str, slide: str) -> dict[str, Any]:
    """What the slide's partition holds, per run: ``{"runs": {run: {"present",
    "files", "rows", "written"}}, "complete": [runs with all their files], "clean":
    exactly one run, complete}``. Reads only file names and one footer per run."""
    fs, root = fsspec.core.url_to_fs(partition_url(output, slide))
    try:
        names = sorted(p.rsplit("/", 1)[-1] for p in _listing(fs, root))
    except FileNotFoundError:
        names = []
    runs: dict[str, dict[str, Any]] = {}
    for name in names:
        if name.startswith("part-") and name.endswith(".parquet"):
            run = name[len("part-") :].rsplit("-", 1)[0]
            runs.setdefault(run, {"present": 0, "first": name})["present"] += 1
    for r in runs.values():
        info = _file_info(fs, f"{root}/{r.pop('first')}")
        r.update(files=info.get("files"), rows=info.get("rows"), written=info.get("written"))
    complete = [run for run, r in runs.items() if r["present"] == r["files"]]
    return {"runs": runs, "complete": complete, "clean": len(runs) == 1 and len(complete) == 1}


def repair_partition(output: str, slide: str) -> str | None:
    """After a killed commit: keep the newest complete run of the slide's partition and
    remove the files of all others; returns the run kept (None: nothing complete, the
    partition is emptied, and the slide must be redone)."""
    state = partition_state(output, slide)
    fs, root = fsspec.core.url_to_fs(partition_url(output, slide))
    keep = max(state["complete"], key=lambda r: state["runs"][r]["written"] or 0, default=None)
    if keep is None:
        if state["runs"]:
            fs.rm([p for p in _listing(fs, root) if p.rsplit("/", 1)[-1].startswith("part-")])
        return None
    _remove_other_runs(fs, root, keep)
    return keep


def cells_dataset(output: str) -> pads.Dataset:
    """The archive's cell table as a :class:`pyarrow.dataset.Dataset` (``slide`` read as
    a string column even for numeric-looking slide names)."""
    filesystem, path = arrow_filesystem(cells_url(output))
    partitioning = pads.partitioning(pa.schema([("slide", pa.string())]), flavor="hive")
    return pads.dataset(path, filesystem=filesystem, format="parquet", partitioning=partitioning)


def slide_infos(output: str) -> dict[str, dict[str, Any]]:
    """Per slide of the archive: the metadata of its partition's newest run plus its
    ``state`` (:func:`partition_state`); ``cells`` is the row count of that run."""
    fs, root = fsspec.core.url_to_fs(cells_url(output))
    try:
        entries = _listing(fs, root, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for entry in sorted(entries, key=lambda e: e["name"]):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry["type"] != "directory" or not name.startswith("slide="):
            continue
        slide = name[len("slide=") :]
        state = partition_state(output, slide)
        if not state["runs"]:
            continue
        run = max(state["runs"], key=lambda r: state["runs"][r]["written"] or 0)
        first = f"{root}/{name}/part-{run}-00000.parquet"
        info = _file_info(fs, first) if fs.exists(first) else {"slide": slide, "run": run}
        info.pop("file", None), info.pop("file_rows", None)
        out[slide] = {**info, "cells": state["runs"][run]["rows"], "state": state}
    return out
