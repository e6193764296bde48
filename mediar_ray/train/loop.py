"""MEDIAR training on Ray Train: DDP workers fed by a Ray Dataset of augmented batches.

The driver (:func:`run_training`) reads the dataset mappings, splits off the held-out
pairs, draws the sample stream (:mod:`.stream`) and starts a
:class:`ray.train.torch.TorchTrainer`. Each worker (:func:`train_loop_per_worker`)
builds the model, restores the latest checkpoint of the run if there is one, and trains
with AdamW and a cosine schedule stepped per epoch; after each epoch it reports the
loss and learning rate, every ``validate_every`` epochs the held-out F1 (rank 0), and
every ``checkpoint_every`` epochs a checkpoint (:mod:`.checkpoint`) to the run's storage.

Resuming is running again with the same ``name`` and ``storage_path``: Ray Train hands the
workers the latest checkpoint, the driver starts the stream at the next epoch, and
training continues at the saved step with the saved learning rate.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mediar_ray.train.checkpoint import (checkpoint_dir_name, latest_checkpoint,
                                         load_training_state, save_training_state)

__all__ = ["TrainData", "prepare_data", "run_training", "split_config_pairs",
           "train_loop_per_worker", "train_step"]

log = logging.getLogger("mediar_ray.train")


@dataclass
class TrainData:
    """The pairs of a run: training, held-out, public (replay), and each training
    pair's modality cluster."""

    train: list
    held: list
    public: list
    clusters: np.ndarray


def split_config_pairs(cfg: Any) -> tuple[list, list]:
    """(training, held-out) pairs of the mappings/roots of ``cfg.data``.

    Raises ValueError when the config names no pairs.
    """
    from mediar_ray.data.mapping import load_pairs, split_holdout

    pairs = load_pairs(cfg.data.mappings, cfg.data.roots)
    if not pairs:
        raise ValueError("no training pairs: set data.roots or data.mappings in the config")
    return split_holdout(pairs, cfg.data.holdout_every)


def prepare_data(cfg: Any) -> TrainData:
    """Read the mappings/roots of ``cfg.data``, hold out pairs, attach clusters."""
    from mediar_ray.data.mapping import load_pairs

    train, held = split_config_pairs(cfg)
    public = (load_pairs(cfg.data.public_mappings, cfg.data.public_roots)
              if cfg.data.public_mappings or cfg.data.public_roots else [])
    clusters = np.zeros(len(train), np.int64)
    if cfg.data.modality_table:
        from mediar_ray.data.modalities import load_modality_table

        table = load_modality_table(cfg.data.modality_table)
        missing = [p.image for p in train if p.image not in table]
        if missing:
            raise ValueError(f"modality table {cfg.data.modality_table} has no cluster for "
                             f"{len(missing)} training images (e.g. {missing[0]}); "
                             "run `mediar-ray discover-modalities` on the same mappings")
        clusters = np.array([table[p.image] for p in train], np.int64)
    return TrainData(train, held, public, clusters)


