"""How many threads the numba kernels (``parallel=True``) may use in this task.

numba starts one thread per core of the node by default, whatever CPU share Ray gave
the task: on a GPU node, where the model actor holds most cores, every tracking task
would oversubscribe them. :func:`limit_threads` caps numba's thread count (numba's count
is per calling thread) at the CPUs the running Ray task or actor was assigned, or at an
explicit number. Ray is only consulted when the process already imported it: this layer
never imports Ray.
"""

from __future__ import annotations

import math
import sys

import numba

__all__ = ["assigned_cpus", "limit_threads", "task_threads"]


def assigned_cpus() -> float | None:
    """The CPUs Ray assigned to the running task or actor, or None outside one (no Ray
    imported, Ray not initialised, or the driver)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        context = ray.get_runtime_context()
        if context.get_task_id() is None and context.get_actor_id() is None:
            return None  # the driver: Ray assigned it nothing
        cpus = context.get_assigned_resources().get("CPU")
    except Exception:  # an older or partial Ray: no limit rather than no result
        return None
    return float(cpus) if cpus is not None else None


def task_threads(cpus: float | None = None) -> int:
    """Threads for numba in this task: ``cpus`` (or Ray's assignment) rounded up, at
    least 1, at most numba's pool (``NUMBA_NUM_THREADS``); numba's pool size when neither
    says."""
    limit = cpus if cpus is not None else assigned_cpus()
    if limit is None:
        return numba.config.NUMBA_NUM_THREADS
    # A fractional share (Ray's 0.25 CPU per stage task) still gets one thread.
    return max(1, min(math.ceil(limit - 1e-9), numba.config.NUMBA_NUM_THREADS))


def limit_threads(cpus: float | None = None) -> int:
    """Set numba's thread count for the calling thread to :func:`task_threads`; returns
    it. Outside Ray and without ``cpus`` the count is left as it is."""
    if cpus is None and assigned_cpus() is None:
        return numba.get_num_threads()
    n = task_threads(cpus)
    numba.set_num_threads(n)
    return n
