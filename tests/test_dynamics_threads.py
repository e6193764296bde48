"""numba's thread count in flow tracking follows the CPUs of the task that runs it."""

from __future__ import annotations

import numba
import numpy as np

from mediar_ray.dynamics import flows_to_labels, labels_to_flows
from mediar_ray.dynamics.threads import task_threads
from mediar_ray.io import read_image


def _raw(data_dir) -> np.ndarray:
    """Perfect network output of a real DSB2018 label image: (3, H, W) float32."""
    path = sorted((data_dir / "dsb2018/labels").glob("*_label.tiff"))[0]
    truth = read_image(str(path)).astype(np.int64)
    return np.concatenate(
        [labels_to_flows(truth) * 5, np.where(truth > 0, 5.0, -5.0)[None]]
    ).astype(np.float32)


def _track(raw: np.ndarray, cpus: float | None = None) -> tuple[int, np.ndarray]:
    labels = flows_to_labels(raw, threads=cpus)
    return numba.get_num_threads(), labels


def test_explicit_threads_cap_numba_and_keep_the_labels(data_dir):
    assert numba.config.NUMBA_NUM_THREADS >= 2, "needs a machine of 2 or more cores"
    raw = _raw(data_dir)
    before = numba.get_num_threads()
    try:
        one, labels_one = _track(raw, 0.25)  # Ray's stage-task share: one thread
        two, labels_two = _track(raw, 2)
    finally:
        numba.set_num_threads(before)
    assert (one, two) == (1, 2)
    assert labels_one.max() > 10
    np.testing.assert_array_equal(labels_one, labels_two)
    assert task_threads(1000) == numba.config.NUMBA_NUM_THREADS  # never above numba's pool


def test_ray_task_uses_its_assigned_cpus(local_ray, data_dir):
    """A tracking task that asked Ray for a quarter CPU runs numba on one thread, one
    that asked for two on two (numba's default would be one per core of the node)."""
    import ray

    raw = _raw(data_dir)

    def tracked(raw):  # defined here: Ray ships it by value (the test module is not importable)
        import numba

        from mediar_ray.dynamics import flows_to_labels

        labels = flows_to_labels(raw)
        return numba.get_num_threads(), labels

    track = ray.remote(tracked)
    quarter = track.options(num_cpus=0.25).remote(raw)
    both = track.options(num_cpus=2).remote(raw)
    (n_quarter, labels_quarter), (n_both, labels_both) = ray.get([quarter, both])
    assert (n_quarter, n_both) == (1, 2)
    np.testing.assert_array_equal(labels_quarter, labels_both)


def test_outside_ray_the_count_is_left_alone():
    from mediar_ray.dynamics.threads import limit_threads

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        assert limit_threads(None) == 1 == numba.get_num_threads()
    finally:
        numba.set_num_threads(before)
