"""Tissue detection: which parts of a slide hold anything worth segmenting.

A tissue mask is a low-resolution boolean image stretched over the processing image: a
window of the sliding-window inference runs when it touches a tissue pixel of the mask,
and is otherwise left out (its output is background). Everything here errs on the side
of tissue: a wrong "tissue" costs a window of compute, a wrong "glass" loses cells.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Callable, Literal, Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

__all__ = [
    "detect_kind",
    "load_mask",
    "resize_mask",
    "tissue_mask",
    "tissue_skip",
    "window_touches_tissue",
]

Kind = Literal["auto", "brightfield", "fluorescence"]

#: Highest optical-density threshold for brightfield: pale eosin-only stroma has an OD of
#: about 0.15 and up in its most absorbing channel, clean glass 0.0-0.05. Otsu's split
#: lands inside the tissue when a thumbnail holds little glass; the cap keeps pale tissue.
OD_CAP = 0.1

#: Least optical density above the glass's that counts as tissue: white-balance drift and
#: dust on clean glass stay below it, pale eosin-only stroma (0.1 and up) is above.
MIN_OD_STEP = 0.03
#: Least correlation of neighbouring thumbnail pixels of a slide with tissue or cells
#: (:func:`_has_signal`): noise gives about 0, real slides 0.5 and more.
MIN_CORRELATION = 0.2

_IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


def _channels_last(thumbnail: np.ndarray) -> np.ndarray:
    """(h, w) or (h, w, C) -> (h, w, C) float64, NaN as 0."""
    img = np.asarray(thumbnail)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or min(img.shape[:2]) == 0:
        raise ValueError(f"expected an (h, w) or (h, w, C) thumbnail, got shape {img.shape}")
    return np.nan_to_num(img.astype(np.float64))


def detect_kind(thumbnail: np.ndarray) -> Literal["brightfield", "fluorescence"]:
    """Brightfield when the background is bright, else fluorescence.

    The background is taken to be the majority of a slide's pixels, so the median pixel
    brightness (mean over the channels) is compared with the middle of the image's
    range (its 0.5th to 99.5th percentiles): a brightfield slide's glass and most of its
    tissue transmit light and sit above the middle; a fluorescence slide's background is
    dark and sits below it. Works on any dtype and bit depth (no full scale assumed).
    """
    grey = _channels_last(thumbnail)[:, :, :3].mean(axis=2)
    lo, hi = np.percentile(grey, [0.5, 99.5])
    return "brightfield" if np.median(grey) > 0.5 * (lo + hi) else "fluorescence"


def _brightfield_score(img: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Optical density of the most absorbing of the first three channels.

    The incident light ``I0`` is the full scale of 8-bit images (255), else the image's
    maximum; ``OD = log10((I0 + e) / (I + e))`` with ``e = I0 / 255`` (the +1 of 8-bit
    data) so that black pixels stay finite.
    """
    rgb = img[:, :, :3]
    i0 = 255.0 if dtype == np.uint8 else max(float(rgb.max()), np.finfo(np.float64).tiny)
    eps = i0 / 255.0
    od = np.log10((i0 + eps) / (np.clip(rgb, 0, i0) + eps))
    return od.max(axis=2)


def _fluorescence_score(img: np.ndarray) -> np.ndarray:
    """Brightest channel after scaling each channel's range (minimum to 99.9th
    percentile) to [0, 1], so that a dim channel counts as much as a bright one."""
    lo = img.min(axis=(0, 1))
    hi = np.percentile(img, 99.9, axis=(0, 1))
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.clip((img - lo) / span, 0, 1).max(axis=2)


def _threshold(score: np.ndarray) -> float:
    """Halfway between the median of the background class and Otsu's threshold: lower
    than Otsu, so the dim edges of the bright class (dim cells, pale tissue) stay in."""
    otsu = float(threshold_otsu(score))
    background = float(np.median(score[score <= otsu]))
    return 0.5 * (otsu + background)


