"""Instance segmentation metrics: the NeurIPS 2022 CellSeg F1 and average precision.

Cells are matched one to one by optimal assignment at an IoU threshold (a match needs
IoU >= threshold). Overlaps are counted sparsely, so images with hundreds of thousands of
cells need no (cells x cells) matrix.

The challenge's F1 first drops every cell that touches a 2-pixel border of the image, from
both the truth and the prediction. Two empty images score 1.0 here (nothing to find,
nothing found); the challenge script scores them 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from mediar_ray.dynamics.heat import renumber

__all__ = [
    "MatchCounts",
    "average_precision",
    "cellseg_f1",
    "match_counts",
    "remove_border_cells",
]


@dataclass(frozen=True)
class MatchCounts:
    """True positives, false positives, false negatives at one IoU threshold."""

    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        """TP / (TP + FP); with no predicted cell, 1.0 when there is no true cell either,
        else 0.0."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float(self.fn == 0)

    @property
    def recall(self) -> float:
        """TP / (TP + FN); with no true cell, 1.0 when there is no predicted cell either,
        else 0.0."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float(self.fp == 0)

    @property
    def f1(self) -> float:
        """2 TP / (2 TP + FP + FN), the harmonic mean of precision and recall (1.0 when
        there are no cells at all)."""
        total = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / total if total else 1.0

    @property
    def ap(self) -> float:
        """TP / (TP + FP + FN), the 'average precision' of cellpose and StarDist."""
        total = self.tp + self.fp + self.fn
        return self.tp / total if total else 1.0


def remove_border_cells(labels: np.ndarray, width: int = 2) -> np.ndarray:
    """Zero every cell with a pixel within ``width`` pixels of the image edge.

    Returns a new (H, W) int32 array, ids renumbered 1..N.
    """
    lab, _ = renumber(labels)
    edge = np.ones(lab.shape, bool)
    edge[width:-width, width:-width] = False
    touching = np.unique(lab[edge])
    lab[np.isin(lab, touching[touching > 0])] = 0
    return renumber(lab)[0]


def _overlaps(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, ...]:
    """Overlapping (truth id, pred id, IoU) triples, ids 1-based consecutive."""
    t, nt = renumber(truth)
    p, npred = renumber(pred)
    both = (t > 0) & (p > 0)
    key = t[both].astype(np.int64) * (npred + 1) + p[both]
    keys, inter = np.unique(key, return_counts=True)
    ti, pi = np.divmod(keys, npred + 1)
    area_t = np.bincount(t.ravel(), minlength=nt + 1)
    area_p = np.bincount(p.ravel(), minlength=npred + 1)
    iou = inter / (area_t[ti] + area_p[pi] - inter)
    return ti, pi, iou, nt, npred


def _count_matches(ti: np.ndarray, pi: np.ndarray, iou: np.ndarray, threshold: float) -> int:
    """Maximum number of one-to-one pairs with IoU >= threshold."""
    ok = iou >= threshold
    ti, pi, iou = ti[ok], pi[ok], iou[ok]
    if ti.size == 0:
        return 0
    # Above IoU 0.5 a cell can overlap that much with one partner only, so pairs are
    # almost always unique; an assignment is solved only among ids that repeat.
    ambiguous = _repeated(ti) | _repeated(pi)
    if not ambiguous.any():
        return int(ti.size)
    rows, r_idx = np.unique(ti[ambiguous], return_inverse=True)
    cols, c_idx = np.unique(pi[ambiguous], return_inverse=True)
    cost = np.zeros((rows.size, cols.size))
    cost[r_idx, c_idx] = -1.0 - iou[ambiguous] / (2 * max(rows.size, cols.size))
    r, c = linear_sum_assignment(cost)
    return int((~ambiguous).sum()) + int((cost[r, c] < 0).sum())


def _repeated(ids: np.ndarray) -> np.ndarray:
    values, counts = np.unique(ids, return_counts=True)
    return np.isin(ids, values[counts > 1])


def match_counts(truth: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> MatchCounts:
    """TP/FP/FN of ``pred`` against ``truth`` ((H, W) integer labels) at an IoU threshold."""
    if truth.shape != pred.shape:
        raise ValueError(f"shapes differ: truth {truth.shape}, prediction {pred.shape}")
    ti, pi, iou, nt, npred = _overlaps(truth, pred)
    tp = _count_matches(ti, pi, iou, threshold)
    return MatchCounts(tp=tp, fp=npred - tp, fn=nt - tp)


def cellseg_f1(
    truth: np.ndarray, pred: np.ndarray, threshold: float = 0.5, drop_border: bool = True
) -> MatchCounts:
    """The NeurIPS 2022 Cell Segmentation Challenge F1 counts of one image.

    Cells touching a 2-pixel border are removed from both sides first (unless
    ``drop_border`` is False), then cells are matched at IoU >= ``threshold``. Use the
    returned counts' ``precision``, ``recall`` and ``f1``.
    """
    if drop_border:
        truth, pred = remove_border_cells(truth), remove_border_cells(pred)
    return match_counts(truth, pred, threshold)


def average_precision(
    truth: np.ndarray, pred: np.ndarray, thresholds: tuple[float, ...] = (0.5, 0.75, 0.9)
) -> dict[float, float]:
    """TP / (TP + FP + FN) at each IoU threshold (no border removal)."""
    ti, pi, iou, nt, npred = _overlaps(truth, pred)
    out = {}
    for th in thresholds:
        tp = _count_matches(ti, pi, iou, th)
        out[th] = MatchCounts(tp, npred - tp, nt - tp).ap
    return out
