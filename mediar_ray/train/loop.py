"""MEDIAR training on Ray Train: DDP workers fed by a Ray Dataset of augmented batches.

The driver (:func:`run_training`) reads the dataset mappings, splits off the held-out
pairs, draws the sample stream (:mod:`.stream`) and starts a
:class:`ray.train.torch.TorchTrainer`. Each worker (:func:`train_loop_per_worker`)
builds the model, restores the latest checkpoint of the run if there is one, and trains
with AdamW and a cosine schedule stepped per epoch; after each epoch it reports the
loss and learning rate, every ``validate_every`` epochs the held-out F1 (rank 0), and
every ``checkpoint_every`` epochs a checkpoint (:mod:`.checkpoint`) to the run's storage.

Resuming is running again with the same ``name`` and ``storage_path``: the driver finds the
newest *whole* checkpoint (:func:`.checkpoint.latest_checkpoint`), starts the stream at
the next epoch and hands that checkpoint's path to the workers, which restore exactly it
(:func:`choose_restore`: Ray's own checkpoint only after a worker failure within this
run, when it is newer), so driver and workers never disagree about where the run is;
training continues at the saved step with the saved learning rate. Before Ray Train starts
the run is checked (:mod:`.preflight`, and every pair by
:func:`mediar_ray.data.mapping.check_pairs`).
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

from mediar_ray.train.checkpoint import (
    checkpoint_dir_name,
    latest_checkpoint,
    load_training_state,
    save_training_state,
)

__all__ = [
    "TrainData",
    "prepare_data",
    "run_training",
    "split_config_pairs",
    "train_loop_per_worker",
    "train_step",
]

log = logging.getLogger("mediar_ray.train")


@dataclass
class TrainData:
    """The pairs of a run: training, held-out, public (replay), and each training
    pair's modality cluster."""

    train: list
    held: list
    public: list
    clusters: np.ndarray


def split_config_pairs(cfg: Any, bad: list | None = None) -> tuple[list, list]:
    """(training, held-out) pairs of the mappings/roots of ``cfg.data``.

    Every pair is checked (:func:`mediar_ray.data.mapping.check_pairs`: readable,
    decodable, labels of whole non-negative ids, the image's size); the bad ones, and
    the files of the roots that make no pair, are logged one line each and left out
    (``bad`` gets them as BadPair), or with ``data.strict`` the run is refused.

    Raises
    ------
    InputError
        The config names no usable pairs, or ``data.strict`` is set and some are bad.
    """
    from mediar_ray.data.mapping import check_pairs, load_pairs, split_holdout
    from mediar_ray.io import InputError, safe_url

    problems: list = []
    pairs = load_pairs(cfg.data.mappings, cfg.data.roots, problems)
    if not pairs and not problems:
        raise InputError("no training pairs: set data.roots or data.mappings in the config")
    pairs, broken = check_pairs(pairs)
    problems += broken
    for problem in problems:
        log.warning("left out: %s: %s", safe_url(problem.path), problem.reason)
    if bad is not None:
        bad += problems
    if problems and cfg.data.strict:
        first = problems[0]
        raise InputError(
            f"{len(problems)} file(s) of data.roots/data.mappings cannot be used "
            f"(e.g. {safe_url(first.path)}: {first.reason}); fix or remove "
            "them, or run without --strict to train on the good pairs"
        )
    if not pairs:
        raise InputError(
            f"none of the pairs of data.roots/data.mappings can be used "
            f"({len(problems)} bad, listed above)"
        )
    return split_holdout(pairs, cfg.data.holdout_every)


def prepare_data(cfg: Any) -> TrainData:
    """Read the mappings/roots of ``cfg.data``, hold out pairs, attach clusters."""
    from mediar_ray.data.mapping import load_pairs

    train, held = split_config_pairs(cfg)
    public = (
        load_pairs(cfg.data.public_mappings, cfg.data.public_roots)
        if cfg.data.public_mappings or cfg.data.public_roots
        else []
    )
    clusters = np.zeros(len(train), np.int64)
    if cfg.data.modality_table:
        from mediar_ray.data.modalities import load_modality_table

        table = load_modality_table(cfg.data.modality_table)
        missing = [p.image for p in train if p.image not in table]
        if missing:
            raise ValueError(
                f"modality table {cfg.data.modality_table} has no cluster for "
                f"{len(missing)} training images (e.g. {missing[0]}), which "
                "are readable pairs: the table was made from other data; run "
                "`mediar-ray discover-modalities` on the config's mappings/roots"
            )
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


