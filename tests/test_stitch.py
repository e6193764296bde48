"""Stitching helpers (anchor names, border pairs, union-find, relabel) on real labels."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from mediar_ray.pipeline.stitch import UnionFind, anchor_labels, border_pairs, consecutive_ids


@pytest.fixture(scope="module")
def real(data_dir) -> np.ndarray:
    """The real DSB2018 label image with the most cells."""
    paths = sorted((data_dir / "dsb2018" / "labels").glob("*_label.tiff"))[:40]
    labs = [tifffile.imread(p) for p in paths]
    return max(labs, key=lambda lab: len(np.unique(lab)))


def test_anchors_agree_between_overlapping_chunks(real):
    """Two chunks that both hold a whole cell name it identically, without talking."""
    h, w = real.shape
    whole = anchor_labels(real, (0, 0), w)
    # same partition as the labels: one name per cell, none shared
    assert len(np.unique(whole)) == len(np.unique(real))
    assert np.array_equal(whole > 0, real > 0)
    y, x = h // 3, w // 3
    part = anchor_labels(real[y:, x:], (y, x), w)
    inner = real[y:, x:]
    # cells wholly inside the second region (not touching its top or left edge)
    cut = np.unique(np.concatenate([inner[0], inner[:, 0]]))
    whole_cells = np.isin(inner, cut, invert=True) & (inner > 0)
    assert whole_cells.sum() > 100
    np.testing.assert_array_equal(part[whole_cells], whole[y:, x:][whole_cells])
    # a cell cut by the region edge gets a different (later) anchor
    cut_fg = np.isin(inner, cut[cut > 0])
    if cut_fg.any():
        assert (part[cut_fg] >= whole[y:, x:][cut_fg]).all()


def test_border_pairs_and_union_find_join_a_cell_named_twice(real):
    h, w = real.shape
    names = anchor_labels(real, (0, 0), w).astype(np.uint64)
    # the right-hand chunk named the cells differently (e.g. an offset)
    other = np.where(names > 0, names + np.uint64(10**9), 0).astype(np.uint64)
    k = w // 2
    pairs = border_pairs(names[:, k - 1 : k + 1], other[:, k - 1 : k + 1])
    on_border = np.unique(names[:, k - 1 : k + 1])
    on_border = on_border[on_border > 0]
    assert len(pairs) == len(on_border) > 0
    assert np.array_equal(np.sort(pairs[:, 0]), on_border)
    uf = UnionFind()
    for a, b in pairs:
        uf.union(int(a), int(b))
    # joined names get one id; identical names give no pair at all
    sorted_names, ids = consecutive_ids(np.concatenate([names.ravel(), pairs[:, 1]]), uf)
    lookup = dict(zip(sorted_names.tolist(), ids.tolist()))
    for a, b in pairs:
        assert lookup[int(a)] == lookup[int(b)]
    assert len(border_pairs(names[:, k - 1 : k + 1], names[:, k - 1 : k + 1])) == 0


def test_consecutive_ids_are_unique_uint32_in_anchor_order(real):
    w = real.shape[1]
    names = anchor_labels(real, (0, 0), w)
    sorted_names, ids = consecutive_ids(names.ravel(), UnionFind())
    assert ids.dtype == np.uint32
    n = len(np.unique(real)) - 1
    np.testing.assert_array_equal(ids, np.arange(1, n + 1))
    relabelled = np.zeros(real.shape, np.uint32)
    fg = names > 0
    relabelled[fg] = ids[np.searchsorted(sorted_names, names[fg])]
    # a pure renaming: the same partition of pixels into cells
    pairs = np.unique(np.stack([real[fg], relabelled[fg]], 1), axis=0)
    assert len(pairs) == n and len(np.unique(pairs[:, 1])) == n


def test_union_find_keeps_the_smallest_name_as_root():
    uf = UnionFind()
    for a, b in [(9, 4), (4, 7), (12, 9), (30, 31)]:
        uf.union(a, b)
    assert {uf.find(x) for x in (4, 7, 9, 12)} == {4}
    assert uf.find(31) == uf.find(30) == 30 and uf.find(5) == 5
