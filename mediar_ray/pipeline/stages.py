"""The work of each stage on one tile or chunk. Plain functions: Ray calls them.

Heavy libraries (torch for the model, numba for tracking) are imported inside the
functions that need them, so that a worker process running only light stages (planning,
relabelling, pyramids) never loads them.

None of these holds more than one tile (plus its halo) in memory, and each writes only the
zarr chunks of its own tile, so no two writers ever share a chunk.

Inference runs every sliding window of the slide exactly once, in two steps per tile:
:func:`infer_partial` runs the windows the tile owns (:func:`mediar_ray.inference.
predict_partial`) and writes their blended sum over the tile and up to one window beyond
its bottom and right edges as one whole chunk of ``.scratch/partials``; then
:func:`gather_tile` adds the parts of its own and its upper/left neighbours' partials that
fall on the tile and writes the tile's chunk of ``.scratch/flows``. Both steps only
overwrite whole chunks, so a retried tile simply redoes its step.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import fsspec
import numpy as np
import zarr

from mediar_ray.pipeline.layout import SlideLayout, Tile, tile_grid
from mediar_ray.pipeline.stitch import anchor_labels
from mediar_ray.preprocess import IntensityAccumulator, IntensityStats, normalize

__all__ = [
    "SlidePlan",
    "measure_tiles",
    "done_tiles",
    "infer_partial",
    "gather_tile",
    "level0_chunk",
    "mark_done",
    "measure_cells",
    "outline_piece",
    "partial_sources",
    "relabel_chunk",
    "TissueTiles",
    "tiles_to_infer",
    "tissue_tiles",
    "windows_never_run",
    "track_chunk",
    "view_chunk",
]


@dataclass
class SlidePlan:
    """Everything the workers need to know about a slide (small, picklable)."""

    url: str
    layout: SlideLayout
    shape: tuple[int, int]
    channels: int
    dtype: str
    tile: int
    halo: int
    stats: IntensityStats | None = None
    roi_size: int = 512
    reader: str = "auto"
    fingerprint: dict | None = None
    level: int = 0
    scale: float = 1.0
    mpp: tuple[float, float] | None = None
    level_downsample: tuple[float, float] = (1.0, 1.0)
    source_shape: tuple[int, int] | None = None
    copy_image: bool = False
    tissue: bool = False
    thumb_factor: int = 16
    partial: tuple[int, int] | None = None

    @property
    def to_level0(self) -> tuple[float, float]:
        """Level-0 pixels per processing pixel along (y, x)."""
        dy, dx = self.level_downsample
        return dy * self.scale, dx * self.scale

    @property
    def processing_mpp(self) -> tuple[float, float] | None:
        """Micrometres per processing pixel (y, x), or None when the slide does not say."""
        if self.mpp is None:
            return None
        sy, sx = self.to_level0
        return self.mpp[0] * sy, self.mpp[1] * sx

    @property
    def spill(self) -> int:
        """How far a tile's windows reach: the tile plus one window less a pixel."""
        return self.tile + self.roi_size - 1

    @property
    def partial_shape(self) -> tuple[int, int]:
        """(rows, columns) of a tile's partial-inference chunk: :attr:`spill` clipped to
        the image (``partial``; plans of earlier versions, without it, did not clip)."""
        return tuple(self.partial) if self.partial else (self.spill, self.spill)

    def to_json(self) -> str:
        """The plan as JSON (the layout as its output root and stem), for
        :meth:`from_json`."""
        d = asdict(self)
        d["layout"] = {"output_root": self.layout.output_root, "stem": self.layout.stem}
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "SlidePlan":
        """The plan that :meth:`to_json` wrote (lists back to tuples, ``stats`` back to
        :class:`IntensityStats`)."""
        d = json.loads(text)
        d["layout"] = SlideLayout(**d["layout"])
        for key in ("shape", "mpp", "level_downsample", "source_shape", "partial"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        d["stats"] = IntensityStats(**d["stats"]) if d["stats"] else None
        return cls(**d)


def open_array(url: str, mode: str = "r") -> zarr.Array:
    return zarr.open_array(url, mode=mode)


def create_arrays(plan: SlidePlan) -> None:
    """Create the scratch flows/partials/anchors, the final label level 0 and, with
    ``copy_image``, the full copy of the processing image."""
    root = zarr.open_group(plan.layout.root, mode="a", zarr_format=3)
    h, w = plan.shape
    t = plan.tile
    if plan.copy_image:
        root.create_array(
            "0",
            shape=(plan.channels, h, w),
            chunks=(plan.channels, t, t),
            dtype=plan.dtype,
            fill_value=0,
            dimension_names=["c", "y", "x"],
            overwrite=True,
        )
    scratch = zarr.open_group(plan.layout.scratch, mode="a", zarr_format=3)
    scratch.create_array(
        "flows", shape=(3, h, w), chunks=(3, t, t), dtype="float32", fill_value=0, overwrite=True
    )
    ny, nx, (sy, sx) = -(-h // t), -(-w // t), plan.partial_shape
    scratch.create_array(
        "partials",
        shape=(ny, nx, 3, sy, sx),
        chunks=(1, 1, 3, sy, sx),
        dtype="float32",
        fill_value=0,
        overwrite=True,
    )
    scratch.create_array(
        "anchors", shape=(h, w), chunks=(t, t), dtype="uint64", fill_value=0, overwrite=True
    )
    labels = zarr.open_group(plan.layout.path("labels", "cells"), mode="a", zarr_format=3)
    labels.create_array(
        "0",
        shape=(h, w),
        chunks=(t, t),
        dtype="uint32",
        fill_value=0,
        dimension_names=["y", "x"],
        overwrite=True,
    )


def measure_tiles(
    plan: SlidePlan, tiles: list[Tile]
) -> tuple[IntensityAccumulator, list[tuple[int, int, np.ndarray]]]:
    """Read tiles of the processing image: accumulate their intensity statistics (exact
    for integer images), copy them into the output image with ``copy_image``, and return
    their block means (``thumb_factor`` px blocks) as (row, col, block) of the thumbnail."""
    from mediar_ray.pipeline.view import block_means, read_processing

    acc = IntensityAccumulator()
    image = open_array(plan.layout.path("0"), mode="r+") if plan.copy_image else None
    blocks = []
    f = plan.thumb_factor
    for tile in tiles:
        region = read_processing(plan, tile.y0, tile.y1, tile.x0, tile.x1)
        acc.update(region)
        if image is not None:
            chw = region[None] if region.ndim == 2 else np.moveaxis(region, -1, 0)
            image[:, tile.y0 : tile.y1, tile.x0 : tile.x1] = chw
        blocks.append((tile.y0 // f, tile.x0 // f, block_means(region, f)))
    return acc, blocks


def _run_key(plan: SlidePlan) -> str:
    """What identifies a slide's run (its output and fingerprint): the key of the caches
    below, which a worker process keeps across the slides and runs it serves."""
    return json.dumps([plan.layout.root, plan.fingerprint], sort_keys=True, default=str)


@lru_cache(maxsize=4)
def _tissue_mask(root: str, key: str) -> np.ndarray:
    """A slide's stored tissue mask, (h, w) bool on the thumbnail grid."""
    return np.asarray(zarr.open_array(f"{root}/labels/tissue/0", mode="r")[:]) > 0


def _tissue_skip(plan: SlidePlan):
    """The window-skip test of a slide's stored tissue mask."""
    from mediar_ray.tissue import tissue_skip

    return tissue_skip(_tissue_mask(plan.layout.root, _run_key(plan)), tuple(plan.shape))


@dataclass(frozen=True)
class TissueTiles:
    """Which tiles of a slide the stages touch, by tile name.

    ``live``: tiles some window that runs reaches, i.e. that may hold cells: gathered,
    tracked and relabelled. ``rim``: the other tiles (glass: every window reaching them
    is skipped, so their flows are :data:`~mediar_ray.windows.BACKGROUND` and their
    labels 0) within a halo of a live tile: only their flows are written, for the live
    tiles' tracking. ``needed``: the tiles whose partials the live tiles sum, the only
    ones the model actors see. Without a tissue mask every tile is live and needed.
    """

    live: frozenset[str]
    rim: frozenset[str]
    needed: frozenset[str]


def tissue_tiles(plan: SlidePlan) -> TissueTiles:
    """The :class:`TissueTiles` of ``plan`` (from its stored tissue mask, if any)."""
    return _tissue_tiles(
        plan.layout.root,
        _run_key(plan),
        tuple(plan.shape),
        plan.tile,
        plan.halo,
        plan.roi_size,
        plan.tissue,
    )


@lru_cache(maxsize=4)
def _tissue_tiles(
    root: str, key: str, shape: tuple[int, int], tile: int, halo: int, roi: int, tissue: bool
) -> TissueTiles:
    from mediar_ray.tissue import window_touches_tissue
    from mediar_ray.windows import partial_extent

    tiles = tile_grid(shape, tile)
    everything = frozenset(t.name for t in tiles)
    if not tissue:
        return TissueTiles(everything, frozenset(), everything)
    mask = _tissue_mask(root, key)
    ds = (shape[0] / mask.shape[0], shape[1] / mask.shape[1])
    # A tile whose windows all lie where the mask has no tissue runs none of them (a
    # window lies within its owner's partial extent, and a batch runs only when one of
    # its windows touches tissue).
    idle = {
        t.name
        for t in tiles
        if not window_touches_tissue(
            mask, ds, *partial_extent(shape, (t.y0, t.y1, t.x0, t.x1), roi)
        )
    }
    sources = {t.name: [s.name for s in _sources(shape, tile, roi, t)] for t in tiles}
    live = frozenset(n for n in everything if any(s not in idle for s in sources[n]))
    reach = -(-halo // tile)  # tiles a halo spans
    by_index = {(t.ty, t.tx): t.name for t in tiles}
    rim = frozenset(
        t.name
        for t in tiles
        if t.name not in live
        and any(
            by_index.get((t.ty + dy, t.tx + dx)) in live
            for dy in range(-reach, reach + 1)
            for dx in range(-reach, reach + 1)
        )
    )
    needed = frozenset(s for n in live for s in sources[n])
    return TissueTiles(live, rim, needed)


def infer_partial(
    plan: SlidePlan,
    tile: Tile,
    models: list,
    tta: bool,
    device: str,
    sw_batch_size: int | None = None,
    *,
    precision: str = "auto",
) -> dict[str, int]:
    """Run the windows ``tile`` owns (those touching tissue, when the slide has a tissue
    mask); write their partial sum as chunk (ty, tx) of ``.scratch/partials`` ((3,
    *partial_shape) float32 from the tile's top-left corner, zero-padded), then a
    ``windows`` done record. Returns the windows run and skipped (per TTA frame).
    ``sw_batch_size`` (None or 0: the device's default) and ``precision`` are those of
    :func:`mediar_ray.inference.predict_partial`."""
    from mediar_ray.inference import predict_partial  # torch: only model actors import it
    from mediar_ray.pipeline.view import read_processing

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return normalize(read_processing(plan, y0, y1, x0, x1), plan.stats)

    skip = _tissue_skip(plan) if plan.tissue else None
    region = (tile.y0, tile.y1, tile.x0, tile.x1)
    part, counts = predict_partial(
        read,
        plan.shape,
        region,
        models,
        tta=tta,
        roi_size=plan.roi_size,
        sw_batch_size=sw_batch_size,
        device=device,
        skip=skip,
        return_counts=True,
        precision=precision,
    )
    chunk = np.zeros((3, *plan.partial_shape), np.float32)
    chunk[:, : part.shape[1], : part.shape[2]] = part
    partials = open_array(plan.layout.scratch + "/partials", mode="r+")
    partials[tile.ty, tile.tx] = chunk  # exactly one whole chunk
    mark_done(plan, "windows", tile)
    return {"windows_run": counts.run, "windows_skipped": counts.skipped}


def partial_sources(plan: SlidePlan, tile: Tile) -> list[Tile]:
    """The tiles whose partials reach ``tile``: itself and the tiles above/left of it
    less than ``spill`` pixels away."""
    return _sources(tuple(plan.shape), plan.tile, plan.roi_size, tile)


def _sources(shape: tuple[int, int], t: int, roi: int, tile: Tile) -> list[Tile]:
    from mediar_ray.windows import partial_extent

    h, w = shape
    spill = t + roi - 1  # as SlidePlan.spill: how far a tile's windows reach
    reach = -(-spill // t)  # a partial spans at most this many tile rows/columns
    sources = []
    for ty in range(max(tile.ty - reach, 0), tile.ty + 1):
        for tx in range(max(tile.tx - reach, 0), tile.tx + 1):
            src = Tile(ty, tx, ty * t, min(ty * t + t, h), tx * t, min(tx * t + t, w))
            ey0, ey1, ex0, ex1 = partial_extent(shape, (src.y0, src.y1, src.x0, src.x1), roi)
            if ey0 <= tile.y0 < ey1 and ex0 <= tile.x0 < ex1:
                sources.append(src)
    return sources


def tiles_to_infer(plan: SlidePlan) -> list[Tile]:
    """The tiles whose partials must still be computed: those that a live tile without
    flows (no ``infer`` record; :func:`tissue_tiles`) needs and that have no ``windows``
    record; largest first, so that the last tiles to start are the short ones."""
    done = done_tiles(plan, "infer")
    live = tissue_tiles(plan).live
    todo = [t for t in tile_grid(plan.shape, plan.tile) if t.name in live and t.name not in done]
    have = done_tiles(plan, "windows")
    needed = {s for t in todo for s in partial_sources(plan, t) if s.name not in have}
    return sorted(needed, key=lambda t: (-(t.y1 - t.y0) * (t.x1 - t.x0), t.ty, t.tx))


def windows_never_run(plan: SlidePlan, tta: bool) -> int:
    """Windows (per augmentation frame) of the tiles no live tile needs: skipped without
    ever reaching a model actor (:func:`tissue_tiles`)."""
    from mediar_ray.windows import owned_window_count

    needed = tissue_tiles(plan).needed
    return sum(
        owned_window_count(plan.shape, (t.y0, t.y1, t.x0, t.x1), tta, plan.roi_size)
        for t in tile_grid(plan.shape, plan.tile)
        if t.name not in needed
    )


def gather_tile(plan: SlidePlan, tile: Tile) -> None:
    """Sum the partials that reach ``tile`` over its core (for a glass tile: background,
    :func:`tissue_tiles`), write its ``.scratch/flows`` chunk ((3, h, w) float32: dy, dx,
    logit), then an ``infer`` done record."""
    total = np.zeros((3, tile.y1 - tile.y0, tile.x1 - tile.x0), np.float32)
    if tile.name not in tissue_tiles(plan).live:  # glass: every window reaching it skipped
        from mediar_ray.windows import BACKGROUND

        total[:] = np.asarray(BACKGROUND, np.float32)[:, None, None]
        sources = []
    else:
        sources = partial_sources(plan, tile)
    partials = open_array(plan.layout.scratch + "/partials")
    for src in sources:
        oy, ox = tile.y0 - src.y0, tile.x0 - src.x0
        sy, sx = plan.partial_shape
        ny, nx = min(total.shape[1], sy - oy), min(total.shape[2], sx - ox)
        total[:, :ny, :nx] += np.asarray(partials[src.ty, src.tx, :, oy : oy + ny, ox : ox + nx])
    flows = open_array(plan.layout.scratch + "/flows", mode="r+")
    flows[:, tile.y0 : tile.y1, tile.x0 : tile.x1] = total
    mark_done(plan, "infer", tile)


def mark_done(plan: SlidePlan, stage: str, tile: Tile) -> None:
    """Record that ``stage`` finished ``tile``: a marker file under the slide's scratch
    folder (``done/<stage>/<tile name>``), read by :func:`done_tiles`."""
    with fsspec.open(f"{plan.layout.scratch}/done/{stage}/{tile.name}", "w") as f:
        f.write("1")


def done_tiles(plan: SlidePlan, stage: str) -> set[str]:
    """The names (``"ty_tx"``) of the tiles :func:`mark_done` recorded for ``stage``
    (empty when none)."""
    fs, path = fsspec.core.url_to_fs(f"{plan.layout.scratch}/done/{stage}")
    try:
        return {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    except FileNotFoundError:
        return set()


def track_chunk(plan: SlidePlan, tile: Tile, flow_params: dict[str, Any]) -> dict[str, Any]:
    """Flow tracking on a chunk plus halo; writes the core's anchor names.

    Returns the names present in the core and this chunk's view of the 2-pixel strips
    across each of its borders (for the union-find safety net on the driver).
    """
    h, w = plan.shape
    y0, y1 = max(tile.y0 - plan.halo, 0), min(tile.y1 + plan.halo, h)
    x0, x1 = max(tile.x0 - plan.halo, 0), min(tile.x1 + plan.halo, w)
    from mediar_ray.dynamics import flows_to_labels

    flows = open_array(plan.layout.scratch + "/flows")
    labels = flows_to_labels(np.asarray(flows[:, y0:y1, x0:x1]), **flow_params)
    names = anchor_labels(labels, (y0, x0), w)
    cy, cx = tile.y0 - y0, tile.x0 - x0
    core = names[cy : cy + tile.y1 - tile.y0, cx : cx + tile.x1 - tile.x0]
    anchors = open_array(plan.layout.scratch + "/anchors", mode="r+")
    anchors[tile.y0 : tile.y1, tile.x0 : tile.x1] = core
    strips = {}
    if tile.x1 < w:  # right border: columns x1-1 and x1
        strips["right"] = names[cy : cy + tile.y1 - tile.y0, tile.x1 - 1 - x0 : tile.x1 + 1 - x0]
    if tile.x0 > 0:
        strips["left"] = names[cy : cy + tile.y1 - tile.y0, tile.x0 - 1 - x0 : tile.x0 + 1 - x0]
    if tile.y1 < h:
        strips["bottom"] = names[tile.y1 - 1 - y0 : tile.y1 + 1 - y0, cx : cx + tile.x1 - tile.x0]
    if tile.y0 > 0:
        strips["top"] = names[tile.y0 - 1 - y0 : tile.y0 + 1 - y0, cx : cx + tile.x1 - tile.x0]
    return {"tile": tile, "names": np.unique(core[core > 0]), "strips": strips}


def relabel_chunk(
    plan: SlidePlan,
    tile: Tile,
    sorted_names: np.ndarray,
    ids: np.ndarray,
    shared: np.ndarray | None = None,
    geojson: bool = False,
) -> dict[str, Any]:
    """Anchor names -> final uint32 ids for one chunk, written to the labels; then, with
    ``shared`` (the ids present in several chunks), the chunk's cells are measured.

    Returns ``present`` ids and their pixel ``counts``; with ``shared`` also ``rows``
    (cells complete in the chunk, staged as a table part) and ``border`` (partial
    measurements of the shared cells, merged by the caller).
    """
    core = np.asarray(
        open_array(plan.layout.scratch + "/anchors")[tile.y0 : tile.y1, tile.x0 : tile.x1]
    )
    out = np.zeros(core.shape, np.uint32)
    fg = core > 0
    out[fg] = ids[np.searchsorted(sorted_names, core[fg])]
    labels = open_array(plan.layout.path("labels", "cells", "0"), mode="r+")
    labels[tile.y0 : tile.y1, tile.x0 : tile.x1] = out
    present, counts = np.unique(out[fg], return_counts=True)
    result: dict[str, Any] = {"present": present, "counts": counts}
    if shared is not None:
        result.update(measure_cells(plan, tile, out, shared, geojson))
    return result


def measure_cells(
    plan: SlidePlan, tile: Tile, labels: np.ndarray, shared: np.ndarray, geojson: bool
) -> dict[str, Any]:
    """Measure the cells of one chunk (:mod:`mediar_ray.cells`): rows of the cells
    complete in it are staged as ``.scratch/cells/<tile>.parquet`` (and their outlines
    as a GeoJSON piece); the partials of shared cells are returned as ``border``."""
    from mediar_ray.cells import finalize, measure_chunk, split_partials
    from mediar_ray.cells.table import cells_table, write_part
    from mediar_ray.pipeline.view import read_processing

    logit = np.asarray(
        open_array(plan.layout.scratch + "/flows")[2, tile.y0 : tile.y1, tile.x0 : tile.x1]
    )
    image = read_processing(plan, tile.y0, tile.y1, tile.x0, tile.x1)
    partials = measure_chunk(labels, (tile.y0, tile.x0), logit, image)
    complete, border = split_partials(partials, shared)
    rows = finalize(complete, scale=plan.to_level0, pixel_size_um=plan.mpp)
    n = write_part(cells_table(rows), f"{plan.layout.scratch}/cells/{tile.name}.parquet")
    if geojson:
        from mediar_ray.cells.geojson import features, write_piece

        write_piece(
            f"{plan.layout.scratch}/geojson/{tile.name}.json",
            features(
                labels, (tile.y0, tile.x0), rows, scale=plan.to_level0, slide=plan.layout.stem
            ),
        )
    return {"rows": n, "border": border}


def outline_piece(
    plan: SlidePlan, region: tuple[int, int, int, int], rows: dict[str, np.ndarray], url: str
) -> int:
    """Stage the GeoJSON outlines of cells that span chunks, from the final labels of a
    region holding them all; returns how many."""
    from mediar_ray.cells.geojson import features, write_piece

    y0, y1, x0, x1 = region
    labels = np.asarray(open_array(plan.layout.path("labels", "cells", "0"))[y0:y1, x0:x1])
    return write_piece(
        url, features(labels, (y0, x0), rows, scale=plan.to_level0, slide=plan.layout.stem)
    )


def downsample_chunk(src_url: str, dst_url: str, tile: Tile) -> None:
    """One chunk of pyramid level k + 1 from level k: every second pixel (nearest)."""
    src, dst = open_array(src_url), open_array(dst_url, mode="r+")
    lead = (slice(None),) * (src.ndim - 2)
    region = np.asarray(
        src[lead + (slice(2 * tile.y0, 2 * tile.y1, 2), slice(2 * tile.x0, 2 * tile.x1, 2))]
    )
    dst[lead + (slice(tile.y0, tile.y1), slice(tile.x0, tile.x1))] = region


def view_chunk(plan: SlidePlan, level: int, scale: float, dst_url: str, tile: Tile) -> None:
    """One chunk of the viewing image (``level`` of the source resampled by ``scale``),
    read from the slide itself."""
    from mediar_ray.pipeline.view import open_source
    from mediar_ray.scale import read_resampled

    source = open_source(plan.url, plan.reader)
    region = read_resampled(source, level, scale, tile.y0, tile.y1, tile.x0, tile.x1)
    chw = region[None] if region.ndim == 2 else np.moveaxis(region, -1, 0)
    open_array(dst_url, mode="r+")[:, tile.y0 : tile.y1, tile.x0 : tile.x1] = chw


def level0_chunk(plan: SlidePlan, src_url: str, dst_url: str, tile: Tile) -> None:
    """One chunk of the labels on the slide's level-0 grid: each level-0 pixel takes the
    label of the processing pixel under its centre (nearest neighbour)."""
    sy, sx = plan.to_level0
    h, w = plan.shape
    rows = np.minimum(((np.arange(tile.y0, tile.y1) + 0.5) / sy).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(tile.x0, tile.x1) + 0.5) / sx).astype(np.int64), w - 1)
    src = np.asarray(open_array(src_url)[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    out = src[(rows - rows[0])[:, None], (cols - cols[0])[None, :]]
    open_array(dst_url, mode="r+")[tile.y0 : tile.y1, tile.x0 : tile.x1] = out
