"""Training checkpoints: one folder per saved epoch.

A folder holds ``model.safetensors`` (weights with the model parameters inside, loadable by
:func:`mediar_ray.model.load_model` and ``mediar-ray segment --weights``),
``optimizer.pt`` (optimizer and LR-scheduler state dicts: plain tensors and numbers, read
back with ``torch.load(weights_only=True)``) and ``state.json`` (epoch, global step,
learning rate, metrics, the run's config, and the size in bytes of every other file),
written last.

A checkpoint counts only when it is whole: Ray Train copies the folder into storage file
by file, so a run killed during the copy can leave ``state.json`` beside a model file cut
short. :func:`latest_checkpoint` checks every file against the sizes in ``state.json``
and parses the safetensors header before it calls a folder a checkpoint.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import fsspec
import torch

from mediar_ray.model import load_state_dict, model_params, save_model

__all__ = [
    "checkpoint_dir_name",
    "checkpoint_epoch",
    "latest_checkpoint",
    "load_training_state",
    "save_training_state",
    "whole_checkpoint",
]

_DIR = re.compile(r"checkpoint_epoch_(\d+)$")
#: The files of a checkpoint whose sizes ``state.json`` records.
_FILES = ("model.safetensors", "optimizer.pt")


def checkpoint_dir_name(epoch: int) -> str:
    """Folder name of the checkpoint saved after ``epoch`` (0-based)."""
    return f"checkpoint_epoch_{epoch:05d}"


def save_training_state(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
) -> None:
    """Write model, optimizer/scheduler and ``state`` into ``folder`` (created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / "model.safetensors"), metadata={"training": state})
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        folder / "optimizer.pt",
    )
    sizes = {name: (folder / name).stat().st_size for name in _FILES}
    (folder / "state.json").write_text(json.dumps({**state, "files": sizes}, indent=1, default=str))


def load_training_state(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> dict[str, Any]:
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


def checkpoint_epoch(path: str) -> int | None:
    """The epoch in a checkpoint folder's name (``.../checkpoint_epoch_00003`` -> 3)."""
    m = _DIR.search(str(path).rstrip("/"))
    return int(m.group(1)) if m else None


def whole_checkpoint(fs: Any, path: str) -> dict[str, Any] | None:
    """The state of the checkpoint folder ``path`` of ``fs`` when it is whole, else None.

    Whole: ``state.json`` parses, every file it lists has the recorded size, and the
    safetensors header of the model parses (a folder cut short while it was copied
    fails one of these). Folders written before sizes were recorded are taken when
    their model header parses.
    """
    try:
        with fs.open(f"{path}/state.json", "r") as f:
            state = json.load(f)
        sizes = state.get("files") or {name: None for name in _FILES}
        for name, size in sizes.items():
            if size is not None and fs.size(f"{path}/{name}") != size:
                return None
        with fs.open(f"{path}/model.safetensors", "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return None
    return state


def latest_checkpoint(run_url: str) -> tuple[str, dict[str, Any]] | None:
    """The newest whole checkpoint folder under ``run_url`` (``storage_path/name``) and
    its state, or None. Folders that are not whole (:func:`whole_checkpoint`: a save cut
    short) are passed over."""
    fs, root = fsspec.core.url_to_fs(run_url)
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return None
    found = sorted((epoch, p) for p in names if (epoch := checkpoint_epoch(p)) is not None)
    for _, path in reversed(found):
        state = whole_checkpoint(fs, path)
        if state is not None:
            return fs.unstrip_protocol(path) if "://" in run_url else path, state
    return None


def describe(model: torch.nn.Module) -> dict[str, Any]:
    """Model parameters of a (possibly DDP-wrapped) MEDIARFormer."""
    return model_params(getattr(model, "module", model))