def _storage(url: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train from a local path or fsspec URL.

    Remote URLs go through fsspec (wrapped for pyarrow), so the endpoint and credentials
    are the same as for every other read and write of mediar_ray.
    """
    if "://" not in url or url.startswith("file://"):
        return os.path.abspath(url.removeprefix("file://")), None
    import fsspec
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(url)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _with_local_paths_absolute(cfg: Any) -> dict[str, Any]:
    """``cfg`` as a dict with a local ``model.init`` made absolute: workers run in other
    folders (and on other machines, where only URLs and shared paths work)."""
    d = cfg.to_dict()
    init = d["model"]["init"]
    if init and "://" not in init:
        d["model"]["init"] = os.path.abspath(init)
    return d


def run_training(cfg: Any, max_epochs_this_run: int | None = None) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg``; returns a summary dict.

    ``max_epochs_this_run`` stops after that many epochs (a later run resumes).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from mediar_ray.pipeline.run import ensure_ray

    ensure_ray()
    data = prepare_data(cfg)
    run_url = f"{cfg.run.storage_path.rstrip('/')}/{cfg.name}"
    latest = latest_checkpoint(run_url)
    start = latest[1]["epoch"] + 1 if latest else 0
    if start >= cfg.optim.epochs:
        log.info("run %s finished already (epoch %d of %d)", cfg.name, start, cfg.optim.epochs)
        return {"name": cfg.name, "epochs_done": start, "resumed_from": start, "ran": 0}
    stop = cfg.optim.epochs if max_epochs_this_run is None else min(
        cfg.optim.epochs, start + max_epochs_this_run)
    world = cfg.run.num_workers
    from mediar_ray.train.stream import BatchMaker, plan_stream, throttle_idle_scheduling

    plan = plan_stream(cfg, data.clusters, len(data.public), world, start)
    plan.rows = [r for r in plan.rows if r["epoch"] < stop]
    log.info("run %s: epochs %d..%d of %d, %d training pairs (%d held out, %d public), "
             "%d steps per epoch per worker x %d workers", cfg.name, start, stop - 1,
             cfg.optim.epochs, len(data.train), len(data.held), len(data.public),
             plan.steps_per_epoch, world)
    throttle_idle_scheduling(ray.data.DataContext.get_current())
    ds = ray.data.from_items(plan.rows, override_num_blocks=max(1, min(len(plan.rows), 200)))
    ds = ds.map_batches(
        BatchMaker, fn_constructor_args=(data.train, data.public, cfg.augment),
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=cfg.run.loader_workers),
        num_cpus=cfg.run.loader_cpus)
    storage_path, storage_fs = _storage(cfg.run.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": _with_local_paths_absolute(cfg), "held": data.held,
                           "steps_per_epoch": plan.steps_per_epoch,
                           "stream_start": start, "stop_epoch": stop},
        scaling_config=ray.train.ScalingConfig(
            num_workers=world, use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker,
                                  **({"GPU": 1} if cfg.run.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints)),
        datasets={"train": ds},
    )
    began = time.time()
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    return {"name": cfg.name, "resumed_from": start, "epochs_done": stop,
            "ran": stop - start, "seconds": round(time.time() - began, 1),
            "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "metrics": metrics}


def _cosine(optimizer: Any, epochs: int, warmup: int) -> Any:
    """Linear warm-up for ``warmup`` epochs, then cosine decay to 0 at ``epochs``."""
    import torch

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        t = (epoch - warmup) / max(epochs - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _build(cfg: Any) -> Any:
    """The model of ``cfg.model``, from ``init`` weights when given."""
    import torch

    from mediar_ray.model import build_model, load_model

    params = {k: v for k, v in cfg.model.to_dict().items() if k != "init"}
    model = load_model(cfg.model.init, **params) if cfg.model.init else build_model(**params)
    # Channels-last weights make every convolution run in oneDNN's fast layout, whatever
    # the batch's layout (bench/forward_layout.py; the cpu_small run here: 4.9 samples/s
    # per worker against 4.2). Checkpoints are saved contiguous (model.save_model).
    return model.to(memory_format=torch.channels_last).train()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: restore, train over its shard of the stream, report."""
    import ray.train
    import torch
    from ray.train.torch import get_device, prepare_model

    from mediar_ray.train.config import TrainConfig

    cfg = TrainConfig.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(max(1, int(cfg.run.cpus_per_worker)))
    torch.manual_seed(cfg.seed + rank)
    model = _build(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = _cosine(optimizer, cfg.optim.epochs, cfg.optim.warmup_epochs)
    epoch, step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_training_state(folder, model, optimizer, scheduler)
        epoch, step = state["epoch"] + 1, state["step"]
    model = prepare_model(model)
    device = get_device()
    steps = config["steps_per_epoch"]
    skip = (epoch - config["stream_start"]) * steps  # rows already trained on
    remaining = (config["stop_epoch"] - epoch) * steps
    shard = ray.train.get_dataset_shard("train")
    losses, seen, began = [], [], time.perf_counter()
    done, warm = 0, {"samples": 0, "seconds": 0.0}  # throughput after this run's 1st epoch
    for batch in shard.iter_batches(batch_size=1, batch_format="numpy"):
        if skip > 0:
            skip -= 1
            continue
        if done >= remaining:
            break
        tensors = {k: torch.from_numpy(batch[k][0]).to(device) for k in ("image", "flows", "cell", "valid")}
        losses.append(train_step(model, optimizer, tensors, cfg.optim.flow_weight,
                                 cfg.optim.amp))
        seen += json_ids(batch["ids"][0])
        step, done = step + 1, done + 1
        if done % steps == 0:
            seconds = time.perf_counter() - began
            if done > steps:
                warm["samples"] += len(seen)
                warm["seconds"] += seconds
            _end_epoch(cfg, config, model, optimizer, scheduler, epoch, step, losses, seen,
                       seconds, rank, warm)
            epoch, losses, seen, began = epoch + 1, [], [], time.perf_counter()


def train_step(model: Any, optimizer: Any, batch: dict[str, Any], flow_weight: float = 0.5,
               amp: bool = False) -> float:
    """One optimiser step on one batch; returns the loss (float).

    ``batch`` holds torch tensors on the model's device: image (B, 3, S, S) float32,
    flows (B, 2, S, S) float32 unit vectors (the loss scales them by 5), cell and valid
    (B, S, S) float32 in {0, 1}, as :class:`mediar_ray.train.stream.BatchMaker` makes
    them. ``amp`` runs the forward pass under bfloat16 autocast; the loss is computed in
    float32 either way.
    """
    import torch

    from mediar_ray.train.loss import mediar_loss

    device = batch["image"].device.type
    # bfloat16 needs no loss scaling, and on CPUs with AVX512-BF16 or AMX it trains
    # faster than float32 (1.6x here, bench/train_throughput.py). Weights stay float32.
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
        out = model(batch["image"])
    loss = mediar_loss(out.float(), batch["flows"], batch["cell"], batch["valid"],
                       flow_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def json_ids(text: Any) -> list[str]:
    import json

    return json.loads(str(text))


def _end_epoch(cfg: Any, config: dict, model: Any, optimizer: Any, scheduler: Any,
               epoch: int, step: int, losses: list[float], seen: list[str],
               seconds: float, rank: int, warm: dict[str, float]) -> None:
    """Step the schedule, validate (rank 0), and report metrics and maybe a checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    lr = optimizer.param_groups[0]["lr"]
    scheduler.step()
    metrics: dict[str, Any] = {
        "epoch": epoch, "step": step, "loss": float(np.mean(losses)), "lr": lr,
        "samples_per_s": len(seen) / max(seconds, 1e-9),
        "samples_per_s_after_first": warm["samples"] / max(warm["seconds"], 1e-9)}
    last = epoch + 1 == config["stop_epoch"]
    every = cfg.run.validate_every
    if rank == 0 and every and ((epoch + 1) % every == 0 or last) and config["held"]:
        from mediar_ray.train.validate import validate

        metrics.update(validate(getattr(model, "module", model), config["held"],
                                cfg.run.validate_max_images, cfg.run.validate_roi))
    save = (epoch + 1) % cfg.run.checkpoint_every == 0 or last
    if not save:
        ray.train.report(metrics)
        return
    state = {**metrics, "next_lr": optimizer.param_groups[0]["lr"], "config": cfg.to_dict()}
    with tempfile.TemporaryDirectory() as folder:
        if rank == 0:
            save_training_state(folder, getattr(model, "module", model), optimizer,
                                scheduler, state)
        import json

        with open(os.path.join(folder, f"seen_rank{rank}.json"), "w") as f:
            json.dump(seen, f)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder),
                         checkpoint_dir_name=checkpoint_dir_name(epoch))
