"""The Ray Data archive engine against the Ray Core one it replaces, measured in one run.

Each command runs both engines (``MEDIAR_ENGINE=core``: the Ray Core engine of
``mediar_ray/pipeline/engine_core.py``, the default until this comparison is made;
``MEDIAR_ENGINE=data``: the Ray Data engine), alternating, ``--repeats`` times, and
keeps each engine's best.

(a) An archive of small real images (DSB2018 and NuInsSeg fields of at most 512 px from
    ../shared/data) through ``mediar-ray segment-slides --workers 2``, beside
    ``mediar-ray segment`` in one process with the same options: the Ray Data engine's
    wall time against the Ray Core engine's (goal: within 5%), each against ``segment``,
    and whether every image's labels are the same cells as ``segment``'s.
(b) An archive of slides of 2048^2 built from real DSB2018 crops with 2 model actors:
    the fraction of the time between the first tile's start and the last tile's end in
    which every model actor is busy (timestamps taken inside the actors; goal >= 0.9).

Every command runs as a subprocess, timed from start to exit (Ray start-up, model
loading and output writing included).

    pip install -e ".[bench]" && python bench/archive_throughput.py
    python bench/archive_throughput.py --small 4 --slides 1 --size 512 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "bench"))


def small_images(n: int) -> list[Path]:
    """``n`` real images of at most 512 px a side, alternating DSB2018 and NuInsSeg."""
    from PIL import Image

    dsb = [
        p for p in sorted((DATA / "dsb2018/images").glob("*.png")) if max(Image.open(p).size) <= 512
    ]
    nuin = sorted((DATA / "nuinsseg/images").glob("*.png"))
    picks = [p for pair in zip(dsb, nuin) for p in pair]
    if len(picks) < n:
        raise SystemExit(f"only {len(picks)} small images found under {DATA}")
    return picks[:n]


#: The engines compared: name -> MEDIAR_ENGINE.
ENGINES = {"ray_core": "core", "ray_data": "data"}


def timed(cmd: list[str], engine: str = "data") -> float:
    start = time.perf_counter()
    env = {**os.environ, "MEDIAR_ENGINE": engine}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    return seconds


def slide_job(src: Path, dest: Path, flags: list[str]) -> list[str]:
    """The ``segment-slides`` command both parts time: ``src`` into ``dest`` with two
    model actors and ``flags``."""
    cmd = [sys.executable, "-m", "mediar_ray.cli", "segment-slides", str(src), str(dest)]
    return [*cmd, "--workers", "2", *flags]


def same_cells(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label images hold the same cells (a bijection between their ids)."""
    if a.shape != b.shape or ((a > 0) != (b > 0)).any():
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]).astype(np.int64), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def small_archive(work: Path, n: int, flags: list[str], repeats: int) -> dict:
    """(a): segment-slides --workers 2 on each engine (best of ``repeats``, alternating)
    against segment, same images and options."""
    import tifffile
    import zarr

    src = work / "small"
    src.mkdir()
    for p in small_images(n):
        shutil.copy(p, src / p.name)
    seg = timed(
        [
            sys.executable,
            "-m",
            "mediar_ray.cli",
            "segment",
            str(src),
            "--output",
            str(work / "seg"),
            *flags,
        ]
    )
    best: dict[str, float] = {}
    identical: dict[str, int] = {}
    for rep in range(repeats):
        for name, engine in ENGINES.items():
            dest = work / f"slides_{name}_{rep}"
            seconds = timed(slide_job(src, dest, flags), engine)
            best[name] = min(best.get(name, seconds), seconds)
            summary = json.loads((dest / "run_summary.json").read_text())
            if summary["failed"]:
                raise SystemExit(f"{name}: slides failed: {summary['failed']}")
            same = 0
            for slide, url in summary["inputs"].items():
                ours = np.asarray(zarr.open_array(str(dest / f"{slide}.zarr/labels/cells/0"))[:])
                stem = Path(url).name.split(".")[0]
                theirs = tifffile.imread(work / "seg" / f"{stem}_label.tiff")
                same += same_cells(ours, theirs)
            identical[name] = min(identical.get(name, same), same)
            shutil.rmtree(dest, ignore_errors=True)
    return {
        "images": n,
        "segment_s": round(seg, 1),
        **{f"{k}_s": round(v, 1) for k, v in best.items()},
        "data_over_core": round(best["ray_data"] / best["ray_core"], 3),
        **{f"{k}_over_segment": round(v / seg, 3) for k, v in best.items()},
        "labels_identical": identical,
    }


