"""The model actor: loads the models once and infers tiles of any slide for the whole job."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from mediar_ray.pipeline.layout import Tile
from mediar_ray.pipeline.stages import SlidePlan, infer_partial

__all__ = ["InferenceActor"]


class InferenceActor:
    """Holds the models (loaded once) and runs the windows each tile owns
    (:func:`mediar_ray.pipeline.stages.infer_partial`), for tiles of every slide.

    Each call returns when the tile's partial chunk and its done record are written,
    with the wall-clock interval it was busy, so the driver can measure how busy the pool
    is. Ray restarts a dead actor and retries its tile; a retried tile rewrites its whole
    chunk.
    """

    def __init__(self, weights: list[str], model_config: dict[str, Any], tta: bool,
                 device: str, threads: int, sw_batch_size: int = 4) -> None:
        import torch

        from mediar_ray.segment import load_models

        torch.set_num_threads(max(1, threads))  # one per requested CPU: cores are shared
        self.models = load_models(weights, model_config, device)
        self.tta, self.device, self.sw_batch_size = tta, device, sw_batch_size
        self.where = f"{socket.gethostname()}:{os.getpid()}"

    def node(self) -> str:
        """The Ray node this actor runs on (its id), once its models are loaded."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def infer(self, plan_json: str, tile_json: str) -> dict[str, Any]:
        """Infer one tile; returns {"slide", "tile", "start", "end", "node",
        "windows_run", "windows_skipped"}."""
        import ray

        start = time.time()
        plan = SlidePlan.from_json(plan_json)
        tile = Tile(**json.loads(tile_json))
        counts = infer_partial(plan, tile, self.models, self.tta, self.device,
                               self.sw_batch_size)
        return {"slide": plan.layout.stem, "tile": tile.name, "start": start,
                "end": time.time(), "node": ray.get_runtime_context().get_node_id(), **counts}
