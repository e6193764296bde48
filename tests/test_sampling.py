"""Amplified sampling over modality clusters and cell memory replay, on seeded runs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mediar_ray.data.sampling import amplified_epoch, expected_frequencies, with_replay
from mediar_ray.train.stream import epoch_batches

# Cluster sizes like a real modality table: a few large clusters and many small ones.
SIZES = (180, 75, 50, 31, 12, 7, 3, 1)


def _clusters(sizes=SIZES) -> np.ndarray:
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    return np.random.default_rng(0).permutation(labels)


def test_expected_frequencies_formula() -> None:
    clusters = _clusters()
    freq = expected_frequencies(clusters, 50)
    total = sum(max(n, 50) for n in SIZES)
    for c, n in enumerate(SIZES):
        assert freq[c] == pytest.approx(max(n, 50) / total)
    assert sum(freq.values()) == pytest.approx(1.0)
    assert freq[7] == freq[2] > freq[0] * 50 / 180 - 1e-12  # 1 image weighs as much as 50


def test_empirical_cluster_frequencies_match_the_formula() -> None:
    clusters = _clusters()
    expected = expected_frequencies(clusters, 50)
    counts: Counter = Counter()
    per_image: Counter = Counter()
    epochs = 300
    for epoch in range(epochs):
        order = amplified_epoch(clusters, np.random.default_rng([11, epoch]), 50)
        assert len(order) == sum(max(n, 50) for n in SIZES)
        counts.update(clusters[order].tolist())
        per_image.update(order.tolist())
    total = sum(counts.values())
    for c, f in expected.items():
        assert counts[c] / total == pytest.approx(f, abs=1e-9)
    # Within a small cluster every image is drawn equally often on average (m / n_c per
    # epoch; the extra draw is a Bernoulli of p = frac(m / n_c) per epoch, so allow five
    # standard errors); a large cluster gives each image exactly once per epoch.
    for c, n in enumerate(SIZES):
        members = np.flatnonzero(clusters == c)
        mean = np.array([per_image[i] for i in members]) / epochs
        rate = max(50 / n, 1.0)
        p = rate - np.floor(rate)
        assert np.abs(mean - rate).max() <= 5 * np.sqrt(p * (1 - p) / epochs) + 1e-12


def test_amplified_epoch_is_seeded_and_shuffled() -> None:
    clusters = _clusters()
    a = amplified_epoch(clusters, np.random.default_rng(5))
    b = amplified_epoch(clusters, np.random.default_rng(5))
    c = amplified_epoch(clusters, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.mean(np.diff(clusters[a]) == 0) < 0.5  # not grouped by cluster
    # Each image of a 7-image cluster appears floor(50/7)=7 or 8 times.
    reps = Counter(a.tolist())
    assert {reps[i] for i in np.flatnonzero(clusters == 5)} <= {7, 8}


def test_cluster_min_gives_chosen_clusters_their_own_m() -> None:
    """Clusters named in ``cluster_min`` supply max(n_c, m_c) samples, the rest max(n_c, m);
    a large cluster named with a smaller m_c still gives each image once."""
    clusters = _clusters()
    own = {3: 80, 5: 20, 0: 10}
    counts: Counter = Counter()
    for epoch in range(20):
        order = amplified_epoch(clusters, np.random.default_rng([3, epoch]), 50, own)
        per_epoch = Counter(clusters[order].tolist())
        for c, n in enumerate(SIZES):
            assert per_epoch[c] == max(n, own.get(c, 50)), (c, per_epoch[c])
        counts.update(per_epoch)
    assert set(Counter(order.tolist())[i] for i in np.flatnonzero(clusters == 0)) == {1}
    expected = expected_frequencies(clusters, 50, own)
    total = sum(counts.values())
    for c, f in expected.items():
        assert counts[c] / total == pytest.approx(f, abs=1e-9)
    assert expected[3] > expected[2] > expected[5]  # 80 > 50 > 20 samples


def test_plan_stream_rejects_cluster_min_of_a_cluster_with_no_pairs() -> None:
    from types import SimpleNamespace

    from mediar_ray.train.stream import plan_stream

    cfg = SimpleNamespace(
        seed=0,
        sampling=SimpleNamespace(amplified=True, min_per_cluster=10, cluster_min={9: 20}),
        data=SimpleNamespace(replay_per_batch=0, modality_table="table.json"),
        optim=SimpleNamespace(epochs=1, batch_size=4),
        run=SimpleNamespace(max_steps_per_epoch=0),
    )
    with pytest.raises(ValueError, match=r"cluster_min.*\[9\].*table.json"):
        plan_stream(cfg, _clusters((30, 12)), 0, 1)
    cfg.sampling.cluster_min = {1: 20}
    plan = plan_stream(cfg, _clusters((30, 12)), 0, 1)
    assert plan.batches_per_epoch == (30 + 20) // 4


@pytest.mark.parametrize("per_batch, batch_size", [(1, 8), (2, 4), (3, 9)])
def test_replay_puts_exactly_the_configured_public_samples_in_each_batch(
    per_batch: int, batch_size: int
) -> None:
    main = np.random.default_rng(0).permutation(100)
    n_public = 13
    order = with_replay(main, n_public, per_batch, batch_size, np.random.default_rng(1))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in batches[:-1]:
        assert len(batch) == batch_size
        assert sum(kind == "public" for kind, _ in batch) == per_batch
    assert sum(kind == "public" for kind, _ in batches[-1]) == per_batch
    assert [i for kind, i in order if kind == "main"] == main.tolist()  # all, in order
    uses = Counter(i for kind, i in order if kind == "public")
    assert set(uses) <= set(range(n_public))
    assert max(uses.values()) - min(uses.values()) <= 1  # cycled without replacement


def test_replay_through_the_epoch_stream() -> None:
    """The training stream's batches (full ones only) each hold the configured number of
    public samples, with amplified sampling on."""
    clusters = _clusters((40, 9, 3))
    for epoch in range(3):
        batches = epoch_batches(
            epoch,
            7,
            clusters,
            n_public=5,
            batch_size=8,
            replay_per_batch=1,
            min_per_cluster=20,
            amplified=True,
        )
        assert batches
        for batch in batches:
            assert len(batch) == 8
            assert sum(kind == "public" for kind, _ in batch) == 1
        again = epoch_batches(epoch, 7, clusters, 5, 8, 1, 20, True)
        assert batches == again


def test_replay_rejects_a_batch_of_only_public_samples() -> None:
    with pytest.raises(ValueError, match="smaller than the batch"):
        with_replay(np.arange(10), 5, 4, 4, np.random.default_rng(0))
