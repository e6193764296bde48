"""Training checkpoints: one folder per saved epoch.

A folder holds ``model.safetensors`` (weights with the model parameters inside, loadable by
:func:`mediar_ray.model.load_model` and ``mediar-ray segment --weights``),
``optimizer.pt`` (optimizer and LR-scheduler state dicts: plain tensors and numbers, read
back with ``torch.load(weights_only=True)``) and ``state.json`` (epoch, global step,
learning rate, metrics, the run's config), written last.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import fsspec
import torch

from mediar_ray.model import load_state_dict, model_params, save_model

__all__ = ["checkpoint_dir_name", "latest_checkpoint", "load_training_state",
           "save_training_state"]

_DIR = re.compile(r"checkpoint_epoch_(\d+)$")


def checkpoint_dir_name(epoch: int) -> str:
    """Folder name of the checkpoint saved after ``epoch`` (0-based)."""
    return f"checkpoint_epoch_{epoch:05d}"


def save_training_state(folder: str | Path, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, scheduler: Any,
                        state: dict[str, Any]) -> None:
    """Write model, optimizer/scheduler and ``state`` into ``folder`` (created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / "model.safetensors"), metadata={"training": state})
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               folder / "optimizer.pt")
    (folder / "state.json").write_text(json.dumps(state, indent=1, default=str))


def load_training_state(folder: str | Path, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer | None = None,
                        scheduler: Any = None) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote; returns the ``state`` dict.

    The model is loaded strictly (every key must fit), the optimizer state with
    ``weights_only=True``.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    load_state_dict(model, load_file(str(folder / "model.safetensors")), str(folder))
    if optimizer is not None or scheduler is not None:
        blob = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        if optimizer is not None:
            optimizer.load_state_dict(blob["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(blob["scheduler"])
    return json.loads((folder / "state.json").read_text())


def latest_checkpoint(run_url: str) -> tuple[str, dict[str, Any]] | None:
    """The newest complete checkpoint folder under ``run_url`` (``storage_path/name``)
    and its state, or None. A folder without ``state.json`` (a save cut short) is
    passed over."""
    fs, root = fsspec.core.url_to_fs(run_url)
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return None
    found = sorted((int(m.group(1)), p) for p in names
                   if (m := _DIR.search(p.rstrip("/"))))
    for _, path in reversed(found):
        try:
            with fs.open(f"{path}/state.json", "r") as f:
                return path, json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            continue
    return None


def describe(model: torch.nn.Module) -> dict[str, Any]:
    """Model parameters of a (possibly DDP-wrapped) MEDIARFormer."""
    return model_params(getattr(model, "module", model))
