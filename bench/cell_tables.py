"""What the per-cell tables (and optionally GeoJSON) add to a slide's finish: time of the
track stage and peak worker memory, cells on against ``--no-cells`` on the same flows.

For each size, writes the slide of ``bench/slide_memory.py`` (a tiled RGB TIFF of crops
of the real DSB2018 images) and infers it once with the model actors' own function
(:class:`mediar_ray.pipeline.actors.InferenceActor`, bundled model unless ``--weights``).
Then, per repeat and per configuration (cells off, cells on, with ``--geojson`` also
cells + GeoJSON), in a fresh Ray session each: the slide is planned as the job plans it
(same fingerprint), the stored flows are copied into its scratch and its tiles marked
inferred, and after a rest ``run_slides`` runs what follows inference (gather, track +
relabel [+ measure], cell outputs, pyramids, QC) while the RSS of every busy ``ray::``
worker process is sampled. Same slide, same flows, same session setup; only the option
differs.

Printed per size: the track stage (tracking, stitching, relabelling, and with cells the
per-chunk measurements and the merge of cells spanning chunks) and the ``cells`` stage
(writing the slide's Parquet partition [and GeoJSON]) in seconds (fastest repeat), the
time the tables add, ``(track_on + cells_on - track_off) / track_off`` (goal <= 10%),
and the peak RSS of the largest worker and of the largest CPU-stage worker (the model
actors, idle here, left out) with and without cells (goal <= 1.1x).

    python bench/cell_tables.py --sizes 16384 --tile 2048 --workers 2 --no-tta --repeats 2
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from slide_memory import WorkerMemory, write_slide

#: The configurations compared: name -> SlideOptions changes.
CONFIGS = {
    "off": {"cells": False},
    "on": {"cells": True},
    "geojson": {"cells": True, "geojson": True},
}


def plan_as_job(slide: Path, out: str, opts, hashes: list[str]):
    """Plan ``slide`` under ``out`` exactly as the job would (same fingerprint), so that
    ``run_slides`` reuses the plan and what is put into its scratch."""
    from mediar_ray.pipeline.plan import plan_slide
    from mediar_ray.pipeline.run import slide_fingerprint

    fp = slide_fingerprint(str(slide), opts, hashes)
    return plan_slide(str(slide), slide.stem, out, opts, fp).plan


def infer_once(slide: Path, out: str, opts, hashes: list[str]):
    """Plan the slide under ``out`` and compute its flows with ``opts.workers`` model
    actors (the job's actor class, one thread each) and the gather step; returns the
    plan, whose ``.scratch/flows`` the timed runs copy."""
    import ray
    from ray.util import ActorPool

    from mediar_ray.pipeline.actors import InferenceActor
    from mediar_ray.pipeline.layout import tile_grid
    from mediar_ray.pipeline.stages import gather_tile
    from mediar_ray.pipeline.tasks import fan_out

    plan = plan_as_job(slide, out, opts, hashes)
    actor = ray.remote(InferenceActor).options(num_cpus=1)
    actors = [
        actor.remote(opts.weights, opts.model_config, opts.tta, "cpu", 1)
        for _ in range(opts.workers)
    ]
    tiles = tile_grid(plan.shape, plan.tile)
    plan_json = plan.to_json()
    list(
        ActorPool(actors).map_unordered(
            lambda a, t: a.infer.remote(plan_json, json.dumps(asdict(t))), tiles
        )
    )
    for a in actors:  # they hold every CPU of the session: the gather tasks need them
        ray.kill(a)
    fan_out(gather_tile, [(plan, t) for t in tiles], opts.cpus_per_task)
    return plan


def stage_flows(source_plan, plan) -> None:
    """Copy the stored flows into ``plan``'s scratch (same array layout: the chunk files
    as they are) and mark every tile inferred, as the job leaves them after inference."""
    from mediar_ray.pipeline.layout import tile_grid
    from mediar_ray.pipeline.stages import mark_done

    src = Path(source_plan.layout.scratch) / "flows"
    dst = Path(plan.layout.scratch) / "flows"
    shutil.rmtree(dst)
    shutil.copytree(src, dst)
    for tile in tile_grid(plan.shape, plan.tile):
        mark_done(plan, "infer", tile)


def timed_run(
    args: argparse.Namespace, slide: Path, source_plan, opts, hashes: list[str], out: str
) -> dict:
    """One configuration in a fresh Ray session: plan, stage the flows, rest, then the
    job with its workers' memory sampled."""
    import ray

    from mediar_ray.pipeline import run_slides

    ray.init(num_cpus=args.workers, include_dashboard=False, logging_level=logging.WARNING)
    try:
        plan = plan_as_job(slide, out, opts, hashes)
        stage_flows(source_plan, plan)
        time.sleep(args.settle)
        with WorkerMemory() as mem:
            start = time.perf_counter()
            report = run_slides([str(slide)], out, opts)
            seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    if report["failed"]:
        raise SystemExit(f"{slide.name} failed: {report['failed']}")
    done = report["done"][slide.stem]
    if done["tiles_inferred"]:
        raise SystemExit(
            f"{slide.name}: the job inferred {done['tiles_inferred']} tiles; "
            "the staged flows were not reused"
        )
    by_kind: dict[str, int] = {}  # largest RSS of each kind of worker, bytes
    for kind, rss in mem.peak.values():
        by_kind[kind] = max(by_kind.get(kind, 0), rss)
    cpu = {k: v for k, v in by_kind.items() if not k.startswith("ray::InferenceActor")}
    return {
        "cells": done["cells"],
        "sec": round(seconds, 3),
        "stages": done["seconds"],
        "peak": max(by_kind.values()),
        "peak_cpu": max(cpu.values(), default=0),
        "peak_mib_by_worker": {k: v // 2**20 for k, v in sorted(by_kind.items())},
    }


def measure_size(args: argparse.Namespace, opts, hashes: list[str], tmp: Path, size: int) -> dict:
    import ray

    slide = tmp / f"slide_{size}.tif"
    write_slide(slide, size)
    ray.init(num_cpus=args.workers, include_dashboard=False, logging_level=logging.WARNING)
    try:
        start = time.perf_counter()
        source = infer_once(slide, str(tmp / f"flows_{size}"), opts, hashes)
        infer_s = time.perf_counter() - start
    finally:
        ray.shutdown()
    configs = ["off", "on"] + (["geojson"] if args.geojson else [])
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for r in range(args.repeats):
        for c in configs if r % 2 == 0 else configs[::-1]:  # alternate the order
            cfg_opts = replace(opts, **CONFIGS[c])
            run = timed_run(args, slide, source, cfg_opts, hashes, str(tmp / f"out_{size}_{c}_{r}"))
            print(json.dumps({"size": size, "config": c, "repeat": r, **run}), flush=True)
            runs[c].append(run)
            shutil.rmtree(tmp / f"out_{size}_{c}_{r}")
    shutil.rmtree(tmp / f"flows_{size}")
    slide.unlink()
    return {"size": size, "infer_once_s": round(infer_s, 1), "runs": runs}


def summarise(row: dict) -> dict:
    """Fastest repeat of each stage, largest peak of each configuration."""
    out = {"size": row["size"]}
    for c, runs in row["runs"].items():
        out[c] = {
            "cells": runs[0]["cells"],
            "track": min(r["stages"]["track"] for r in runs),
            "cells_stage": min(r["stages"].get("cells", 0.0) for r in runs),
            "finish": min(r["stages"].get("finish", 0.0) for r in runs),
            "peak": max(r["peak"] for r in runs),
            "peak_cpu": max(r["peak_cpu"] for r in runs),
        }
    return out


def print_table(args: argparse.Namespace, rows: list[dict]) -> None:
    print(
        f"tile {args.tile}, workers {args.workers}, tta {args.tta}, repeats {args.repeats} "
        f"(times: fastest repeat; peaks: largest), weights {args.weights or 'bundled cpu_small'}"
    )
    print(
        "| size | config | cells | track s | cells stage s | added s | added / track (off) "
        "| peak worker RSS MiB | ratio to off | peak CPU-stage worker MiB | ratio to off |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        s = summarise(row)
        off = s["off"]
        for c in row["runs"]:
            r = s[c]
            added = r["track"] + r["cells_stage"] - off["track"]
            print(
                f"| {s['size']}^2 | {c} | {r['cells']} | {r['track']:.1f} "
                f"| {r['cells_stage']:.1f} | {added:+.1f} | {added / off['track']:+.1%} "
                f"| {r['peak'] / 2**20:.0f} | {r['peak'] / off['peak']:.2f} "
                f"| {r['peak_cpu'] / 2**20:.0f} | {r['peak_cpu'] / max(off['peak_cpu'], 1):.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384])
    parser.add_argument("--tile", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--roi-size",
        type=int,
        default=None,
        help="sliding-window size (default: the weights' own; figures "
        "measured before 2026-12-02 used 512)",
    )
    parser.add_argument("--weights", nargs="*", default=[])
    parser.add_argument("--no-tta", dest="tta", action="store_false")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed runs of each configuration (order alternated)"
    )
    parser.add_argument("--geojson", action="store_true", help="also time cells + GeoJSON")
    parser.add_argument(
        "--settle", type=float, default=30.0, help="seconds of rest before each timed run"
    )
    parser.add_argument("--tmp", default=None, help="folder for slides, flows and outputs")
    args = parser.parse_args()

    from mediar_ray.pipeline import SlideOptions
    from mediar_ray.pipeline.run import check_weights

    logging.basicConfig(level=logging.WARNING)
    opts = SlideOptions(
        weights=args.weights,
        tta=args.tta,
        tile_size=args.tile,
        roi_size=args.roi_size,
        workers=args.workers,
    )
    opts, hashes = check_weights(opts)  # resolves the bundled model, as run_slides does
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for size in args.sizes:
            rows.append(measure_size(args, opts, hashes, Path(tmp), size))
    print_table(args, rows)


if __name__ == "__main__":
    main()