def _has_signal(score: np.ndarray) -> bool:
    """Whether ``score`` shows structure rather than noise: the correlation of
    neighbouring pixels (along y and x, averaged) is at least :data:`MIN_CORRELATION`.

    A thumbnail pixel averages many slide pixels, so camera noise and grain on blank,
    black or noisy glass leave neighbours uncorrelated (about 0), whatever the noise's
    level or quantisation; tissue, and cells on glass, make neighbours alike (0.5 and
    more). A constant thumbnail has no structure either.
    """
    if score.min() == score.max() or min(score.shape) < 2:
        return False
    rho = []
    for a, b in ((score[1:], score[:-1]), (score[:, 1:], score[:, :-1])):
        a, b = a - a.mean(), b - b.mean()
        denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
        rho.append(float((a * b).sum()) / denom if denom > 0 else 0.0)
    return float(np.mean(rho)) >= MIN_CORRELATION


def _remove_small(mask: np.ndarray, min_size: int, structure: np.ndarray) -> np.ndarray:
    """``mask`` without the connected components of fewer than ``min_size`` pixels."""
    labels, n = ndi.label(mask, structure=structure)
    if n == 0:
        return mask
    keep = np.bincount(labels.ravel()) >= min_size
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_hole: int) -> np.ndarray:
    """``mask`` with holes (background components not touching the border) of at most
    ``max_hole`` pixels filled."""
    holes, n = ndi.label(~mask)  # 4-connected background, the dual of 8-connected tissue
    if n == 0:
        return mask
    fill = np.bincount(holes.ravel()) <= max_hole
    border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    fill[border] = False
    fill[0] = False
    return mask | fill[holes]


def tissue_mask(
    thumbnail: np.ndarray,
    kind: Kind = "auto",
    *,
    min_size: int = 4,
    max_hole: int = 64,
    margin: float = 2.0,
) -> np.ndarray:
    """Where a low-resolution image of a slide shows tissue (or cells).

    1. A per-pixel score: brightfield, the optical density of the most absorbing
       channel (:func:`_brightfield_score`); fluorescence, the brightest channel after
       scaling each channel to its own range (:func:`_fluorescence_score`).
    2. Threshold: halfway between the background's median score and Otsu's threshold
       (below Otsu, to keep dim cells and pale tissue); for brightfield at most
       :data:`OD_CAP` and at least :data:`MIN_OD_STEP` above the glass. A thumbnail with
       no structure (:func:`_has_signal`: one constant value, blank or black glass,
       camera noise) has no tissue.
    3. Components (8-connected) under ``min_size`` pixels are removed as specks (dust,
       noise), holes of up to ``max_hole`` pixels are filled, and the mask is dilated by
       ``margin`` pixels (Euclidean) so that cells at the tissue edge stay inside.

    Parameters
    ----------
    thumbnail : ndarray, (h, w) or (h, w, C), any real dtype
        A low-resolution image of the whole slide (a coarse pyramid level). Brightfield
        uses the first three channels (alpha ignored), fluorescence all of them.
    kind : {"auto", "brightfield", "fluorescence"}
        "auto" decides with :func:`detect_kind` (bright background: brightfield).
    min_size, max_hole : int
        Smallest tissue component kept and largest hole filled, in thumbnail pixels.
    margin : float
        Dilation radius in thumbnail pixels. Choose it from the thumbnail's pixel size:
        at least one cell diameter plus a pixel.

    Returns
    -------
    ndarray, (h, w) bool
        True on tissue.
    """
    if kind not in ("auto", "brightfield", "fluorescence"):
        raise ValueError(f"unknown tissue kind {kind!r}; choose auto, brightfield or fluorescence")
    img = _channels_last(thumbnail)
    if kind == "auto":
        kind = detect_kind(img)
    if kind == "brightfield":
        score = _brightfield_score(img, np.asarray(thumbnail).dtype)
    else:
        score = _fluorescence_score(img)
    if not _has_signal(score):
        return np.zeros(score.shape, bool)  # blank, black or noisy glass: no window to run
    threshold = _threshold(score)
    if kind == "brightfield":
        threshold = max(
            min(threshold, OD_CAP),
            float(np.median(score[score <= threshold_otsu(score)])) + MIN_OD_STEP,
        )
    mask = score > threshold
    mask = _remove_small(mask, min_size, np.ones((3, 3), bool))
    mask = _fill_small_holes(mask, max_hole)
    if margin > 0 and mask.any():
        mask = ndi.distance_transform_edt(~mask) <= margin
    return mask


def _downsample_pair(mask_downsample: float | Sequence[float]) -> tuple[float, float]:
    if np.isscalar(mask_downsample):
        return float(mask_downsample), float(mask_downsample)  # type: ignore[arg-type]
    dy, dx = (float(v) for v in mask_downsample)  # type: ignore[union-attr]
    return dy, dx


