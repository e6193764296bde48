"""Compile the numba kernels of flow dynamics once (``python -m mediar_ray.dynamics.warm``).

The kernels are cached on disk (``cache=True``; ``NUMBA_CACHE_DIR``): an image built with
this step starts tracking on its first slide without compiling (several seconds per
process otherwise).
"""

from __future__ import annotations

import numpy as np

from mediar_ray.dynamics import flows_to_labels, labels_to_flows


def warm() -> int:
    """Run every kernel on a small synthetic image of two touching cells; returns the
    number of cells found (2)."""
    labels = np.zeros((48, 64), np.int32)
    labels[8:40, 6:32], labels[8:40, 32:58] = 1, 2
    for per_cell in (False, True):
        flows = labels_to_flows(labels, per_cell_niter=per_cell)
    raw = np.concatenate([flows * 5, np.where(labels > 0, 5.0, -5.0)[None]]).astype(np.float32)
    return int(flows_to_labels(raw).max())


if __name__ == "__main__":
    print(f"numba kernels compiled: {warm()} cells on the check image")
