"""Processing resolution: pixel sizes, pyramid level choice and tile-exact resampling.

A slide is processed at one resolution: a pyramid level plus a resampling factor
``scale`` (processing pixel size / level pixel size). The *processing image* is the
level resampled by ``scale``; the engine tiles it like any other image.

Pixel grid convention: pixel ``j`` of an image covers ``[j, j + 1)`` along each axis, and
processing pixel ``i`` covers level pixels ``[i * scale, (i + 1) * scale)``. Downsampling
(``scale > 1``) averages the level pixels under that footprint, each weighted by the
length it overlaps (a box filter with fractional edges); upsampling (``scale < 1``)
interpolates bilinearly at the footprint's centre ``(i + 0.5) * scale - 0.5``, clamped
at the borders. Weights depend only on the absolute output index and every output
pixel is summed over the same source pixels in the same order, with element-wise
arithmetic only (no BLAS reductions whose order depends on array shapes), so any tiling
of the processing image gives bit-identical pixels to one read of the whole image.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import PurePosixPath
from typing import Sequence

import fsspec
import numpy as np

from mediar_ray.sources.base import Level, SlideSource

__all__ = [
    "check_processing_size",
    "choose_level",
    "level_mpp",
    "level_problem",
    "load_mpp_table",
    "lookup_mpp",
    "match_mpp_rows",
    "processing_shape",
    "usable_levels",
    "processing_transform",
    "read_resampled",
    "slide_mpp",
    "thumbnail_level",
]

#: Relative slack when comparing pixel sizes: scanners round their metadata and real
#: pyramids have downsamples such as 4.0013, which should not force a resampling pass.
MPP_TOLERANCE = 0.01

#: What to tell a user whose slide has no pixel size (the engine's option names).
MPP_FIX = (
    "pass --mpp UM_PER_PIXEL for all slides, or a per-slide CSV with columns slide,mpp (--mpp-csv)"
)


def _safe(url: str) -> str:
    from mediar_ray.io import safe_url

    return safe_url(url)


def _as_pair(mpp: float | Sequence[float]) -> tuple[float, float]:
    pair = (float(mpp), float(mpp)) if np.isscalar(mpp) else tuple(float(v) for v in mpp)
    if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
        raise ValueError(f"a pixel size must be one or two positive numbers (um), got {mpp!r}")
    return pair  # type: ignore[return-value]


def level_mpp(mpp0: float | Sequence[float], level: Level) -> float:
    """Pixel size of ``level`` in micrometres: level 0's (y, x) pixel size times the
    level's downsample, averaged over y and x (processing pixels are square; real
    pyramids differ between axes only by rounding of the level shapes)."""
    my, mx = _as_pair(mpp0)
    dy, dx = level.downsample
    return 0.5 * (my * dy + mx * dx)


def choose_level(
    levels: Sequence[Level],
    mpp0: float | Sequence[float] | None,
    target_mpp: float | None,
    *,
    slide: str = "",
    tolerance: float = MPP_TOLERANCE,
) -> tuple[int, float]:
    """The pyramid level to read and the resampling factor that brings it to the target.

    Parameters
    ----------
    levels : sequence of Level
        The slide's levels, level 0 first (:attr:`SlideSource.levels`).
    mpp0 : float, (y, x) floats or None
        Level 0's pixel size in micrometres (None: unknown).
    target_mpp : float or None
        Wanted processing pixel size in micrometres; None keeps level 0 as it is.
    slide : str
        The slide's URL, named in errors.
    tolerance : float
        Relative slack: a level up to ``1 + tolerance`` times coarser than the target
        still counts as not coarser, and a remaining factor within ``tolerance`` of 1 is
        taken as exactly 1 (no resampling).

    Returns
    -------
    level : int
        The coarsest usable level (:func:`usable_levels`) whose pixel size is not coarser
        than the target (level 0 when the target is finer than level 0).
    scale : float
        Processing pixel size / that level's pixel size: 1.0 (read the level as it is),
        > 1 (area downsampling) or < 1 (bilinear upsampling, only below level 0).

    Raises
    ------
    ValueError
        A target is asked and the pixel size is unknown (the message names the slide and
        the fix), or the target is not a positive number.
    """
    if target_mpp is None:
        return 0, 1.0
    target = float(target_mpp)
    if not (math.isfinite(target) and target > 0):
        raise ValueError(
            f"the target pixel size must be a positive number of um, got {target_mpp!r}"
        )
    if mpp0 is None:
        raise ValueError(
            f"{_safe(slide) or 'slide'}: its pixel size is unknown (no pixel size "
            f"in the file's metadata), so --target-mpp {target:g} cannot be "
            f"applied; {MPP_FIX}"
        )
    pair = _as_pair(mpp0)
    usable = usable_levels(
        levels, square=abs(pair[0] - pair[1]) <= tolerance * max(pair), slide=slide
    )
    sizes = [level_mpp(mpp0, lv) for lv in levels]
    fine_enough = [
        k for k, size in enumerate(sizes) if k in usable and size <= target * (1 + tolerance)
    ]
    level = max(fine_enough, key=lambda k: sizes[k]) if fine_enough else 0
    scale = target / sizes[level]
    return level, 1.0 if abs(scale - 1.0) <= tolerance else scale


def level_problem(level0: Level, level: Level, *, square: bool = True) -> str | None:
    """Why a pyramid level cannot stand for level 0 resampled, or None if it can.

    A level must cover level 0's extent within one of its own pixels on each axis, be no
    finer than level 0, and, when level 0's pixels are square (``square``), have one
    downsample factor for both axes up to the rounding of its shape (a level whose
    shape is not level 0's scaled down shows another region, or is corrupt).
    """
    (h0, w0), (h, w) = level0.shape, level.shape
    dy, dx = level.downsample
    if not (math.isfinite(dy) and math.isfinite(dx) and dy >= 1 - 1e-9 and dx >= 1 - 1e-9):
        return f"downsample {dy:g} x {dx:g} is finer than level 0"
    if abs(h * dy - h0) > dy + 1e-6 or abs(w * dx - w0) > dx + 1e-6:
        return (
            f"{h} x {w} px at downsample {dy:g} x {dx:g} covers "
            f"{h * dy:.0f} x {w * dx:.0f} level-0 px, not level 0's {h0} x {w0}"
        )
    # Shapes are whole pixels: each axis's factor may differ from the other's by the
    # rounding of one pixel on either.
    slack = max(dy, dx) * (1.0 / h + 1.0 / w) + MPP_TOLERANCE * max(dy, dx)
    if square and abs(dy - dx) > slack:
        return (
            f"downsample {dy:g} x {dx:g} differs between the axes: non-square pixels, "
            "or another region than level 0"
        )
    return None


def usable_levels(levels: Sequence[Level], *, square: bool = True, slide: str = "") -> list[int]:
    """Indices of the levels that may stand for level 0 resampled (:func:`level_problem`);
    level 0 always. The others are logged and never read."""
    import logging

    usable = [0]
    for k, level in enumerate(levels[1:], start=1):
        problem = level_problem(levels[0], level, square=square)
        if problem is None:
            usable.append(k)
        else:
            logging.getLogger("mediar_ray.slides").warning(
                "%s: pyramid level %d not used (%s); a finer level is resampled instead",
                _safe(slide) or "slide",
                k,
                problem,
            )
    return usable


#: Largest processing image, as a multiple of level 0's area: resampling a slide to 8x
#: its resolution per side is beyond any optics; more is a mistyped --target-mpp.
MAX_UPSAMPLED_AREA = 64


def check_processing_size(
    level0: Level,
    shape: tuple[int, int],
    *,
    target_mpp: float | None,
    mpp0: float | Sequence[float] | None,
    slide: str = "",
) -> None:
    """Raise ValueError when the processing image ``shape`` (px) exceeds
    :data:`MAX_UPSAMPLED_AREA` times level 0's area; the message names --target-mpp,
    the size it would have and the slide's own pixel size."""
    h0, w0 = level0.shape
    ratio = shape[0] * shape[1] / max(1, h0 * w0)
    if ratio <= MAX_UPSAMPLED_AREA:
        return
    own = (
        f" (its level 0: {level_mpp(mpp0, Level(level0.shape, (1.0, 1.0))):.3g} um)"
        if mpp0 is not None
        else ""
    )
    raise ValueError(
        f"{_safe(slide) or 'slide'}: --target-mpp {target_mpp:g} would make a processing "
        f"image of {shape[0]:,} x {shape[1]:,} px, {ratio:,.0f} times level 0's area "
        f"{h0:,} x {w0:,} (at most {MAX_UPSAMPLED_AREA}){own}; give a pixel size nearer "
        "the slide's own"
    )


def match_mpp_rows(
    table: dict[str, float], urls: Sequence[str]
) -> tuple[dict[str, float | None], list[str]]:
    """Each input's pixel size from a ``--mpp-csv`` table, and the rows no input uses.

    A slide may match several rows (``nompp`` and ``nompp.tif``); when they disagree
    there is no right answer, so ValueError names the slide and the rows.

    Returns
    -------
    found : dict
        URL -> pixel size (um) or None (no row: the file's own metadata is used).
    unmatched : list of str
        Row keys that match no input, in table order.
    """
    found: dict[str, float | None] = {}
    used: set[str] = set()
    for url in urls:
        keys = [k for k in _candidates(url) if k in table]
        values = {table[k] for k in keys}
        if len(values) > 1:
            rows = ", ".join(f"{k},{table[k]:g}" for k in keys)
            raise ValueError(
                f"rows {rows} all match {_safe(url)} with different pixel sizes; keep one"
            )
        used.update(keys)
        found[url] = table[keys[0]] if keys else None
    return found, [k for k in table if k not in used]


def thumbnail_level(
    levels: Sequence[Level], level: int, scale: float, downsample: float = 16.0
) -> tuple[int, float]:
    """Where to read a thumbnail of the processing image with ``downsample`` processing
    pixels per thumbnail pixel (e.g. for :func:`mediar_ray.tissue.tissue_mask`).

    Returns (k, s): the coarsest level not coarser than the thumbnail (same tolerance
    as :func:`choose_level`) and the factor to resample it by. The thumbnail is
    ``read_resampled(source, k, s, 0, th, 0, tw)`` with ``(th, tw) =
    processing_shape(levels[k].shape, s)``, about the processing shape / ``downsample``.
    """
    # Level-0 pixels per thumbnail pixel; a level's "pixel size" in level-0 pixels.
    want = downsample * scale * float(np.mean(levels[level].downsample))
    return choose_level(levels, 1.0, want)


def processing_shape(level_shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """(height, width) of the processing image: a level of ``level_shape`` resampled by
    ``scale``, rounded up so that no level pixel is left out (the last row or column
    may cover only part of a footprint; it averages what it covers)."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    # 1e-9: a ratio that is an integer but for float noise must not gain an empty row.
    h, w = (max(math.ceil(n / scale - 1e-9), 1) for n in level_shape)
    return h, w


def processing_transform(
    mpp0: float | Sequence[float], level: Level, scale: float
) -> dict[str, list[float]]:
    """NGFF ``scale`` and ``translation`` (micrometres, (y, x)) of the processing image.

    Processing pixel ``i`` covers level-0 pixels ``[i * s * d, (i + 1) * s * d)`` (s the
    scale, d the level's downsample), so its centre lies at ``i * s * d * mpp0 +
    (s * d - 1) * mpp0 / 2`` micrometres from level 0's first pixel centre. A label
    pyramid made by taking every 2**k-th pixel keeps this translation and multiplies the
    scale by 2**k.
    """
    my, mx = _as_pair(mpp0)
    dy, dx = level.downsample
    return {
        "scale": [my * dy * scale, mx * dx * scale],
        "translation": [0.5 * (dy * scale - 1) * my, 0.5 * (dx * scale - 1) * mx],
    }


def _axis_weights(o0: int, o1: int, n_src: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights of outputs ``o0 .. o1 - 1`` along one axis.

    Returns (n, K) int64 indices into ``[0, n_src)`` and (n, K) float64 weights (row sums
    1 up to rounding; an unused slot has weight 0 and repeats the row's first index).
    Computed from the absolute output index alone, so a tile gets the same numbers as
    the whole image.
    """
    i = np.arange(o0, o1, dtype=np.float64)[:, None]
    if scale > 1:  # box filter: overlap of [a, a + 1) with [i * s, (i + 1) * s)
        lo, hi = i * scale, np.minimum((i + 1) * scale, n_src)
        taps = math.ceil(scale) + 1
        a = np.floor(lo) + np.arange(taps)
        weights = np.clip(np.minimum(a + 1, hi) - np.maximum(a, lo), 0, None) / (hi - lo)
    else:  # bilinear at the footprint centre
        c = (i + 0.5) * scale - 0.5
        a = np.floor(c) + np.arange(2)
        t = c - a[:, :1]
        weights = np.concatenate([1 - t, t], axis=1)
    idx = np.clip(a, 0, n_src - 1).astype(np.int64)
    idx = np.where(weights > 0, idx, idx[:, :1])
    return idx, weights


def _work_dtype(dtype: np.dtype) -> type:
    """float32 is exact enough for <= 16-bit integers and float32 pixels; else float64."""
    small = dtype.itemsize <= 2 or dtype == np.float32
    return np.float32 if small and dtype.kind in "uif" else np.float64


def _to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def read_resampled(
    source: SlideSource, level: int, scale: float, y0: int, y1: int, x0: int, x1: int
) -> np.ndarray:
    """Pixels ``[y0:y1, x0:x1]`` of the processing image (``level`` resampled by ``scale``).

    Parameters
    ----------
    source : SlideSource
        The open slide; only the level pixels under the region's footprints are read
        (one :meth:`SlideSource.read_region` call).
    level : int
        Pyramid level to read.
    scale : float
        Processing pixel size / level pixel size (see :func:`choose_level`); 1.0 reads
        the level unchanged.
    y0, y1, x0, x1 : int
        Half-open region of the processing image, inside
        ``processing_shape(source.levels[level].shape, scale)``.

    Returns
    -------
    ndarray
        (y1 - y0, x1 - x0) or (y1 - y0, x1 - x0, C), in the source's dtype (integers
        rounded half to even). Bit-identical to the same pixels of a read of the whole
        processing image.
    """
    lh, lw = source.levels[level].shape
    ph, pw = processing_shape((lh, lw), scale)
    if not (0 <= y0 < y1 <= ph and 0 <= x0 < x1 <= pw):
        raise ValueError(
            f"region {(y0, y1, x0, x1)} is empty or outside the processing "
            f"image of shape {(ph, pw)}"
        )
    if scale == 1.0:
        return source.read_region(level, y0, y1, x0, x1)
    iy, wy = _axis_weights(y0, y1, lh, scale)
    ix, wx = _axis_weights(x0, x1, lw, scale)
    ry0, rx0 = int(iy.min()), int(ix.min())
    src = source.read_region(level, ry0, int(iy.max()) + 1, rx0, int(ix.max()) + 1)
    iy, ix = iy - ry0, ix - rx0
    work = _work_dtype(np.dtype(src.dtype))
    wy, wx = wy.astype(work), wx.astype(work)
    chans = (None,) * (src.ndim - 2)  # broadcast weights over a channel axis
    # Separable: rows first, then columns; each sum runs over the taps in a fixed order.
    rows = np.zeros((y1 - y0,) + src.shape[1:], work)
    for k in range(iy.shape[1]):
        rows += wy[(slice(None), k, None) + chans] * src[iy[:, k]]
    out = np.zeros((y1 - y0, x1 - x0) + src.shape[2:], work)
    for k in range(ix.shape[1]):
        out += wx[(None, slice(None), k) + chans] * rows[:, ix[:, k]]
    return _to_dtype(out, np.dtype(src.dtype))


def _candidates(url: str) -> list[str]:
    """Keys a table row may use for ``url``: the full URL (as given and without
    credentials), the file name, the name less its last extension, and the name up to
    its first '.'."""
    full = str(url).rstrip("/")
    name = PurePosixPath(full).name
    keys = [str(url), full, _safe(full), name, name.rsplit(".", 1)[0], name.split(".")[0]]
    return list(dict.fromkeys(keys))


def load_mpp_table(url: str) -> dict[str, float]:
    """Per-slide pixel sizes from a CSV with columns ``slide,mpp``.

    Parameters
    ----------
    url : str
        Local path or fsspec URL of the CSV. An optional header row ``slide,mpp``; blank
        lines and lines starting with '#' are ignored. ``slide`` is a slide's full URL,
        its file name, or its name without extension (see :func:`lookup_mpp`); ``mpp``
        is micrometres per pixel at level 0.

    Returns
    -------
    dict
        slide key -> pixel size (um, float > 0).

    Raises
    ------
    ValueError
        The file is missing or unreadable, or a row is malformed, repeats a slide or has
        a pixel size that is not a positive number (the message names file and line).
    """
    where = _safe(url)
    try:
        with fsspec.open(url, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"{where}: pixel-size table not found") from None
    except Exception as err:
        raise ValueError(
            f"{where}: cannot read the pixel-size table ({type(err).__name__}: {err})"
        ) from None
    table: dict[str, float] = {}
    for line, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if not table and [c.lower() for c in cells] == ["slide", "mpp"]:
            continue
        if len(cells) != 2 or not cells[0]:
            raise ValueError(f"{where}, line {line}: expected two columns 'slide,mpp', got {row!r}")
        try:
            mpp = float(cells[1])
        except ValueError:
            mpp = float("nan")
        if not (math.isfinite(mpp) and mpp > 0):
            raise ValueError(
                f"{where}, line {line}: pixel size {cells[1]!r} of {cells[0]!r} "
                "is not a positive number of micrometres"
            )
        if cells[0] in table:
            raise ValueError(f"{where}, line {line}: slide {cells[0]!r} is listed twice")
        table[cells[0]] = mpp
    return table


def lookup_mpp(table: dict[str, float], url: str) -> float | None:
    """The table's pixel size for ``url``: matched by full URL first, then file name,
    then the name less its last extension, then the name up to its first '.'; None when
    no row matches."""
    for key in _candidates(url):
        if key in table:
            return table[key]
    return None


def slide_mpp(
    source: SlideSource,
    url: str,
    mpp_override: float | None = None,
    table: dict[str, float] | None = None,
) -> tuple[float, float] | None:
    """The (y, x) pixel size in micrometres to use for a slide, or None when unknown.

    Precedence: ``mpp_override`` (``--mpp``, all slides) > the slide's row of ``table``
    (:func:`load_mpp_table`, matched on ``url``) > the file's own metadata
    (``source.mpp``) > None.
    """
    if mpp_override is not None:
        return _as_pair(mpp_override)
    from_table = lookup_mpp(table, url) if table else None
    if from_table is not None:
        return _as_pair(from_table)
    return _as_pair(source.mpp) if source.mpp is not None else None
