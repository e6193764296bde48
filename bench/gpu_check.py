"""One command that checks and measures inference on one accelerator and prints one table.

On a CUDA GPU (meant for one H100-class card, 8 minutes):

1. forward windows per second of the full mit_b5 MEDIAR-Former (random weights: the same
   cost as the released ones) in fp32 (exact), tf32, bf16 and fp16 at batch sizes 1 to 64,
   with the relative error against exact fp32 and the peak GPU memory of each;
2. the 2-model TTA ensemble's megapixels per second at the best setting of (1);
3. ``segment-slides`` end to end on a slide of real DSB2018 tiles (8192^2) with one GPU
   actor: megapixels per second, the every-actor-busy fraction, CPU cores used (the
   machine's /proc/stat); says "not run" when Ray is not installed;
4. one DDP training step, a save and a resume, and one more step on the device;
5. one tile whose forward runs out of device memory: the batch is halved and the tile's
   result equals the one of a batch that fits.

``--device cpu --quick`` runs the same code on small sizes (mit_b0, 256-px windows,
batch 1-2, a 1024^2 slide), as the test suite does. No GPU figure is ever estimated: a
part that did not run says so.

    python bench/gpu_check.py --device cuda --json gpu_check.json
    python bench/gpu_check.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SMALL = {
    "encoder_name": "mit_b0",
    "decoder_channels": [64, 32, 16, 16, 16],
    "decoder_pab_channels": 16,
}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mosaic(size: int) -> np.ndarray:
    """(size, size, 3) uint8 made of real DSB2018 images tiled side by side."""
    from mediar_ray.io import read_image

    tiles = [read_image(str(p)) for p in sorted((DATA / "dsb2018/images").glob("*.png"))[:64]]
    tiles = [np.repeat(t[..., None], 3, -1) if t.ndim == 2 else t[..., :3] for t in tiles]
    out, k, y = np.zeros((size, size, 3), np.uint8), 0, 0
    while y < size:
        x, row = 0, 0
        while x < size:
            t = tiles[k % len(tiles)].astype(np.uint8)
            h, w = min(t.shape[0], size - y), min(t.shape[1], size - x)
            out[y : y + h, x : x + w] = t[:h, :w]
            x, row, k = x + w, max(row, h), k + 1
        y += row
    return out


def forward_table(model, device, roi: int, batches: list[int], reps: int) -> list[dict]:
    """Windows/s, relative error against exact fp32 and peak memory per mode and batch."""
    import torch

    from mediar_ray.inference import _forward
    from mediar_ray.precision import exact_fp32, tf32_allowed

    modes = ["fp32", "tf32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in batches:
        x = torch.randn((batch, 3, roi, roi), generator=gen).to(device)
        with exact_fp32():
            ref = _forward(model, x, device, "fp32")
        for mode in modes:
            prec = "fp32" if mode in ("fp32", "tf32") else mode
            ctx = (
                exact_fp32()
                if mode == "fp32"
                else (tf32_allowed(True) if mode == "tf32" else contextlib.nullcontext())
            )
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                with ctx:
                    out = _forward(model, x, device, prec)  # warm-up
                    _sync(device)
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        out = _forward(model, x, device, prec)
                    _sync(device)
                    seconds = time.perf_counter() - t0
            except torch.OutOfMemoryError:
                rows.append({"mode": mode, "batch": batch, "windows_per_s": "OOM"})
                torch.cuda.empty_cache()
                continue
            err = float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))
            peak = (
                round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                if device.type == "cuda"
                else "n/a"
            )
            rows.append(
                {
                    "mode": mode,
                    "batch": batch,
                    "windows_per_s": round(batch * reps / seconds, 2),
                    "rel_err": float(f"{err:.2e}"),
                    "peak_gib": peak,
                }
            )
    return rows


def ensemble_mp_per_s(models, device, precision: str, batch: int, size: int) -> dict:
    """2-model TTA ensemble on a real-tile mosaic: megapixels per second."""
    from mediar_ray.inference import predict_raw
    from mediar_ray.preprocess import normalize

    image = normalize(_mosaic(size))
    predict_raw(
        image[:, :512, :512], models, device=device, precision=precision, sw_batch_size=batch
    )  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    predict_raw(image, models, device=device, precision=precision, sw_batch_size=batch)
    _sync(device)
    seconds = time.perf_counter() - t0
    return {
        "precision": precision,
        "batch": batch,
        "size": size,
        "mp_per_s": round(size * size / 1e6 / seconds, 3),
        "seconds": round(seconds, 2),
    }


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def slide_end_to_end(weights: str, params: dict, device, size: int, roi: int, tmp: Path) -> dict:
    """``segment-slides`` on a ``size``^2 slide of real tiles, one actor."""
    try:
        import ray  # noqa: F401
        import zarr  # noqa: F401
    except ImportError as err:
        return {"run": False, "why": f"not run: {err.name} is not installed"}
    import os

    import tifffile

    from mediar_ray.pipeline.options import SlideOptions
    from mediar_ray.pipeline.run import run_slides

    slide = tmp / "mosaic.tif"
    tifffile.imwrite(slide, _mosaic(size), tile=(256, 256), photometric="rgb")
    gpu = device.type == "cuda"
    opts = SlideOptions(
        weights=[weights],
        model_config=params,
        tta=True,
        roi_size=roi,
        tile_size=2048 if gpu else 512,
        workers=1,
        tissue="off",
        num_gpus_per_worker=1.0 if gpu else 0.0,
        device="cuda" if gpu else "cpu",
    )
    hz = os.sysconf("SC_CLK_TCK")
    j0, t0 = _busy_jiffies(), time.perf_counter()
    report = run_slides([str(slide)], str(tmp / "out"), opts)
    seconds, cores = time.perf_counter() - t0, (_busy_jiffies() - j0) / hz
    if report["failed"]:
        return {"run": True, "failed": report["failed"]}
    util = report.get("utilization", {})
    return {
        "run": True,
        "size": size,
        "seconds": round(seconds, 1),
        "mp_per_s": round(size * size / 1e6 / seconds, 3),
        "all_actors_busy": util.get("all_actors_busy"),
        "cpu_cores_used": round(cores / seconds, 2),
    }


def train_resume(params: dict, device, roi: int, tmp: Path) -> dict:
    """One DDP step, save, resume into a fresh model and optimizer on the device, one
    more step; the resumed step must run (optimizer state on the model's device)."""
    import torch
    import torch.distributed as dist

    from mediar_ray.model import build_model
    from mediar_ray.train.checkpoint import load_training_state, save_training_state
    from mediar_ray.train.loop import train_step

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp / 'ddp'}", rank=0, world_size=1)
    try:

        def make():
            model = build_model(**params).to(device)  # on the device before the optimizer
            ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index or 0] if device.type == "cuda" else None
            )
            opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4, weight_decay=0.01)
            return model, ddp, opt, torch.optim.lr_scheduler.StepLR(opt, 1)

        gen = torch.Generator().manual_seed(0)
        batch = {
            "image": torch.randn((2, 3, roi, roi), generator=gen),
            "flows": torch.randn((2, 2, roi, roi), generator=gen),
            "cell": (torch.rand((2, roi, roi), generator=gen) > 0.5).float(),
            "valid": torch.ones((2, roi, roi)),
        }
        batch = {k: v.to(device) for k, v in batch.items()}
        model, ddp, opt, sched = make()
        first = train_step(ddp, opt, batch, amp=True)
        save_training_state(tmp / "ckpt", model, opt, sched, {"epoch": 0})
        model, ddp, opt, sched = make()
        load_training_state(tmp / "ckpt", model, opt, sched)
        second = train_step(ddp, opt, batch, amp=True)
        return {
            "run": True,
            "backend": backend,
            "loss_first": round(first, 4),
            "loss_after_resume": round(second, 4),
        }
    finally:
        dist.destroy_process_group()