def big_archive(work: Path, n: int, size: int, flags: list[str], repeats: int) -> dict:
    """(b): every-actor-busy fraction of each engine (best of ``repeats``, alternating)."""
    from slide_memory import write_slide

    src = work / "big"
    src.mkdir()
    for i in range(n):
        write_slide(src / f"slide{i}.tif", size, seed=i)
    out: dict[str, dict] = {}
    for rep in range(repeats):
        for name, engine in ENGINES.items():
            dest = work / f"big_{name}_{rep}"
            seconds = timed(slide_job(src, dest, flags), engine)
            summary = json.loads((dest / "run_summary.json").read_text())
            run = {
                "wall_s": round(seconds, 1),
                **summary["utilization"],
                "pool_peak": summary.get("pool", {}).get("peak"),
            }
            if name not in out or run["all_actors_busy"] > out[name]["all_actors_busy"]:
                out[name] = run
            shutil.rmtree(dest, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=48, help="images in archive (a)")
    parser.add_argument("--slides", type=int, default=6, help="slides in archive (b)")
    parser.add_argument("--size", type=int, default=2048, help="side of the slides of (b)")
    parser.add_argument("--small-flags", default="", help="extra options for (a) (both commands)")
    parser.add_argument("--big-flags", default="--no-tta", help="options for (b)")
    parser.add_argument(
        "--roi-size",
        type=int,
        default=None,
        help="sliding-window size for every command (default: the weights' "
        "own; figures measured before 2026-12-02 used 512)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of each engine per archive, alternating (best kept)",
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="archive_bench_"))
    try:
        roi = ["--roi-size", str(args.roi_size)] if args.roi_size else []
        args.small_flags = " ".join([args.small_flags, *roi]).strip()
        args.big_flags = " ".join([args.big_flags, *roi]).strip()
        a = small_archive(work, args.small, args.small_flags.split(), args.repeats)
        print(
            f"(a) {a['images']} small real images, options: {args.small_flags or 'defaults'}, "
            f"best of {args.repeats}"
        )
        print("| command | wall s | / segment | labels same cells |\n|---|---|---|---|")
        print(f"| mediar-ray segment (one process) | {a['segment_s']} | 1 | |")
        for name in ENGINES:
            print(
                f"| segment-slides --workers 2, {name} engine | {a[name + '_s']} | "
                f"{a[name + '_over_segment']} | {a['labels_identical'][name]}/{a['images']} |"
            )
        print(f"Ray Data / Ray Core engine: {a['data_over_core']} (goal <= 1.05)")
        b = big_archive(work, args.slides, args.size, args.big_flags.split(), args.repeats)
        print(
            f"\n(b) {args.slides} slides of {args.size}^2 from real DSB2018 crops, 2 model "
            f"actors, options: {args.big_flags}, best of {args.repeats}"
        )
        print(
            "| engine | wall s | every actor busy | span s | tiles | pool peak |\n"
            "|---|---|---|---|---|---|"
        )
        for name, r in b.items():
            print(
                f"| {name} | {r['wall_s']} | {r['all_actors_busy']:.3f} | {r['span_s']} "
                f"| {r['tiles']} | {r['pool_peak']} |"
            )
        print(
            f"every-actor-busy fraction, Ray Data engine: "
            f"{b['ray_data']['all_actors_busy']:.3f} (goal >= 0.9)"
        )
        if args.json:
            Path(args.json).write_text(json.dumps({"small": a, "big": b}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
