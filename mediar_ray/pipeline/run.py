"""Whole-slide segmentation on Ray: plan -> infer (Ray Data) -> track + stitch -> finish.

One slide at a time goes through the stages; within a stage its tiles run in parallel on
the cluster. A slide is complete when ``<stem>.zarr/.mediar_complete`` exists, which is
written last: a rerun skips complete slides and redoes the rest (tiles already inferred
are kept). An unreadable slide is logged and skipped; the others finish.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from mediar_ray import __version__
from mediar_ray.io import expand_inputs, stem
from mediar_ray.pipeline.layout import SlideLayout, Tile, safe_url, tile_grid
from mediar_ray.sources import open_slide
from mediar_ray.pipeline.stitch import UnionFind, border_pairs, consecutive_ids
from mediar_ray.pipeline import stages
from mediar_ray.pipeline.stages import SlidePlan

__all__ = ["SlideOptions", "run_slides", "segment_slide"]

log = logging.getLogger("mediar_ray.slides")

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".png", ".jpg", ".jpeg", ".bmp")


@dataclass
class SlideOptions:
    """Options of a slide job (defaults: the single-image path's)."""

    weights: list[str] = field(default_factory=list)
    model_config: dict[str, Any] = field(default_factory=dict)
    tta: bool = True
    roi_size: int = 512
    tile: int = 1024
    halo: int = 128
    workers: int = 1
    num_gpus_per_worker: float = 0.0
    device: str = "cpu"
    overwrite: bool = False
    reader: str = "auto"
    flow_params: dict[str, Any] = field(default_factory=dict)


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS, or start Ray in this process."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True,
                 logging_level=logging.WARNING)


def _write_json(url: str, obj: dict) -> None:
    with fsspec.open(url, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def plan_slide(url: str, output: str, opts: SlideOptions) -> SlidePlan:
    """Stage 1: metadata, arrays, level-0 copy and exact intensity statistics."""
    import ray

    layout = SlideLayout(output, stem(url))
    plan_url = f"{layout.scratch}/plan.json"
    if _exists(plan_url):
        with fsspec.open(plan_url, "r") as f:
            return SlidePlan.from_json(f.read())
    with open_slide(url, opts.reader) as reader:
        plan = SlidePlan(url, layout, reader.shape, reader.channels, str(reader.dtype),
                         opts.tile, opts.halo, roi_size=opts.roi_size, reader=opts.reader)
    stages.create_arrays(plan)
    tiles = tile_grid(plan.shape, plan.tile)
    rows = [tiles[i : i + 16] for i in range(0, len(tiles), 16)]
    task = ray.remote(stages.copy_and_measure).options(max_retries=3)
    accs = ray.get([task.remote(plan, group) for group in rows])
    merged = accs[0]
    for acc in accs[1:]:
        merged.merge(acc)
    plan.stats = merged.stats()
    with fsspec.open(plan_url, "w") as f:
        f.write(plan.to_json())
    return plan


def infer_slide(plan: SlidePlan, opts: SlideOptions, progress: Callable[[str], None]) -> None:
    """Stage 2: windowed TTA ensemble inference, every window of the slide run once.

    infer (Ray Data, one row per tile): each tile's own windows -> its partial chunk;
    gather (Ray tasks): each tile's flows chunk = the partials that reach it. A rerun
    gathers only the tiles without flows, and infers only the partials they still need.
    """
    import ray

    done = stages.done_tiles(plan, "infer")
    todo = [t for t in tile_grid(plan.shape, plan.tile) if t.name not in done]
    if not todo:
        return
    have = stages.done_tiles(plan, "windows")
    needed = {s for t in todo for s in stages.partial_sources(plan, t) if s.name not in have}
    # Largest tiles first, so the last tiles to start are the short ones (less idle tail).
    needed = sorted(needed, key=lambda t: (-(t.y1 - t.y0) * (t.x1 - t.x0), t.ty, t.tx))
    if needed:
        rows = [{"plan": plan.to_json(), "tile": json.dumps(asdict(t))} for t in needed]
        gpu = opts.num_gpus_per_worker > 0
        # Ray Data's actor pool restarts a dead actor and retries its tile by default
        # (max_restarts / max_task_retries -1); a retried tile rewrites its whole chunk.
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            stages.TileInference,
            fn_constructor_kwargs={"weights": opts.weights, "model_config": opts.model_config,
                                   "tta": opts.tta,
                                   "device": opts.device if not gpu else "cuda"},
            # One tile in flight per actor: a tile is minutes of work and its row is a
            # few bytes, so prefetching gains nothing, while tiles queued behind a busy
            # actor can leave another idle at the end.
            compute=ray.data.ActorPoolStrategy(size=max(1, opts.workers),
                                               max_tasks_in_flight_per_actor=1),
            batch_size=1,
            num_cpus=1 if not gpu else 0.5,
            num_gpus=opts.num_gpus_per_worker if gpu else 0,
        )
        start = time.perf_counter()
        for i, _ in enumerate(ds.iter_rows(), 1):
            eta = (time.perf_counter() - start) / i * (len(needed) - i)
            progress(f"infer: {i}/{len(needed)} tiles, ETA {eta:.0f} s")
    gather = ray.remote(stages.gather_tile).options(max_retries=3)
    pending = [gather.remote(plan, t) for t in todo]
    for i in range(1, len(todo) + 1):
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready[0])
        progress(f"gather: {i}/{len(todo)} tiles")


