"""MEDIAR's training augmentations and targets, as small seeded numpy/torch functions.

Each transform takes the image as (C, H, W) float32 in [0, 1] (after
:func:`mediar_ray.preprocess.normalize`), the labels as (H, W) int and a
``numpy.random.Generator``; spatial ones change both, intensity ones only the image.
:func:`train_sample` composes them in MEDIAR's order and probabilities (its table):

=====================  =====  ==================================================
transform              p      parameters
=====================  =====  ==================================================
normalise              1      percentiles 0 / 99.5 of non-zero pixels, to [0, 1]
zoom                   0.5    factor in [0.25, 1.5]; image "area", labels nearest
pad + random crop      1      ``crop`` x ``crop``, zero padding centred
axis flip              0.5    rows or columns, chosen at random
rotation               0.5    k x 90 degrees, k in 1..3
cell-aware intensity   0.25   40 % of cells, each x its own factor in [1.0, 1.7]
Gaussian noise         0.25   std uniform in [0, 0.1]
contrast               0.25   gamma in [1, 2]
Gaussian smoothing     0.25   sigma in [1, 2] px along rows, [0.25, 1.5] along
                              columns (MONAI's sigma_x is the first spatial axis)
histogram shift        0.25   3 control points
Gaussian sharpening    0.25   per axis sigma1 in [0.5, 1], sigma2 in [0.5, sigma1];
                              alpha in [10, 30]
=====================  =====  ==================================================

One transform is ours, not MEDIAR's, and off unless ``stain_p`` > 0: H&E stain jitter
(:func:`stain_jitter`), applied to colour images before the others, for tissue stained
in other labs than the training pairs'.

Targets come from the transformed labels (:func:`targets`), so flips and rotations need
no vector bookkeeping. (MEDIAR's code applies cell-aware intensity to every sample while
its paper's table says 0.25; the probability is ``cell_aware_p``, default 0.25.)

Replay ("public") samples get what MEDIAR's public-data pipeline gives them: pad + random
crop, flip and rotation, and boundary exclusion; no zoom and no intensity transforms.
Boundary exclusion ignores the border pixels of cells of at least 196 pixels
(:func:`excluded_pixels`); smaller cells keep theirs, as in MEDIAR.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from mediar_ray.dynamics import labels_to_flows
from mediar_ray.preprocess import normalize

__all__ = [
    "axis_flip",
    "border_pixels",
    "cell_aware_intensity",
    "contrast",
    "crop",
    "excluded_pixels",
    "gaussian_noise",
    "gaussian_sharpen",
    "gaussian_smooth",
    "histogram_shift",
    "rotate90",
    "stain_jitter",
    "targets",
    "train_sample",
    "augment_sample",
    "zoom_crop",
]

Sample = tuple[np.ndarray, np.ndarray]


def crop(image: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator) -> Sample:
    """Zero-pad (centred) to at least ``size`` and take a random ``size`` x ``size`` crop.

    image (C, H, W), labels (H, W) -> (C, size, size), (size, size).
    """
    h, w = labels.shape
    py, px = max(size - h, 0), max(size - w, 0)
    pads = ((py // 2, py - py // 2), (px // 2, px - px // 2))
    image = np.pad(image, ((0, 0),) + pads)
    labels = np.pad(labels, pads)
    y = int(rng.integers(0, labels.shape[0] - size + 1))
    x = int(rng.integers(0, labels.shape[1] - size + 1))
    return image[:, y : y + size, x : x + size], labels[y : y + size, x : x + size]


def zoom_crop(
    image: np.ndarray, labels: np.ndarray, size: int, factor: float, rng: np.random.Generator
) -> Sample:
    """Zoom by ``factor`` then crop ``size`` (as MEDIAR's RandZoom + SpatialPad + RandCrop).

    Done as a crop of ``size / factor`` pixels resized to ``size``, which gives the same
    distribution of samples without resizing the whole image first. Image: area
    interpolation; labels: nearest neighbour at the pixel centre (torch's
    "nearest-exact"), so ids are kept and each label pixel comes from the middle of the
    area its image pixel averages (plain "nearest" takes the block's top-left source
    pixel, which moves the labels towards the bottom right by almost half an output
    pixel when zooming out by 4).
    """
    src = max(1, int(round(size / factor)))
    image, labels = crop(image, labels, src, rng)
    if src == size:
        return image, labels
    img = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(image))[None], size=(size, size), mode="area"
    )[0].numpy()
    lab = (
        F.interpolate(
            torch.from_numpy(labels.astype(np.float64))[None, None],
            size=(size, size),
            mode="nearest-exact",
        )[0, 0]
        .numpy()
        .astype(labels.dtype)
    )
    return img, lab


def axis_flip(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> Sample:
    """Flip rows or columns (one axis, chosen at random)."""
    axis = int(rng.integers(2))
    return np.flip(image, axis=axis + 1), np.flip(labels, axis=axis)


def rotate90(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> Sample:
    """Rotate by k x 90 degrees, k in 1..3 (counter-clockwise, rows to columns)."""
    k = int(rng.integers(1, 4))
    return np.rot90(image, k, axes=(1, 2)), np.rot90(labels, k)


def cell_aware_intensity(
    image: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    fraction: float = 0.4,
    factors: tuple[float, float] = (1.0, 1.7),
) -> np.ndarray:
    """Multiply each of a random ``fraction`` of the cells by its own factor.

    ``round(fraction * n)`` of the ``n`` cell ids are chosen; each gets a factor drawn
    uniformly from ``factors``; background and the other cells are unchanged. Values are
    not clipped (as in MEDIAR: clipping would flatten bright cells into saturated blobs).

    image (C, H, W) float32, labels (H, W) int -> (C, H, W) float32.
    """
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if ids.size == 0:
        return image
    chosen = rng.choice(ids, int(round(fraction * ids.size)), replace=False)
    scale = np.ones(int(labels.max()) + 1, np.float32)
    scale[chosen] = rng.uniform(*factors, size=chosen.size).astype(np.float32)
    return (image * scale[labels][None]).astype(np.float32)


def gaussian_noise(image: np.ndarray, rng: np.random.Generator, max_std: float = 0.1) -> np.ndarray:
    """Add zero-mean Gaussian noise of a standard deviation drawn from [0, max_std]."""
    std = rng.uniform(0.0, max_std)
    return image + rng.normal(0.0, std, image.shape).astype(np.float32)


def stain_jitter(
    image: np.ndarray, rng: np.random.Generator, scale: float = 0.05, shift: float = 0.05
) -> np.ndarray:
    """Vary the amounts of haematoxylin, eosin and DAB in a colour image.

    Each pixel's optical density (OD = -ln RGB) is unmixed into the three stains with
    Ruifrok and Johnston's matrix (``skimage.color.hed_from_rgb``); each stain's density
    is multiplied by a factor drawn from [1 - ``scale``, 1 + ``scale``] and moved by an
    offset drawn from [-``shift``, ``shift``] OD units, then mixed back
    (``skimage.color.rgb_from_hed``) and clipped to [0, 1]. With factor 1 and offset 0
    the image comes back unchanged (no clamping of negative densities in between). A
    grey image (three equal channels: every fluorescence and phase-contrast image here)
    is returned as it is, since it has no stains to unmix.

    image (3, H, W) float32 in [0, 1], RGB -> (3, H, W) float32 in [0, 1].
    """
    from skimage.color import hed_from_rgb, rgb_from_hed

    if np.array_equal(image[0], image[1]) and np.array_equal(image[1], image[2]):
        return image
    od = -np.log(np.maximum(np.moveaxis(image, 0, -1), 1e-6, dtype=np.float64))
    stains = od @ hed_from_rgb
    stains = stains * rng.uniform(1.0 - scale, 1.0 + scale, 3) + rng.uniform(-shift, shift, 3)
    rgb = np.exp(-(stains @ rgb_from_hed))
    return np.clip(np.moveaxis(rgb, -1, 0), 0.0, 1.0).astype(np.float32)


def _span(image: np.ndarray) -> tuple[float, float]:
    lo, hi = float(image.min()), float(image.max())
    return lo, max(hi - lo, 1e-7)


def contrast(
    image: np.ndarray, rng: np.random.Generator, gamma: tuple[float, float] = (1.0, 2.0)
) -> np.ndarray:
    """Gamma on the image's own range: ((x - min) / range) ** g * range + min."""
    g = rng.uniform(*gamma)
    lo, span = _span(image)
    return (((image - lo) / span) ** g * span + lo).astype(np.float32)


def gaussian_smooth(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur of a (C, H, W) image: sigma in [1, 2] pixels along rows (H) and in
    [0.25, 1.5] along columns (W), as MONAI's RandGaussianSmooth(sigma_x=(1, 2))."""
    sigma = (0.0, rng.uniform(1.0, 2.0), rng.uniform(0.25, 1.5))
    return ndimage.gaussian_filter(image, sigma).astype(np.float32)


def histogram_shift(image: np.ndarray, rng: np.random.Generator, points: int = 3) -> np.ndarray:
    """Piecewise-linear intensity remap through ``points`` control points whose inner
    ones are moved at random (ends fixed), on the image's own range."""
    ref = np.linspace(0.0, 1.0, points)
    moved = ref.copy()
    for i in range(1, points - 1):
        moved[i] = rng.uniform(moved[i - 1], moved[i + 1])
    lo, span = _span(image)
    out = np.interp((image - lo) / span, ref, moved)
    return (out * span + lo).astype(np.float32)


def gaussian_sharpen(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unsharp masking of a (C, H, W) image, as MONAI's RandGaussianSharpen defaults.

    b1 = blur(x, s1), b2 = blur(b1, s2), x' = b1 + alpha (b1 - b2), with s1 drawn per
    axis from [0.5, 1] px, s2 per axis from [0.5, s1] and alpha from [10, 30].
    """
    s1 = rng.uniform(0.5, 1.0, size=2)
    s2 = rng.uniform(0.5, s1)
    alpha = rng.uniform(10.0, 30.0)
    b1 = ndimage.gaussian_filter(image, (0.0, *s1))
    b2 = ndimage.gaussian_filter(b1, (0.0, *s2))
    return (b1 + alpha * (b1 - b2)).astype(np.float32)


def border_pixels(labels: np.ndarray) -> np.ndarray:
    """Cell pixels with a 4-neighbour of another value (background or another cell).

    The image edge does not count as a border. Equals
    ``skimage.segmentation.find_boundaries(labels, connectivity=1, mode="inner")`` inside
    the image. Returns (H, W) bool.
    """
    p = np.pad(labels, 1, mode="edge")
    c = p[1:-1, 1:-1]
    differs = (p[:-2, 1:-1] != c) | (p[2:, 1:-1] != c) | (p[1:-1, :-2] != c) | (p[1:-1, 2:] != c)
    return differs & (c > 0)


#: Cells smaller than this many pixels (14 x 14, as MEDIAR) keep their borders under
#: boundary exclusion: most of a small cell is border, and ignoring it would hide it.
BOUNDARY_MIN_AREA = 196


def excluded_pixels(labels: np.ndarray, min_area: int = BOUNDARY_MIN_AREA) -> np.ndarray:
    """The pixels boundary exclusion ignores: :func:`border_pixels` of the cells of at
    least ``min_area`` pixels. labels (H, W) int -> (H, W) bool."""
    border = border_pixels(labels)
    if min_area <= 1:
        return border
    return border & (cell_areas(labels) >= min_area)


def cell_areas(labels: np.ndarray) -> np.ndarray:
    """Area in pixels of each pixel's label (of the background too, for label 0).
    labels (H, W) int -> (H, W) int64."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(labels.shape)]


def touching_pixels(labels: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels (cell or background) with two different cells within ``radius`` px
    (Chebyshev distance): the seams and narrow gaps between touching cells, where a
    merge of two cells is decided. labels (H, W) int -> (H, W) bool."""
    size = 2 * radius + 1
    top = ndimage.maximum_filter(labels, size=size, mode="nearest")
    # Background counts as one more than the largest label, so that the minimum is the
    # smallest *cell* (a dtype's own maximum overflows inside scipy's filters).
    fill = labels.max() + 1
    low = ndimage.minimum_filter(np.where(labels > 0, labels, fill), size=size, mode="nearest")
    return (low != fill) & (top != low)


def pixel_weights(
    labels: np.ndarray, small_area: int = 0, small_max: float = 3.0, touching: float = 1.0
) -> np.ndarray:
    """Loss weights that count small and touching cells more (1 elsewhere).

    Parameters
    ----------
    labels : ndarray, (H, W) int
        Instance labels, 0 for background.
    small_area : int
        Pixels of a cell smaller than this (in pixels) weigh ``sqrt(small_area / area)``,
        at most ``small_max``: each small cell then counts more nearly as much as a large
        one, where a plain pixel mean lets the large ones dominate. 0 turns it off.
    small_max : float
        Upper bound of the small-cell weight (>= 1).
    touching : float
        Weight of :func:`touching_pixels` (multiplies the small-cell weight). 1 turns it off.

    Returns
    -------
    (H, W) float32, >= 1.
    """
    weights = np.ones(labels.shape, np.float32)
    if small_area > 0:
        area = cell_areas(labels).astype(np.float32)
        small = (labels > 0) & (area < small_area)
        weights[small] = np.minimum(small_max, np.sqrt(small_area / area[small]))
    if touching != 1.0:
        weights[touching_pixels(labels)] *= touching
    return weights


def targets(
    labels: np.ndarray, boundary_exclusion: bool = False, weights: dict[str, float] | None = None
) -> dict[str, np.ndarray]:
    """Training targets of a (transformed) label image.

    Returns flows (2, H, W) float32 unit vectors (dy, dx), cell (H, W) float32 0/1 and
    valid (H, W) float32, the per-pixel loss weight: 0 on :func:`excluded_pixels` under
    boundary exclusion, else 1, or :func:`pixel_weights` (``**weights``) when given.
    """
    labels = np.ascontiguousarray(labels)
    valid = pixel_weights(labels, **weights) if weights else np.ones(labels.shape, np.float32)
    if boundary_exclusion:
        valid[excluded_pixels(labels)] = 0.0
    return {
        "flows": labels_to_flows(labels),
        "cell": (labels > 0).astype(np.float32),
        "valid": valid,
    }


def train_sample(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, cfg: Any, public: bool = False
) -> dict[str, np.ndarray]:
    """One augmented training sample (MEDIAR's table, see the module docstring).

    Parameters
    ----------
    image : ndarray, (H, W) or (H, W, C), any dtype
        As :func:`mediar_ray.io.read_image` returns it.
    labels : ndarray, (H, W) int
    rng : numpy Generator
        All randomness comes from it: a seed gives the same sample.
    cfg : AugmentSection
        Probabilities and parameters (:class:`mediar_ray.train.config.AugmentSection`).
    public : bool
        A replay sample from public data: crop, flip and rotation only (no zoom, no
        intensity transforms), and boundary exclusion.

    Returns
    -------
    dict of image (3, S, S) float32, flows (2, S, S) float32, cell (S, S) float32,
    valid (S, S) float32, with S = ``cfg.crop``.
    """
    if labels.shape != image.shape[:2]:
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ in size")
    return augment_sample(normalize(image), labels, rng, cfg, public)


def augment_sample(
    img: np.ndarray, labels: np.ndarray, rng: np.random.Generator, cfg: Any, public: bool = False
) -> dict[str, np.ndarray]:
    """:func:`train_sample` after normalisation: ``img`` (3, H, W) float32 in [0, 1]
    (callers that see an image many times normalise it once). ``public`` samples get
    the spatial transforms other than zoom, and boundary exclusion, only."""
    lab = labels.astype(np.int64)
    size = cfg.crop
    if not public and rng.random() < cfg.zoom_p:
        img, lab = zoom_crop(img, lab, size, rng.uniform(*cfg.zoom_range), rng)
    else:
        img, lab = crop(img, lab, size, rng)
    if rng.random() < cfg.flip_p:
        img, lab = axis_flip(img, lab, rng)
    if rng.random() < cfg.rotate_p:
        img, lab = rotate90(img, lab, rng)
    img, lab = np.ascontiguousarray(img), np.ascontiguousarray(lab)
    if not public:
        img = _intensity_augment(img, lab, rng, cfg)
    out = targets(lab, cfg.boundary_exclusion or public, _loss_weights(cfg))
    out["image"] = img.astype(np.float32)
    return out


def _loss_weights(cfg: Any) -> dict[str, float] | None:
    """:func:`pixel_weights` arguments of an AugmentSection, or None when both are off."""
    if cfg.small_cell_area <= 0 and cfg.touching_weight == 1.0:
        return None
    return {
        "small_area": cfg.small_cell_area,
        "small_max": cfg.small_cell_max_weight,
        "touching": cfg.touching_weight,
    }


def _intensity_augment(
    img: np.ndarray, lab: np.ndarray, rng: np.random.Generator, cfg: Any
) -> np.ndarray:
    """Stain jitter (when ``cfg.stain_p`` > 0), cell-aware intensity, then noise,
    contrast, smoothing, histogram shift and sharpening, each with its probability from
    ``cfg``."""
    # Drawn only when on, so that a recipe without it gets the samples it always got.
    if cfg.stain_p > 0 and rng.random() < cfg.stain_p:
        img = stain_jitter(img, rng, cfg.stain_scale, cfg.stain_shift)
    if rng.random() < cfg.cell_aware_p:
        img = cell_aware_intensity(
            img, lab, rng, cfg.cell_aware_fraction, tuple(cfg.cell_aware_range)
        )
    for p, fn in (
        (cfg.noise_p, gaussian_noise),
        (cfg.contrast_p, contrast),
        (cfg.smooth_p, gaussian_smooth),
        (cfg.hist_shift_p, histogram_shift),
        (cfg.sharpen_p, gaussian_sharpen),
    ):
        if rng.random() < p:
            img = fn(img, rng)
    return img
