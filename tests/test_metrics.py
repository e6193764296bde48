"""Metrics on hand-built cases, with the expected numbers worked out here."""

from __future__ import annotations

import numpy as np
import pytest

from mediar_ray.metrics import average_precision, cellseg_f1, match_counts, remove_border_cells


def square(lab: np.ndarray, y: int, x: int, size: int, value: int) -> None:
    lab[y : y + size, x : x + size] = value


@pytest.fixture()
def truth() -> np.ndarray:
    lab = np.zeros((40, 40), np.uint16)
    square(lab, 5, 5, 6, 1)  # 36 px each, away from the border
    square(lab, 5, 20, 6, 2)
    square(lab, 20, 5, 6, 3)
    square(lab, 20, 20, 6, 4)
    return lab


def test_perfect(truth):
    relabelled = np.where(truth > 0, 10 + 3 * truth.astype(np.int64), 0)  # ids differ
    m = cellseg_f1(truth, relabelled)
    assert (m.tp, m.fp, m.fn) == (4, 0, 0) and m.f1 == 1.0


def test_empty_prediction(truth):
    m = cellseg_f1(truth, np.zeros_like(truth))
    assert (m.tp, m.fp, m.fn) == (0, 0, 4)
    assert m.precision == 0.0 and m.recall == 0.0 and m.f1 == 0.0


def test_empty_truth(truth):
    m = cellseg_f1(np.zeros_like(truth), truth)
    assert (m.tp, m.fp, m.fn) == (0, 4, 0) and m.f1 == 0.0


def test_both_empty_is_perfect():
    empty = np.zeros((10, 10), np.uint8)
    assert cellseg_f1(empty, empty).f1 == 1.0


def test_split_cell(truth):
    pred = truth.astype(np.int32).copy()
    pred[5:11, 5:8] = 1  # cell 1 cut in two halves of 18 px: IoU 0.5 each
    pred[5:11, 8:11] = 9
    pred[20:26, 5:7] = 3  # cell 3 cut 12 / 24: IoU 1/3 and 2/3
    pred[20:26, 7:11] = 8
    m = match_counts(truth, pred)
    # Cell 1: one half matches at exactly IoU 0.5 (>= threshold), the other is a FP.
    # Cell 3: the 24-px part matches (IoU 2/3), the 12-px part is a FP.
    assert (m.tp, m.fp, m.fn) == (4, 2, 0)
    assert m.precision == pytest.approx(4 / 6) and m.recall == 1.0
    assert m.f1 == pytest.approx(2 * 4 / (2 * 4 + 2))


def test_merged_cells(truth):
    pred = truth.astype(np.int32).copy()
    pred[5:11, 5:26] = 1  # cells 1 and 2 plus the gap: 6 x 21 = 126 px
    m = match_counts(truth, pred)
    # IoU(1, merged) = 36 / 126 < 0.5, same for 2: both missed, the merged cell is a FP.
    assert (m.tp, m.fp, m.fn) == (2, 1, 2)
    assert m.f1 == pytest.approx(4 / 7)


def test_border_cells_are_dropped_from_both_sides(truth):
    t = truth.copy()
    square(t, 0, 30, 5, 5)  # touches the top edge
    square(t, 34, 34, 5, 6)  # rows 34..38: row 38 lies in the last 2 rows
    p = t.copy()
    p[t == 5] = 0  # the prediction misses a border cell: must not count
    p[t == 6] = 0
    square(p, 35, 35, 4, 7)  # and gets the other wrong (IoU 16 / 25), also at the border
    m = cellseg_f1(t, p)
    assert (m.tp, m.fp, m.fn) == (4, 0, 0)
    assert match_counts(t, p).fn == 1  # without border removal it would count
    assert cellseg_f1(t, p, drop_border=False).f1 < 1.0
    assert remove_border_cells(t).max() == 4


def test_iou_exactly_half_matches():
    t = np.zeros((20, 20), np.uint8)
    p = np.zeros((20, 20), np.uint8)
    t[5:9, 5:9] = 1  # 16 px
    p[5:9, 5:13] = 1  # 32 px, overlap 16: IoU = 16 / 32 = 0.5
    assert match_counts(t, p, 0.5).tp == 1
    assert match_counts(t, p, 0.5000001).tp == 0


def test_optimal_assignment_among_ties():
    # Truth a (2 px) and b (2 px); prediction p1 covers a's left pixel + b's... a chain
    # where greedy matching could lose one: each pred overlaps two truths at IoU 0.5.
    t = np.array([[1, 1, 2, 2]])
    p = np.array([[5, 6, 6, 7]])
    # IoU(1,5)=1/2, IoU(1,6)=1/3, IoU(2,6)=1/3, IoU(2,7)=1/2 -> best: 1-5, 2-7.
    assert match_counts(t, p).tp == 2
    t2 = np.array([[1, 1, 0, 0]])
    p2 = np.array([[5, 6, 0, 0]])  # both preds at IoU 0.5 with the same truth
    assert match_counts(t2, p2).tp == 1 and match_counts(t2, p2).fp == 1


def test_average_precision(truth):
    pred = truth.astype(np.int32).copy()
    pred[5:11, 5:8] = 0  # cell 1 shrinks to 18 px: IoU 0.5
    ap = average_precision(truth, pred, (0.5, 0.75))
    assert ap[0.5] == 1.0  # 4 / (4 + 0 + 0)
    assert ap[0.75] == pytest.approx(3 / 5)  # 3 TP, 1 FP, 1 FN


def test_shape_mismatch_is_an_error(truth):
    with pytest.raises(ValueError, match="shapes differ"):
        match_counts(truth, truth[:-1])
