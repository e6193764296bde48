"""Cell outlines along pixel edges, for all cells of a label region at once (pure numpy).

A cell's outline is one polygon: an exterior ring and one ring per hole, along the edges
of its pixels, so that it covers exactly the cell's pixels. A label that a polygon could
not describe is first made one region, adding as few pixels as it takes: pieces that
touch only at a corner are bridged by one pixel, and pieces that do not touch are
joined to the largest by a one-pixel-wide corridor (QuPath cannot edit a MultiPolygon).
The rings then touch nowhere, so the polygon is valid (OGC simple features).

Edge coordinates: pixel (i, j) of the region spans rows i..i+1 and columns j..j+1; a
vertex (r, c) is a pixel corner. Rings are walked with the cell on the right when rows
point down: read as (x, y) = (c, r) with y up, the exterior is counter-clockwise and
holes are clockwise, as RFC 7946 asks of GeoJSON.

Tracing is vectorised over the region: every edge between a cell pixel and a different
neighbour is one directed edge; edges are chained into cycles by their end vertex
(unique per cell once no two pixels of the cell meet only at a corner) and ordered along
each cycle by pointer jumping; only the (rare) cells that need bridging are traced one
by one.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.measure import label as same_value_pieces

__all__ = ["outline", "outlines"]

_EIGHT = np.ones((3, 3), bool)
# Edge kinds: (which neighbour differs, start corner, end corner) relative to pixel (i, j).
# Top edges run east, right edges south, bottom edges west, left edges north.
_KINDS = (
    ((-1, 0), (0, 0), (0, 1)),
    ((0, 1), (0, 1), (1, 1)),
    ((1, 0), (1, 1), (1, 0)),
    ((0, -1), (1, 0), (0, 0)),
)


def _corridor(r0: int, c0: int, r1: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of a 4-connected digital line from (r0, c0) to (r1, c1)."""
    n = max(abs(r1 - r0), abs(c1 - c0)) + 1
    rows = np.rint(np.linspace(r0, r1, n)).astype(np.int64)
    cols = np.rint(np.linspace(c0, c1, n)).astype(np.int64)
    # Where the line steps diagonally, add the pixel that makes the step 4-connected.
    return np.r_[rows, rows[1:]], np.r_[cols, cols[:-1]]


def _join_pieces(mask: np.ndarray) -> np.ndarray:
    """Join every 8-connected piece to the largest by a corridor from its pixel nearest
    to it (nearest pieces first)."""
    pieces, n = ndimage.label(mask, structure=_EIGHT)
    while n > 1:
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        main = pieces == int(np.argmax(sizes))
        dist, (near_r, near_c) = ndimage.distance_transform_edt(~main, return_indices=True)
        r, c = np.unravel_index(np.argmin(np.where(mask & ~main, dist, np.inf)), mask.shape)
        rows, cols = _corridor(int(r), int(c), int(near_r[r, c]), int(near_c[r, c]))
        mask = mask.copy()
        mask[rows, cols] = True
        pieces, n = ndimage.label(mask, structure=_EIGHT)
    return mask


def _bridge_corners(mask: np.ndarray) -> np.ndarray:
    """Add one pixel wherever two pixels of ``mask`` meet only at a corner, until none do
    (then 4- and 8-connectivity agree, for the mask and for its complement)."""
    mask = mask.copy()
    while True:
        a, b, c, d = mask[:-1, :-1], mask[:-1, 1:], mask[1:, :-1], mask[1:, 1:]
        falling, rising = a & d & ~b & ~c, b & c & ~a & ~d
        if not (falling.any() or rising.any()):
            return mask
        mask[:-1, 1:] |= falling  # top-right pixel of the 2x2 block
        mask[:-1, :-1] |= rising  # top-left pixel


def _connected(mask: np.ndarray) -> np.ndarray:
    """``mask`` made one region without corner-only contacts; every pixel stays in."""
    return _bridge_corners(_join_pieces(mask))


