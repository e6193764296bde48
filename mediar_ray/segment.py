"""The single-image path: image -> normalised -> network output -> labels.

This is what ``mediar-ray segment`` runs on each file, and the reference that the slide
pipeline must reproduce tile by tile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from mediar_ray.inference import models_window, predict_raw, resolve_device
from mediar_ray.model import MEDIARFormer, load_model
from mediar_ray.preprocess import normalize
from mediar_ray.weights import parse_model_config, resolve_weights

__all__ = [
    "SegmentResult",
    "check_device",
    "load_models",
    "models_window",
    "parse_model_config",
    "resolve_weights",
    "segment_image",
]


@dataclass
class SegmentResult:
    """labels: (H, W) uint32, 0 = background; raw: (3, H, W) float32 (dy, dx, logit)."""

    labels: np.ndarray | None
    raw: np.ndarray


def check_device(device: str | torch.device | None) -> torch.device:
    """The torch device for ``device`` ("auto"/None, "cpu", "cuda", "cuda:N", "mps"),
    checked to exist on this machine.

    Raises
    ------
    ValueError
        One line naming the device and the fix: an unknown name, or a device this
        machine does not have (no CUDA GPU, GPU index out of range, no Apple GPU).
    """
    name = "auto" if device is None else str(device)
    if name == "auto":
        return resolve_device(None)
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"--device {name}: not a device name; use cpu, cuda, cuda:N, mps or auto"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"--device {name}: this machine has no usable CUDA GPU (torch "
                f"{torch.__version__}, built for CUDA {torch.version.cuda}); "
                "use --device cpu, or --device auto to take a GPU when there "
                "is one"
            )
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"--device {name}: this machine has {count} GPU(s), numbered "
                f"0 to {count - 1}; use --device cuda:0 .. cuda:{count - 1}"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {name}: no Apple GPU (MPS) here; use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(
            f"--device {name}: unsupported device type {dev.type!r}; use cpu, "
            "cuda, cuda:N, mps or auto"
        )
    return dev


def load_models(
    weights: Sequence[str] | None,
    model_config: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> list[MEDIARFormer]:
    """Load each checkpoint of :func:`resolve_weights` (``weights`` or the bundled model)."""
    dev = resolve_device(device)
    return [load_model(p, device=dev, **(model_config or {})) for p in resolve_weights(weights)]


def segment_image(
    image: np.ndarray,
    models: Sequence[torch.nn.Module],
    tta: bool = True,
    device: str | torch.device | None = None,
    sw_batch_size: int | None = None,
    roi_size: int | None = None,
    postprocess: bool = True,
    *,
    precision: str = "auto",
    **flow_params: Any,
) -> SegmentResult:
    """Segment one whole image.

    Parameters
    ----------
    image : ndarray, (H, W) or (H, W, C)
        As returned by :func:`mediar_ray.io.read_image`.
    models : sequence of MEDIARFormer
        Ensemble; outputs are averaged.
    tta, device, sw_batch_size
        See :func:`mediar_ray.inference.predict_raw` (``sw_batch_size`` None or 0: the
        device's default, 4 windows on a CPU, 32 on a CUDA GPU).
    roi_size : int, optional
        Sliding-window size (px); None: the one the models were trained for
        (:func:`mediar_ray.inference.models_window`).
    postprocess : bool
        Run flow tracking to labels (else ``labels`` is None).
    precision : str
        "auto" (default), "fp32", "bf16" or "fp16": the network forward only
        (:func:`mediar_ray.precision.resolve_precision`; "auto" is bfloat16 on CPUs with
        bf16 units and CUDA GPUs from compute capability 8.0).
    **flow_params
        Passed to :func:`mediar_ray.dynamics.flows_to_labels`.
    """
    raw = predict_raw(
        normalize(image),
        models,
        tta=tta,
        roi_size=roi_size,
        device=device,
        sw_batch_size=sw_batch_size,
        precision=precision,
    )
    labels = None
    if postprocess:
        from mediar_ray.dynamics import flows_to_labels

        labels = flows_to_labels(raw, **flow_params)
    return SegmentResult(labels=labels, raw=raw)