def track_slide(plan: SlidePlan, opts: SlideOptions, progress: Callable[[str], None]) -> dict:
    """Stage 3: tracking per chunk + halo, union-find over borders, global relabel."""
    import ray

    tiles = tile_grid(plan.shape, plan.tile)
    track = ray.remote(stages.track_chunk).options(max_retries=3)
    pending = [track.remote(plan, t, opts.flow_params) for t in tiles]
    results = {}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        r = ray.get(ready[0])
        results[(r["tile"].ty, r["tile"].tx)] = r
        progress(f"track: {len(results)}/{len(tiles)} chunks")
    uf = UnionFind()
    for (ty, tx), r in results.items():
        for side, (dy, dx), other in (("right", (0, 1), "left"), ("bottom", (1, 0), "top")):
            if side in r["strips"]:
                theirs = results[(ty + dy, tx + dx)]["strips"][other]
                for a, b in border_pairs(r["strips"][side], theirs):
                    uf.union(int(a), int(b))
    names = np.concatenate([r["names"] for r in results.values()] + [np.zeros(0, np.uint64)])
    sorted_names, ids = consecutive_ids(names, uf)
    relabel = ray.remote(stages.relabel_chunk).options(max_retries=3)
    names_ref, ids_ref = ray.put(sorted_names), ray.put(ids)
    counts = np.zeros(int(ids.max(initial=0)) + 1, np.int64)
    for present, n in ray.get([relabel.remote(plan, t, names_ref, ids_ref) for t in tiles]):
        counts[present] += n
    areas = counts[1:]
    return {"cells": int(areas.size), "joined_across_borders": len(uf.parent),
            "area_px": {"mean": float(areas.mean()) if areas.size else 0.0,
                        "median": float(np.median(areas)) if areas.size else 0.0,
                        "min": int(areas.min()) if areas.size else 0, "max": int(areas.max(initial=0))}}


def build_pyramids(plan: SlidePlan) -> int:
    """Nearest-neighbour pyramids of image and labels until one chunk holds a level."""
    import ray
    import zarr

    task = ray.remote(stages.downsample_chunk).options(max_retries=3)
    h, w = plan.shape
    level = 0
    while max(h, w) > plan.tile:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        level += 1
        refs = []
        for prefix, lead in ((plan.layout.root, (plan.channels,)),
                             (plan.layout.path("labels", "cells"), ())):
            src = zarr.open_array(f"{prefix}/{level - 1}", mode="r")
            zarr.open_group(prefix, mode="a", zarr_format=3).create_array(
                str(level), shape=lead + (h, w), chunks=lead + (plan.tile, plan.tile),
                dtype=src.dtype, fill_value=0, dimension_names=list(src.metadata.dimension_names),
                overwrite=True)
            refs += [task.remote(f"{prefix}/{level - 1}", f"{prefix}/{level}", t)
                     for t in tile_grid((h, w), plan.tile)]
        ray.get(refs)
    return level + 1