def _needs_bridging(loc: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Boolean over local labels: cells (``keep``) with pixels that meet only at a
    corner, or in more than one 8-connected piece."""
    bad = np.zeros(keep.size, bool)
    a, b, c, d = loc[:-1, :-1], loc[:-1, 1:], loc[1:, :-1], loc[1:, 1:]
    bad[a[(a == d) & (b != a) & (c != a)]] = True
    bad[b[(b == c) & (a != b) & (d != b)]] = True
    pieces = same_value_pieces(loc, background=0, connectivity=2)
    owner = np.zeros(int(pieces.max()) + 1, np.int64)
    owner[pieces.ravel()] = loc.ravel()
    bad |= np.bincount(owner[1:], minlength=keep.size) > 1
    bad[0] = False
    return bad & keep


def _edges(loc: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, ...]:
    """Directed boundary edges of the cells ``keep`` of a local label image:
    (cell, start vertex, end vertex, kind), vertex = r * (w + 1) + c."""
    h, w = loc.shape
    padded = np.pad(loc, 1)
    cells, starts, ends, kinds = [], [], [], []
    for kind, ((dy, dx), (sy, sx), (ey, ex)) in enumerate(_KINDS):
        neighbour = padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        i, j = np.nonzero((loc != neighbour) & keep[loc])
        cells.append(loc[i, j])
        starts.append((i + sy) * (w + 1) + j + sx)
        ends.append((i + ey) * (w + 1) + j + ex)
        kinds.append(np.full(i.size, kind, np.int8))
    return tuple(np.concatenate(x) for x in (cells, starts, ends, kinds))


def _walk_order(keys_start: np.ndarray, keys_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges chained into cycles (edge e is followed by the edge whose start key is e's
    end key) and ordered: returns (order, cycle key), where ``order`` lists the edges
    cycle by cycle (cycles sorted by their smallest start key), each cycle from the edge
    with that smallest key, and ``cycle key[e]`` is that key for edge e's cycle."""
    n = keys_start.size
    by_start = np.argsort(keys_start)
    succ = by_start[np.searchsorted(keys_start[by_start], keys_end)]
    if not np.array_equal(keys_start[succ], keys_end):
        raise AssertionError("outline: an edge has no successor")
    # Smallest start key of each cycle, by pointer jumping (log2 of the longest cycle).
    low, jump = keys_start.copy(), succ.copy()
    while True:
        new = np.minimum(low, low[jump])
        jump = jump[jump]
        if np.array_equal(new, low):
            break
        low = new
    # Distance of each edge to the last edge of its cycle (the one before its head).
    last = keys_start[succ] == low
    dist, ptr = np.where(last, 0, 1), np.where(last, np.arange(n), succ)
    while not np.array_equal(ptr, ptr[ptr]):
        dist, ptr = dist + dist[ptr], ptr[ptr]
    return np.lexsort((-dist, low)), low


def _rings_of(
    cells: np.ndarray,
    starts: np.ndarray,
    kinds: np.ndarray,
    cycle: np.ndarray,
    order: np.ndarray,
    stride: int,
) -> dict[int, list[np.ndarray]]:
    """Corner vertices of each cycle, grouped by cell (exterior first)."""
    cells, starts, kinds, cycle = cells[order], starts[order], kinds[order], cycle[order]
    head = np.r_[True, cycle[1:] != cycle[:-1]]
    # A vertex is a corner where the direction changes (a cycle's head always is one:
    # it is the cycle's top-left vertex).
    corner = head | (kinds != np.r_[kinds[:1], kinds[:-1]])
    cells, starts, cycle = cells[corner], starts[corner], cycle[corner]
    rows, cols = np.divmod(starts, stride)
    bounds = np.r_[np.flatnonzero(np.r_[True, cycle[1:] != cycle[:-1]]), cycle.size]
    out: dict[int, list[np.ndarray]] = {}
    for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        out.setdefault(int(cells[s]), []).append(np.stack([rows[s:e], cols[s:e]], axis=1))
    return out


def _trace(loc: np.ndarray, keep: np.ndarray) -> dict[int, list[np.ndarray]]:
    """Rings of the cells ``keep`` (none needing bridging) of a local label image."""
    cells, starts, ends, kinds = _edges(loc, keep)
    if cells.size == 0:
        return {}
    nv = (loc.shape[0] + 1) * (loc.shape[1] + 1)
    key = cells.astype(np.int64) * nv
    order, cycle = _walk_order(key + starts, key + ends)
    return _rings_of(cells, starts, kinds, cycle, order, loc.shape[1] + 1)


def outline(mask: np.ndarray) -> list[np.ndarray]:
    """Outline of one cell.

    Parameters
    ----------
    mask : (h, w) bool
        The cell's pixels (any number of pieces; holes allowed).

    Returns
    -------
    list of (k, 2) int64
        Rings of corner vertices (row, column) in edge coordinates, not closed: the
        exterior first, then one per hole, of the cell made one region (see the module
        docstring). Empty for an empty mask.
    """
    m = _connected(np.asarray(mask, bool))
    if not m.any():
        return []
    return _trace(m.astype(np.int64), np.array([False, True]))[1]


def outlines(labels: np.ndarray, ids: np.ndarray | None = None) -> dict[int, list[np.ndarray]]:
    """Outlines of the cells of a label region.

    Parameters
    ----------
    labels : (h, w) array of int
        Cell ids, 0 = background. Each cell outlined must lie wholly inside.
    ids : array of int, optional
        The cells to outline (default: every id present).

    Returns
    -------
    dict of int -> list of (k, 2) int64
        Cell id -> rings as :func:`outline` gives them, in the region's edge coordinates.
    """
    uniq, loc = _local_labels(np.asarray(labels))
    keep = uniq != 0 if ids is None else np.isin(uniq, np.asarray(ids)) & (uniq != 0)
    bad = _needs_bridging(loc, keep)
    rings = {int(uniq[k]): r for k, r in _trace(loc, keep & ~bad).items()}
    if bad.any():
        boxes = ndimage.find_objects(loc)
        for k in np.flatnonzero(bad):
            rows, cols = boxes[k - 1]
            for ring in (cell_rings := outline(loc[rows, cols] == k)):
                ring += (rows.start, cols.start)
            rings[int(uniq[k])] = cell_rings
    return rings


def _local_labels(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, local): the sorted ids present with 0 first, and ``lab`` renumbered to
    their indices (int64, 0 = background)."""
    uniq = np.unique(lab)
    if uniq.size == 0 or uniq[0] != 0:
        uniq = np.r_[np.zeros(1, uniq.dtype), uniq]
    if uniq.size == 1:
        return uniq, np.zeros(lab.shape, np.int64)
    lo, hi = int(uniq[1]), int(uniq[-1])
    if hi - lo < 4 * lab.size:  # the ids of a region are close: use a lookup table
        table = np.zeros(hi - lo + 2, np.int64)  # entry 0: background
        table[uniq[1:].astype(np.int64) - lo + 1] = np.arange(1, uniq.size)
        return uniq, table[np.maximum(lab.astype(np.int64) - (lo - 1), 0)]
    return uniq, np.searchsorted(uniq, lab)
