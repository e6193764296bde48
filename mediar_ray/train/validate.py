"""Held-out validation during training: CellSeg F1 of whole images, per source."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from mediar_ray.io import read_image
from mediar_ray.metrics import cellseg_f1
from mediar_ray.segment import segment_image

__all__ = ["validate"]


def validate(model: torch.nn.Module, pairs: Sequence[Any], max_images: int = 0,
             roi_size: int = 512) -> dict[str, float]:
    """Segment held-out images as ``mediar-ray segment --no-tta`` would and score them.

    Parameters
    ----------
    model : MEDIARFormer
        Put in eval mode for the duration, back in train mode after.
    pairs : sequence of Pair
        Held-out (image, label, source) pairs.
    max_images : int
        Score only the first ``max_images`` pairs (0 = all).
    roi_size : int
        Sliding-window size.

    Returns
    -------
    dict
        ``val_f1`` (mean over images), ``val_f1_<source>`` (mean per source),
        ``val_images``.
    """
    chosen = list(pairs)[: max_images or None]
    scores: dict[str, list[float]] = {}
    device = next(model.parameters()).device
    model.eval()
    try:
        for pair in chosen:
            labels = segment_image(read_image(pair.image), [model], tta=False,
                                   roi_size=roi_size, device=device).labels
            truth = read_image(pair.label)
            scores.setdefault(pair.source, []).append(cellseg_f1(truth, labels).f1)
    finally:
        model.train()
    every = [s for v in scores.values() for s in v]
    out = {"val_f1": float(np.mean(every)) if every else 0.0, "val_images": len(every)}
    out.update({f"val_f1_{k}": float(np.mean(v)) for k, v in scores.items()})
    return out
