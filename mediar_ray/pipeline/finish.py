"""The CPU stages of one slide after its last tile is inferred: gather, track, stitch,
relabel, pyramids, OME metadata, QC image, summary, completion marker.

:func:`finish_slide` runs as one Ray task per slide while the model actors infer other
slides; the per-tile work of a big slide fans out as further tasks
(:func:`mediar_ray.pipeline.tasks.fan_out`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from mediar_ray import __version__
from mediar_ray.io import safe_url
from mediar_ray.pipeline import stages
from mediar_ray.pipeline.layout import tile_grid
from mediar_ray.pipeline.options import SlideOptions
from mediar_ray.pipeline.stages import SlidePlan
from mediar_ray.pipeline.stitch import UnionFind, border_pairs, consecutive_ids
from mediar_ray.pipeline.tasks import fan_out

__all__ = ["finish_slide", "track_and_relabel"]

log = logging.getLogger("mediar_ray.slides")


def _write_json(url: str, obj: dict) -> None:
    """Write ``obj`` as JSON; the file at ``url`` is never partial (a kill leaves the old
    file or none: the completion marker in particular)."""
    from mediar_ray.io import atomic_open

    with atomic_open(url, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)


def gather(plan: SlidePlan, cpus: float) -> None:
    """Flows of every live or rim tile (:func:`.stages.tissue_tiles`) without an
    ``infer`` record, from the partials."""
    done = stages.done_tiles(plan, "infer")
    which = stages.tissue_tiles(plan)
    todo = [
        t
        for t in tile_grid(plan.shape, plan.tile)
        if t.name not in done and (t.name in which.live or t.name in which.rim)
    ]
    fan_out(
        stages.gather_tile, [(plan, t) for t in todo], cpus, progress=f"{plan.layout.stem}: gather"
    )


def track_and_relabel(
    plan: SlidePlan,
    flow_params: dict[str, Any],
    cpus: float,
    measure: bool = False,
    geojson: bool = False,
) -> dict:
    """Tracking per live chunk + halo (:func:`.stages.tissue_tiles`: the other chunks
    hold no cell), union-find over borders, global relabel to 1..N; with
    ``measure``, every cell measured once by the relabel tasks (complete cells) or here
    (cells spanning chunks, merged exactly) and staged as table parts.

    Returns the slide's cell count, joins and area statistics (pixels), and with
    ``measure`` the merged measurements of the shared cells (``border_rows``).
    """
    name = plan.layout.stem
    live = stages.tissue_tiles(plan).live  # the others hold no cell: labels stay 0
    tiles = [t for t in tile_grid(plan.shape, plan.tile) if t.name in live]
    results = {
        (r["tile"].ty, r["tile"].tx): r
        for r in fan_out(
            stages.track_chunk,
            [(plan, t, flow_params) for t in tiles],
            cpus,
            progress=f"{name}: track",
        )
    }
    uf = UnionFind()
    for (ty, tx), r in results.items():
        for side, (dy, dx), other in (("right", (0, 1), "left"), ("bottom", (1, 0), "top")):
            if side in r["strips"] and (ty + dy, tx + dx) in results:
                theirs = results[(ty + dy, tx + dx)]["strips"][other]
                for a, b in border_pairs(r["strips"][side], theirs):
                    uf.union(int(a), int(b))
    names = np.concatenate([r["names"] for r in results.values()] + [np.zeros(0, np.uint64)])
    sorted_names, ids = consecutive_ids(names, uf)
    counts = np.zeros(int(ids.max(initial=0)) + 1, np.int64)
    shared = None
    if measure:  # ids in several chunks: the only cells whose measurements need a merge
        from mediar_ray.cells import cells_in_several_chunks

        shared = cells_in_several_chunks(
            [np.unique(ids[np.searchsorted(sorted_names, r["names"])]) for r in results.values()]
        )
    if len(tiles) > 2:  # shared once through the object store, not once per task
        import ray

        sorted_names, ids, shared = ray.put(sorted_names), ray.put(ids), ray.put(shared)
    chunks = fan_out(
        stages.relabel_chunk,
        [(plan, t, sorted_names, ids, shared, geojson) for t in tiles],
        cpus,
        progress=f"{name}: relabel",
    )
    for chunk in chunks:
        counts[chunk["present"]] += chunk["counts"]
    areas = counts[1:]
    summary = {
        "cells": int(areas.size),
        "joined_across_borders": len(uf.parent),
        "area_px": {
            "mean": float(areas.mean()) if areas.size else 0.0,
            "median": float(np.median(areas)) if areas.size else 0.0,
            "min": int(areas.min()) if areas.size else 0,
            "max": int(areas.max(initial=0)),
        },
    }
    if measure:
        summary["border_rows"] = _stage_border_cells(
            plan, [c["border"] for c in chunks], geojson, cpus
        )
    return summary


def _stage_border_cells(plan: SlidePlan, borders: list, geojson: bool, cpus: float) -> int:
    """Merge the partial measurements of cells spanning chunks, stage their rows (and
    outlines, read from the final labels region by region); returns their number."""
    from mediar_ray.cells import finalize, merge_partials, take_rows
    from mediar_ray.cells.geojson import outline_regions
    from mediar_ray.cells.table import cells_table, write_part

    rows = finalize(merge_partials(borders), scale=plan.to_level0, pixel_size_um=plan.mpp)
    n = write_part(cells_table(rows), f"{plan.layout.scratch}/cells/border.parquet")
    if geojson and n:
        calls = [
            (
                plan,
                region,
                take_rows(rows, index),
                f"{plan.layout.scratch}/geojson/border_{k:06d}.json",
            )
            for k, (region, index) in enumerate(outline_regions(rows, plan.tile))
        ]
        fan_out(stages.outline_piece, calls, cpus)
    return n


def write_cell_outputs(plan: SlidePlan, geojson: bool) -> dict[str, Any]:
    """Replace the slide's partition of ``OUTPUT/cells`` with its staged rows, and write
    ``OUTPUT/<name>.geojson.gz`` from the staged pieces (chunks in raster order, then
    the cells that span chunks)."""
    import zarr

    from mediar_ray.cells.geojson import write_feature_collection
    from mediar_ray.cells.table import commit_slide

    fs, scratch = fsspec.core.url_to_fs(plan.layout.scratch)

    def url(path: str) -> str:
        return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)

    parts = [url(p) for p in sorted(fs.ls(f"{scratch}/cells", detail=False))]
    tissue_px = None
    if plan.tissue:
        mask = np.asarray(zarr.open_array(plan.layout.path("labels", "tissue", "0"))[:])
        tissue_px = int(mask.sum()) * plan.thumb_factor**2
    info = {
        "shape": list(plan.shape),
        "scale": list(plan.to_level0),
        "pixel_size_um": list(plan.mpp) if plan.mpp else None,
        "tissue_area_px": tissue_px,
        "channels": plan.channels,
        "source": safe_url(plan.url),
        "mediar_ray": __version__,
    }
    committed = commit_slide(plan.layout.output_root, plan.layout.stem, parts, info)
    out = {"cells_table_rows": committed["rows"]}
    if geojson:
        target = f"{plan.layout.output_root.rstrip('/')}/{plan.layout.stem}.geojson.gz"
        live = stages.tissue_tiles(plan).live
        tiles = [
            f"{plan.layout.scratch}/geojson/{t.name}.json"
            for t in tile_grid(plan.shape, plan.tile)
            if t.name in live
        ]
        border = sorted(fs.glob(f"{scratch}/geojson/border_*.json"))
        write_feature_collection(target, tiles + [url(b) for b in border])
        out["geojson"] = safe_url(target)
    return out


def finish_slide(
    plan_json: str,
    opts: SlideOptions,
    seconds: dict[str, float],
    windows: dict[str, int] | None = None,
) -> dict:
    """Everything after inference for one slide; returns its summary.

    ``seconds`` holds the times of the stages before (plan, infer), ``windows`` the
    sliding windows run and skipped; the summary and the completion marker are written
    last, then the scratch is removed.
    """
    from mediar_ray.pipeline.outputs import build_outputs

    plan = SlidePlan.from_json(plan_json)
    times = dict(seconds)
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[stage] = round(times.get(stage, 0.0) + now - clock, 3)
        clock = now

    gather(plan, opts.cpus_per_task)
    lap("infer")  # gathering the partials completes inference
    summary = track_and_relabel(
        plan, opts.flow_params, opts.cpus_per_task, opts.cells, opts.geojson
    )
    lap("track")
    if opts.cells:
        summary.update(write_cell_outputs(plan, opts.geojson))
        lap("cells")
    written = build_outputs(plan, opts.labels_level0, opts.cpus_per_task)
    lap("finish")
    summary.update(
        {
            "slide": safe_url(plan.url),
            "shape": list(plan.shape),
            "levels": written["label_levels"],
            "outputs": written,
            "resolution": {
                "source_level": plan.level,
                "resampling": plan.scale,
                "source_shape": plan.source_shape,
                "um_per_level0_pixel": plan.mpp,
                "um_per_processing_pixel": plan.processing_mpp,
            },
            "tissue_mask": plan.tissue,
            "windows": windows or {},
            "seconds": times,
            "mediar_ray": __version__,
            "options": opts.public(),
            "weights": [safe_url(w) for w in opts.weights],
            "fingerprint": plan.fingerprint,
        }
    )
    _write_json(plan.layout.path("summary.json"), summary)
    _write_json(
        plan.layout.marker,
        {"complete": True, "cells": summary["cells"], "fingerprint": plan.fingerprint},
    )
    fs, scratch = fsspec.core.url_to_fs(plan.layout.scratch)
    fs.rm(scratch, recursive=True)
    return summary
