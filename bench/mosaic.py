"""Build large label images from the real labels in ../shared/data (for benchmarks/tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def real_labels(sources: tuple[str, ...] = ("dsb2018", "stardist_nuclei", "usiigaci_phase")):
    """Every real label image of the given sources, sorted by path."""
    paths = sorted(p for s in sources for p in (DATA / s / "labels").glob("*_label.tiff"))
    return [tifffile.imread(p) for p in paths]


def mosaic(labels: list[np.ndarray], size: int, seed: int = 0) -> np.ndarray:
    """A (size, size) uint32 mosaic of label images placed row by row, ids made unique.

    Images are taken in a seeded random order (repeated as needed); each keeps its own
    cells, shifted so that no two images share an id.
    """
    rng = np.random.default_rng(seed)
    out = np.zeros((size, size), np.uint32)
    y = x = row_h = 0
    next_id = 0
    order = rng.permutation(len(labels))
    i = 0
    while y < size:
        lab = labels[order[i % len(order)]]
        i += 1
        h, w = min(lab.shape[0], size - y), min(lab.shape[1], size - x)
        piece = lab[:h, :w].astype(np.uint32)
        fg = piece > 0
        out[y : y + h, x : x + w][fg] = piece[fg] + next_id
        next_id += int(lab.max())
        row_h = max(row_h, h)
        x += w
        if x >= size:
            x, y, row_h = 0, y + row_h, 0
    return out