def segment_slide(url: str, output: str, opts: SlideOptions,
                  progress: Callable[[str], None] = log.info) -> dict:
    """Run all stages on one slide; returns its summary. Raises on failure."""
    times: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[name] = round(now - clock, 3)
        clock = now

    plan = plan_slide(url, output, opts)
    lap("plan")
    infer_slide(plan, opts, progress)
    lap("infer")
    summary = track_slide(plan, opts, progress)
    lap("track")
    levels = build_pyramids(plan)
    stages.write_ome_metadata(plan, levels)
    from mediar_ray.pipeline.qc import write_qc_png

    write_qc_png(plan, levels)
    lap("finish")
    summary.update({"slide": safe_url(url), "shape": list(plan.shape), "levels": levels,
                    "seconds": times, "mediar_ray": __version__,
                    "options": {k: v for k, v in asdict(opts).items() if k != "weights"},
                    "weights": [safe_url(w) for w in opts.weights]})
    _write_json(plan.layout.path("summary.json"), summary)
    fs, scratch = fsspec.core.url_to_fs(plan.layout.scratch)
    _write_json(plan.layout.marker, {"complete": True, "cells": summary["cells"]})
    fs.rm(scratch, recursive=True)
    return summary


def check_output_root(output: str) -> None:
    """Fail early, and clearly, when the output root cannot be written."""
    probe = f"{output.rstrip('/')}/.mediar_write_probe"
    try:
        fs, path = fsspec.core.url_to_fs(probe)
        if isinstance(fs, LocalFileSystem):  # a local root may be created; a bucket never
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(b"ok")
        fs.rm(path)
    except Exception as err:
        raise PermissionError(
            f"cannot write to the output root {safe_url(output)} ({type(err).__name__}: "
            f"{err}); check that the bucket/folder exists and that the credentials in the "
            "environment allow writing there"
        ) from None


def run_slides(inputs: list[str], output: str, opts: SlideOptions) -> dict:
    """Segment every slide of ``inputs`` into ``output``; returns the run summary, which
    is also written to ``OUTPUT/run_summary.json``."""
    ensure_ray()
    urls = [u for u in expand_inputs(inputs) if u.lower().endswith(SLIDE_EXTENSIONS)]
    check_output_root(output)
    report: dict[str, Any] = {"done": {}, "skipped": [], "failed": {}, "output": safe_url(output)}
    for i, url in enumerate(urls, 1):
        name = stem(url)
        layout = SlideLayout(output, name)
        if opts.overwrite and _exists(layout.root):
            fs, root = fsspec.core.url_to_fs(layout.root)
            fs.rm(root, recursive=True)
        elif _exists(layout.marker):
            log.info("[%d/%d] %s: complete already, skipped (--overwrite to redo)", i, len(urls), name)
            report["skipped"].append(name)
            continue
        log.info("[%d/%d] %s: segmenting", i, len(urls), name)
        try:
            summary = segment_slide(url, output, opts,
                                    lambda m: log.info("[%d/%d] %s: %s", i, len(urls), name, m))
        except Exception as err:  # one bad slide must not stop the archive
            reason = f"{type(err).__name__}: {err}"
            log.error("[%d/%d] %s: failed: %s", i, len(urls), name, reason)
            report["failed"][name] = reason
            continue
        report["done"][name] = {"cells": summary["cells"], "seconds": summary["seconds"]}
        log.info("[%d/%d] %s: %d cells", i, len(urls), name, summary["cells"])
    _write_json(f"{output.rstrip('/')}/run_summary.json", report)
    return report
