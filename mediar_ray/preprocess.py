"""MEDIAR's prediction preprocessing, whole-image and tile by tile.

The original (``get_pred_transforms``) does, on the whole image:

1. make it (H, W, 3) float32: grey repeated to three channels, RGBA cut to RGB;
2. take the 0th and 99.5th percentiles of all non-zero values (all channels together),
   rescale that range to [0, 255] with clipping and truncate to uint8;
3. min-max scale the uint8 image to [0, 1] (MONAI ``ScaleIntensity``).

Every step after the statistics is pointwise, so a slide can be normalised tile by tile
once its :class:`IntensityStats` are known. For integer images the statistics are exact
when accumulated over tiles (:class:`IntensityAccumulator` keeps a histogram), so the tiled
result equals the whole-image one bit for bit.

Non-finite pixels: the original does not handle them (one NaN or one -inf pixel breaks
the normalisation of the whole image). Here a value of a float image that is NaN, +inf
or -inf once converted to float32 is *missing*: it is left out of every statistic (the
percentiles, the minimum and the maximum are those of the finite values only) and its
normalised value is 0, the value of background. The rule is per value: in a colour image
only the non-finite channel of a pixel is set to 0. :func:`normalize` and
:class:`IntensityAccumulator` apply it identically, so the tiled and whole-image results
stay equal. Integer images have no such values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.exposure import rescale_intensity

__all__ = [
    "IntensityAccumulator",
    "IntensityStats",
    "intensity_stats",
    "normalize",
    "to_rgb",
]

LOWER_PERCENTILE = 0.0
UPPER_PERCENTILE = 99.5


@dataclass(frozen=True)
class IntensityStats:
    """Whole-image statistics that normalisation needs.

    Attributes
    ----------
    lo, hi : float
        0th and 99.5th percentiles of the finite non-zero values (all channels), or NaN
        when the image has no such value.
    vmin, vmax : float
        Minimum and maximum of all finite values.
    non_finite : int
        How many values (pixels x channels, up to 3 channels) were NaN or infinite, and
        so left out of the statistics and normalised to 0.
    """

    lo: float
    hi: float
    vmin: float
    vmax: float
    non_finite: int = 0

    @property
    def blank(self) -> bool:
        """True when the image has no finite non-zero value (the original crashes on
        images without non-zero pixels)."""
        return bool(np.isnan(self.lo))


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) -> (H, W, 3) float32, as MEDIAR loads images.

    Grey is repeated to three channels, extra channels (alpha) are dropped, and a
    2-channel image gets a zero third channel.
    """
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] > 3:
        img = img[:, :, :3]
    elif img.ndim == 3 and img.shape[2] < 3:
        pad = np.zeros(img.shape[:2] + (3 - img.shape[2],), dtype=img.dtype)
        img = np.concatenate([img, pad], axis=2)
    elif img.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {img.shape}")
    return img.astype(np.float32, copy=False)


def _percentiles_from_counts(
    values: np.ndarray, counts: np.ndarray, q: tuple[float, ...]
) -> list[float]:
    """np.percentile(..., method="linear") of a multiset given as sorted values + counts.

    Uses numpy's own virtual-index and interpolation formulas so the result is the same
    float as ``np.percentile`` on the expanded array.
    """
    n = int(counts.sum())
    ends = np.cumsum(counts)  # ends[i] = number of elements <= values[i]
    out = []
    for pct in q:
        frac = np.float64(pct) / 100.0
        virtual = (n - 1) * frac
        below = min(max(int(np.floor(virtual)), 0), n - 1)
        above = min(below + 1, n - 1)
        gamma = float(virtual - np.floor(virtual))
        a = float(values[np.searchsorted(ends, below, side="right")])
        b = float(values[np.searchsorted(ends, above, side="right")])
        diff = b - a
        out.append(b - diff * (1.0 - gamma) if gamma >= 0.5 else a + diff * gamma)
    return out


