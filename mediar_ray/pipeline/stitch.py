"""Stitching per-chunk labels into one slide-wide labelling (pure numpy).

Each chunk is tracked with a halo, so a cell near a chunk border is segmented by both
neighbours from the same flows. Every cell is named by its *anchor*: 1 + the slide-wide
linear index (y * W + x) of its first pixel in raster order. Two chunks that segment the
same cell therefore give it the same name without talking to each other. As a safety net
for cells that two chunks segment differently, the ids seen on both sides of each chunk
border are joined with union-find (mutual best overlap); then every name is mapped to a
consecutive uint32 id. Only border strips and the sets of names travel to the driver.
"""

from __future__ import annotations

import numpy as np

__all__ = ["UnionFind", "anchor_labels", "border_pairs", "consecutive_ids"]


def anchor_labels(labels: np.ndarray, origin: tuple[int, int], width: int) -> np.ndarray:
    """Replace local ids by anchors.

    Parameters
    ----------
    labels : ndarray of int, (h, w)
        Local labels (0 = background) of a region whose top-left pixel is ``origin``
        (y, x) in a slide ``width`` pixels wide.

    Returns
    -------
    ndarray uint64, (h, w)
        For each cell, 1 + the slide-wide linear index of its first pixel (raster order).
    """
    lab = np.asarray(labels)
    h, w = lab.shape
    flat = lab.ravel()
    n = int(flat.max(initial=0))
    first = np.full(n + 1, np.iinfo(np.int64).max, np.int64)
    positions = np.arange(flat.size, dtype=np.int64)
    np.minimum.at(first, flat, positions)  # first raster pixel of each local id
    ys, xs = np.divmod(first[1:].clip(max=flat.size - 1), w)
    anchors = np.zeros(n + 1, np.uint64)
    anchors[1:] = (
        (ys + origin[0]).astype(np.uint64) * np.uint64(width)
        + (xs + origin[1]).astype(np.uint64)
        + np.uint64(1)
    )
    return anchors[lab]


def border_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairs of names that two chunks gave to the same pixels, mutual best matches only.

    ``a`` and ``b`` are the two chunks' views (uint64 anchors) of the same border strip.
    Returns (k, 2) uint64 pairs with different names (identical names need no join).

    Examples
    --------
    The left chunk calls a cell 5 and the right one 9; both call another cell 7:

    >>> import numpy as np
    >>> a = np.array([[5, 5, 0, 7]], np.uint64)
    >>> b = np.array([[9, 9, 0, 7]], np.uint64)
    >>> border_pairs(a, b).tolist()
    [[5, 9]]
    """
    both = (a > 0) & (b > 0)
    if not both.any():
        return np.zeros((0, 2), np.uint64)
    pairs, counts = np.unique(np.stack([a[both], b[both]], axis=1), axis=0, return_counts=True)
    best_for_a = _best(pairs[:, 0], counts)
    best_for_b = _best(pairs[:, 1], counts)
    mutual = best_for_a & best_for_b & (pairs[:, 0] != pairs[:, 1])
    return pairs[mutual]


def _best(keys: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mask of the rows holding the largest count of their key (first on ties)."""
    order = np.lexsort((-counts, keys))
    first = np.ones(order.size, bool)
    first[1:] = keys[order][1:] != keys[order][:-1]
    mask = np.zeros(order.size, bool)
    mask[order[first]] = True
    return mask


class UnionFind:
    """Union-find over arbitrary uint64 names (path halving, union by name order)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        """The root name of ``x``'s set (``x`` itself when never joined)."""
        parent = self.parent
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        """Join the sets of ``a`` and ``b``; the smaller root names the joined set."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo  # the smaller anchor names the cell


def consecutive_ids(names: np.ndarray, uf: UnionFind) -> tuple[np.ndarray, np.ndarray]:
    """Map every name to a consecutive id 1..N (joined names share an id).

    Returns ``(sorted_names, ids)``: name ``sorted_names[i]`` becomes ``ids[i]`` (uint32),
    numbered in the raster order of the cells' anchors.

    Examples
    --------
    >>> import numpy as np
    >>> uf = UnionFind()
    >>> uf.union(5, 9)  # two chunks' names of one cell
    >>> names, ids = consecutive_ids(np.array([9, 5, 7], np.uint64), uf)
    >>> names.tolist(), ids.tolist()
    ([5, 7, 9], [1, 2, 1])
    """
    sorted_names = np.unique(np.asarray(names, np.uint64))
    sorted_names = sorted_names[sorted_names > 0]
    roots = (
        np.array([uf.find(int(n)) for n in sorted_names], np.uint64)
        if uf.parent
        else (sorted_names.copy())
    )
    unique_roots, ids = np.unique(roots, return_inverse=True)
    if unique_roots.size >= 2**32 - 1:
        raise OverflowError("more than 2**32 - 2 cells: uint32 labels cannot hold them")
    return sorted_names, (ids + 1).astype(np.uint32)
