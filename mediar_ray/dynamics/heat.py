"""Labels -> flows by heat diffusion (cellpose-style), as MEDIAR computes its targets.

For every cell, heat is injected at the cell pixel nearest the median (y, x) of its
pixels and diffused inside the cell (3x3 mean over neighbours of the same cell, Jacobi
steps); the flow is the central-difference gradient of ``log(1 + T)``, normalised to unit
length. Cells never exchange heat, so each cell is computed independently (in parallel),
but, as in the original, the gradient at a cell's edge reads the heat of a touching
neighbour cell.
"""

from __future__ import annotations

import numba as nb
import numpy as np

__all__ = ["cell_pixels", "diffuse", "labels_to_flows", "renumber"]


def renumber(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Map the ids of ``labels`` to 1..N in increasing order of id (0 stays background).

    Parameters
    ----------
    labels : ndarray of int, (H, W)
        Any integer dtype, ids need not be consecutive (up to 2**32 - 1 and beyond).

    Returns
    -------
    (ndarray of int32 (H, W), int N)
    """
    lab = np.asarray(labels)
    if not np.issubdtype(lab.dtype, np.integer):
        raise TypeError(f"labels must be an integer array, got {lab.dtype}")
    if lab.size == 0:
        return np.zeros(lab.shape, np.int32), 0
    if lab.min() < 0:
        raise ValueError("labels must not be negative")
    top = int(lab.max())
    if top <= 4 * lab.size + 1024:
        # Small ids: a lookup table, O(pixels + max id), no sort.
        present = np.bincount(lab.ravel(), minlength=top + 1) > 0
        present[0] = False
        lut = np.cumsum(present, dtype=np.int64).astype(np.int32)
        lut[~present] = 0
        return lut[lab], int(present.sum())
    fg = lab != 0
    ids, inverse = np.unique(lab[fg], return_inverse=True)
    out = np.zeros(lab.shape, np.int32)
    out[fg] = inverse.astype(np.int32) + 1
    return out, int(ids.size)


@nb.njit(cache=True)
def _cell_pixels(lab: np.ndarray, n: int):
    """Raster-ordered pixel lists of cells 1..n: (start (n+1,), ys, xs)."""
    h, w = lab.shape
    counts = np.zeros(n + 1, np.int64)
    for y in range(h):
        for x in range(w):
            counts[lab[y, x]] += 1
    start = np.zeros(n + 1, np.int64)
    for c in range(1, n + 1):
        start[c] = start[c - 1] + counts[c]
    fill = start.copy()
    total = start[n]
    ys = np.empty(total, np.int32)
    xs = np.empty(total, np.int32)
    for y in range(h):
        for x in range(w):
            c = lab[y, x]
            if c > 0:
                ys[fill[c - 1]] = y
                xs[fill[c - 1]] = x
                fill[c - 1] += 1
    return start, ys, xs


def cell_pixels(lab: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels of cells 1..n of a consecutively numbered label image.

    Returns ``start`` (n + 1,) int64 and ``ys``, ``xs`` int32 such that cell ``c`` (1-based)
    owns ``ys[start[c-1]:start[c]]``, in raster order.
    """
    return _cell_pixels(np.ascontiguousarray(lab, dtype=np.int32), int(n))


@nb.njit(cache=True)
def _diffuse_cell(yy, xx, niter, T):
    """Diffuse one cell (pixels yy, xx in padded coordinates, raster order) into T."""
    n = yy.shape[0]
    ymed = np.median(yy.astype(np.float64))
    xmed = np.median(xx.astype(np.float64))
    centre = 0
    best = np.inf
    for k in range(n):
        d = (xx[k] - xmed) ** 2 + (yy[k] - ymed) ** 2
        if d < best:
            best = d
            centre = k
    # Local index map over the bounding box (+1 margin): pixel -> k, else n (a slot that
    # stays 0), so the 3x3 mean over same-cell neighbours needs no branches.
    y0, x0 = yy.min() - 1, xx.min() - 1
    bh, bw = yy.max() - y0 + 2, xx.max() - x0 + 2
    index = np.full((bh, bw), n, np.int32)
    for k in range(n):
        index[yy[k] - y0, xx[k] - x0] = k
    nbr = np.empty((n, 9), np.int32)
    for k in range(n):
        j = 0
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                nbr[k, j] = index[yy[k] - y0 + dy, xx[k] - x0 + dx]
                j += 1
    t = np.zeros(n + 1, np.float64)
    nxt = np.zeros(n + 1, np.float64)
    for _ in range(niter):
        t[centre] += 1.0
        for k in range(n):
            acc = 0.0
            for j in range(9):
                acc += t[nbr[k, j]]
            nxt[k] = acc / 9.0
        t, nxt = nxt, t
    for k in range(n):
        T[yy[k], xx[k]] = t[k]


@nb.njit(cache=True, parallel=True)
def _diffuse(start, ys, xs, niters, T):
    n = start.shape[0] - 1
    for c in nb.prange(n):
        s, e = start[c], start[c + 1]
        if e > s:
            _diffuse_cell(ys[s:e] + 1, xs[s:e] + 1, niters[c], T)


def diffuse(lab: np.ndarray, n: int, niters: np.ndarray, pixels: tuple | None = None) -> np.ndarray:
    """Heat of every cell after ``niters[c-1]`` diffusion steps.

    Parameters
    ----------
    lab : ndarray int32 (H, W)
        Consecutive ids 1..n.
    niters : ndarray int64 (n,)
        Steps per cell.

    Returns
    -------
    ndarray float64 (H + 2, W + 2)
        Heat ``T`` in coordinates padded by one pixel on each side (0 off cells).
    """
    start, ys, xs = cell_pixels(lab, n) if pixels is None else pixels
    T = np.zeros((lab.shape[0] + 2, lab.shape[1] + 2), np.float64)
    _diffuse(start, ys, xs, np.asarray(niters, np.int64), T)
    return T


@nb.njit(cache=True, parallel=True)
def _gradients(T, ys, xs, out):
    for k in nb.prange(ys.shape[0]):
        y, x = ys[k] + 1, xs[k] + 1
        dy = np.log1p(T[y + 1, x]) - np.log1p(T[y - 1, x])
        dx = np.log1p(T[y, x + 1]) - np.log1p(T[y, x - 1])
        norm = 1e-20 + np.sqrt(dy * dy + dx * dx)
        out[0, ys[k], xs[k]] = dy / norm
        out[1, ys[k], xs[k]] = dx / norm


def bbox_extents(start: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """(bbox height + 1) + (bbox width + 1) of each cell: (n,) int64."""
    n = start.shape[0] - 1
    if n == 0:
        return np.zeros(0, np.int64)
    idx = np.repeat(np.arange(n), np.diff(start))
    ext = np.zeros(n, np.int64)
    for coords in (ys, xs):
        lo = np.full(n, np.iinfo(np.int64).max)
        hi = np.full(n, -1)
        np.minimum.at(lo, idx, coords)
        np.maximum.at(hi, idx, coords)
        ext += hi - lo + 2
    return ext


def labels_to_flows(labels: np.ndarray, per_cell_niter: bool = False) -> np.ndarray:
    """Unit flows (dy, dx) of a label image, MEDIAR's training targets before the x5.

    Parameters
    ----------
    labels : ndarray of int, (H, W)
        0 = background; ids of any integer dtype, not necessarily consecutive.
    per_cell_niter : bool
        False (the original): every cell diffuses for 2 x the largest (bbox height + 1 +
        bbox width + 1) over all cells. True: each cell uses its own extent, so a cell's
        flows depend on that cell alone (used by the flow-error check, which must give
        the same answer on a tile as on the whole slide).

    Returns
    -------
    ndarray float32, (2, H, W)
        dy, dx unit vectors inside cells (pixels), 0 on background.
    """
    lab, n = renumber(labels)
    out = np.zeros((2,) + lab.shape, np.float32)
    if n == 0 or np.count_nonzero(lab) <= 1:  # the original returns zeros here too
        return out
    pixels = cell_pixels(lab, n)
    ext = bbox_extents(*pixels)
    niters = 2 * ext if per_cell_niter else np.full(n, 2 * ext.max(), np.int64)
    T = diffuse(lab, n, niters, pixels)
    _gradients(T, pixels[1], pixels[2], out)
    return out
