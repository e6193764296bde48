"""The archive engine against its peers, measured in one run.

(a) An archive of small real images (DSB2018 and NuInsSeg fields of at most 512 px from
    ../shared/data) through ``mediar-ray segment-slides --workers 2`` against
    ``mediar-ray segment`` in one process, with the same options: wall-time ratio (goal
    <= 1.0), and whether every image's labels are identical (the same cells, pixel for
    pixel; ids are numbered differently: the slide job numbers cells in raster order).
(b) An archive of slides of 2048^2 built from real DSB2018 crops with 2 model actors:
    the fraction of the time between the first tile's start and the last tile's end in
    which every model actor is busy (timestamps taken inside the actors; goal >= 0.9),
    beside the same figure for the one-slide-at-a-time order (``--max-slides-in-flight
    1``: the next slide is planned only when the previous one is finished).

Both commands run as subprocesses, each timed from start to exit (Ray start-up, model
loading and output writing included).

    pip install -e ".[bench]" && python bench/archive_throughput.py
"""

from __future__ import annotations

import argparse
import json
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

    dsb = [p for p in sorted((DATA / "dsb2018/images").glob("*.png"))
           if max(Image.open(p).size) <= 512]
    nuin = sorted((DATA / "nuinsseg/images").glob("*.png"))
    picks = [p for pair in zip(dsb, nuin) for p in pair]
    if len(picks) < n:
        raise SystemExit(f"only {len(picks)} small images found under {DATA}")
    return picks[:n]


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    return seconds


def same_cells(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label images hold the same cells (a bijection between their ids)."""
    if a.shape != b.shape or ((a > 0) != (b > 0)).any():
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]).astype(np.int64), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def small_archive(work: Path, n: int, flags: list[str]) -> dict:
    """(a): segment-slides --workers 2 against segment, same images and options."""
    import tifffile
    import zarr

    src = work / "small"
    src.mkdir()
    for p in small_images(n):
        shutil.copy(p, src / p.name)
    seg = timed([sys.executable, "-m", "mediar_ray.cli", "segment", str(src),
                 "--output", str(work / "seg"), *flags])
    slides = timed([sys.executable, "-m", "mediar_ray.cli", "segment-slides", str(src),
                    str(work / "slides"), "--workers", "2", *flags])
    summary = json.loads((work / "slides/run_summary.json").read_text())
    identical = 0
    for name, url in summary["inputs"].items():
        ours = np.asarray(zarr.open_array(str(work / f"slides/{name}.zarr/labels/cells/0"))[:])
        theirs = tifffile.imread(work / "seg" / f"{Path(url).name.split('.')[0]}_label.tiff")
        identical += same_cells(ours, theirs)
    return {"images": n, "segment_s": round(seg, 1), "segment_slides_s": round(slides, 1),
            "ratio": round(slides / seg, 3), "labels_identical": identical,
            "failed": summary["failed"]}


def big_archive(work: Path, n: int, size: int, flags: list[str]) -> dict:
    """(b): every-actor-busy fraction, archive order against one slide at a time."""
    from slide_memory import write_slide

    src = work / "big"
    src.mkdir()
    for i in range(n):
        write_slide(src / f"slide{i}.tif", size, seed=i)
    out = {}
    for order, extra in (("archive", []), ("one_at_a_time", ["--max-slides-in-flight", "1"])):
        dest = work / f"big_{order}"
        seconds = timed([sys.executable, "-m", "mediar_ray.cli", "segment-slides", str(src),
                         str(dest), "--workers", "2", *flags, *extra])
        util = json.loads((dest / "run_summary.json").read_text())["utilization"]
        out[order] = {"wall_s": round(seconds, 1), **util}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=48, help="images in archive (a)")
    parser.add_argument("--slides", type=int, default=6, help="slides in archive (b)")
    parser.add_argument("--size", type=int, default=2048, help="side of the slides of (b)")
    parser.add_argument("--small-flags", default="", help="extra options for (a) (both commands)")
    parser.add_argument("--big-flags", default="--no-tta", help="options for (b)")
    parser.add_argument("--roi-size", type=int, default=None,
                        help="sliding-window size for every command (default: the weights' "
                        "own; figures measured before 2026-12-02 used 512)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="archive_bench_"))
    try:
        roi = ["--roi-size", str(args.roi_size)] if args.roi_size else []
        args.small_flags = " ".join([args.small_flags, *roi]).strip()
        args.big_flags = " ".join([args.big_flags, *roi]).strip()
        a = small_archive(work, args.small, args.small_flags.split())
        print(f"(a) {a['images']} small real images, options: {args.small_flags or 'defaults'}")
        print("| command | wall s |\n|---|---|")
        print(f"| mediar-ray segment (one process) | {a['segment_s']} |")
        print(f"| mediar-ray segment-slides --workers 2 | {a['segment_slides_s']} |")
        print(f"segment-slides / segment: {a['ratio']} (goal <= 1.0); labels identical "
              f"(same cells) for {a['labels_identical']} of {a['images']} images")
        b = big_archive(work, args.slides, args.size, args.big_flags.split())
        print(f"\n(b) {args.slides} slides of {args.size}^2 from real DSB2018 crops, 2 model "
              f"actors, options: {args.big_flags}")
        print("| order | wall s | every actor busy | span s | tiles |\n|---|---|---|---|---|")
        for order, r in b.items():
            print(f"| {order} | {r['wall_s']} | {r['all_actors_busy']:.3f} | {r['span_s']} "
                  f"| {r['tiles']} |")
        print(f"every-actor-busy fraction, archive order: {b['archive']['all_actors_busy']:.3f} "
              "(goal >= 0.9)")
        if args.json:
            Path(args.json).write_text(json.dumps({"small": a, "big": b}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
