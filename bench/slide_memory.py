"""Bounded memory and pipeline overhead of the slide job on slides built from real images.

For each size, writes a tiled RGB TIFF (256-px tiles) made of crops of the real DSB2018
images, segments it with ``run_slides`` on a local Ray, and samples the resident memory
of every busy Ray worker process (``ray::`` processes) while it runs. Prints, per size:
peak RSS of the largest worker (and of each kind of worker), end-to-end seconds per
megapixel, and the model forward time alone for the slide's windows (every global sliding
window once per TTA frame). Each size runs in its own Ray session; the forward-only time
is measured first, after a rest, on a sample of real windows of the slide (same batch
size, one thread per process, as many one-CPU Ray tasks at once as there are actors) and
scaled by the number of windows; then the ratio of peaks (largest slide / smallest) and
the overhead ratio (end-to-end / forward-only).

    python bench/slide_memory.py --sizes 4096 16384 --tile 2048 --workers 2 --no-tta
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil
import tifffile

if TYPE_CHECKING:
    from mediar_ray.pipeline import SlideOptions
    from mediar_ray.sources import SlideSource

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
    tifffile.imwrite(
        path,
        (bank[i] for i in picks),
        shape=(size, size, 3),
        dtype=np.uint8,
        tile=(CROP, CROP),
        photometric="rgb",
        compression="zlib",
    )


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


def _time_forward(weights: list[str], model_config: dict, windows: np.ndarray, batch: int) -> float:
    """Seconds per window for the model forward alone (every model), in this process."""
    import torch

    from mediar_ray.inference import _forward
    from mediar_ray.segment import load_models

    models = load_models(weights, model_config, "cpu")
    x = torch.from_numpy(np.array(windows))  # a writable copy
    for m in models:
        _forward(m, x[:batch], torch.device("cpu"), False)  # warm-up, untimed
    start = time.perf_counter()
    for b in range(0, len(x), batch):
        for m in models:
            _forward(m, x[b : b + batch], torch.device("cpu"), False)
    return (time.perf_counter() - start) / len(x)


def sample_windows(reader: SlideSource, roi: int, n: int, seed: int = 0) -> np.ndarray:
    """(n, 3, roi, roi) float32: real windows of an open slide at random positions of the
    inference grid, each normalised by its own percentiles (the forward pass costs the
    same whatever the values)."""
    from mediar_ray.inference import window_starts
    from mediar_ray.preprocess import normalize

    h, w = reader.shape
    ys, xs = window_starts(h, roi, 0.6), window_starts(w, roi, 0.6)
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, roi, roi), np.float32)
    for i in range(n):
        y, x = int(rng.choice(ys)), int(rng.choice(xs))
        out[i] = normalize(reader[y : y + roi, x : x + roi])
    return out


def forward_seconds(
    weights: list[str], slide: str, roi: int, tta: bool, workers: int, sample: int, batch: int = 4
) -> tuple[float, int, float]:
    """Model forward alone on every window of the slide, as wall-clock seconds over
    ``workers``: timed on ``sample`` real windows of the slide, split over ``workers``
    Ray tasks of one CPU each running at the same time (like the inference actors, same
    batch size and thread count), then scaled by the slide's number of windows.

    Returns (estimated seconds, number of windows, measured seconds per window).
    """
    import ray

    from mediar_ray.inference import window_starts
    from mediar_ray.sources import open_slide

    with open_slide(str(slide)) as reader:  # opened once: shape and sampled windows
        h, w = reader.shape
        windows = sample_windows(reader, roi, sample)
    n_windows = len(window_starts(h, roi, 0.6)) * len(window_starts(w, roi, 0.6))
    n_windows *= 3 if tta else 1
    task = ray.remote(num_cpus=1, max_calls=1)(_time_forward)  # worker exits after
    per = ray.get(
        [task.remote(weights, {}, part, batch) for part in np.array_split(windows, workers)]
    )
    per_window = float(np.mean(per))
    return per_window * n_windows / workers, n_windows, per_window


def measure_size(
    args: argparse.Namespace, opts: SlideOptions, slide: Path, size: int, out: str
) -> dict:
    """One size in its own Ray session: the forward-only peer first, then the pipeline.

    A fresh session per size, because what a previous run leaves behind skews the
    timing: measured 2026-11-26, a forward-only sample taken after the 4k pipeline in
    the same session ran at 0.79 s per window, against 0.44 at the start of the session.
    """
    import ray

    from mediar_ray.pipeline import run_slides

    ray.init(num_cpus=args.workers, include_dashboard=False, logging_level=logging.WARNING)
    try:
        time.sleep(args.settle)
        fwd, n_windows, per_window = forward_seconds(
            args.weights, str(slide), opts.roi_size, args.tta, args.workers, args.sample
        )
        time.sleep(args.settle)
        with WorkerMemory() as mem:
            start = time.perf_counter()
            report = run_slides([str(slide)], out, opts)
            seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    if report["failed"]:
        raise SystemExit(f"slide {size} failed: {report['failed']}")
    name, peak = max(mem.peak.values(), key=lambda v: v[1])
    by_kind: dict[str, int] = {}  # largest RSS of each kind of worker, MiB
    for kind, rss in mem.peak.values():
        by_kind[kind] = max(by_kind.get(kind, 0), rss // 2**20)
    done = report["done"][slide.stem]
    return dict(
        size=size,
        mp=size * size / 1e6,
        cells=done["cells"],
        sec=seconds,
        stages=done["seconds"],
        fwd=fwd,
        windows=n_windows,
        per_window=per_window,
        peak=peak,
        name=name,
        peak_mib_by_worker=by_kind,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
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
        "--sample",
        type=int,
        default=200,
        help="windows timed for the forward-only estimate, per slide",
    )
    parser.add_argument(
        "--settle", type=float, default=30.0, help="seconds of rest before each timed phase"
    )
    args = parser.parse_args()

    from mediar_ray.pipeline import SlideOptions

    logging.basicConfig(level=logging.WARNING)
    opts = SlideOptions(
        weights=args.weights,
        tta=args.tta,
        tile_size=args.tile,
        roi_size=args.roi_size,
        workers=args.workers,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            slide = Path(tmp) / f"slide_{size}.tif"
            write_slide(slide, size)
            rows.append(measure_size(args, opts, slide, size, f"{tmp}/out_{size}"))
            print(json.dumps(rows[-1]), flush=True)  # kept even if a later size fails
            slide.unlink()
    print_table(args, rows)


def print_table(args: argparse.Namespace, rows: list[dict]) -> None:
    print(
        f"tile {args.tile}, workers {args.workers}, tta {args.tta}, "
        f"weights {args.weights or 'bundled cpu_small'}; forward-only = seconds per window "
        f"measured on {args.sample} real windows of each slide (batch 4, {args.workers} "
        "one-CPU Ray tasks at once, like the actors) x the slide's windows / workers"
    )
    print(
        "| size | MP | cells | windows | end-to-end s | plan / infer / track / finish s "
        "| s/MP | forward-only s/MP | overhead ratio | peak worker RSS MiB | worker |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        st = r["stages"]
        stages = " / ".join(f"{st.get(k, 0):.0f}" for k in ("plan", "infer", "track", "finish"))
        print(
            f"| {r['size']}^2 | {r['mp']:.1f} | {r['cells']} | {r['windows']} "
            f"| {r['sec']:.1f} | {stages} | {r['sec'] / r['mp']:.2f} "
            f"| {r['fwd'] / r['mp']:.2f} | {r['sec'] / r['fwd']:.2f} "
            f"| {r['peak'] / 2**20:.0f} | {r['name']} |"
        )
    print(
        "forward seconds per window (all models, one thread): "
        + ", ".join(f"{r['size']}^2 {r['per_window']:.3f}" for r in rows)
    )
    print(f"peak worker RSS, largest / smallest slide: {rows[-1]['peak'] / rows[0]['peak']:.2f}")


if __name__ == "__main__":
    main()
