"""The archive engine on Ray Core: the default until the Ray Data engine
(:mod:`mediar_ray.pipeline.engine`, ``MEDIAR_ENGINE=data``) has been measured against it
(bench/archive_throughput.py runs both) and its elastic pool shown on an autoscaling
cluster; then this module is deleted. Its pool is fixed: ``--workers MIN:MAX`` runs MAX
actors.

One streaming job over every slide, model actors never waiting.

One pool of model actors (:class:`~mediar_ray.pipeline.actors.InferenceActor`, models
loaded once each) lives for the whole job and is fed the tiles of all slides. Each slide
is prepared (fingerprint, skip/plan: :func:`~mediar_ray.pipeline.plan.prepare_slide`) by
a CPU task; its tiles join the queue; when its last tile is inferred, a CPU task
finishes it (:func:`~mediar_ray.pipeline.finish.finish_slide`) while the actors infer
other slides. No slide is planned before one actor has loaded the models (strictly:
a checkpoint that does not fit stops the job there). The driver only orders and
throttles:

- slides are admitted in input order while fewer than ``slides_in_flight`` are being
  prepared, inferred or finished and while the tile queue is short (fewer than four
  tiles per actor), so the next slide is planned before the pool runs dry, and scratch
  storage and memory stay bounded however large the archive;
- each actor has one tile in flight, two while the queue is long, so it never waits for
  the driver between tiles;
- Ray restarts a dead actor and retries its tile; plan and finish tasks retry too.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from mediar_ray.pipeline.cluster import ResourceError
from mediar_ray.pipeline.options import SlideOptions
from mediar_ray.pipeline.utilization import all_busy_fraction

__all__ = ["ArchiveRun"]

log = logging.getLogger("mediar_ray.slides")

#: Seconds between progress lines of the archive while tiles are inferred.
PROGRESS_EVERY = 10.0
#: Times one actor slot is re-created after Ray reports its actor dead for good (its
#: restarts exhausted, or its creation cancelled before it started), after a pause of
#: 1, 2, 4, ... 30 s (about 1.5 min in all); then the job stops with the slides not ended
#: listed as failed.
MAX_REPLACEMENTS = 7


@dataclass
class _Slide:
    url: str
    name: str
    state: str = "preparing"  # preparing -> inferring -> finishing
    plan_json: str = ""
    plan_ref: Any = None
    tiles_total: int = 0
    tiles_left: int = 0  # queued or running
    running: int = 0
    started: float | None = None  # first tile start (actor clock)
    ended: float | None = None  # last tile end
    seconds: dict[str, float] = field(default_factory=dict)
    windows: dict[str, int] = field(default_factory=lambda: {"run": 0, "skipped": 0})
    failed: bool = False


def _reason(err: BaseException) -> str:
    """One line for the run summary: the innermost error of a Ray task, not its trace."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}".strip()


def _warm_up() -> None:
    """Import what the CPU stages need (run once, as a task, to start a worker)."""
    import mediar_ray.pipeline.finish  # noqa: F401
    import mediar_ray.pipeline.plan  # noqa: F401


def _load_error(err: BaseException) -> Exception:
    """The error of a model actor that died loading the models: a
    :class:`~mediar_ray.weights.CheckpointError` (its message names the file and the
    fix) when a checkpoint was at fault, else a RuntimeError."""
    from mediar_ray.weights import CheckpointError

    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in reversed(lines):
        name, _, message = line.partition(": ")
        if name.rsplit(".", 1)[-1] == "CheckpointError":
            return CheckpointError(message)
    return RuntimeError(f"the model actors could not start: {lines[-1] if lines else err}")


