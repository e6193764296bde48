"""Held-out validation during training: CellSeg F1 of whole images, per source."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from mediar_ray.data.mapping import BadPair, LabelError, read_labels
from mediar_ray.errors import UserError
from mediar_ray.io import InputError, read_image
from mediar_ray.metrics import cellseg_f1
from mediar_ray.segment import segment_image

__all__ = ["validate"]


def validate(
    models: torch.nn.Module | Sequence[torch.nn.Module],
    pairs: Sequence[Any],
    max_images: int = 0,
    roi_size: int | None = None,
    tta: bool = False,
    per_image: list | None = None,
    bad: list | None = None,
    *,
    precision: str = "auto",
    sw_batch_size: int | None = None,
) -> dict[str, float]:
    """Segment held-out images as ``mediar-ray segment`` would and score them.

    Parameters
    ----------
    models : MEDIARFormer or sequence of them (an ensemble)
        Put in eval mode for the duration, back in train mode after.
    pairs : sequence of Pair
        Held-out (image, label, source) pairs.
    max_images : int
        Score only the first ``max_images`` pairs (0 = all).
    roi_size : int, optional
        Sliding-window size; None: the models' own (:func:`mediar_ray.segment.models_window`).
    tta : bool
        Test-time augmentation (flips), as ``mediar-ray segment`` does by default.
    per_image : list, optional
        Gets one (image URL, source, F1, true cells, predicted cells) tuple per image.
    bad : list, optional
        Gets a :class:`mediar_ray.data.mapping.BadPair` for every pair that cannot be
        scored (unreadable image, label not of whole non-negative ids, sizes differ);
        the other pairs are still scored. Without it such a pair raises.
    precision, sw_batch_size
        Of the network forward, as :func:`mediar_ray.segment.segment_image`.

    Returns
    -------
    dict
        ``val_f1`` (mean over the scored images), ``val_f1_<source>`` (mean per source),
        ``val_images`` (scored), ``val_bad`` (pairs that could not be scored).
    """
    chosen = list(pairs)[: max_images or None]
    scores: dict[str, list[float]] = {}
    models = [models] if isinstance(models, torch.nn.Module) else list(models)
    device = next(models[0].parameters()).device
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        for pair in chosen:
            try:
                truth = read_labels(pair.label)
                image = read_image(pair.image)
                if image.shape[:2] != truth.shape:
                    raise InputError(
                        f"{pair.image} is {image.shape[0]}x{image.shape[1]} "
                        f"pixels but its label is {truth.shape[0]}x"
                        f"{truth.shape[1]}"
                    )
            except UserError as err:  # one bad pair must not lose the other scores
                if bad is None:
                    raise
                bad.append(
                    BadPair(pair.label if isinstance(err, LabelError) else pair.image, str(err))
                )
                continue
            labels = segment_image(
                image,
                models,
                tta=tta,
                roi_size=roi_size,
                device=device,
                precision=precision,
                sw_batch_size=sw_batch_size,
            ).labels
            score = cellseg_f1(truth, labels)
            scores.setdefault(pair.source, []).append(score.f1)
            if per_image is not None:
                per_image.append(
                    (pair.image, pair.source, score.f1, score.tp + score.fn, score.tp + score.fp)
                )
    finally:
        for m, training in zip(models, modes):
            m.train(training)
    every = [s for v in scores.values() for s in v]
    out = {
        "val_f1": float(np.mean(every)) if every else 0.0,
        "val_images": len(every),
        "val_bad": len(bad or []),
    }
    out.update({f"val_f1_{k}": float(np.mean(v)) for k, v in scores.items()})
    return out
