"""Bounded memory and pipeline overhead of the slide job on slides built from real images.

For each size, writes a tiled RGB TIFF (256-px tiles) made of crops of the real DSB2018
images, segments it with ``run_slides`` on a local Ray, and samples the resident memory
of every Ray worker process (``ray::`` processes) while it runs. Prints, per size: peak
RSS of the largest worker, end-to-end seconds per megapixel, and the model forward time
alone for the same slide (every global sliding window once, times the TTA flips, measured
here with one thread per worker like the actors, divided by the worker count); then the
ratio of peaks (largest slide / smallest) and the overhead ratio (end-to-end / forward).

    python bench/slide_memory.py --sizes 4096 16384 --tile 1024 --workers 2 --no-tta
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import tifffile

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CROP = 256


def crop_bank(n: int = 64) -> list[np.ndarray]:
    """Up to ``n`` RGB crops (CROP x CROP, uint8) of the real DSB2018 images."""
    from mediar_ray.io import read_image

    bank = []
    for path in sorted((DATA / "dsb2018" / "images").glob("*.png")):
        img = read_image(str(path))
        img = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img[..., :3]
        if min(img.shape[:2]) >= CROP:
            bank.append(np.ascontiguousarray(img[:CROP, :CROP]).astype(np.uint8))
        if len(bank) == n:
            break
    return bank


def write_slide(path: Path, size: int, seed: int = 0) -> None:
    """A (size, size, 3) uint8 tiled TIFF, streamed tile by tile (never whole in memory)."""
    bank = crop_bank()
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(bank), (size // CROP) ** 2)
    tifffile.imwrite(path, (bank[i] for i in picks), shape=(size, size, 3), dtype=np.uint8,
                     tile=(CROP, CROP), photometric="rgb", compression="zlib")


class WorkerMemory:
    """Samples the RSS of every Ray worker process in a background thread."""

    def __init__(self, every: float = 0.2) -> None:
        self.peak: dict[int, tuple[str, int]] = {}
        self.every, self._stop = every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in psutil.process_iter(["pid", "name", "cmdline"]):
                try:
                    title = " ".join(p.info["cmdline"] or [])
                    if not title.startswith("ray::") or "IDLE" in title:
                        continue  # idle workers hold no slide data
                    rss = p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if rss > self.peak.get(p.pid, ("", 0))[1]:
                    self.peak[p.pid] = (title.split(" ")[0][:40], rss)
            self._stop.wait(self.every)

    def __enter__(self) -> "WorkerMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def forward_seconds(models: list, size: int, roi: int, tta: bool, workers: int,
                    batch: int = 4) -> float:
    """Model forward alone on every global window of a size x size slide (estimated from
    timed batches of real-sized windows), as wall-clock time over ``workers``."""
    import torch

    from mediar_ray.inference import window_starts

    n_windows = len(window_starts(size, roi, 0.6)) ** 2
    x = torch.rand(batch, 3, roi, roi)
    with torch.inference_mode():
        for m in models:
            m(x)  # warm-up
        start = time.perf_counter()
        reps = 3
        for _ in range(reps):
            for m in models:
                m(x)
        per_window = (time.perf_counter() - start) / (reps * batch)
    flips = 4 if tta else 1
    return per_window * n_windows * flips / workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--weights", nargs="*", default=[])
    parser.add_argument("--no-tta", dest="tta", action="store_false")
    args = parser.parse_args()

    import ray
    import torch

    from mediar_ray.pipeline import SlideOptions, run_slides
    from mediar_ray.segment import load_models

    torch.set_num_threads(1)  # like one actor with num_cpus=1
    logging.basicConfig(level=logging.WARNING)
    ray.init(num_cpus=args.workers, include_dashboard=False, logging_level=logging.WARNING)
    models = load_models(args.weights, {}, "cpu")
    opts = SlideOptions(weights=args.weights, tta=args.tta, tile=args.tile,
                        workers=args.workers)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            slide = Path(tmp) / f"slide_{size}.tif"
            write_slide(slide, size)
            with WorkerMemory() as mem:
                start = time.perf_counter()
                report = run_slides([str(slide)], f"{tmp}/out", opts)
                seconds = time.perf_counter() - start
            if report["failed"]:
                raise SystemExit(f"slide {size} failed: {report['failed']}")
            name, peak = max(mem.peak.values(), key=lambda v: v[1])
            fwd = forward_seconds(models, size, opts.roi_size, args.tta, args.workers)
            mp = size * size / 1e6
            rows.append((size, mp, report["done"][slide.stem]["cells"], seconds, fwd, peak, name))
    ray.shutdown()

    print(f"tile {args.tile}, workers {args.workers}, tta {args.tta}, "
          f"weights {args.weights or 'bundled cpu_small'}")
    print("| size | MP | cells | end-to-end s | s/MP | forward-only s/MP | overhead ratio "
          "| peak worker RSS MiB | worker |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, mp, cells, sec, fwd, peak, name in rows:
        print(f"| {size}^2 | {mp:.1f} | {cells} | {sec:.1f} | {sec / mp:.2f} | {fwd / mp:.2f} "
              f"| {sec / fwd:.2f} | {peak / 2**20:.0f} | {name} |")
    print(f"peak worker RSS, largest / smallest slide: {rows[-1][5] / rows[0][5]:.2f}")


if __name__ == "__main__":
    main()
