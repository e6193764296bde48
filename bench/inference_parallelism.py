"""Two ways to spend two cores on inference, measured in one run on the same images.

The archive engine's model actors each run one torch thread; ``mediar-ray segment`` runs
one process with torch's default threads (two on this machine). This measures, on the
small real images of ``bench/archive_throughput.py`` (a) with flip TTA and the bundled
model, the network's share of both commands (:func:`mediar_ray.inference.predict_raw`,
no tracking, no I/O):

- one process, one thread (the uncontended cost of an image);
- one process, two threads (``segment``);
- two processes of one thread each, running at the same time, each on half the images
  (two model actors).

The three are measured in turn, ``--repeats`` rounds, and each reports its fastest
round (this machine is shared: single runs of the same layout differed by 30%). It
prints images per second and the speed-up of each over one thread. When both
two-core layouts reach about the same speed-up, the slide job cannot be cheaper than
``segment`` on these images: what it adds (Ray and actor start-up, the slide stages'
CPU, shutdown) is not paid back by faster inference.

    pip install -e ".[bench]" && python bench/inference_parallelism.py
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def _images(n: int) -> list[str]:
    from archive_throughput import small_images

    return [str(p) for p in small_images(n)]


def _run(paths: list[str], threads: int, ready, start, out, roi: int | None = None) -> None:
    """Infer ``paths`` with ``threads`` torch threads after one warm-up image (then
    report on ``ready`` and wait for the ``start`` Event); put the seconds of the timed
    loop on ``out``."""
    import torch

    from mediar_ray.inference import predict_raw
    from mediar_ray.io import read_image
    from mediar_ray.preprocess import normalize
    from mediar_ray.segment import load_models

    torch.set_num_threads(threads)
    models = load_models(None, {}, "cpu")
    images = [normalize(read_image(p)) for p in paths]
    predict_raw(images[0], models, tta=True, roi_size=roi, device="cpu")
    ready.put(True)
    start.wait()
    t0 = time.perf_counter()
    for image in images:
        predict_raw(image, models, tta=True, roi_size=roi, device="cpu")
    out.put(time.perf_counter() - t0)


def measure(paths: list[str], processes: int, threads: int, roi: int | None = None) -> float:
    """Wall seconds for ``paths`` split over ``processes`` processes of ``threads``
    threads each, timed from the moment all have loaded the model (the slowest part)."""
    ctx = mp.get_context("spawn")
    ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_run, args=(paths[i::processes], threads, ready, start, out, roi))
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    for _ in procs:  # every process has its model, its images and a warm-up behind it
        ready.get(timeout=300)
    start.set()
    seconds = max(out.get() for _ in procs)
    for p in procs:
        p.join()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--roi-size",
        type=int,
        default=None,
        help="sliding-window size (default: the weights' own; figures "
        "measured before 2026-12-02 used 512)",
    )
    args = parser.parse_args()
    paths = _images(max(args.images, 2))
    layouts = (
        ("1 process x 1 thread", 1, 1),
        ("1 process x 2 threads (segment)", 1, 2),
        ("2 processes x 1 thread (2 model actors)", 2, 1),
    )
    best = {name: float("inf") for name, _, _ in layouts}
    for _ in range(args.repeats):  # in turn, so that a slow spell hits every layout
        for name, procs, threads in layouts:
            best[name] = min(best[name], measure(paths, procs, threads, args.roi_size))
    rows = {
        name: {"seconds": round(s, 2), "images_per_s": round(len(paths) / s, 3)}
        for name, s in best.items()
    }
    base = next(iter(rows.values()))["images_per_s"]
    for name, row in rows.items():
        row["speedup"] = round(row["images_per_s"] / base, 2)
        print(
            f"{name:42s} {row['seconds']:7.2f} s  {row['images_per_s']:.3f} images/s  "
            f"x{row['speedup']:.2f}"
        )
    print(json.dumps({"images": len(paths), "rows": rows}))


if __name__ == "__main__":
    main()
