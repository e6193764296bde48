"""How fast the CPU side of the slide engine can feed one accelerator, on real slides.

The network is replaced by a stand-in model actor that takes a chosen time per tile,
stated as megapixels of slide per second (``mp_per_s``), and returns flows computed from
real labels (a mosaic of the DSB2018/StarDist/Usiigaci ground truth, sized like the
slide), so that every CPU stage does its real work: the actor reads and normalises the
pixels its windows cover, as a model actor does, then waits, then writes the tile's
partial chunk; gather, tracking, relabelling, the cell table, pyramids and QC run as in a
real job. It measures:

1. ``stage_cpu_s_per_mp``: CPU-seconds per megapixel of each stage outside the network
   (plan, read and normalise, partial writes, gather, tracking, relabel, cell table,
   pyramids, QC), each stage run in this process, one call after another
   (``time.process_time``, all threads counted);
2. ``standin``: for stand-in speeds from 0.25 to 8 MP/s, the engine on ``--copies``
   copies of the slide in one job (as an archive: a slide's CPU stages overlap the next
   one's inference) with ``--actors`` stand-in actors: the fraction of time every actor
   was busy (first tile's start to last tile's end) and the megapixels per second
   achieved (all copies' megapixels over the job's wall time);
3. ``cores_per_accelerator``: CPU cores one accelerator needs at each speed,
   ``mp_per_s x sum(stage_cpu_s_per_mp)``.

    python bench/accelerator_capacity.py --json bench/accelerator_capacity.json
    python bench/accelerator_capacity.py --quick      # < 3 min: 1 um/px, two speeds

Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
SLIDES = REPO.parent / "shared" / "data" / "slides"
SPEEDS = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]


def standin_actor(mp_per_s: float, flows_path: str) -> type:
    """A class with :class:`mediar_ray.pipeline.actors.InferenceActor`'s interface whose
    "network" takes (tile megapixels / ``mp_per_s``) seconds and returns the flows stored
    in ``flows_path`` ((3, H, W) float32 over the processing image)."""

    class StandInActor:
        def __init__(
            self, weights, model_config, tta, device, threads, *, precision="auto", batch_size=0
        ):
            self.flows = np.load(flows_path, mmap_mode="r")

        def node(self) -> str:
            import ray

            return ray.get_runtime_context().get_node_id()

        def infer(self, plan_json: str, tile_json: str) -> dict:
            import ray

            from mediar_ray.pipeline.layout import Tile
            from mediar_ray.pipeline.stages import SlidePlan

            start = time.time()
            plan = SlidePlan.from_json(plan_json)
            tile = Tile(**json.loads(tile_json))
            read_normalise(plan, tile)  # the actor's own CPU work
            time.sleep((tile.y1 - tile.y0) * (tile.x1 - tile.x0) / 1e6 / mp_per_s)
            write_partial(plan, tile, self.flows)
            return {
                "slide": plan.layout.stem,
                "tile": tile.name,
                "start": start,
                "end": time.time(),
                "node": ray.get_runtime_context().get_node_id(),
                "windows_run": 0,
                "windows_skipped": 0,
            }

    return StandInActor


def read_normalise(plan, tile) -> np.ndarray:
    """What a model actor reads for a tile: the image under the windows it owns."""
    from mediar_ray.pipeline.view import read_processing
    from mediar_ray.preprocess import normalize

    h, w = plan.shape
    y1, x1 = min(tile.y1 + plan.roi_size, h), min(tile.x1 + plan.roi_size, w)
    return normalize(read_processing(plan, tile.y0, y1, tile.x0, x1), plan.stats)


def write_partial(plan, tile, flows: np.ndarray) -> None:
    """The tile's partial chunk: the true flows on the tile, zero beyond (so gathering
    the partials gives the flows exactly), and its done record."""
    from mediar_ray.pipeline.stages import mark_done, open_array

    chunk = np.zeros((3, *plan.partial_shape), np.float32)
    chunk[:, : tile.y1 - tile.y0, : tile.x1 - tile.x0] = flows[
        :, tile.y0 : tile.y1, tile.x0 : tile.x1
    ]
    partials = open_array(plan.layout.scratch + "/partials", mode="r+")
    partials[tile.ty, tile.tx] = chunk
    mark_done(plan, "windows", tile)


def true_flows(shape: tuple[int, int], path: Path) -> int:
    """(3, H, W) network-like output of a mosaic of real labels, saved to ``path``;
    returns the number of cells."""
    from mosaic import mosaic, real_labels

    from mediar_ray.dynamics import labels_to_flows

    labels = real_labels(("dsb2018", "stardist_nuclei"))
    truth = mosaic(labels, max(shape), seed=3)[: shape[0], : shape[1]]
    raw = np.concatenate([labels_to_flows(truth) * 5, np.where(truth > 0, 5.0, -5.0)[None]]).astype(
        np.float32
    )
    np.save(path, raw)
    return int(len(np.unique(truth)) - 1)


def _cpu(fn, *args):
    t0 = time.process_time()
    out = fn(*args)
    return out, time.process_time() - t0


def stage_costs(slide: str, opts, out: Path, flows_path: Path) -> tuple[dict, dict]:
    """Step 1: each stage in this process; (CPU-seconds per stage, facts of the plan)."""
    from mediar_ray.pipeline import finish, outputs, stages, tasks
    from mediar_ray.pipeline.plan import plan_slide
    from mediar_ray.pipeline.run import check_weights, slide_fingerprint

    tasks.INLINE_MAX = 10**9  # every fan-out in this process: CPU time measurable
    fp = slide_fingerprint(slide, opts, check_weights(opts), opts.mpp)
    planned, cpu_plan = _cpu(plan_slide, slide, "capacity", str(out), opts, fp, opts.mpp)
    plan = planned.plan
    cells = true_flows(tuple(plan.shape), flows_path)
    flows = np.load(flows_path, mmap_mode="r")
    todo = stages.tiles_to_infer(plan)
    cpu = {"plan": cpu_plan, "read_normalise": 0.0, "partial_writes": 0.0}
    for tile in todo:
        cpu["read_normalise"] += _cpu(read_normalise, plan, tile)[1]
        cpu["partial_writes"] += _cpu(write_partial, plan, tile, flows)[1]
    cpu["gather"] = _cpu(finish.gather, plan, opts.cpus_per_task)[1]
    tracked = [0.0]
    track_chunk = stages.track_chunk

    def timed_track(*args):
        result, seconds = _cpu(track_chunk, *args)
        tracked[0] += seconds
        return result

    import ray

    put = ray.put  # in this process the "object store" is the objects themselves
    stages.track_chunk, ray.put = timed_track, lambda value: value
    try:
        summary, cpu_tr = _cpu(
            finish.track_and_relabel,
            plan,
            opts.flow_params,
            opts.cpus_per_task,
            opts.cells,
            opts.geojson,
        )
    finally:
        stages.track_chunk, ray.put = track_chunk, put
    cpu["tracking"], cpu["relabel"] = tracked[0], cpu_tr - tracked[0]
    cpu["cell_table"] = _cpu(finish.write_cell_outputs, plan, opts.geojson)[1]
    qc = [0.0]
    write_qc = outputs.write_qc_png

    def timed_qc(*args):
        result, seconds = _cpu(write_qc, *args)
        qc[0] += seconds
        return result

    outputs.write_qc_png = timed_qc
    try:
        cpu_out = _cpu(outputs.build_outputs, plan, opts.labels_level0, opts.cpus_per_task)[1]
    finally:
        outputs.write_qc_png = write_qc
    cpu["pyramids"], cpu["qc"] = cpu_out - qc[0], qc[0]
    mp = plan.shape[0] * plan.shape[1] / 1e6
    facts = {
        "shape": list(plan.shape),
        "megapixels": round(mp, 3),
        "tiles": len(todo),
        "cells_in_flows": cells,
        "cells_found": summary.get("cells"),
    }
    return {k: round(v / mp, 4) for k, v in cpu.items()}, facts


def engine_run(
    slides: list[str], opts, out: Path, mp_per_s: float, flows_path: Path, mp: float
) -> dict:
    """Step 2: the engine on copies of the slide (one job, so that a slide's CPU stages
    overlap the next slide's inference, as in an archive) with stand-in actors of speed
    ``mp_per_s``; ``mp``: megapixels of one copy."""
    import mediar_ray.pipeline.actors as actors
    from mediar_ray.pipeline.run import run_slides

    real = actors.InferenceActor
    actors.InferenceActor = standin_actor(mp_per_s, str(flows_path))
    try:
        t0 = time.perf_counter()
        report = run_slides(slides, str(out), opts)
        seconds = time.perf_counter() - t0
    finally:
        actors.InferenceActor = real
    if report["failed"]:
        raise SystemExit(f"the slide failed at {mp_per_s} MP/s: {report['failed']}")
    util = report.get("utilization", {})
    achieved = len(slides) * mp / seconds
    # all_actors_busy spans first tile to last tile; standin_busy_of_job is the share of
    # the whole job's wall time the stand-in spent on tiles (what a GPU would see).
    return {
        "mp_per_s": mp_per_s,
        "all_actors_busy": util.get("all_actors_busy"),
        "standin_busy_of_job": round(achieved / mp_per_s / max(1, opts.workers), 4),
        "achieved_mp_per_s": round(achieved, 3),
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", default=str(sorted(SLIDES.glob("*.svs"))[0]))
    parser.add_argument(
        "--target-mpp",
        type=float,
        default=None,
        help="processing resolution (default: the slide's own; --quick: 1.0)",
    )
    parser.add_argument(
        "--speeds",
        type=float,
        nargs="+",
        default=None,
        help=f"stand-in MP/s (default {SPEEDS}; --quick: 1 and 8)",
    )
    parser.add_argument("--actors", type=int, default=1, help="stand-in actors")
    parser.add_argument(
        "--copies",
        type=int,
        default=None,
        help="copies of the slide per run (default 6; --quick: 3)",
    )
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    from mediar_ray.pipeline.cluster import ensure_ray
    from mediar_ray.pipeline.options import SlideOptions

    speeds = args.speeds or ([1.0, 8.0] if args.quick else SPEEDS)
    target = args.target_mpp or (1.0 if args.quick else None)
    # The bundled model's window size (256 px) sets the reach of a tile's windows.
    opts = SlideOptions(
        tta=False,
        tile_size=512 if args.quick else args.tile,
        workers=args.actors,
        target_mpp=target,
    )
    from mediar_ray.weights import resolve_weights

    opts.weights = resolve_weights(None)
    opts.roi_size = 256
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "slide": Path(args.slide).name,
        "target_mpp": target,
        "actors": args.actors,
        "cpus": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        flows_path = tmp / "flows.npy"
        costs, facts = stage_costs(args.slide, opts, tmp / "stages", flows_path)
        result.update({"stage_cpu_s_per_mp": costs, "slide_facts": facts})
        copies = []
        for k in range(args.copies or (3 if args.quick else 6)):
            copies.append(tmp / f"copy{k}{Path(args.slide).suffix}")
            shutil.copyfile(args.slide, copies[-1])
        ensure_ray(dashboard=False)
        result["copies"] = len(copies)
        result["standin"] = [
            engine_run(
                [str(c) for c in copies], opts, tmp / f"run_{k}", s, flows_path, facts["megapixels"]
            )
            for k, s in enumerate(speeds)
        ]
    total = sum(costs.values())
    result["cpu_s_per_mp_total"] = round(total, 4)
    result["cores_per_accelerator"] = {str(s): round(s * total, 2) for s in SPEEDS}
    result["fed_up_to_mp_per_s_on_this_machine"] = round((os.cpu_count() or 1) / total, 2)
    print(f"{result['slide']} at {target or 'native'} um/px: {facts}")
    print("| stage | CPU-s per MP |\n|---|---|")
    for stage, v in costs.items():
        print(f"| {stage} | {v} |")
    print(f"| total | {result['cpu_s_per_mp_total']} |")
    print(
        "| stand-in MP/s | all actors busy (tiles' span) | busy share of the job "
        "| achieved MP/s | cores per accelerator |"
    )
    print("|---|---|---|---|---|")
    for row in result["standin"]:
        print(
            f"| {row['mp_per_s']} | {row['all_actors_busy']} | {row['standin_busy_of_job']} "
            f"| {row['achieved_mp_per_s']} | {round(row['mp_per_s'] * total, 2)} |"
        )
    print(
        f"this machine's {result['cpus']} cores feed up to "
        f"{result['fed_up_to_mp_per_s_on_this_machine']} MP/s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
