"""Flow dynamics on real labels and the original MEDIAR outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from mediar_ray.dynamics import flows_to_labels, labels_to_flows
from mediar_ray.metrics import match_counts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from mosaic import mosaic, real_labels  # noqa: E402


def densest_labels(k: int) -> list[np.ndarray]:
    """The k real label images with the most cells per pixel."""
    labels = real_labels(("dsb2018", "stardist_nuclei"))
    labels.sort(key=lambda lab: len(np.unique(lab)) / lab.size, reverse=True)
    return labels[:k]


def synthetic_raw(labels: np.ndarray) -> np.ndarray:
    """What a perfect network would output for ``labels``: flows x 5, logit +-5."""
    flows = labels_to_flows(labels) * 5
    logit = np.where(labels > 0, 5.0, -5.0).astype(np.float32)[None]
    return np.concatenate([flows, logit])


def test_labels_to_flows_matches_original_targets(ref_dir, data_dir):
    ref = np.load(ref_dir / "targets.flows_from_label.npy")
    labels = tifffile.imread(data_dir / "stardist_nuclei/labels/img2d_label.tiff")
    flows = labels_to_flows(labels)  # ids are not consecutive here (max 183, 125 cells)
    assert flows.shape == (2, 512, 512) and flows.dtype == np.float32
    err = np.linalg.norm(flows - ref[2:]) / np.linalg.norm(ref[2:])
    assert err < 1e-8  # 1.3e-10 measured: the same float32 computation as MEDIAR's
    np.testing.assert_array_equal(np.any(flows != 0, axis=0), ref[1] > 0)


def test_flows_to_labels_reproduces_original_postprocessing(ref_dir):
    raw = np.load(ref_dir / "postprocess.input.npy")
    expected = tifffile.imread(ref_dir / "postprocess.labels.tiff")
    labels = flows_to_labels(raw, cellprob_threshold=0.5, flow_threshold=0.4, niter=200)
    assert labels.dtype == np.uint32 and labels.shape == expected.shape
    assert labels.max() == len(np.unique(labels)) - 1 == 125  # consecutive 1..N
    m = match_counts(expected, labels, 0.5)
    assert (m.tp, m.fp, m.fn) == (125, 0, 0)


def test_round_trip_on_every_real_label(data_dir):
    paths = sorted(data_dir.glob("*/labels/*_label.tiff"))
    sources = {p.parent.parent.name for p in paths}
    assert {"dsb2018", "nuinsseg", "usiigaci_phase", "stardist_nuclei"} <= sources
    assert len(paths) >= 300
    scores = {}
    for path in paths:
        labels = tifffile.imread(path)
        scores[path.name] = match_counts(labels, flows_to_labels(synthetic_raw(labels))).f1
    worst = min(scores, key=scores.get)
    assert np.mean(list(scores.values())) >= 0.98
    assert scores[worst] >= 0.9, (worst, scores[worst])


def test_any_integer_dtype_and_huge_ids(data_dir):
    labels = tifffile.imread(data_dir / "stardist_nuclei/labels/img2d_label.tiff")
    reference = labels_to_flows(labels)
    for dtype, offset in ((np.int32, 7), (np.uint32, 2**32 - 400), (np.int64, 2**40)):
        shifted = np.where(labels > 0, labels.astype(np.int64) + offset, 0).astype(dtype)
        np.testing.assert_array_equal(labels_to_flows(shifted), reference)
    with pytest.raises(TypeError):
        labels_to_flows(labels.astype(np.float32))


def test_blank_and_tiny_inputs():
    assert not labels_to_flows(np.zeros((30, 30), np.uint16)).any()
    blank = np.zeros((3, 64, 64), np.float32)
    blank[2] = -5
    out = flows_to_labels(blank)
    assert out.dtype == np.uint32 and not out.any()
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        flows_to_labels(blank[:2])


def test_a_chunk_with_a_halo_labels_its_core_like_the_whole_image():
    """The locality the slide pipeline relies on."""
    labels = mosaic(densest_labels(30), 1024, seed=3)
    raw = synthetic_raw(labels)
    whole = flows_to_labels(raw)
    y0, y1, x0, x1, halo = 300, 700, 250, 800, 96
    part = flows_to_labels(raw[:, y0 - halo : y1 + halo, x0 - halo : x1 + halo])
    part = part[halo:-halo, halo:-halo]
    ref = whole[y0:y1, x0:x1]
    # Cells wholly inside the core are identical, pixel for pixel (up to their ids).
    edge = np.unique(np.concatenate([ref[0], ref[-1], ref[:, 0], ref[:, -1]]))
    inner = (ref > 0) & ~np.isin(ref, edge)
    assert inner.sum() > 10_000
    pairs = np.unique(np.stack([ref[inner], part[inner]]), axis=1)
    assert np.unique(pairs[0]).size == pairs.shape[1] == np.unique(pairs[1]).size
    assert (part[inner] > 0).all()


@pytest.mark.slow
def test_dense_mosaic_beyond_uint16(data_dir):
    """More than 70,000 real cells in one image: uint32 ids and F1 >= 0.98."""
    big = mosaic(densest_labels(20), 8192, seed=1)
    n_cells = len(np.unique(big)) - 1
    assert n_cells > 70_000
    out = flows_to_labels(synthetic_raw(big))
    assert out.dtype == np.uint32 and out.max() > 65_535
    assert match_counts(big, out).f1 >= 0.98