class ArchiveRun:
    """One job over ``slides`` ((url, output name, pixel-size override)) into ``output``.

    ``run()`` returns the report: done (cells, seconds per stage), skipped, failed
    (reason), and the pool's utilisation.
    """

    def __init__(
        self,
        slides: list[tuple[str, str, float | None]],
        output: str,
        opts: SlideOptions,
        weight_hashes: list[str],
        wait_for_nodes: bool = False,
    ) -> None:
        self.waiting = deque(slides)
        self.total = len(slides)
        self.output, self.opts, self.weight_hashes = output, opts, weight_hashes
        self.wait_for_nodes = wait_for_nodes
        self.active: dict[str, _Slide] = {}
        self.queue: deque[tuple[str, str]] = deque()  # (slide name, tile JSON)
        self.pending: dict[Any, tuple] = {}  # ObjectRef -> what it is
        self.report: dict[str, Any] = {
            "done": {},
            "skipped": [],
            "failed": {},
            "notes": {},
            "elsewhere": {},
        }
        self.leases = None  # a .lease.Leases: slides another live job holds are left to it
        self.intervals: list[list[tuple[float, float]]] = []
        self.nodes: set[str] = set()
        self.tiles_done = 0
        self._last_progress = 0.0
        self._t0 = time.perf_counter()

    # -- setup ------------------------------------------------------------------------
    def _start_actors(self) -> None:
        import ray

        from mediar_ray.pipeline.actors import InferenceActor

        opts = self.opts
        cpus = opts.actor_cpus()
        actor = ray.remote(InferenceActor).options(
            num_cpus=cpus,
            num_gpus=opts.num_gpus_per_worker,
            max_restarts=-1,
            max_task_retries=-1,
            scheduling_strategy="SPREAD",
        )
        device = "cuda" if opts.gpu else opts.device
        self._new_actor = lambda: actor.remote(
            opts.weights,
            opts.model_config,
            opts.tta,
            device,
            max(1, round(cpus)),
            precision=opts.precision,
            batch_size=opts.batch_size,
        )
        # A fixed pool: an elastic --workers MIN:MAX gets its maximum (what a fixed pool of
        # the Ray Data engine's size would be), logged so the user knows.
        if opts.min_workers != opts.max_workers:
            log.info(
                "--workers %s: this engine's pool is fixed at %d actors",
                opts.workers,
                opts.max_workers,
            )
        self.actors = [self._new_actor() for _ in range(opts.max_workers)]
        self.generation = [0] * len(self.actors)
        self.load = [0] * len(self.actors)
        self.intervals = [[] for _ in self.actors]
        # A CPU-stage worker starts (imports) while the models load, not after.
        ray.remote(_warm_up).options(num_cpus=opts.cpus_per_task).remote()
        self._await_models(cpus)

    def _await_models(self, cpus: float) -> None:
        """Return when one model actor has loaded the models. They load strictly, so a
        checkpoint that does not fit the model raises here, before any slide is planned;
        with ``wait_for_nodes`` (an autoscaler may add the nodes) the wait is bounded."""
        import ray

        opts = self.opts
        timeout = opts.resource_timeout if self.wait_for_nodes else None
        ready, _ = ray.wait([a.node.remote() for a in self.actors], num_returns=1, timeout=timeout)
        if not ready:
            raise ResourceError(
                f"no node able to hold a model actor ({cpus:g} CPU, "
                f"{opts.num_gpus_per_worker:g} GPU) joined within "
                f"{opts.resource_timeout:.0f} s (--resource-timeout)"
            )
        try:
            ray.get(ready[0])
        except ray.exceptions.ActorDiedError as err:
            raise _load_error(err) from None

    def _tasks(self) -> None:
        import ray

        from mediar_ray.pipeline.finish import finish_slide
        from mediar_ray.pipeline.plan import prepare_slide

        cpus = self.opts.cpus_per_task
        self.prepare_task = ray.remote(prepare_slide).options(num_cpus=cpus, max_retries=3)
        self.finish_task = ray.remote(finish_slide).options(num_cpus=cpus, max_retries=3)

    # -- the loop ---------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Segment every slide; returns the run summary (done, skipped, failed, ...)."""
        import ray

        self._tasks()
        self._start_actors()
        while self.waiting or self.active:
            self._admit()
            self._dispatch()
            if not self.pending:
                raise RuntimeError("internal: slides in flight but nothing pending")
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=PROGRESS_EVERY)
            for ref in ready:
                self._handle(ref, self.pending.pop(ref))
            self._progress()
        self.report["utilization"] = self.utilization()
        self.report["model_nodes"] = len(self.nodes)
        for actor in self.actors:
            ray.kill(actor)
        return self.report

    def _admit(self) -> None:
        limit, lookahead = self.opts.slides_in_flight(), 4 * len(self.actors)
        preparing = sum(s.state == "preparing" for s in self.active.values())
        while self.waiting and len(self.active) < limit and len(self.queue) + preparing < lookahead:
            url, name, mpp = self.waiting.popleft()
            holder = self.leases.claim(name) if self.leases is not None else None
            if holder is not None:
                log.info("%s: in progress elsewhere (job %s holds it), left to it", name, holder)
                self.report["elsewhere"][name] = holder
                continue
            self.active[name] = _Slide(url, name)
            ref = self.prepare_task.remote(
                url, name, self.output, self.opts, self.weight_hashes, mpp
            )
            self.pending[ref] = ("prepare", name)
            preparing += 1

    def _dispatch(self) -> None:
        for i, actor in enumerate(self.actors):
            depth = 2 if len(self.queue) >= 2 * len(self.actors) else 1
            while self.load[i] < depth and self.queue:
                name, tile_json = self.queue.popleft()
                slide = self.active.get(name)
                if slide is None or slide.failed:
                    continue
                ref = actor.infer.remote(slide.plan_ref, tile_json)
                self.pending[ref] = ("tile", name, i, tile_json, self.generation[i])
                self.load[i] += 1
                slide.running += 1

    def _handle(self, ref: Any, what: tuple) -> None:
        import ray

        kind, name = what[0], what[1]
        slide = self.active[name]
        try:
            result = ray.get(ref)
        except ray.exceptions.ActorDiedError as err:  # restarts exhausted or init failed
            if kind == "tile":
                self._actor_died(slide, *what[2:], err)
            else:
                self._fail(slide, _reason(err))
            return
        except Exception as err:  # noqa: BLE001 - one slide's failure, reported per slide
            if kind == "tile":
                self._tile_ended(slide, what[2], what[4])
            if slide.failed:
                self._forget_if_idle(slide)
            else:
                self._fail(slide, _reason(err))
            return
        getattr(self, f"_on_{kind}")(slide, result, *what[2:])

    def _on_prepare(self, slide: _Slide, result: dict) -> None:
        import ray

        if result["kind"] == "skip":
            log.info(
                "%s: complete already, skipped (--overwrite to redo)%s",
                slide.name,
                f"; {result['note']}" if result.get("note") else "",
            )
            self.report["skipped"].append(slide.name)
            if result.get("note"):
                self.report["notes"][slide.name] = result["note"]
            del self.active[slide.name]
            return
        if result["kind"] == "stale":
            self._fail(slide, result["reason"])
            return
        planned = result["planned"]
        slide.seconds["plan"] = result["seconds"]
        slide.plan_json = planned.plan_json
        slide.plan_ref = ray.put(planned.plan_json)  # once, not once per tile
        slide.tiles_total = slide.tiles_left = len(planned.tiles)
        slide.windows["skipped"] += planned.windows_skipped
        slide.state = "inferring"
        log.info(
            "%s: planned, %d tile(s) to infer%s",
            slide.name,
            len(planned.tiles),
            " (earlier state reused)" if planned.reused else "",
        )
        self.queue.extend((slide.name, t) for t in planned.tiles)
        if not planned.tiles:
            self._finish(slide)

    def _tile_ended(self, slide: _Slide, actor: int, generation: int) -> None:
        if generation == self.generation[actor]:
            self.load[actor] -= 1
        slide.running -= 1

    def _actor_died(
        self, slide: _Slide, actor: int, tile_json: str, generation: int, err: BaseException
    ) -> None:
        """Ray gave up on an actor: put its tile back in the queue and, the first time
        one of its tiles reports it, start a new actor in its slot (bounded)."""
        self._tile_ended(slide, actor, generation)
        if generation == self.generation[actor]:
            if self.generation[actor] >= MAX_REPLACEMENTS:
                raise RuntimeError(
                    f"the model actors could not be restarted: {_reason(err)}"
                ) from None
            pause = min(30.0, 2.0 ** self.generation[actor])
            log.warning(
                "model actor %d died (%s): a new one in %.0f s",
                actor,
                " | ".join(str(err).split("\n")),
                pause,
            )
            time.sleep(pause)  # the driver only; tasks and the other actors go on
            self.actors[actor] = self._new_actor()
            self.generation[actor] += 1
            self.load[actor] = 0
        if slide.failed:
            self._forget_if_idle(slide)
        else:
            self.queue.appendleft((slide.name, tile_json))

    def _on_tile(
        self, slide: _Slide, result: dict, actor: int, tile_json: str, generation: int
    ) -> None:
        self._tile_ended(slide, actor, generation)
        self.tiles_done += 1
        self.intervals[actor].append((result["start"], result["end"]))
        self.nodes.add(result["node"])
        slide.windows["run"] += result["windows_run"]
        slide.windows["skipped"] += result["windows_skipped"]
        slide.started = min(slide.started or result["start"], result["start"])
        slide.ended = max(slide.ended or result["end"], result["end"])
        if slide.failed:
            self._forget_if_idle(slide)
            return
        slide.tiles_left -= 1
        done = slide.tiles_total - slide.tiles_left
        if slide.tiles_total >= 10 and done % max(1, slide.tiles_total // 10) == 0:
            log.info("%s: %d/%d tiles inferred", slide.name, done, slide.tiles_total)
        if slide.tiles_left == 0:
            self._finish(slide)

    def _finish(self, slide: _Slide) -> None:
        slide.state = "finishing"
        if slide.started is not None:
            slide.seconds["infer"] = round(slide.ended - slide.started, 3)
        ref = self.finish_task.remote(slide.plan_json, self.opts, slide.seconds, slide.windows)
        self.pending[ref] = ("finish", slide.name)

    def _on_finish(self, slide: _Slide, summary: dict) -> None:
        self.report["done"][slide.name] = {
            "cells": summary["cells"],
            "seconds": summary["seconds"],
            "tiles_inferred": slide.tiles_total,
            "windows": slide.windows,
        }
        log.info(
            "[%d/%d] %s: %d cells", self._count_ended(), self.total, slide.name, summary["cells"]
        )
        del self.active[slide.name]

    def _fail(self, slide: _Slide, reason: str) -> None:
        log.error("%s: failed: %s", slide.name, reason)
        self.report["failed"][slide.name] = reason
        slide.failed = True
        self._forget_if_idle(slide)

    def _forget_if_idle(self, slide: _Slide) -> None:
        if slide.running == 0:
            self.active.pop(slide.name, None)

    def in_flight(self) -> list[str]:
        """The slides this job holds (their leases kept alive)."""
        return list(self.active)

    # -- reporting --------------------------------------------------------------------
    def _count_ended(self) -> int:
        r = self.report
        return len(r["done"]) + len(r["skipped"]) + len(r["failed"]) + len(r["elsewhere"])

    def _progress(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_progress < PROGRESS_EVERY:
            return
        self._last_progress = now
        elapsed = now - self._t0
        rate = self.tiles_done / elapsed if elapsed > 0 else 0.0
        known = [s for s in self.active.values() if s.state != "preparing"]
        left = sum(s.tiles_left for s in known)
        per_slide = (sum(s.tiles_total for s in known) / len(known)) if known else 1.0
        left += per_slide * (len(self.waiting) + len(self.active) - len(known))
        eta = f"{left / rate:.0f} s" if rate > 0 else "unknown"
        r = self.report
        log.info(
            "archive: %d/%d slides ended (%d done, %d skipped, %d failed), %d in flight; "
            "%d tiles inferred, %.2f tiles/s, ETA %s",
            self._count_ended(),
            self.total,
            len(r["done"]),
            len(r["skipped"]),
            len(r["failed"]),
            len(self.active),
            self.tiles_done,
            rate,
            eta,
        )

    def utilization(self) -> dict[str, Any]:
        """Fraction of the time between the first tile's start and the last tile's end
        in which every model actor was busy (timestamps taken inside the actors)."""
        together, span = all_busy_fraction(self.intervals)
        return {
            "all_actors_busy": round(together, 4),
            "span_s": round(span, 3),
            "tiles": self.tiles_done,
            "actors": len(self.intervals),
        }
