"""Training throughput: the Ray Train loop against a plain PyTorch loop, and 2 workers
against 1, on the same model, data and augmentations, measured in the same run.

    pip install -e ".[bench]" && python bench/train_throughput.py

Plain loop: one process, a torch DataLoader with one worker process making the same
batches (:class:`mediar_ray.train.stream.BatchMaker` over the same stream rows), the same
model, loss and AdamW step, torch with one thread per training process. Ray Train: the
same rows as a Ray Dataset mapped by BatchMaker actors, TorchTrainer with 1 and with 2
workers of one torch thread each (DDP over gloo for 2). All three run the cpu_small
config's bfloat16 autocast (``optim.amp``); a fourth run, 2 workers in float32, measures
what autocast buys. Samples per second are counted over the epochs after the first
(warm-up: process start, model build, first batches).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mediar_ray.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def config(data: Path, storage: Path, workers: int, args, amp: bool = True) -> "TrainConfig":
    from mediar_ray.train.config import TrainConfig, load_config

    d = load_config(str(REPO / "configs" / "cpu_small.yaml")).to_dict()
    d["name"] = f"throughput_{workers}w_{'bf16' if amp else 'fp32'}"
    d["data"].update(
        {"roots": [str(data)], "mappings": [], "holdout_every": 5, "modality_table": None}
    )
    d["augment"]["crop"] = args.crop
    d["optim"].update({"epochs": args.epochs, "batch_size": args.batch, "amp": amp})
    d["run"].update(
        {
            "storage_path": str(storage),
            "num_workers": workers,
            "validate_every": 0,
            "checkpoint_every": args.epochs,
            "max_steps_per_epoch": args.steps,
            # logical shares that fit 2 workers + the loader into 2 CPUs; every
            # training process runs one torch thread whatever its share
            "cpus_per_worker": 0.75,
            "loader_workers": 1,
            "loader_cpus": 0.5,
        }
    )
    return TrainConfig.from_dict(d)


def plain_loop(cfg, steps_per_epoch: int) -> float:
    """Samples per second of a plain single-process PyTorch loop (epochs after the first)."""
    import torch

    from mediar_ray.train.loop import _build, _cosine, prepare_data, train_step
    from mediar_ray.train.stream import BatchMaker, plan_stream

    torch.set_num_threads(1)
    data = prepare_data(cfg)
    plan = plan_stream(cfg, data.clusters, len(data.public), 1)

    class Rows(torch.utils.data.Dataset):
        """The stream rows as batches; the BatchMaker is built in the loader process
        (numba's OpenMP must not start in a process that forks)."""

        maker = None

        def __len__(self):
            return len(plan.rows)

        def __getitem__(self, i):
            if Rows.maker is None:
                Rows.maker = BatchMaker(data.train, data.public, cfg.augment)
            row = plan.rows[i]
            return Rows.maker.make(json.loads(row["items"]), row["seed"])

    loader = torch.utils.data.DataLoader(Rows(), batch_size=None, num_workers=1, prefetch_factor=2)
    model = _build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=0.01)
    sched = _cosine(opt, cfg.optim.epochs, 0)
    start, counted = None, 0
    for i, batch in enumerate(loader):
        if i == steps_per_epoch:  # warm-up epoch done
            start = time.perf_counter()
        t = {k: torch.as_tensor(batch[k]) for k in ("image", "flows", "cell", "valid")}
        train_step(model, opt, t, cfg.optim.flow_weight, cfg.optim.amp)
        if (i + 1) % steps_per_epoch == 0:
            sched.step()
        if start is not None:
            counted += t["image"].shape[0]
    return counted / (time.perf_counter() - start)


def ray_loop(cfg) -> float:
    """Samples per second of the Ray Train loop, all workers together, after epoch 0."""
    from mediar_ray.train.loop import run_training

    run_training(cfg)
    run = Path(cfg.run.storage_path) / cfg.name
    states = [json.loads(p.read_text()) for p in sorted(run.glob("checkpoint_*/state.json"))]
    return float(states[-1]["samples_per_s_after_first"]) * cfg.run.num_workers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "dsb2018"))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=12, help="steps per epoch per worker")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=256)
    args = p.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp())
    try:
        rows = []
        plain = plain_loop(config(Path(args.data), tmp, 1, args), args.steps)
        rows.append(("plain PyTorch loop, 1 process", plain))
        one = ray_loop(config(Path(args.data), tmp, 1, args))
        rows.append(("Ray Train, 1 worker", one))
        two = ray_loop(config(Path(args.data), tmp, 2, args))
        rows.append(("Ray Train, 2 workers (DDP, gloo)", two))
        full = ray_loop(config(Path(args.data), tmp, 2, args, amp=False))
        rows.append(("Ray Train, 2 workers, float32 (optim.amp off)", full))
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"model cpu_small, crop {args.crop}, batch {args.batch} per worker, "
        f"{args.steps} steps/epoch/worker, {args.epochs} epochs (first not counted)"
    )
    print("| loop | samples/s |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.2f} |")
    print(f"Ray Train 1 worker / plain loop: {one / plain:.2f} (goal >= 0.9)")
    print(f"Ray Train 2 workers / 1 worker: {two / one:.2f}")
    print(f"bfloat16 autocast / float32, 2 workers: {two / full:.2f}")


if __name__ == "__main__":
    main()