def window_touches_tissue(
    mask: np.ndarray,
    mask_downsample: float | Sequence[float],
    y0: int,
    y1: int,
    x0: int,
    x1: int,
) -> bool:
    """Whether the window ``[y0:y1, x0:x1]`` of the processing image touches tissue.

    Parameters
    ----------
    mask : ndarray, (h, w) bool
        Tissue mask; mask pixel ``(m, n)`` covers processing pixels
        ``[m * dy, (m + 1) * dy) x [n * dx, (n + 1) * dx)``.
    mask_downsample : float or (dy, dx)
        Processing pixels per mask pixel (processing shape / mask shape).
    y0, y1, x0, x1 : int
        Half-open window in processing pixels; parts outside the image are ignored.

    Returns
    -------
    bool
        True when any mask pixel whose footprint overlaps the window is tissue (a hair
        of slack against float rounding): never False for a window that overlaps a
        tissue pixel of the mask brought to full resolution.

    Examples
    --------
    A 4 x 4 mask of a 64 x 64 image (16 px per mask pixel), tissue in one mask pixel:

    >>> import numpy as np
    >>> mask = np.zeros((4, 4), bool)
    >>> mask[1, 2] = True
    >>> window_touches_tissue(mask, 16, 16, 32, 32, 48)
    True
    >>> window_touches_tissue(mask, 16, 48, 64, 0, 16)
    False
    """
    dy, dx = _downsample_pair(mask_downsample)
    h, w = mask.shape
    eps = 1e-9  # footprints are compared in floats; widen, never narrow
    m0, m1 = max(int(np.floor(y0 / dy - eps)), 0), min(int(np.ceil(y1 / dy + eps)), h)
    n0, n1 = max(int(np.floor(x0 / dx - eps)), 0), min(int(np.ceil(x1 / dx + eps)), w)
    return bool(m0 < m1 and n0 < n1 and mask[m0:m1, n0:n1].any())


def tissue_skip(
    mask: np.ndarray, image_shape: tuple[int, int]
) -> Callable[[int, int, int, int], bool]:
    """``skip(y0, y1, x0, x1)`` for :func:`mediar_ray.inference.predict_partial`: True for
    windows that touch no tissue. ``mask`` is stretched over the whole processing image
    of ``image_shape`` (downsample = image shape / mask shape along each axis)."""
    mask = np.asarray(mask, bool)
    ds = (image_shape[0] / mask.shape[0], image_shape[1] / mask.shape[1])

    def skip(y0: int, y1: int, x0: int, x1: int) -> bool:
        return not window_touches_tissue(mask, ds, y0, y1, x0, x1)

    return skip


