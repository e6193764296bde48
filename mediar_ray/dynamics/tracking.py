"""Gradient-flow tracking: where does each cell pixel end up when it follows the flows?

MEDIAR (like cellpose 2) moves every foreground pixel for 200 Euler steps along the
bilinearly interpolated flow field (flows / 5, so about one pixel per step). Pixels of one
cell converge to the same sink, where they then oscillate within about a pixel.

Here each pixel steps until it has converged, instead of always 200 steps: a pixel whose
position moved less than ``settle_px`` over the last ``settle_window`` steps is at its
sink (it would only oscillate there). That is what makes tracking fast: most pixels
settle after about a cell radius of steps. The result depends only on the flows within
``niter`` pixels of the start, so a tile with a wide enough halo gives the same ends as
the whole image.

Bit for bit the same: a pixel's position is kept as its integer start plus a float32
offset from it, not as one float32 coordinate. A float32 coordinate rounds differently at
y = 2927 (whole slide) than at y = 495 (the same pixel in a tile), and an end point a hair
from a histogram bin edge then lands in another bin; on the bundled SVS that moved two
pixels of one small cell and dropped it in the tile. With offsets every operation sees
the same numbers wherever the image starts.
"""

from __future__ import annotations

import numba as nb
import numpy as np

__all__ = ["follow_flows"]


@nb.njit(cache=True, inline="always")
def _bilinear(f, c, by, bx, oy, ox):
    """Flow channel ``c`` at (by + oy, bx + ox): integer base, float offset."""
    h, w = f.shape[1], f.shape[2]
    fy = np.floor(oy)
    fx = np.floor(ox)
    y0 = by + int(fy)
    x0 = bx + int(fx)
    ty = oy - fy
    tx = ox - fx
    v = 0.0
    for dy in range(2):
        yy = y0 + dy
        if yy < 0 or yy >= h:
            continue
        wy = ty if dy == 1 else 1.0 - ty
        for dx in range(2):
            xx = x0 + dx
            if xx < 0 or xx >= w:
                continue
            wx = tx if dx == 1 else 1.0 - tx
            v += wy * wx * f[c, yy, xx]
    return v


@nb.njit(cache=True, parallel=True)
def _follow(flow, ys, xs, niter, window, settle, out):
    h, w = flow.shape[1], flow.shape[2]
    settle2 = settle * settle
    for k in nb.prange(ys.shape[0]):
        by = ys[k]
        bx = xs[k]
        # offsets from the start pixel; the clamp to the image is exact in these terms
        y = np.float32(0.0)
        x = np.float32(0.0)
        lo_y, hi_y = np.float32(-by), np.float32(h - 1 - by)
        lo_x, hi_x = np.float32(-bx), np.float32(w - 1 - bx)
        hist_y = np.empty(window, np.float32)
        hist_x = np.empty(window, np.float32)
        for t in range(niter):
            slot = t % window
            if t >= window:
                dy = y - hist_y[slot]
                dx = x - hist_x[slot]
                if dy * dy + dx * dx < settle2:
                    break
            hist_y[slot] = y
            hist_x[slot] = x
            vy = np.float32(_bilinear(flow, 0, by, bx, y, x))
            vx = np.float32(_bilinear(flow, 1, by, bx, y, x))
            y = min(max(np.float32(y + vy), lo_y), hi_y)
            x = min(max(np.float32(x + vx), lo_x), hi_x)
        out[0, k] = by + np.float64(y)  # exact: a float32 offset fits a float64 sum
        out[1, k] = bx + np.float64(x)


def follow_flows(
    flow: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    niter: int = 200,
    settle_window: int = 10,
    settle_px: float = 1.0,
) -> np.ndarray:
    """End positions of pixels that follow a flow field.

    Parameters
    ----------
    flow : ndarray float32, (2, H, W)
        dy, dx in pixels per step (the network's flows / 5, zero off the foreground).
    ys, xs : ndarray of int, (N,)
        Start pixels.
    niter : int
        Maximum number of Euler steps.
    settle_window, settle_px : int, float
        A pixel stops once it moved less than ``settle_px`` pixels over the last
        ``settle_window`` steps.

    Returns
    -------
    ndarray float64, (2, N)
        End positions (y, x), clamped to the image: the start pixel plus a float32
        offset, summed exactly, so they do not depend on where the image starts.
    """
    out = np.empty((2, ys.shape[0]), np.float64)
    _follow(
        np.ascontiguousarray(flow, np.float32),
        np.asarray(ys, np.int32),
        np.asarray(xs, np.int32),
        int(niter),
        int(settle_window),
        float(settle_px),
        out,
    )
    return out
