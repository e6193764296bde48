"""Sliding-window, test-time-augmented, ensembled MEDIAR inference.

The original runs MONAI's ``sliding_window_inference`` (512 px windows, overlap 0.6,
Gaussian importance, constant padding) on the whole image, once per test-time
augmentation (identity, horizontal flip, vertical flip) and per model, and averages.

Here the same computation is written so that any *region* of an image can be predicted
on its own and still equal the whole-image result: a window grid depends only on the
image size, so :func:`predict_region` runs exactly the global windows that overlap the
region, with the same Gaussian weights, and reads only their extent. The slide pipeline
calls it per tile; :func:`predict_raw` is the whole image as one region.

A flipped augmentation is computed in the flipped image's own frame (its own window grid
and padding, as the original does by flipping the whole image), then flipped back, and
the flow component along the flipped axis changes sign.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import numpy as np
import torch
from monai.data.utils import compute_importance_map

__all__ = ["Reader", "predict_raw", "predict_region", "window_starts", "resolve_device"]

#: read(y0, y1, x0, x1) -> (3, y1 - y0, x1 - x0) float32, normalised pixels of the image.
Reader = Callable[[int, int, int, int], np.ndarray]

# (flip rows?, flip columns?) for identity, horizontal flip, vertical flip; the order in
# which the original averages them.
_TTA = ((False, False), (False, True), (True, False))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def window_starts(length: int, roi: int, overlap: float) -> list[int]:
    """Start offsets of sliding windows along one axis, as MONAI places them.

    ``length`` is the (padded) axis length, at least ``roi``. Windows step by
    ``int(roi * (1 - overlap))`` (at least 1; one window if ``length == roi``) and the
    last one is shifted back to end at ``length``.
    """
    if length < roi:
        raise ValueError(f"axis length {length} is smaller than the window {roi}")
    if length == roi:
        return [0]
    step = max(int(roi * (1 - overlap)), 1)
    starts = []
    for k in range(length):
        start = k * step
        starts.append(min(start, length - roi))
        if start + roi >= length:
            break
    return starts


def _pad_before(length: int, roi: int) -> int:
    """Constant padding MONAI puts before an axis shorter than the window."""
    return max(roi - length, 0) // 2


def _overlapping(starts: list[int], roi: int, lo: int, hi: int) -> list[int]:
    return [s for s in starts if s < hi and s + roi > lo]


def _flipped_reader(read: Reader, shape: tuple[int, int], fy: bool, fx: bool) -> Reader:
    """A reader of the image flipped along rows (fy) and/or columns (fx)."""
    h, w = shape

    def read_flipped(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        sy = (h - y1, h - y0) if fy else (y0, y1)
        sx = (w - x1, w - x0) if fx else (x0, x1)
        crop = read(sy[0], sy[1], sx[0], sx[1])
        axes = [a for a, f in ((1, fy), (2, fx)) if f]
        return np.flip(crop, axis=axes) if axes else crop

    return read_flipped


def _windowed(
    read: Reader,
    shape: tuple[int, int],
    region: tuple[int, int, int, int],
    models: Sequence[torch.nn.Module],
    roi: int,
    overlap: float,
    sw_batch_size: int,
    device: torch.device,
    amp: bool,
) -> np.ndarray:
    """Sliding-window prediction of ``region``, summed over ``models``.

    Returns (3, ry1 - ry0, rx1 - rx0) float32: for each model, the Gaussian-weighted
    average of the windows covering each pixel, summed over the models.
    """
    h, w = shape
    ry0, ry1, rx0, rx1 = region
    py, px = _pad_before(h, roi), _pad_before(w, roi)
    ph, pw = max(h, roi), max(w, roi)
    ys = _overlapping(window_starts(ph, roi, overlap), roi, ry0 + py, ry1 + py)
    xs = _overlapping(window_starts(pw, roi, overlap), roi, rx0 + px, rx1 + px)
    # Extent of the windows in padded coordinates; read its part inside the image.
    ey0, ey1, ex0, ex1 = ys[0], ys[-1] + roi, xs[0], xs[-1] + roi
    iy0, iy1 = max(ey0 - py, 0), min(ey1 - py, h)
    ix0, ix1 = max(ex0 - px, 0), min(ex1 - px, w)
    canvas = np.zeros((3, ey1 - ey0, ex1 - ex0), dtype=np.float32)
    canvas[:, iy0 + py - ey0 : iy1 + py - ey0, ix0 + px - ex0 : ix1 + px - ex0] = read(
        iy0, iy1, ix0, ix1
    )
    image = torch.from_numpy(canvas)
    weight = compute_importance_map(
        (roi, roi), mode="gaussian", sigma_scale=0.125, device="cpu", dtype=torch.float32
    )
    total = torch.zeros((3,) + canvas.shape[1:], dtype=torch.float32)
    count = torch.zeros(canvas.shape[1:], dtype=torch.float32)
    starts = [(y, x) for y in ys for x in xs]  # C order, as MONAI iterates
    for model in models:
        out = torch.zeros_like(total)
        count.zero_()
        for b in range(0, len(starts), sw_batch_size):
            batch = starts[b : b + sw_batch_size]
            crops = torch.stack(
                [image[:, y - ey0 : y - ey0 + roi, x - ex0 : x - ex0 + roi] for y, x in batch]
            )
            pred = _forward(model, crops, device, amp)
            for (y, x), p in zip(batch, pred):
                out[:, y - ey0 : y - ey0 + roi, x - ex0 : x - ex0 + roi] += weight * p
                count[y - ey0 : y - ey0 + roi, x - ex0 : x - ex0 + roi] += weight
        total += out / count.clamp_min(torch.finfo(torch.float32).tiny)
    oy, ox = ry0 + py - ey0, rx0 + px - ex0
    return total[:, oy : oy + ry1 - ry0, ox : ox + rx1 - rx0].numpy()


def _forward(
    model: torch.nn.Module, crops: torch.Tensor, device: torch.device, amp: bool
) -> torch.Tensor:
    """Model outputs for a batch of windows, float32 on the CPU."""
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.float16)
        if amp and device.type == "cuda"
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        return model(crops.to(device)).float().cpu()


def predict_region(
    read: Reader,
    image_shape: tuple[int, int],
    region: tuple[int, int, int, int],
    models: Sequence[torch.nn.Module] | torch.nn.Module,
    tta: bool = True,
    roi_size: int = 512,
    overlap: float = 0.6,
    sw_batch_size: int = 4,
    device: str | torch.device | None = None,
    amp: bool = False,
) -> np.ndarray:
    """Predict (dy, dx, cell logit) on a region of an image, as whole-image inference would.

    Parameters
    ----------
    read : callable
        ``read(y0, y1, x0, x1) -> (3, y1 - y0, x1 - x0)`` float32 normalised pixels of the
        whole image (see :func:`mediar_ray.preprocess.normalize`). Called once per
        augmentation with the extent of the windows the region needs, clipped to the
        image: at most one window of context beyond the region on each side.
    image_shape : (H, W)
        Size of the whole image, which fixes the window grid.
    region : (y0, y1, x0, x1)
        Pixels to predict, half-open, inside the image.
    models : module or sequence of modules
        MEDIARFormer-like networks, (N, 3, roi, roi) -> (N, 3, roi, roi); averaged.
    tta : bool
        Average identity, horizontal and vertical flips (flow signs corrected).
    roi_size, overlap, sw_batch_size
        Sliding-window parameters (MEDIAR: 512, 0.6, 4).
    device : str, torch.device or None
        Where the networks run; None picks CUDA when available. Models are moved there.
    amp : bool
        float16 autocast on CUDA (ignored on CPU).

    Returns
    -------
    ndarray, (3, y1 - y0, x1 - x0) float32
        dy, dx (flows x 5, pixels) and the cell logit.
    """
    models = [models] if isinstance(models, torch.nn.Module) else list(models)
    if not models:
        raise ValueError("predict_region needs at least one model")
    h, w = (int(v) for v in image_shape)
    y0, y1, x0, x1 = (int(v) for v in region)
    if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise ValueError(f"region {region} is empty or outside an image of shape {(h, w)}")
    dev = resolve_device(device)
    models = [m.to(dev).eval() for m in models]
    result = np.zeros((3, y1 - y0, x1 - x0), dtype=np.float32)
    for fy, fx in _TTA if tta else _TTA[:1]:
        # The region and the reader in the flipped frame; predict there, flip back.
        fregion = (h - y1, h - y0, x0, x1) if fy else (y0, y1, x0, x1)
        fregion = fregion[:2] + ((w - x1, w - x0) if fx else fregion[2:])
        pred = _windowed(
            _flipped_reader(read, (h, w), fy, fx), (h, w), fregion, models,
            roi_size, overlap, sw_batch_size, dev, amp,
        )
        axes = [a for a, f in ((1, fy), (2, fx)) if f]
        pred = np.flip(pred, axis=axes) if axes else pred
        sign = np.array([-1.0 if fy else 1.0, -1.0 if fx else 1.0, 1.0], np.float32)
        result += pred * sign[:, None, None]
    return result / np.float32(len(models) * (3 if tta else 1))


def predict_raw(
    image_chw: np.ndarray,
    models: Sequence[torch.nn.Module] | torch.nn.Module,
    tta: bool = True,
    roi_size: int = 512,
    overlap: float = 0.6,
    sw_batch_size: int = 4,
    device: str | torch.device | None = None,
    amp: bool = False,
) -> np.ndarray:
    """Whole-image MEDIAR inference.

    Parameters
    ----------
    image_chw : ndarray, (3, H, W) float32
        Normalised image (:func:`mediar_ray.preprocess.normalize`).
    models, tta, roi_size, overlap, sw_batch_size, device, amp
        As :func:`predict_region`.

    Returns
    -------
    ndarray, (3, H, W) float32
        dy, dx (flows x 5) and the cell logit, averaged over augmentations and models.
    """
    image = np.asarray(image_chw, dtype=np.float32)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) normalised image, got shape {image.shape}")
    h, w = image.shape[1:]

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return image[:, y0:y1, x0:x1]

    return predict_region(
        read, (h, w), (0, h, 0, w), models, tta, roi_size, overlap, sw_batch_size, device, amp
    )