def _any_resize_axis(mask: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Output pixel i along ``axis`` is True when any input pixel overlapping its
    footprint ``[i * n / n_out, (i + 1) * n / n_out)`` is (exact integer arithmetic)."""
    n = mask.shape[axis]
    i = np.arange(n_out, dtype=np.int64)
    lo, hi = (i * n) // n_out, -((-(i + 1) * n) // n_out)
    counts = np.cumsum(mask, axis=axis, dtype=np.int64)
    counts = np.concatenate([np.zeros_like(np.take(counts, [0], axis=axis)), counts], axis=axis)
    return (np.take(counts, hi, axis=axis) - np.take(counts, lo, axis=axis)) > 0


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask on another grid covering the same extent, erring towards True.

    Each output pixel is True when any input pixel its footprint overlaps is: max
    pooling when shrinking, nearest neighbour (plus the neighbour across a footprint
    that straddles two input pixels) when enlarging.

    Parameters
    ----------
    mask : ndarray, (h, w) bool
    shape : (H, W)

    Returns
    -------
    ndarray, (H, W) bool

    Examples
    --------
    >>> import numpy as np
    >>> mask = np.zeros((4, 4), bool)
    >>> mask[1, 2] = True
    >>> resize_mask(mask, (2, 2)).tolist()
    [[False, True], [False, False]]
    """
    out = _any_resize_axis(np.asarray(mask, bool), int(shape[0]), 0)
    return _any_resize_axis(out, int(shape[1]), 1)


def _as_bool(values: np.ndarray) -> np.ndarray:
    """Bool as is; integers non-zero (0/1, 0/255); floats above one half (0/1
    probabilities)."""
    if values.dtype == bool:
        return values
    if np.issubdtype(values.dtype, np.floating):
        return values > 0.5
    return values != 0


def _zarr_mask(url: str, shape: tuple[int, int]) -> np.ndarray:
    """A 2-D array from a zarr array or an NGFF image group: the coarsest level that is
    still at least ``shape`` (else level 0); leading singleton axes dropped; a leading
    channel axis reduced with any."""
    import zarr

    node = zarr.open(url, mode="r")
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        multiscales = attrs.get("ome", attrs).get("multiscales")
        paths = [d["path"] for d in multiscales[0]["datasets"]] if multiscales else ["0"]
        arrays = [node[p] for p in paths]
        big = [a for a in arrays if a.shape[-2] >= shape[0] and a.shape[-1] >= shape[1]]
        node = big[-1] if big else arrays[0]
    data = np.asarray(node[...])
    while data.ndim > 2 and data.shape[0] == 1:
        data = data[0]
    if data.ndim == 3:
        return _as_bool(data).any(axis=0)
    return _as_bool(data)


def load_mask(url: str, shape: tuple[int, int]) -> np.ndarray:
    """A user's tissue mask (``--tissue MASK_URL``) on the mask grid.

    Parameters
    ----------
    url : str
        Local path or fsspec URL: a PNG/TIFF/JPEG/BMP image ((h, w) or (h, w, C); alpha
        dropped, any channel counts), or a zarr array or NGFF image group ((..., y, x);
        leading singleton axes dropped, a channel axis reduced with any). Any resolution;
        the image is assumed to span the whole slide. Tissue: True, non-zero integers
        (0/255 images), floats above 0.5.
    shape : (h, w)
        The mask grid (e.g. the shape of the tissue thumbnail).

    Returns
    -------
    ndarray, (h, w) bool
        Resized with :func:`resize_mask` (conservative: any overlapped tissue pixel).

    Raises
    ------
    ValueError
        The mask cannot be read or is not a 2-D image (the message names the file).
    """
    from mediar_ray.io import ImageReadError, read_image, safe_url

    name = PurePosixPath(str(url).rstrip("/")).name.lower()
    try:
        if name.endswith(_IMAGE_SUFFIXES):
            data = read_image(url)
            mask = _as_bool(data).any(axis=2) if data.ndim == 3 else _as_bool(data)
        else:
            mask = _zarr_mask(url, shape)
    except ImageReadError as err:
        raise ValueError(
            f"tissue mask {err}; give a PNG/TIFF image or a zarr array (non-zero = tissue)"
        ) from None
    except Exception as err:
        raise ValueError(
            f"{safe_url(url)}: cannot read the tissue mask ({type(err).__name__}: "
            f"{err}); give a PNG/TIFF image or a zarr array (non-zero = tissue)"
        ) from None
    if mask.ndim != 2:
        raise ValueError(
            f"{safe_url(url)}: the tissue mask has shape {mask.shape}; expected a 2-D image (y, x)"
        )
    check_aspect(mask.shape, shape, url)
    return resize_mask(mask, shape)


#: Largest relative difference between a mask's aspect ratio and the slide's (beyond the
#: rounding of one pixel of either): a mask that differs more is of another slide.
ASPECT_TOLERANCE = 0.05


def check_aspect(mask_shape: tuple[int, int], shape: tuple[int, int], url: str = "") -> None:
    """Raise ValueError when a mask of ``mask_shape`` cannot span a slide whose mask grid
    is ``shape`` (aspect ratios, height / width, differ by more than
    :data:`ASPECT_TOLERANCE` plus a pixel's rounding): it would be stretched."""
    from mediar_ray.io import safe_url

    (mh, mw), (h, w) = mask_shape, shape
    a, b = mh / mw, h / w
    slack = ASPECT_TOLERANCE + 1.0 / min(mh, mw) + 1.0 / min(h, w)
    if abs(a / b - 1.0) > slack:
        raise ValueError(
            f"{safe_url(url)}: the tissue mask is {mh} x {mw} px (aspect {a:.3g}) but the "
            f"slide's grid is {h} x {w} (aspect {b:.3g}): it would be stretched; give a mask "
            "of the whole slide"
        )
