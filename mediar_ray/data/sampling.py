"""Amplified sampling over modality clusters, and cell memory replay.

MEDIAR groups its training images into modality clusters (:mod:`.modalities`) and, each
epoch, cycles every cluster with fewer than ``m`` images (MEDIAR: 50) up to exactly ``m``
samples; larger clusters contribute each of their images once. So a cluster of ``n_c``
images supplies ``max(n_c, m)`` samples of the epoch, and its expected share is

    f_c = max(n_c, m) / sum_k max(n_k, m),

which :func:`expected_frequencies` returns. Within a small cluster every image appears
``floor(m / n_c)`` or ``ceil(m / n_c)`` times (a random subset gets the extra one).

``cluster_min`` (our addition, not MEDIAR's) gives chosen clusters their own ``m_c`` in
place of ``m``: a way to weigh a modality that the others crowd out (for example a stained
tissue cluster beside three H&E clusters of another source) without changing the rest.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = ["amplified_epoch", "expected_frequencies", "with_replay"]


def amplified_epoch(
    clusters: np.ndarray,
    rng: np.random.Generator,
    min_per_cluster: int = 50,
    cluster_min: Mapping[int, int] | None = None,
) -> np.ndarray:
    """Sample indices of one epoch under amplified sampling, shuffled.

    Parameters
    ----------
    clusters : (N,) int array
        Modality cluster of each training sample.
    rng : numpy Generator
    min_per_cluster : int
        ``m``: clusters with fewer images are cycled up to exactly ``m`` samples.
    cluster_min : mapping of cluster id to int, optional
        ``m_c`` for the clusters it names, in place of ``m``.

    Returns
    -------
    (sum_c max(n_c, m_c),) int64 array of indices into ``clusters``.
    """
    clusters = np.asarray(clusters)
    chosen = []
    for c in np.unique(clusters):
        members = np.flatnonzero(clusters == c)
        m = _cluster_m(int(c), min_per_cluster, cluster_min)
        if len(members) >= m:
            chosen.append(members)
            continue
        reps = m // len(members)
        extra = rng.choice(members, m - reps * len(members), replace=False)
        chosen.append(np.concatenate([np.repeat(members, reps), extra]))
    order = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    return rng.permutation(order).astype(np.int64)


def expected_frequencies(
    clusters: np.ndarray, min_per_cluster: int = 50, cluster_min: Mapping[int, int] | None = None
) -> dict[int, float]:
    """Share of each cluster in an epoch of :func:`amplified_epoch` (formula above)."""
    ids, counts = np.unique(np.asarray(clusters), return_counts=True)
    sizes = np.array(
        [max(n, _cluster_m(int(c), min_per_cluster, cluster_min)) for c, n in zip(ids, counts)],
        np.float64,
    )
    return {int(c): float(s / sizes.sum()) for c, s in zip(ids, sizes)}


def _cluster_m(c: int, default: int, cluster_min: Mapping[int, int] | None) -> int:
    return int(cluster_min.get(c, default)) if cluster_min else int(default)


def with_replay(
    main: np.ndarray, n_public: int, per_batch: int, batch_size: int, rng: np.random.Generator
) -> list[tuple[str, int]]:
    """Interleave public ("cell memory") samples: each batch of ``batch_size`` holds
    ``per_batch`` public samples and ``batch_size - per_batch`` main ones.

    Public samples are drawn without replacement, cycling through a fresh permutation of
    the public set when it runs out (MEDIAR: one public image in each batch of 8).

    Returns
    -------
    list of ("main", i) / ("public", j) in batch order; the last batch may be short.
    """
    if per_batch <= 0 or n_public <= 0:
        return [("main", int(i)) for i in main]
    if per_batch >= batch_size:
        raise ValueError(
            f"replay_per_batch {per_batch} must be smaller than the batch size {batch_size}"
        )
    take = batch_size - per_batch
    public: list[int] = []
    out: list[tuple[str, int]] = []
    for b in range(0, len(main), take):
        out += [("main", int(i)) for i in main[b : b + take]]
        while len(public) < per_batch:
            public += [int(j) for j in rng.permutation(n_public)]
        out += [("public", public.pop(0)) for _ in range(per_batch)]
    return out
