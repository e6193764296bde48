"""Running a stage's per-tile function over many tiles: as Ray tasks, or in this process.

A slide's stage runs its per-tile function once per tile. Inside a Ray task (the plan and
finish tasks of the archive engine) the tiles of a big slide fan out as more Ray tasks;
a slide of a few tiles runs them in the task itself, because a task round trip and a
worker process would then cost more than the work.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

__all__ = ["INLINE_MAX", "fan_out"]

log = logging.getLogger("mediar_ray.slides")

#: Stages of slides with at most this many items run in the calling process.
INLINE_MAX = 2


def fan_out(
    fn: Callable[..., Any], calls: Sequence[tuple], cpus: float = 0.25, progress: str | None = None
) -> list[Any]:
    """``[fn(*args) for args in calls]``, in order; as Ray tasks (3 retries each, ``cpus``
    CPUs) when there are more than :data:`INLINE_MAX` calls. ``progress`` names the stage
    for a log line every 10% of the calls."""
    if len(calls) <= INLINE_MAX:
        return [fn(*args) for args in calls]
    import ray

    task = ray.remote(fn).options(num_cpus=cpus, max_retries=3)
    refs = [task.remote(*args) for args in calls]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending, step, done = list(refs), max(1, len(refs) // 10), 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        results[index[ready[0]]] = ray.get(ready[0])
        done += 1
        if progress and (done % step == 0 or done == len(refs)):
            log.info("%s: %d/%d", progress, done, len(refs))
    return results
