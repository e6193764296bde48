"""The model actor: loads the models once and infers tiles of any slide for the whole job."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any, Callable, TypeVar

from mediar_ray.pipeline.layout import Tile
from mediar_ray.pipeline.stages import SlidePlan, infer_partial

__all__ = ["InferenceActor", "is_device_fault", "run_with_smaller_batches"]

log = logging.getLogger("mediar_ray.actors")

T = TypeVar("T")

#: Words of the errors that leave a CUDA context unusable (sticky errors): every later
#: kernel launch in this process fails too, so the process must go.
_FAULTS = (
    "cuda error",
    "cublas_status",
    "cudnn_status",
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "ecc error",
    "nccl",
)


def is_device_fault(err: BaseException) -> bool:
    """True for an accelerator error other than out-of-memory: the device context is
    poisoned (illegal address, device assert, ECC, launch failure) and stays so."""
    import torch

    from mediar_ray.precision import is_oom

    if is_oom(err):
        return False
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(err, accel):
        return True
    return isinstance(err, RuntimeError) and any(w in str(err).lower() for w in _FAULTS)


def _die(err: BaseException) -> None:  # pragma: no cover - ends the process
    """End this actor's process at once: Ray restarts the actor (``max_restarts``) and
    retries its tile (``max_task_retries``), on a fresh CUDA context."""
    log.error(
        "model actor %s: device fault, exiting so Ray replaces it: %s",
        f"{socket.gethostname()}:{os.getpid()}",
        err,
    )
    logging.shutdown()
    os._exit(1)


def run_with_smaller_batches(
    step: Callable[[int], T], batch_size: int, *, die: Callable[[BaseException], None] = _die
) -> tuple[T, int]:
    """``step(batch_size)``, retried with half the batch after a device out-of-memory
    error (cache freed first), down to batch 1; a device fault calls ``die``.

    Parameters
    ----------
    step : callable
        ``step(windows per forward) -> result``; must be safe to rerun (a tile's step
        rewrites its whole chunk).
    batch_size : int
        Windows per forward to start with (>= 1).
    die : callable
        Called with a device fault (:func:`is_device_fault`); the default ends the
        process so that Ray restarts the actor. Other errors propagate unchanged.

    Returns
    -------
    (result, batch size that worked)
    """
    from mediar_ray.precision import free_device_cache, is_oom

    batch = max(1, int(batch_size))
    while True:
        try:
            return step(batch), batch
        except RuntimeError as err:
            if is_device_fault(err):
                die(err)
                raise
            if not is_oom(err) or batch == 1:
                raise
            log.warning(
                "device out of memory at %d windows per forward; retrying with %d",
                batch,
                batch // 2,
            )
        batch //= 2
        free_device_cache()  # outside the handler: the traceback no longer holds tensors


class InferenceActor:
    """Holds the models (loaded once) and runs the windows each tile owns
    (:func:`mediar_ray.pipeline.stages.infer_partial`), for tiles of every slide.

    Each call returns when the tile's partial chunk and its done record are written,
    with the wall-clock interval it was busy, so the driver can measure how busy the pool
    is. Ray restarts a dead actor and retries its tile; a retried tile rewrites its whole
    chunk. A device out-of-memory error retries the tile with half the batch (kept for
    later tiles); any other CUDA error ends the process, so Ray replaces the actor
    instead of leaving a poisoned CUDA context serving every later slide.
    """

    def __init__(
        self,
        weights: list[str],
        model_config: dict[str, Any],
        tta: bool,
        device: str,
        threads: int,
        *,
        precision: str = "auto",
        batch_size: int = 0,
    ) -> None:
        import torch

        from mediar_ray.precision import default_batch_size, resolve_precision
        from mediar_ray.segment import load_models

        torch.set_num_threads(max(1, threads))  # one per requested CPU: cores are shared
        self.models = load_models(weights, model_config, device)
        self.tta, self.device = tta, device
        self.precision = resolve_precision(precision, device)
        self.batch_size = batch_size or default_batch_size(device)
        self.where = f"{socket.gethostname()}:{os.getpid()}"

    def node(self) -> str:
        """The Ray node this actor runs on (its id), once its models are loaded."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def infer(self, plan_json: str, tile_json: str) -> dict[str, Any]:
        """Infer one tile; returns {"slide", "tile", "start", "end", "node",
        "windows_run", "windows_skipped", "batch_size"}."""
        import ray

        start = time.time()
        plan = SlidePlan.from_json(plan_json)
        tile = Tile(**json.loads(tile_json))
        counts, self.batch_size = run_with_smaller_batches(
            lambda batch: infer_partial(
                plan, tile, self.models, self.tta, self.device, batch, precision=self.precision
            ),
            self.batch_size,
        )
        return {
            "slide": plan.layout.stem,
            "tile": tile.name,
            "start": start,
            "end": time.time(),
            "node": ray.get_runtime_context().get_node_id(),
            "batch_size": self.batch_size,
            **counts,
        }