def run_training(
    cfg: Any, max_epochs_this_run: int | None = None, *, overwrite: bool = False
) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg``; returns a summary dict.

    ``max_epochs_this_run`` stops after that many epochs (a later run resumes).
    ``overwrite`` deletes a run of the same name made with another config or other data
    (without it such a run is refused). Everything that can be checked before Ray Train
    starts is (:mod:`.preflight`, the pairs), and raises a UserError.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from mediar_ray.pipeline.run import ensure_ray
    from mediar_ray.train.preflight import (
        check_resources,
        check_run_name,
        check_storage,
        pairs_fingerprint,
        resolve_model_init,
    )

    cfg = resolve_model_init(cfg)
    check_storage(cfg.run.storage_path)
    data = prepare_data(cfg)
    run_url = f"{cfg.run.storage_path.rstrip('/')}/{cfg.name}"
    fingerprint = pairs_fingerprint(data.train)
    check_run_name(run_url, cfg, fingerprint, overwrite=overwrite)
    latest = latest_checkpoint(run_url)
    start = latest[1]["epoch"] + 1 if latest else 0
    if start >= cfg.optim.epochs:
        log.info("run %s finished already (epoch %d of %d)", cfg.name, start, cfg.optim.epochs)
        return {"name": cfg.name, "epochs_done": start, "resumed_from": start, "ran": 0}
    stop = (
        cfg.optim.epochs
        if max_epochs_this_run is None
        else min(cfg.optim.epochs, start + max_epochs_this_run)
    )
    if not os.environ.get("RAY_ADDRESS"):
        check_resources(cfg.run)  # this machine, before Ray starts
    ensure_ray()
    check_resources(cfg.run)
    world = cfg.run.num_workers
    from mediar_ray.train.stream import BatchMaker, plan_stream, throttle_idle_scheduling

    plan = plan_stream(cfg, data.clusters, len(data.public), world, start)
    plan.rows = [r for r in plan.rows if r["epoch"] < stop]
    log.info(
        "run %s: epochs %d..%d of %d, %d training pairs (%d held out, %d public), "
        "%d steps per epoch per worker x %d workers",
        cfg.name,
        start,
        stop - 1,
        cfg.optim.epochs,
        len(data.train),
        len(data.held),
        len(data.public),
        plan.steps_per_epoch,
        world,
    )
    throttle_idle_scheduling(ray.data.DataContext.get_current())
    ds = ray.data.from_items(plan.rows, override_num_blocks=max(1, min(len(plan.rows), 200)))
    ds = ds.map_batches(
        BatchMaker,
        fn_constructor_args=(data.train, data.public, cfg.augment),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=cfg.run.loader_workers),
        num_cpus=cfg.run.loader_cpus,
    )
    storage_path, storage_fs = _storage(cfg.run.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": _with_local_paths_absolute(cfg),
            "held": data.held,
            "steps_per_epoch": plan.steps_per_epoch,
            "stream_start": start,
            "stop_epoch": stop,
            "resume_from": latest[0] if latest else None,
            "pairs": fingerprint,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=world,
            use_gpu=cfg.run.use_gpu,
            resources_per_worker={
                "CPU": cfg.run.cpus_per_worker,
                **({"GPU": 1} if cfg.run.use_gpu else {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
        ),
        datasets={"train": ds},
    )
    began = time.time()
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    return {
        "name": cfg.name,
        "resumed_from": start,
        "epochs_done": stop,
        "ran": stop - start,
        "seconds": round(time.time() - began, 1),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "metrics": metrics,
    }


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


def choose_restore(
    *, driver_epoch: int | None, ray_epoch: int | None, stream_start: int
) -> str | None:
    """Which checkpoint a worker restores: "driver", "ray" or None (start afresh).

    The driver planned the stream from ``stream_start`` = the epoch after the checkpoint
    it found whole (``driver_epoch``, None: none). Ray Train hands the workers its own
    latest checkpoint (``ray_epoch``): at the start of a run that is the newest one Ray
    registered, which may be older than the driver's (Ray registers a checkpoint after
    its copy, the driver also takes one whose copy ended but was not registered) and
    must not be used; after a worker failure within this run it is one reported in
    this run (epoch >= ``stream_start``), newer than the driver's, and is the one to use.
    """
    if ray_epoch is not None and ray_epoch >= stream_start:
        return "ray"
    return "driver" if driver_epoch is not None else None


def _restore_from_url(url: str, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """:func:`load_training_state` of a checkpoint folder at a local path or URL."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if "file" in fs.protocol or fs.protocol == "local":
        return load_training_state(path, model, optimizer, scheduler)
    with tempfile.TemporaryDirectory() as folder:
        fs.get(path.rstrip("/") + "/", folder, recursive=True)
        return load_training_state(folder, model, optimizer, scheduler)


def build_training(
    cfg: Any,
    device: Any,
    *,
    resume_from: str | None = None,
    ray_checkpoint: Any = None,
    stream_start: int = 0,
) -> tuple[Any, Any, Any, int, int]:
    """Model, AdamW, cosine schedule and the (epoch, step) to start at, on ``device``.

    The model is moved to ``device`` before the optimizer is made and its state loaded:
    ``Optimizer.load_state_dict`` puts each state tensor on its parameter's device, so a
    model moved afterwards would leave the AdamW moments on the CPU and the first GPU
    step would fail. The checkpoint restored is chosen by :func:`choose_restore` from the
    driver's ``resume_from`` (a whole checkpoint folder, path or URL) and Ray's
    ``ray_checkpoint``.

    Raises
    ------
    RuntimeError
        The restored checkpoint's epoch is not the one the stream starts at (the
        driver and the workers disagree about where the run is: never train on).
    """
    import torch

    from mediar_ray.train.checkpoint import checkpoint_epoch

    model = _build(cfg).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    scheduler = _cosine(optimizer, cfg.optim.epochs, cfg.optim.warmup_epochs)
    ray_path = getattr(ray_checkpoint, "path", None) if ray_checkpoint else None
    which = choose_restore(
        driver_epoch=checkpoint_epoch(resume_from) if resume_from else None,
        ray_epoch=checkpoint_epoch(ray_path) if ray_path else None,
        stream_start=stream_start,
    )
    if which is None:
        epoch, step = 0, 0
    elif which == "ray":
        with ray_checkpoint.as_directory() as folder:
            state = load_training_state(folder, model, optimizer, scheduler)
        epoch, step = state["epoch"] + 1, state["step"]
    else:
        state = _restore_from_url(resume_from, model, optimizer, scheduler)
        epoch, step = state["epoch"] + 1, state["step"]
    if epoch < stream_start:
        raise RuntimeError(
            f"the restored checkpoint ends at epoch {epoch - 1} but the "
            f"driver planned the stream from epoch {stream_start}"
        )
    return model, optimizer, scheduler, epoch, step


def _mean_over_workers(value: float, device: Any) -> tuple[float, list[float]]:
    """(mean of ``value`` over the workers, each worker's value, by rank)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value, [value]
    mine = torch.tensor([value], dtype=torch.float64, device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    values = [float(t.item()) for t in every]
    return float(np.mean(values)), values


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
    device = get_device()
    model, optimizer, scheduler, epoch, step = build_training(
        cfg,
        device,
        resume_from=config.get("resume_from"),
        ray_checkpoint=ray.train.get_checkpoint(),
        stream_start=config["stream_start"],
    )
    model = prepare_model(model, move_to_device=False)
    steps = config["steps_per_epoch"]
    skip = (epoch - config["stream_start"]) * steps  # rows already trained on
    remaining = (config["stop_epoch"] - epoch) * steps
    shard = ray.train.get_dataset_shard("train")
    losses, seen, began = [], [], time.perf_counter()
    done, warm = 0, {"samples": 0, "seconds": 0.0}  # throughput after this run's 1st epoch
    cuda = getattr(device, "type", str(device)) == "cuda"
    # Ray Data prepares the next batches while this one trains; copies to a GPU are
    # asynchronous from pinned memory, and the loss stays on the device until the epoch
    # ends, so a step does not wait for the GPU (iter_torch_batches cannot carry the
    # string column of sample ids).
    for batch in shard.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=2):
        if skip > 0:
            skip -= 1
            continue
        if done >= remaining:
            break
        tensors = {
            k: _to_device(batch[k][0], device, cuda) for k in ("image", "flows", "cell", "valid")
        }
        losses.append(
            train_step(
                model, optimizer, tensors, cfg.optim.flow_weight, cfg.optim.amp, as_tensor=True
            )
        )
        seen += json_ids(batch["ids"][0])
        step, done = step + 1, done + 1
        if done % steps == 0:
            seconds = time.perf_counter() - began
            if done > steps:
                warm["samples"] += len(seen)
                warm["seconds"] += seconds
            mean_loss = float(torch.stack(losses).mean())
            _end_epoch(
                cfg,
                config,
                model,
                optimizer,
                scheduler,
                epoch,
                step,
                mean_loss,
                seen,
                seconds,
                rank,
                warm,
                device,
            )
            epoch, losses, seen, began = epoch + 1, [], [], time.perf_counter()


def _to_device(array: np.ndarray, device: Any, cuda: bool) -> Any:
    import torch

    tensor = torch.from_numpy(array)
    return tensor.pin_memory().to(device, non_blocking=True) if cuda else tensor.to(device)


def train_step(
    model: Any,
    optimizer: Any,
    batch: dict[str, Any],
    flow_weight: float = 0.5,
    amp: bool = False,
    *,
    as_tensor: bool = False,
) -> Any:
    """One optimiser step on one batch; returns the loss (float, or with ``as_tensor`` a
    detached 0-d tensor on the model's device, which does not wait for the device).

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
    loss = mediar_loss(out.float(), batch["flows"], batch["cell"], batch["valid"], flow_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach() if as_tensor else float(loss.detach())


def json_ids(text: Any) -> list[str]:
    import json

    return json.loads(str(text))


def _end_epoch(
    cfg: Any,
    config: dict,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    epoch: int,
    step: int,
    loss: float,
    seen: list[str],
    seconds: float,
    rank: int,
    warm: dict[str, float],
    device: Any,
) -> None:
    """Step the schedule, validate (rank 0), and report metrics and maybe a checkpoint.

    ``loss`` is this worker's mean loss of the epoch; the loss reported is the mean over
    the workers (each worker's is kept as ``loss_ranks``).
    """
    import ray.train
    from ray.train import Checkpoint

    lr = optimizer.param_groups[0]["lr"]
    scheduler.step()
    mean_loss, per_rank = _mean_over_workers(loss, device)
    metrics: dict[str, Any] = {
        "epoch": epoch,
        "step": step,
        "loss": mean_loss,
        "loss_ranks": per_rank,
        "lr": lr,
        "samples_per_s": len(seen) / max(seconds, 1e-9),
        "samples_per_s_after_first": warm["samples"] / max(warm["seconds"], 1e-9),
    }
    last = epoch + 1 == config["stop_epoch"]
    every = cfg.run.validate_every
    if rank == 0 and every and ((epoch + 1) % every == 0 or last) and config["held"]:
        from mediar_ray.train.validate import validate

        bad: list = []
        metrics.update(
            validate(
                getattr(model, "module", model),
                config["held"],
                cfg.run.validate_max_images,
                cfg.run.validate_roi,
                bad=bad,
            )
        )
        for pair in bad:
            log.warning("validation left out %s: %s", pair.path, pair.reason)
    save = (epoch + 1) % cfg.run.checkpoint_every == 0 or last
    if not save:
        ray.train.report(metrics)
        return
    state = {
        **metrics,
        "next_lr": optimizer.param_groups[0]["lr"],
        "config": cfg.to_dict(),
        "pairs": config.get("pairs"),
    }
    with tempfile.TemporaryDirectory() as folder:
        if rank == 0:
            save_training_state(
                folder, getattr(model, "module", model), optimizer, scheduler, state
            )
        import json

        with open(os.path.join(folder, f"seen_rank{rank}.json"), "w") as f:
            json.dump(seen, f)
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(folder),
            checkpoint_dir_name=checkpoint_dir_name(epoch),
        )