def oom_tile(model, device, roi: int) -> dict:
    """A tile whose forward runs out of memory, through the model actor's retry path
    (:func:`mediar_ray.pipeline.actors.run_with_smaller_batches` around the tile): on
    CUDA with the allocator capped at 3 GB (a real out-of-memory error), on a CPU (no
    allocator limit) a forward that fails above 2 windows as CUDA would. Reports the
    forwards that ran and the tile's result against a batch that fits."""
    import torch

    from mediar_ray.inference import predict_partial
    from mediar_ray.pipeline.actors import run_with_smaller_batches
    from mediar_ray.preprocess import normalize

    image = normalize(_mosaic(6 * roi))
    sizes: list[int] = []
    limit = None if device.type == "cuda" else 2

    class Recorded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            if limit is not None and x.shape[0] > limit:
                raise torch.OutOfMemoryError("CUDA out of memory (stand-in limit)")
            out = self.inner(x)
            sizes.append(x.shape[0])
            return out

    net = Recorded()
    start = 64 if device.type == "cuda" else 16

    def step(batch):
        return predict_partial(
            lambda y0, y1, x0, x1: image[:, y0:y1, x0:x1],
            image.shape[1:],
            (0, 4 * roi, 0, 4 * roi),
            [net],
            tta=False,
            roi_size=roi,
            sw_batch_size=batch,
            device=device,
            precision="fp32",
        )

    if device.type == "cuda":  # a real out-of-memory: the allocator capped at ~3 GB
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(3 * 2**30 / total, device)
    try:
        out, used = run_with_smaller_batches(step, start)
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    ran = sorted(set(sizes))
    ref = step(2)
    err = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
    return {
        "start_batch": start,
        "actor_batch_after": used,
        "forward_sizes_ran": ran,
        "rel_diff_vs_batch_2": float(f"{err:.1e}"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (the test suite)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    import torch

    from mediar_ray.model import build_model
    from mediar_ray.precision import resolve_precision
    from mediar_ray.segment import check_device

    device = check_device(args.device)
    params = SMALL if args.quick else {}
    roi = 256 if args.quick else 512
    batches = [1, 2] if args.quick else [1, 2, 4, 8, 16, 32, 64]
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": str(device),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "quick": args.quick,
    }
    models = [
        build_model(**params).to(device, memory_format=torch.channels_last).eval() for _ in range(2)
    ]
    table = forward_table(models[0], device, roi, batches, reps=1 if args.quick else 5)
    result["forward"] = table
    numeric = [r for r in table if isinstance(r["windows_per_s"], float)]
    best = max(numeric, key=lambda r: r["windows_per_s"])
    prec = resolve_precision("auto", device)
    result["ensemble"] = ensemble_mp_per_s(
        models, device, prec, best["batch"], 512 if args.quick else 4096
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = str(tmp / "model.pth")
        torch.save(models[0].state_dict(), weights)
        result["slide"] = slide_end_to_end(
            weights, params, device, 1024 if args.quick else 8192, roi, tmp
        )
        result["train_resume"] = train_resume(params, device, 128 if args.quick else roi, tmp)
    result["oom_tile"] = oom_tile(models[0], device, roi)
    print(f"{result['card']} ({result['device']}), torch {result['torch']}, {result['date']}")
    print("| mode | batch | windows/s | rel. error vs fp32 | peak GiB |\n|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['mode']} | {r['batch']} | {r['windows_per_s']} | {r.get('rel_err', '')} "
            f"| {r.get('peak_gib', '')} |"
        )
    for key in ("ensemble", "slide", "train_resume", "oom_tile"):
        print(f"{key}: {result[key]}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