class IntensityAccumulator:
    """Accumulates :class:`IntensityStats` over tiles of one image.

    Integer images (after :func:`to_rgb` their values are still whole numbers) are
    counted in an exact histogram: the percentiles equal those of the whole image. Float
    images keep every ``float_subsample``-th non-zero value of each tile (a documented
    approximation: the percentiles of a regular subsample). Non-finite values of float
    images are counted, then left out (the rule of the module docstring).
    """

    def __init__(self, float_subsample: int = 1) -> None:
        self.float_subsample = max(int(float_subsample), 1)
        self._counts: np.ndarray | None = None
        self._floats: list[np.ndarray] = []
        self._vmin = np.inf
        self._vmax = -np.inf
        self._non_finite = 0

    def update(self, tile: np.ndarray) -> None:
        """Add a tile: (h, w) or (h, w, C) in the image's native dtype."""
        arr = np.asarray(tile)
        if arr.ndim == 3 and arr.shape[2] > 3:
            arr = arr[:, :, :3]
        if np.issubdtype(arr.dtype, np.floating):
            # float32 is the precision normalisation works in: a float64 value too large
            # for it is as missing as an inf.
            arr = arr.astype(np.float32, copy=False)
            finite = np.isfinite(arr)
            if not finite.all():
                self._non_finite += int(finite.size - np.count_nonzero(finite))
                arr = arr[finite]
        if arr.size == 0:
            return
        self._vmin = min(self._vmin, float(arr.min()))
        self._vmax = max(self._vmax, float(arr.max()))
        nonzero = arr[arr != 0]
        if (
            np.issubdtype(arr.dtype, np.integer)
            and arr.dtype.itemsize <= 2
            and nonzero.min(initial=0) >= 0
        ):
            counts = np.bincount(nonzero.ravel(), minlength=1 << (8 * arr.dtype.itemsize))
            self._counts = counts if self._counts is None else self._counts + counts
        else:
            self._floats.append(nonzero.ravel()[:: self.float_subsample].astype(np.float32))

    def merge(self, other: "IntensityAccumulator") -> None:
        """Add everything ``other`` has accumulated (tiles measured elsewhere)."""
        if other._counts is not None:
            self._counts = other._counts if self._counts is None else self._counts + other._counts
        self._floats.extend(other._floats)
        self._vmin = min(self._vmin, other._vmin)
        self._vmax = max(self._vmax, other._vmax)
        self._non_finite += other._non_finite

    def stats(self) -> IntensityStats:
        """The statistics of everything added so far."""
        values, counts = [], []
        if self._counts is not None:
            idx = np.flatnonzero(self._counts)
            values.append(idx.astype(np.float64))
            counts.append(self._counts[idx])
        if self._floats:
            uniq, cnt = np.unique(np.concatenate(self._floats), return_counts=True)
            values.append(uniq.astype(np.float64))
            counts.append(cnt)
        if not values or sum(int(c.sum()) for c in counts) == 0:
            return IntensityStats(np.nan, np.nan, self._vmin, self._vmax, self._non_finite)
        vals = np.concatenate(values)
        cnts = np.concatenate(counts)
        order = np.argsort(vals, kind="stable")
        lo, hi = _percentiles_from_counts(
            vals[order], cnts[order], (LOWER_PERCENTILE, UPPER_PERCENTILE)
        )
        return IntensityStats(lo, hi, self._vmin, self._vmax, self._non_finite)


def intensity_stats(image: np.ndarray) -> IntensityStats:
    """:class:`IntensityStats` of a whole image ((H, W) or (H, W, C), native dtype)."""
    acc = IntensityAccumulator()
    acc.update(image)
    return acc.stats()


def _to_uint8(values: np.ndarray, stats: IntensityStats) -> np.ndarray:
    """Percentile range -> [0, 255] with clipping, truncated to uint8 (skimage's rule)."""
    return rescale_intensity(values, in_range=(stats.lo, stats.hi), out_range="uint8").astype(
        np.uint8
    )


def normalize(image: np.ndarray, stats: IntensityStats | None = None) -> np.ndarray:
    """MEDIAR prediction preprocessing.

    Parameters
    ----------
    image : ndarray, (H, W) or (H, W, C), any real dtype
        The raw image (or a tile of it, with ``stats`` of the whole image).
    stats : IntensityStats, optional
        Whole-image statistics; computed from ``image`` when omitted.

    Returns
    -------
    ndarray, (3, H, W) float32 in [0, 1]
        All zeros for an image without any finite non-zero value. NaN and infinite
        values are 0 (background) and do not count in the statistics (module docstring).
    """
    rgb = to_rgb(image)
    stats = intensity_stats(image) if stats is None else stats
    if stats.blank:
        return np.zeros((3,) + rgb.shape[:2], dtype=np.float32)
    missing = ~np.isfinite(rgb) if np.issubdtype(np.asarray(image).dtype, np.floating) else None
    if missing is not None and missing.any():
        rgb = np.where(missing, np.float32(stats.vmin), rgb)  # any finite value; zeroed below
    else:
        missing = None
    u8 = _to_uint8(rgb, stats)
    # The min and max of the uint8 image follow from the raw min and max, because the
    # mapping above is monotonic; that is what makes tile-by-tile normalisation exact.
    lo8, hi8 = (float(v) for v in _to_uint8(np.array([stats.vmin, stats.vmax], np.float32), stats))
    chw = np.ascontiguousarray(u8.transpose(2, 0, 1)).astype(np.float32)
    if hi8 == lo8:
        return np.zeros_like(chw)
    out = (chw - np.float32(lo8)) / np.float32(hi8 - lo8)
    if missing is not None:
        out[missing.transpose(2, 0, 1)] = 0.0
    return out
