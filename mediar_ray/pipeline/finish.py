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

from mediar_ray import __version__
from mediar_ray.pipeline import stages
from mediar_ray.pipeline.layout import safe_url, tile_grid
from mediar_ray.pipeline.options import SlideOptions
from mediar_ray.pipeline.stages import SlidePlan
from mediar_ray.pipeline.stitch import UnionFind, border_pairs, consecutive_ids
from mediar_ray.pipeline.tasks import fan_out

__all__ = ["finish_slide", "track_and_relabel"]

log = logging.getLogger("mediar_ray.slides")


def _write_json(url: str, obj: dict) -> None:
    with fsspec.open(url, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def gather(plan: SlidePlan, cpus: float) -> None:
    """Flows of every tile without an ``infer`` record, from the partials."""
    done = stages.done_tiles(plan, "infer")
    todo = [t for t in tile_grid(plan.shape, plan.tile) if t.name not in done]
    fan_out(stages.gather_tile, [(plan, t) for t in todo], cpus,
            progress=f"{plan.layout.stem}: gather")


def track_and_relabel(plan: SlidePlan, flow_params: dict[str, Any], cpus: float) -> dict:
    """Tracking per chunk + halo, union-find over borders, global relabel to 1..N.

    Returns the slide's cell count, joins and area statistics (pixels).
    """
    name = plan.layout.stem
    tiles = tile_grid(plan.shape, plan.tile)
    results = {(r["tile"].ty, r["tile"].tx): r for r in fan_out(
        stages.track_chunk, [(plan, t, flow_params) for t in tiles], cpus,
        progress=f"{name}: track")}
    uf = UnionFind()
    for (ty, tx), r in results.items():
        for side, (dy, dx), other in (("right", (0, 1), "left"), ("bottom", (1, 0), "top")):
            if side in r["strips"]:
                theirs = results[(ty + dy, tx + dx)]["strips"][other]
                for a, b in border_pairs(r["strips"][side], theirs):
                    uf.union(int(a), int(b))
    names = np.concatenate([r["names"] for r in results.values()] + [np.zeros(0, np.uint64)])
    sorted_names, ids = consecutive_ids(names, uf)
    counts = np.zeros(int(ids.max(initial=0)) + 1, np.int64)
    if len(tiles) > 2:  # shared once through the object store, not once per task
        import ray

        sorted_names, ids = ray.put(sorted_names), ray.put(ids)
    counts_by_chunk = fan_out(stages.relabel_chunk, [(plan, t, sorted_names, ids) for t in tiles],
                              cpus, progress=f"{name}: relabel")
    for present, c in counts_by_chunk:
        counts[present] += c
    areas = counts[1:]
    return {"cells": int(areas.size), "joined_across_borders": len(uf.parent),
            "area_px": {"mean": float(areas.mean()) if areas.size else 0.0,
                        "median": float(np.median(areas)) if areas.size else 0.0,
                        "min": int(areas.min()) if areas.size else 0,
                        "max": int(areas.max(initial=0))}}


def finish_slide(plan_json: str, opts: SlideOptions, seconds: dict[str, float],
                 windows: dict[str, int] | None = None) -> dict:
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
    summary = track_and_relabel(plan, opts.flow_params, opts.cpus_per_task)
    lap("track")
    written = build_outputs(plan, opts.labels_level0, opts.cpus_per_task)
    lap("finish")
    summary.update({"slide": safe_url(plan.url), "shape": list(plan.shape),
                    "levels": written["label_levels"], "outputs": written,
                    "resolution": {"source_level": plan.level, "resampling": plan.scale,
                                   "source_shape": plan.source_shape,
                                   "um_per_level0_pixel": plan.mpp,
                                   "um_per_processing_pixel": plan.processing_mpp},
                    "tissue_mask": plan.tissue, "windows": windows or {},
                    "seconds": times, "mediar_ray": __version__, "options": opts.public(),
                    "weights": [safe_url(w) for w in opts.weights],
                    "fingerprint": plan.fingerprint})
    _write_json(plan.layout.path("summary.json"), summary)
    _write_json(plan.layout.marker, {"complete": True, "cells": summary["cells"],
                                     "fingerprint": plan.fingerprint})
    fs, scratch = fsspec.core.url_to_fs(plan.layout.scratch)
    fs.rm(scratch, recursive=True)
    return summary
