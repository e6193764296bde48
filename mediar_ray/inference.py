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

For a slide, :func:`predict_partial` computes every window exactly once: the result is a
sum over windows of (weight x prediction / the frame's coverage at each pixel), so a
window may be assigned to one tile only (the tile holding its top-left corner in image
coordinates) and the tiles' partial sums, added where they overlap, give the
whole-image prediction up to float rounding. A ``skip`` test (a tissue mask) leaves
windows out: they contribute background with their usual weight, so pixels that only
windows that ran reach keep exactly the sums they had without it.

Only the network's forward runs in the requested ``precision`` (autocast; see
:mod:`mediar_ray.precision`); its output is cast to float32 at once, and the canvas, the
Gaussian weights and the sums are float32 tensors on the model's device, copied there
once and back once per call. A device out-of-memory error halves the batch
(:func:`forward_windows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from monai.data.utils import compute_importance_map

from mediar_ray.precision import (
    autocast,
    default_batch_size,
    free_device_cache,
    is_oom,
    resolve_precision,
)
from mediar_ray.weights import DEFAULT_ROI_SIZE, common_window
from mediar_ray.windows import BACKGROUND, owned_windows, pad_before, partial_extent, window_starts
from mediar_ray.windows import frames as tta_frames

__all__ = [
    "BACKGROUND",
    "Reader",
    "SkipWindow",
    "WindowCounts",
    "models_window",
    "predict_raw",
    "predict_region",
    "predict_partial",
    "partial_extent",
    "window_starts",
    "resolve_device",
    "forward_windows",
]

#: read(y0, y1, x0, x1) -> (3, y1 - y0, x1 - x0) float32, normalised pixels of the image.
Reader = Callable[[int, int, int, int], np.ndarray]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _overlapping(starts: list[int], roi: int, lo: int, hi: int) -> list[int]:
    return [s for s in starts if s < hi and s + roi > lo]


def _importance(roi: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(roi, roi) float32 Gaussian importance map (MONAI's, sigma = 0.125 x roi), on
    ``device``."""
    return compute_importance_map(
        (roi, roi), mode="gaussian", sigma_scale=0.125, device="cpu", dtype=torch.float32
    ).to(device)


def _add_window(canvas: torch.Tensor, patch: torch.Tensor, y: int, x: int) -> None:
    """``canvas[..., y:y+r, x:x+r] += patch`` for an (..., r, r) patch, clipped to the canvas.

    ``(y, x)`` is the patch's top-left corner in canvas coordinates (may be negative).
    """
    h, w = canvas.shape[-2:]
    r = patch.shape[-1]
    cy0, cy1, cx0, cx1 = max(y, 0), min(y + r, h), max(x, 0), min(x + r, w)
    if cy0 < cy1 and cx0 < cx1:
        canvas[..., cy0:cy1, cx0:cx1] += patch[..., cy0 - y : cy1 - y, cx0 - x : cx1 - x]


def _coverage(
    ys: list[int],
    xs: list[int],
    weight: torch.Tensor,
    origin: tuple[int, int],
    shape: tuple[int, int],
) -> torch.Tensor:
    """Sum of the importance ``weight`` of windows ``ys x xs`` over a canvas.

    ``ys``/``xs`` are window starts, ``origin`` the canvas's top-left in the same
    coordinates, ``shape`` its (h, w). Windows are added in C order (MONAI's), so each
    pixel's value does not depend on which other windows are listed. Returns (h, w)
    float32 on ``weight``'s device.
    """
    count = torch.zeros(shape, dtype=torch.float32, device=weight.device)
    for y in ys:
        for x in xs:
            _add_window(count, weight, y - origin[0], x - origin[1])
    return count


def _batches(starts: list[tuple[int, int]], size: int):
    for b in range(0, len(starts), size):
        yield starts[b : b + size]


def _crops(
    canvas: torch.Tensor, batch: list[tuple[int, int]], origin: tuple[int, int], roi: int
) -> torch.Tensor:
    """(N, C, roi, roi) windows at starts ``batch`` of a (C, h, w) canvas whose top-left
    is ``origin`` (same coordinates as the starts)."""
    oy, ox = origin
    return torch.stack([canvas[:, y - oy : y - oy + roi, x - ox : x - ox + roi] for y, x in batch])


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


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A float32 array as a tensor on ``device``: on CUDA through pinned memory with a
    non-blocking copy (the host goes on preparing while the copy runs)."""
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _windowed(
    read: Reader,
    shape: tuple[int, int],
    region: tuple[int, int, int, int],
    models: Sequence[torch.nn.Module],
    roi: int,
    overlap: float,
    sw_batch_size: int,
    device: torch.device,
    precision: str,
) -> np.ndarray:
    """Sliding-window prediction of ``region``, summed over ``models``.

    The canvas, the weights and the sums live on ``device`` in float32: one copy there
    per region and one back. Returns (3, ry1 - ry0, rx1 - rx0) float32: for each model,
    the Gaussian-weighted average of the windows covering each pixel, summed over the
    models.
    """
    h, w = shape
    ry0, ry1, rx0, rx1 = region
    py, px = pad_before(h, roi), pad_before(w, roi)
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
    image = _to_device(canvas, device)
    weight = _importance(roi, device)
    total = torch.zeros((3,) + canvas.shape[1:], dtype=torch.float32, device=device)
    count = _coverage(ys, xs, weight, (ey0, ex0), canvas.shape[1:])
    starts = [(y, x) for y in ys for x in xs]  # C order, as MONAI iterates
    for model in models:
        out = torch.zeros_like(total)
        for batch in _batches(starts, sw_batch_size):
            pred = _forward(model, _crops(image, batch, (ey0, ex0), roi), device, precision)
            for (y, x), p in zip(batch, pred):
                _add_window(out, weight * p, y - ey0, x - ex0)
        total += out / count.clamp_min(torch.finfo(torch.float32).tiny)
    oy, ox = ry0 + py - ey0, rx0 + px - ex0
    return total[:, oy : oy + ry1 - ry0, ox : ox + rx1 - rx0].cpu().numpy()


def forward_windows(
    forward: Callable[[torch.Tensor], torch.Tensor], crops: torch.Tensor
) -> torch.Tensor:
    """``forward(crops)``; on a device out-of-memory error, the device cache freed and
    the batch run as two halves (recursively, down to one window, which re-raises).

    Parameters
    ----------
    forward : callable
        (N, C, r, r) -> (N, C', r, r), e.g. a network forward on the device.
    crops : Tensor, (N, C, r, r)
        The batch.

    Returns
    -------
    Tensor, (N, C', r, r)
        The outputs, in the order of ``crops``.
    """
    try:
        return forward(crops)
    except RuntimeError as err:  # torch.OutOfMemoryError is a RuntimeError
        if not is_oom(err) or crops.shape[0] <= 1:
            raise
    free_device_cache()  # outside the handler: the traceback no longer pins tensors
    half = (crops.shape[0] + 1) // 2
    return torch.cat(
        [forward_windows(forward, crops[:half]), forward_windows(forward, crops[half:])]
    )


def _forward(
    model: torch.nn.Module, crops: torch.Tensor, device: torch.device, precision: str
) -> torch.Tensor:
    """Model outputs for a batch of windows, float32 on ``device``.

    ``precision`` is resolved ("fp32", "bf16", "fp16"): only the forward runs in it; the
    output is cast to float32 at once, so the blending after it is float32.
    """
    # Channels-last activations: oneDNN's fast convolution layout on CPUs (a 512-px window
    # of the bundled model 1.23x faster on one thread, 1.27x on two: bench/forward_layout.py)
    # and the tensor-core layout on GPUs; :func:`_prepare_models` puts the weights in it.
    crops = crops.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)

    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(precision, device):
            return model(batch).float()

    return forward_windows(run, crops)


def _prepare_models(
    models: Sequence[torch.nn.Module] | torch.nn.Module,
    device: str | torch.device | None,
    precision: str = "auto",
    sw_batch_size: int | None = None,
) -> tuple[list[torch.nn.Module], torch.device, str, int]:
    """The models as a non-empty list, in eval mode on the resolved device; the resolved
    precision (:func:`mediar_ray.precision.resolve_precision`) and batch size (the
    device's default when None)."""
    models = [models] if isinstance(models, torch.nn.Module) else list(models)
    if not models:
        raise ValueError("inference needs at least one model")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    if sw_batch_size is not None and sw_batch_size < 0:
        raise ValueError(
            f"sw_batch_size must be at least 1 (0: the device's default), got {sw_batch_size}"
        )
    batch = sw_batch_size or default_batch_size(dev)
    return ([m.to(dev, memory_format=torch.channels_last).eval() for m in models], dev, prec, batch)


def _check_region(
    image_shape: tuple[int, int], region: tuple[int, int, int, int]
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """(H, W) and (y0, y1, x0, x1) as ints; refuses an empty region or one outside."""
    h, w = (int(v) for v in image_shape)
    y0, y1, x0, x1 = (int(v) for v in region)
    if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise ValueError(f"region {region} is empty or outside an image of shape {(h, w)}")
    return (h, w), (y0, y1, x0, x1)


def _flow_sign(fy: bool, fx: bool) -> np.ndarray:
    """(3,) float32: a flip along an axis negates the flow component along it."""
    return np.array([-1.0 if fy else 1.0, -1.0 if fx else 1.0, 1.0], np.float32)


def predict_region(
    read: Reader,
    image_shape: tuple[int, int],
    region: tuple[int, int, int, int],
    models: Sequence[torch.nn.Module] | torch.nn.Module,
    tta: bool = True,
    roi_size: int = 512,
    overlap: float = 0.6,
    sw_batch_size: int | None = None,
    device: str | torch.device | None = None,
    *,
    precision: str = "auto",
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
    roi_size, overlap
        Sliding-window parameters (MEDIAR: 512, 0.6).
    sw_batch_size : int, optional
        Windows per forward; None or 0: the device's default
        (:func:`mediar_ray.precision.default_batch_size`: 4 on CPUs, 32 on CUDA). A device
        out-of-memory error halves a batch (:func:`forward_windows`).
    device : str, torch.device or None
        Where the networks run; None picks CUDA when available. Models are moved there.
    precision : str
        "fp32", "bf16", "fp16" or "auto" (:func:`mediar_ray.precision.resolve_precision`):
        the network forward runs in it, the rest in float32. On CUDA, fp32 uses TF32
        tensor cores except inside :func:`mediar_ray.precision.exact_fp32`.

    Returns
    -------
    ndarray, (3, y1 - y0, x1 - x0) float32
        dy, dx (flows x 5, pixels) and the cell logit.
    """
    models, dev, prec, batch = _prepare_models(models, device, precision, sw_batch_size)
    (h, w), (y0, y1, x0, x1) = _check_region(image_shape, region)
    result = np.zeros((3, y1 - y0, x1 - x0), dtype=np.float32)
    for fy, fx in tta_frames(tta):
        # The region and the reader in the flipped frame; predict there, flip back.
        fregion = (h - y1, h - y0, x0, x1) if fy else (y0, y1, x0, x1)
        fregion = fregion[:2] + ((w - x1, w - x0) if fx else fregion[2:])
        pred = _windowed(
            _flipped_reader(read, (h, w), fy, fx),
            (h, w),
            fregion,
            models,
            roi_size,
            overlap,
            batch,
            dev,
            prec,
        )
        axes = [a for a, f in ((1, fy), (2, fx)) if f]
        pred = np.flip(pred, axis=axes) if axes else pred
        result += pred * _flow_sign(fy, fx)[:, None, None]
    return result / np.float32(len(models) * len(tta_frames(tta)))


#: skip(y0, y1, x0, x1) -> True to leave out the window covering image pixels
#: [y0:y1, x0:x1] (half-open, clipped to the image); see :func:`predict_partial`.
SkipWindow = Callable[[int, int, int, int], bool]


@dataclass
class WindowCounts:
    """Windows of :func:`predict_partial`, each counted once per augmentation frame
    (model forwards = ``run`` x number of models).

    ``kept`` windows were wanted by the skip test; ``run`` windows were computed (the
    kept ones and the others of their batches); ``skipped`` windows were not.
    """

    run: int = 0
    skipped: int = 0
    kept: int = 0


def _batches_to_run(
    starts: list[tuple[int, int]],
    skip: SkipWindow | None,
    roi: int,
    shape: tuple[int, int],
    size: int,
) -> tuple[list[list[tuple[int, int]]], list[tuple[int, int]], int]:
    """(batches to run, windows skipped, windows kept) of one frame's owned windows.

    Batches are cut from ``starts`` exactly as without a skip test, and a batch runs
    whole when ``skip`` keeps any of its windows. Why whole: a network's output for a
    window can change in the last bits with the batch size (convolution kernels are
    chosen by shape), never with the other windows' contents; same batches, same bits.
    """
    batches = list(_batches(starts, size))
    if skip is None:
        return batches, [], len(starts)
    h, w = shape
    run, skipped, kept = [], [], 0
    for batch in batches:
        keep = [not skip(max(y, 0), min(y + roi, h), max(x, 0), min(x + roi, w)) for y, x in batch]
        kept += sum(keep)
        if any(keep):
            run.append(batch)
        else:
            skipped.extend(batch)
    return run, skipped, kept


def predict_partial(
    read: Reader,
    image_shape: tuple[int, int],
    region: tuple[int, int, int, int],
    models: Sequence[torch.nn.Module] | torch.nn.Module,
    tta: bool = True,
    roi_size: int = 512,
    overlap: float = 0.6,
    sw_batch_size: int | None = None,
    device: str | torch.device | None = None,
    skip: SkipWindow | None = None,
    return_counts: bool = False,
    *,
    precision: str = "auto",
) -> np.ndarray | tuple[np.ndarray, WindowCounts]:
    """A region's share of whole-image inference: the windows it owns, each run once.

    Whole-image inference at a pixel is, for each augmentation frame f and model m, the
    sum over the frame's windows covering it of weight x prediction, divided by the
    frame's coverage (sum of weights) there, averaged over frames and models. Coverage
    depends only on the window grid, so the result is a sum of per-window terms. Each
    window (of every frame, mapped back to image coordinates) is owned by the region that
    holds its top-left corner, clipped into the image; this function sums the terms of
    the windows ``region`` owns. Over regions that partition the image, the partials
    placed at their :func:`partial_extent` and added give :func:`predict_raw` up to
    float rounding (the sum order differs), with every window computed exactly once.

    With ``skip`` (e.g. :func:`mediar_ray.tissue.tissue_skip`), windows it is True for
    are left out, a batch of ``sw_batch_size`` windows at a time: the batches are those
    of the run without ``skip``, and a batch runs whole when any of its windows is kept
    (so every window computed is computed bit for bit as without ``skip``). A window
    left out contributes :data:`BACKGROUND` with its usual weight, so the coverage
    normalisation is unchanged and pixels reached only by left-out windows read as
    background; pixels reached only by windows that ran get the same sums, in the same
    order, as without ``skip``.

    Parameters
    ----------
    read : callable
        As :func:`predict_region`; called once, with the image part of the owned windows
        that run (within :func:`partial_extent` of the region), and not at all when none
        runs.
    image_shape, region, models, tta, roi_size, overlap, sw_batch_size, device, precision
        As :func:`predict_region`. The canvas, weights and sums stay on ``device``
        (float32); one copy there and one back per call.
    skip : callable, optional
        ``skip(y0, y1, x0, x1) -> bool``, asked once per owned window of every frame with
        the image pixels the window covers (half-open, image coordinates, clipped to the
        image); True leaves the window out, unless another window of its batch is kept.
    return_counts : bool
        Also return the :class:`WindowCounts` of windows run, skipped and kept.

    Returns
    -------
    partial : ndarray, (3, ey1 - ey0, ex1 - ex0) float32
        Partial (dy, dx, logit) over ``partial_extent(image_shape, region, roi_size)``
        ``= (ey0, ey1, ex0, ex1)``; zero where the region's windows do not reach.
    counts : WindowCounts
        Only with ``return_counts``.
    """
    models, dev, prec, sw_batch_size = _prepare_models(models, device, precision, sw_batch_size)
    (h, w), (y0, y1, x0, x1) = _check_region(image_shape, region)
    roi = roi_size
    ey0, ey1, ex0, ex1 = partial_extent((h, w), (y0, y1, x0, x1), roi)
    frames = []  # (fy, fx, all starts y, all starts x, batches to run, windows skipped)
    kept = 0
    for fy, fx, ys_all, xs_all, mine in owned_windows((h, w), (y0, y1, x0, x1), tta, roi, overlap):
        run, skipped, k = _batches_to_run(mine, skip, roi, (h, w), sw_batch_size)
        frames.append((fy, fx, ys_all, xs_all, run, skipped))
        kept += k
    ran = [s for f in frames for batch in f[4] for s in batch]
    counts = WindowCounts(len(ran), sum(len(f[5]) for f in frames), kept)
    result = torch.zeros((3, ey1 - ey0, ex1 - ex0), dtype=torch.float32, device=dev)
    if ran:  # one read: the image part of every window that runs, zero-padded like MONAI
        cy0, cy1 = min(y for y, _ in ran), max(y for y, _ in ran) + roi
        cx0, cx1 = min(x for _, x in ran), max(x for _, x in ran) + roi
        iy0, iy1, ix0, ix1 = max(cy0, 0), min(cy1, h), max(cx0, 0), min(cx1, w)
        canvas = np.zeros((3, cy1 - cy0, cx1 - cx0), dtype=np.float32)
        canvas[:, iy0 - cy0 : iy1 - cy0, ix0 - cx0 : ix1 - cx0] = read(iy0, iy1, ix0, ix1)
        canvas = _to_device(canvas, dev)
    weight = _importance(roi, dev)
    background = torch.tensor(BACKGROUND, dtype=torch.float32, device=dev)[:, None, None]
    for fy, fx, ys_all, xs_all, run, skipped in frames:
        if not run and not skipped:
            continue
        axes = [a for a, f in ((0, fy), (1, fx)) if f]  # (rows, cols) flipped in the frame

        # frame <-> image orientation, last 2 dims (axes bound now: B023)
        def flip(t: torch.Tensor, axes: list[int] = axes) -> torch.Tensor:
            return t.flip([a + t.ndim - 2 for a in axes]) if axes else t

        # The frame's coverage, on the image, from every window of the frame reaching it.
        count = _coverage(
            _overlapping(ys_all, roi, ey0, ey1),
            _overlapping(xs_all, roi, ex0, ex1),
            flip(weight),
            (ey0, ex0),
            (ey1 - ey0, ex1 - ex0),
        )
        acc = torch.zeros_like(result)
        glass = flip(weight) * background
        for model in models:
            for batch in run:
                pred = _forward(model, flip(_crops(canvas, batch, (cy0, cx0), roi)), dev, prec)
                for (y, x), p in zip(batch, pred):
                    _add_window(acc, flip(weight * p), y - ey0, x - ex0)
            for y, x in skipped:  # after the windows that ran: their pixels' sums unchanged
                _add_window(acc, glass, y - ey0, x - ex0)
        sign = torch.from_numpy(_flow_sign(fy, fx)).to(dev)[:, None, None]
        result += acc / count.clamp_min(torch.finfo(torch.float32).tiny) * sign
    partial = (result / np.float32(len(models) * len(frames))).cpu().numpy()
    return (partial, counts) if return_counts else partial


def models_window(models: Sequence[torch.nn.Module]) -> int:
    """The sliding-window size (px) an ensemble was trained for: the ``roi_size`` that
    :func:`mediar_ray.model.load_model` gives each model (MEDIAR's 512 for a model built
    otherwise). Raises :class:`~mediar_ray.weights.CheckpointError` (a ValueError) when
    they differ (:func:`~mediar_ray.weights.common_window`).
    """
    return common_window(getattr(m, "roi_size", DEFAULT_ROI_SIZE) for m in models)


def predict_raw(
    image_chw: np.ndarray,
    models: Sequence[torch.nn.Module] | torch.nn.Module,
    tta: bool = True,
    roi_size: int | None = None,
    overlap: float = 0.6,
    sw_batch_size: int | None = None,
    device: str | torch.device | None = None,
    *,
    precision: str = "auto",
) -> np.ndarray:
    """Whole-image MEDIAR inference.

    Parameters
    ----------
    image_chw : ndarray, (3, H, W) float32
        Normalised image (:func:`mediar_ray.preprocess.normalize`).
    models, tta, overlap, sw_batch_size, device, precision
        As :func:`predict_region`.
    roi_size : int, optional
        As :func:`predict_region`; None: the size the models were trained for
        (:func:`models_window`).

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

    if isinstance(models, torch.nn.Module):
        models = [models]
    return predict_region(
        read,
        (h, w),
        (0, h, 0, w),
        models,
        tta,
        roi_size or models_window(models),
        overlap,
        sw_batch_size,
        device,
        precision=precision,
    )
