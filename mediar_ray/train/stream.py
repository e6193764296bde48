"""The training sample stream: which samples each step sees, and the Ray Data step that
turns those choices into augmented batches.

Ray Data has no weighted sampler, so the driver draws every epoch's sample list itself
(amplified sampling over modality clusters, cell memory replay) and cuts it into batches;
each batch is one row of a Ray Dataset. Ray Train splits the rows evenly across workers
(``streaming_split(equal=True)``), so every worker runs the same number of steps and two
workers never see the same batch. A callable class run by Ray Data reads the images
(cached per actor), applies MEDIAR's augmentations and computes the targets.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from mediar_ray.data.mapping import Pair
from mediar_ray.data.sampling import amplified_epoch, with_replay

__all__ = ["StreamPlan", "plan_stream", "BatchMaker", "throttle_idle_scheduling"]


@dataclass
class StreamPlan:
    """Rows of the training dataset and how they map to steps.

    ``rows[i]`` = {"epoch", "batch", "items" (JSON list of [kind, index]), "seed"}.
    Each worker runs ``steps_per_epoch`` steps per epoch.
    """

    rows: list[dict[str, Any]]
    batches_per_epoch: int
    steps_per_epoch: int
    start_epoch: int


def epoch_batches(
    epoch: int,
    seed: int,
    clusters: np.ndarray | None,
    n_public: int,
    batch_size: int,
    replay_per_batch: int,
    min_per_cluster: int,
    amplified: bool,
    cluster_min: dict[int, int] | None = None,
) -> list[list[tuple[str, int]]]:
    """The batches of one epoch, each a list of ("main" | "public", index).

    Deterministic in (seed, epoch): a rerun, or a resumed run, draws the same samples.
    """
    rng = np.random.default_rng([seed, epoch])
    n = len(clusters) if clusters is not None else 0
    if amplified and clusters is not None:
        main = amplified_epoch(clusters, rng, min_per_cluster, cluster_min)
    else:
        main = rng.permutation(n)
    order = with_replay(main, n_public, replay_per_batch if n_public else 0, batch_size, rng)
    full = len(order) // batch_size
    return [list(order[b * batch_size : (b + 1) * batch_size]) for b in range(full)]


def plan_stream(
    cfg: Any, clusters: np.ndarray, n_public: int, world_size: int, start_epoch: int = 0
) -> StreamPlan:
    """All rows from ``start_epoch`` to the last epoch of ``cfg`` (a TrainConfig).

    ``clusters`` (N,) int: the modality cluster of each training pair (all 0 when no
    modality table is given). Batches per epoch are cut to a multiple of the world size
    (and to ``run.max_steps_per_epoch`` steps per worker when set).
    """
    unknown = sorted(set(cfg.sampling.cluster_min) - set(np.unique(clusters).tolist()))
    if unknown:
        raise ValueError(
            f"sampling.cluster_min names cluster(s) {unknown} that no training pair is in "
            f"(modality table {cfg.data.modality_table}); use ids of that table's clusters"
        )
    rows = []
    per_epoch = None
    for epoch in range(start_epoch, cfg.optim.epochs):
        batches = epoch_batches(
            epoch,
            cfg.seed,
            clusters,
            n_public,
            cfg.optim.batch_size,
            cfg.data.replay_per_batch,
            cfg.sampling.min_per_cluster,
            cfg.sampling.amplified,
            cfg.sampling.cluster_min,
        )
        keep = len(batches) - len(batches) % world_size
        if cfg.run.max_steps_per_epoch:
            keep = min(keep, cfg.run.max_steps_per_epoch * world_size)
        per_epoch = keep if per_epoch is None else min(per_epoch, keep)
        for b, items in enumerate(batches[:keep]):
            rows.append(
                {
                    "epoch": epoch,
                    "batch": b,
                    "items": json.dumps([[k, int(i)] for k, i in items]),
                    "seed": int(np.random.default_rng([cfg.seed, epoch, b]).integers(2**31)),
                }
            )
    if per_epoch == 0:
        raise ValueError(
            f"an epoch has fewer samples than one batch of {cfg.optim.batch_size} per "
            f"worker x {world_size} workers: lower optim.batch_size or add data"
        )
    per_epoch = per_epoch or 0
    return StreamPlan(rows, per_epoch, per_epoch // world_size, start_epoch)


try:  # Ray Data's execution callbacks live in an internal module: use them if present
    from ray.data._internal.execution.execution_callback import ExecutionCallback
except ImportError:  # pragma: no cover - another Ray version
    ExecutionCallback = object


class IdleThrottle(ExecutionCallback):
    """Ray Data execution callback: pause the scheduling loop a little on every step.

    The loop blocks in ``ray.wait`` only while it has outputs to collect. When the loader
    is ahead of the trainers every operator is backpressured and the loop spins: on a
    2-core machine the ``SplitCoordinator`` then took a third of a core from training
    with nothing in flight, and 80% of one with the loader actor's tasks in flight but
    backpressured (py-spy, Ray 2.60). A training batch takes about a second here, so a
    pause of 10 ms per step (20 ms when nothing runs) costs the trainers nothing.
    """

    seconds = 0.02
    busy_seconds = 0.01

    def on_execution_step(self, executor: Any) -> None:
        ops = getattr(executor, "_topology", None) or {}
        idle = not any(op.num_active_tasks() for op in ops)
        time.sleep(self.seconds if idle else self.busy_seconds)


def throttle_idle_scheduling(context: Any) -> bool:
    """Register :class:`IdleThrottle` on ``context`` (a ``ray.data.DataContext``).

    Returns False, changing nothing, where this Ray has no execution callbacks.
    """
    classes = getattr(context, "custom_execution_callback_classes", None)
    if ExecutionCallback is object or classes is None:
        return False
    if IdleThrottle not in classes:
        classes.append(IdleThrottle)
    return True


class BatchMaker:
    """Ray Data callable class: one stream row -> one augmented training batch.

    Keeps decoded images in a small LRU cache (``cache_mb``) because amplified sampling
    reads the images of minor modalities many times per epoch.
    """

    def __init__(
        self, train: Sequence[Pair], public: Sequence[Pair], augment: Any, cache_mb: int = 1024
    ) -> None:
        import numba

        # One numba thread: the actor has a fraction of a core, and idle numba workers
        # spinning after labels_to_flows slowed the torch/numpy work after it 2x here.
        numba.set_num_threads(1)
        self.pairs = {"main": list(train), "public": list(public)}
        self.augment = augment
        self.cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.cache_bytes, self.cache_limit = 0, cache_mb << 20

    def _load(self, pair: Pair) -> tuple[np.ndarray, np.ndarray]:
        """(normalised image (3, H, W) float32, labels (H, W)) of ``pair``, cached."""
        from mediar_ray.data.mapping import read_labels
        from mediar_ray.io import read_image
        from mediar_ray.preprocess import normalize

        if pair.image in self.cache:
            self.cache.move_to_end(pair.image)
            return self.cache[pair.image]
        item = (normalize(read_image(pair.image)), read_labels(pair.label))
        if item[0].shape[1:] != item[1].shape:
            raise ValueError(
                f"{pair.image} {item[0].shape[1:]} and its labels {pair.label} "
                f"{item[1].shape} differ in size"
            )
        self.cache[pair.image] = item
        self.cache_bytes += item[0].nbytes + item[1].nbytes
        while self.cache_bytes > self.cache_limit and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.cache_bytes -= old[0].nbytes + old[1].nbytes
        return item

    def make(self, items: list[list], seed: int) -> dict[str, np.ndarray]:
        """One batch: image (B, 3, S, S), flows (B, 2, S, S), cell/valid (B, S, S)."""
        from mediar_ray.data.transforms import augment_sample

        rng = np.random.default_rng(seed)
        samples, ids = [], []
        for kind, index in items:
            pair = self.pairs[kind][index]
            image, labels = self._load(pair)
            samples.append(
                augment_sample(image, labels, rng, self.augment, public=(kind == "public"))
            )
            ids.append(f"{kind}:{index}")
        out = {k: np.stack([s[k] for s in samples]) for k in ("image", "flows", "cell", "valid")}
        out["ids"] = np.array(json.dumps(ids))
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        made = [
            self.make(json.loads(str(items)), int(seed))
            for items, seed in zip(batch["items"], batch["seed"])
        ]
        out = {k: np.stack([m[k] for m in made]) for k in ("image", "flows", "cell", "valid")}
        out["ids"] = np.array([str(m["ids"]) for m in made])
        out["epoch"] = np.asarray(batch["epoch"])
        return out
