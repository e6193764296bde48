"""How busy a pool of workers was, from the intervals each spent working (pure Python)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["all_busy_fraction", "busy_fraction"]

Interval = tuple[float, float]


def _merged(intervals: Sequence[Interval]) -> list[Interval]:
    """Sorted, non-overlapping union of half-open intervals."""
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def busy_fraction(intervals: Sequence[Interval], start: float, end: float) -> float:
    """Fraction of ``[start, end]`` covered by the union of ``intervals`` (seconds)."""
    if end <= start:
        return 0.0
    busy = sum(max(0.0, min(b, end) - max(a, start)) for a, b in _merged(intervals))
    return busy / (end - start)


def all_busy_fraction(per_worker: Sequence[Sequence[Interval]]) -> tuple[float, float]:
    """Fraction of the time from the first interval's start to the last one's end in
    which *every* worker was busy at once, and that time span (seconds).

    >>> all_busy_fraction([[(0, 4)], [(0, 2), (3, 4)]])
    (0.75, 4)
    """
    merged = [_merged(w) for w in per_worker]
    if not merged or any(not m for m in merged):
        return 0.0, 0.0
    start = min(m[0][0] for m in merged)
    end = max(m[-1][1] for m in merged)
    events: list[tuple[float, int]] = []
    for m in merged:
        events += [(a, 1) for a, _ in m] + [(b, -1) for _, b in m]
    events.sort(key=lambda e: (e[0], e[1]))  # ends before starts at equal times
    active, last, together = 0, start, 0.0
    for t, step in events:
        if active == len(merged):
            together += t - last
        active += step
        last = t
    return (together / (end - start) if end > start else 0.0), end - start
