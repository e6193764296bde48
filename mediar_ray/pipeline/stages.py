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
from typing import Any

import fsspec
import numpy as np
import zarr

from mediar_ray.pipeline.layout import (IMAGE_AXES, LABEL_AXES, SlideLayout, Tile, multiscales,
                                        tile_grid)
from mediar_ray.pipeline.stitch import anchor_labels
from mediar_ray.sources import open_slide
from mediar_ray.preprocess import IntensityAccumulator, IntensityStats, normalize

__all__ = [
    "SlidePlan", "copy_and_measure", "done_tiles", "infer_partial", "gather_tile",
    "mark_done", "partial_sources", "relabel_chunk", "tiles_to_infer", "track_chunk",
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

    @property
    def spill(self) -> int:
        """Side of a tile's partial-inference chunk: the tile plus one window less a pixel."""
        return self.tile + self.roi_size - 1

    def to_json(self) -> str:
        d = asdict(self)
        d["layout"] = {"output_root": self.layout.output_root, "stem": self.layout.stem}
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "SlidePlan":
        d = json.loads(text)
        d["layout"] = SlideLayout(**d["layout"])
        d["shape"] = tuple(d["shape"])
        d["stats"] = IntensityStats(**d["stats"]) if d["stats"] else None
        return cls(**d)


def open_array(url: str, mode: str = "r") -> zarr.Array:
    return zarr.open_array(url, mode=mode)


def create_arrays(plan: SlidePlan) -> None:
    """Create the image level 0, the scratch flows/labels and the final label level 0."""
    root = zarr.open_group(plan.layout.root, mode="a", zarr_format=3)
    h, w = plan.shape
    t = plan.tile
    root.create_array("0", shape=(plan.channels, h, w), chunks=(plan.channels, t, t),
                      dtype=plan.dtype, fill_value=0, dimension_names=["c", "y", "x"],
                      overwrite=True)
    scratch = zarr.open_group(plan.layout.scratch, mode="a", zarr_format=3)
    scratch.create_array("flows", shape=(3, h, w), chunks=(3, t, t), dtype="float32",
                         fill_value=0, overwrite=True)
    ny, nx, s = -(-h // t), -(-w // t), plan.spill
    scratch.create_array("partials", shape=(ny, nx, 3, s, s), chunks=(1, 1, 3, s, s),
                         dtype="float32", fill_value=0, overwrite=True)
    scratch.create_array("anchors", shape=(h, w), chunks=(t, t), dtype="uint64",
                         fill_value=0, overwrite=True)
    labels = zarr.open_group(plan.layout.path("labels", "cells"), mode="a", zarr_format=3)
    labels.create_array("0", shape=(h, w), chunks=(t, t), dtype="uint32", fill_value=0,
                        dimension_names=["y", "x"], overwrite=True)


def copy_and_measure(plan: SlidePlan, tiles: list[Tile]) -> IntensityAccumulator:
    """Copy level 0 of the slide into the output image array, tile by tile, and
    accumulate its intensity statistics (exact for integer images)."""
    acc = IntensityAccumulator()
    image = open_array(plan.layout.path("0"), mode="r+")
    with open_slide(plan.url, plan.reader) as reader:
        for tile in tiles:
            region = reader[tile.y0:tile.y1, tile.x0:tile.x1]
            acc.update(region)
            chw = region[None] if region.ndim == 2 else np.moveaxis(region, -1, 0)
            image[:, tile.y0:tile.y1, tile.x0:tile.x1] = chw
    return acc


def infer_partial(plan: SlidePlan, tile: Tile, models: list, tta: bool, device: str,
                  sw_batch_size: int = 4) -> None:
    """Run the windows ``tile`` owns; write their partial sum as chunk (ty, tx) of
    ``.scratch/partials`` ((3, spill, spill) float32 from the tile's top-left corner,
    zero-padded), then a ``windows`` done record."""
    image = open_array(plan.layout.path("0"))

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        chw = np.asarray(image[:, y0:y1, x0:x1])
        hwc = chw[0] if chw.shape[0] == 1 else np.moveaxis(chw, 0, -1)
        return normalize(hwc, plan.stats)

    from mediar_ray.inference import predict_partial  # torch: only model actors import it

    region = (tile.y0, tile.y1, tile.x0, tile.x1)
    part = predict_partial(read, plan.shape, region, models, tta=tta,
                           roi_size=plan.roi_size, sw_batch_size=sw_batch_size, device=device)
    chunk = np.zeros((3, plan.spill, plan.spill), np.float32)
    chunk[:, : part.shape[1], : part.shape[2]] = part
    partials = open_array(plan.layout.scratch + "/partials", mode="r+")
    partials[tile.ty, tile.tx] = chunk  # exactly one whole chunk
    mark_done(plan, "windows", tile)


def partial_sources(plan: SlidePlan, tile: Tile) -> list[Tile]:
    """The tiles whose partials reach ``tile``: itself and the tiles above/left of it
    less than ``spill`` pixels away."""
    from mediar_ray.inference import partial_extent

    (h, w), t = plan.shape, plan.tile
    reach = -(-plan.spill // t)  # a partial spans at most this many tile rows/columns
    sources = []
    for ty in range(max(tile.ty - reach, 0), tile.ty + 1):
        for tx in range(max(tile.tx - reach, 0), tile.tx + 1):
            src = Tile(ty, tx, ty * t, min(ty * t + t, h), tx * t, min(tx * t + t, w))
            ey0, ey1, ex0, ex1 = partial_extent(plan.shape, (src.y0, src.y1, src.x0, src.x1),
                                                plan.roi_size)
            if ey0 <= tile.y0 < ey1 and ex0 <= tile.x0 < ex1:
                sources.append(src)
    return sources


def tiles_to_infer(plan: SlidePlan) -> list[Tile]:
    """The tiles whose partials must still be computed: those that a tile without
    flows (no ``infer`` record) needs and that have no ``windows`` record; largest first,
    so that the last tiles to start are the short ones."""
    done = done_tiles(plan, "infer")
    todo = [t for t in tile_grid(plan.shape, plan.tile) if t.name not in done]
    have = done_tiles(plan, "windows")
    needed = {s for t in todo for s in partial_sources(plan, t) if s.name not in have}
    return sorted(needed, key=lambda t: (-(t.y1 - t.y0) * (t.x1 - t.x0), t.ty, t.tx))


def gather_tile(plan: SlidePlan, tile: Tile) -> None:
    """Sum the partials that reach ``tile`` over its core, write its ``.scratch/flows``
    chunk ((3, h, w) float32: dy, dx, logit), then an ``infer`` done record."""
    partials = open_array(plan.layout.scratch + "/partials")
    total = np.zeros((3, tile.y1 - tile.y0, tile.x1 - tile.x0), np.float32)
    for src in partial_sources(plan, tile):
        oy, ox = tile.y0 - src.y0, tile.x0 - src.x0
        ny, nx = min(total.shape[1], plan.spill - oy), min(total.shape[2], plan.spill - ox)
        total[:, :ny, :nx] += np.asarray(partials[src.ty, src.tx, :, oy : oy + ny, ox : ox + nx])
    flows = open_array(plan.layout.scratch + "/flows", mode="r+")
    flows[:, tile.y0:tile.y1, tile.x0:tile.x1] = total
    mark_done(plan, "infer", tile)


def mark_done(plan: SlidePlan, stage: str, tile: Tile) -> None:
    with fsspec.open(f"{plan.layout.scratch}/done/{stage}/{tile.name}", "w") as f:
        f.write("1")


def done_tiles(plan: SlidePlan, stage: str) -> set[str]:
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
    anchors[tile.y0:tile.y1, tile.x0:tile.x1] = core
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


def relabel_chunk(plan: SlidePlan, tile: Tile, sorted_names: np.ndarray,
                  ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Anchor names -> final uint32 ids for one chunk; returns (ids, pixel counts)."""
    core = np.asarray(open_array(plan.layout.scratch + "/anchors")[tile.y0:tile.y1,
                                                                   tile.x0:tile.x1])
    out = np.zeros(core.shape, np.uint32)
    fg = core > 0
    out[fg] = ids[np.searchsorted(sorted_names, core[fg])]
    labels = open_array(plan.layout.path("labels", "cells", "0"), mode="r+")
    labels[tile.y0:tile.y1, tile.x0:tile.x1] = out
    present, counts = np.unique(out[fg], return_counts=True)
    return present, counts


def downsample_chunk(src_url: str, dst_url: str, tile: Tile) -> None:
    """One chunk of pyramid level k + 1 from level k: every second pixel (nearest)."""
    src, dst = open_array(src_url), open_array(dst_url, mode="r+")
    lead = (slice(None),) * (src.ndim - 2)
    region = np.asarray(src[lead + (slice(2 * tile.y0, 2 * tile.y1, 2),
                                    slice(2 * tile.x0, 2 * tile.x1, 2))])
    dst[lead + (slice(tile.y0, tile.y1), slice(tile.x0, tile.x1))] = region


def write_ome_metadata(plan: SlidePlan, levels: int) -> None:
    """NGFF 0.5 attributes for the image, the labels group and the ``cells`` label."""
    root = zarr.open_group(plan.layout.root, mode="a", zarr_format=3)
    root.attrs["ome"] = {"version": "0.5",
                         "multiscales": multiscales(levels, IMAGE_AXES, plan.layout.stem)}
    zarr.open_group(plan.layout.path("labels"), mode="a", zarr_format=3).attrs["ome"] = {
        "version": "0.5", "labels": ["cells"]}
    zarr.open_group(plan.layout.path("labels", "cells"), mode="a", zarr_format=3).attrs[
        "ome"] = {"version": "0.5", "multiscales": multiscales(levels, LABEL_AXES, "cells"),
                  "image-label": {"version": "0.5", "source": {"image": "../../"}}}
