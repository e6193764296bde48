"""The archive engine on Ray Data: one streaming dataset of tiles over a pool of model actors.

How the job maps onto Ray Data (one :class:`ray.data.Dataset` per job)::

    slides (one row, one block each, input order)
      -> flat_map(plan_rows)        CPU tasks (--cpus-per-task): gate, lease, prepare/plan;
                                    one row per tile still to infer, or one row saying
                                    what became of the slide (skipped, failed, ...)
                                    (one row per block: target_max_block_size=1; Ray
                                    Data never splits a block, and a block of all a
                                    slide's tiles would go to one actor)
      -> map_batches(TileInferer)   the model actors, ActorPoolStrategy(min, max) from
                                    --workers N or MIN:MAX, one tile per call
      -> iter_rows() on the driver  TileRecords in completion order; a slide's finish
                                    task (gather, track, relabel, tables, pyramids, marker)
                                    starts as soon as its last tile is in

Ray Data grows the pool while tiles queue and shrinks it when they drain, applies
backpressure, restarts dead actors and retries their tiles, and shows nothing (its
progress bars are off: the driver logs today's progress lines). What it does not do, and
this module does:

- **The gate bounds slides in flight.** Ray Data's backpressure counts bytes and
  resources; tile records are tiny, so planning would run ahead through the whole
  archive and fill scratch storage. A small actor (:class:`SlideGate`) admits at most
  ``--max-slides-in-flight`` slides: a plan task acquires a place before it plans, and
  the place is given back when the slide has finished (the finish task's completion
  callback), failed (the plan task or the model actor that saw the failure) or was
  skipped. It is never given back by the loop that reads the dataset: that loop waits
  for tiles that only a freed place lets be planned, so it would deadlock.
- **Planning stays out of the model actors.** A task stage with the model stage's
  resources fuses into the actors; the plan stage asks for ``--cpus-per-task`` CPUs and
  a bounded task pool, so ``ds.explain()`` shows it as its own operator.
- **A failing tile fails its slide, never the dataset.** A UDF exception aborts the
  whole dataset, so :class:`TileInferer` catches per tile and emits a failed record. A
  tile that kills its actor is retried by Ray forever; the gate counts attempts, and
  after :data:`MAX_TILE_ATTEMPTS` the tile is failed without running it.
- **No progress timeout.** Long plans, finishes or waits for a GPU node must not abort
  the dataset (``execution_no_progress_timeout_s`` is disabled).
- **The pool's peak size** is computed from the tile records (actor, start, end).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any, Iterable

from mediar_ray.pipeline.cluster import ResourceError
from mediar_ray.pipeline.options import SlideOptions
from mediar_ray.pipeline.utilization import all_busy_fraction

__all__ = [
    "ArchiveRun",
    "Outcome",
    "SlideGate",
    "TileInferer",
    "TileRecord",
    "build_dataset",
    "peak_overlap",
]

log = logging.getLogger("mediar_ray.slides")

#: Seconds between progress lines of the archive while tiles are inferred.
PROGRESS_EVERY = 10.0
#: Times a tile is started on a model actor before its slide fails: a tile that kills
#: its actor every time (Ray restarts the actor and retries the tile forever) stops here.
MAX_TILE_ATTEMPTS = 3
#: Environment variable (tests only) naming a slide whose tiles end their model actor's
#: process on every attempt, as a tile that crashes the device would.
KILL_SLIDE_ENV = "MEDIAR_TEST_KILL_SLIDE"


class Outcome(str, Enum):
    """What a :class:`TileRecord` says."""

    TO_INFER = "to_infer"  # a tile the plan stage sent to the model actors
    INFERRED = "inferred"  # ... inferred (its partial chunk and done record written)
    PLANNED_EMPTY = "empty"  # a planned slide whose tiles were all inferred before
    SKIPPED = "skipped"  # complete already
    ELSEWHERE = "elsewhere"  # another live job holds the slide's lease
    FAILED = "failed"  # the slide failed (plan, or one of its tiles)
    CANCELLED = "cancelled"  # a tile of a slide that failed already: not run


@dataclass
class TileRecord:
    """The one row schema of the dataset after planning: a tile (to infer, or inferred)
    or, with ``tile`` empty, what became of a slide. Empty strings and zeros stand for
    "none" so that every block has the same columns and types."""

    slide: str
    outcome: str
    tile: str = ""  # the tile's JSON (:class:`.layout.Tile`)
    tile_name: str = ""
    plan_json: str = ""
    tiles_total: int = 0  # tiles of the slide still to infer when it was planned
    windows_skipped: int = 0  # windows no tile the model sees owns (glass)
    plan_seconds: float = 0.0
    reused: bool = False
    note: str = ""  # skip note, failure reason or the lease holder
    actor: str = ""  # the model actor that inferred the tile
    node: str = ""
    start: float = 0.0  # actor clock, seconds since the epoch
    end: float = 0.0
    windows_run: int = 0
    windows_skipped_tile: int = 0

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "TileRecord":
        """A record from a dataset row (numpy or Arrow scalars turned into Python's)."""
        values = {}
        for f in fields(cls):
            v = row[f.name]
            v = v.item() if hasattr(v, "item") else v
            values[f.name] = {"str": str, "int": int, "float": float, "bool": bool}[f.type](v)
        return cls(**values)


def _columns(records: list[TileRecord]) -> dict[str, list]:
    return {f.name: [getattr(r, f.name) for r in records] for f in fields(TileRecord)}


def _records(batch: dict[str, Any]) -> list[TileRecord]:
    n = len(batch["slide"])
    return [TileRecord.from_row({k: batch[k][i] for k in batch}) for i in range(n)]


def _reason(err: BaseException) -> str:
    """One line for the run summary: the innermost error of a Ray task, not its trace."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}".strip()


# -- the gate ---------------------------------------------------------------------------
class SlideGate:
    """Admits at most ``limit`` slides between planning and their end, and counts the
    attempts of each tile (an async Ray actor; it outlives the model actors' restarts).

    It records the most slides it ever admitted at once, for the run summary and tests.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(1, int(limit))
        self.active: set[str] = set()
        self.failed: set[str] = set()
        self.attempts: dict[tuple[str, str], int] = {}
        self.peak = 0
        self._changed = None  # asyncio.Condition, made in the actor's event loop

    def _cond(self):
        import asyncio

        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def acquire(self, slide: str) -> None:
        """Wait for a place, then hold it for ``slide``."""
        cond = self._cond()
        async with cond:
            await cond.wait_for(lambda: len(self.active) < self.limit)
            self.active.add(slide)
            self.peak = max(self.peak, len(self.active))

    async def release(self, slide: str) -> None:
        """``slide`` ended (finished, skipped or failed): its place is free."""
        cond = self._cond()
        async with cond:
            self.active.discard(slide)
            cond.notify_all()

    async def fail(self, slide: str) -> None:
        """``slide`` failed: its other tiles are not run, its place is free."""
        self.failed.add(slide)
        await self.release(slide)

    async def attempt(self, slide: str, tile: str) -> int:
        """Count one more start of ``tile``; returns the count, or 0 when its slide
        failed already (the tile is not to be run)."""
        if slide in self.failed:
            return 0
        key = (slide, tile)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        return self.attempts[key]

    async def state(self) -> dict[str, Any]:
        """{"active": slides holding a place, "peak": most ever held at once}."""
        return {"active": sorted(self.active), "peak": self.peak}


# -- the plan stage ---------------------------------------------------------------------
def plan_rows(
    row: dict[str, Any],
    *,
    gate: Any,
    output: str,
    opts: SlideOptions,
    weight_hashes: list[str],
    job: str,
) -> list[dict[str, Any]]:
    """The plan stage of one slide (a Ray Data task): wait at the gate, claim the lease,
    skip or plan (:func:`~mediar_ray.pipeline.plan.prepare_slide`); returns one
    :class:`TileRecord` row per tile to infer, or one saying what became of the slide.
    The gate's place is given back here unless the slide goes on to the model actors.
    It never raises: an exception would abort the whole dataset."""
    import ray

    from mediar_ray.pipeline.lease import Leases

    url, name, mpp = json.loads(row["spec"])
    _warm_numba_once_per_node()  # CPU-only nodes run finish tasks, never a model actor
    ray.get(gate.acquire.remote(name))
    leases = Leases(output, job=job)
    try:
        records = _plan_slide(url, name, mpp, leases, output, opts, weight_hashes)
    except Exception as err:  # noqa: BLE001 - one slide's failure, reported per slide
        records = [TileRecord(name, Outcome.FAILED.value, note=_reason(err))]
    if records[0].outcome != Outcome.TO_INFER.value:
        if records[0].outcome != Outcome.PLANNED_EMPTY.value:
            ray.get(gate.release.remote(name))
        if records[0].outcome in (Outcome.SKIPPED.value, Outcome.FAILED.value):
            leases.release(name)
    return [asdict(r) for r in records]


def _plan_slide(
    url: str,
    name: str,
    mpp: float | None,
    leases: Any,
    output: str,
    opts: SlideOptions,
    weight_hashes: list[str],
) -> list[TileRecord]:
    from mediar_ray.pipeline.layout import Tile
    from mediar_ray.pipeline.plan import prepare_slide

    holder = leases.claim(name)
    if holder is not None:
        return [TileRecord(name, Outcome.ELSEWHERE.value, note=holder)]
    result = prepare_slide(url, name, output, opts, weight_hashes, mpp)
    if result["kind"] == "skip":
        return [TileRecord(name, Outcome.SKIPPED.value, note=result.get("note") or "")]
    if result["kind"] != "planned":
        return [TileRecord(name, Outcome.FAILED.value, note=result["reason"])]
    planned = result["planned"]
    common = dict(
        plan_json=planned.plan_json,
        tiles_total=len(planned.tiles),
        windows_skipped=planned.windows_skipped,
        plan_seconds=result["seconds"],
        reused=planned.reused,
    )
    if not planned.tiles:
        return [TileRecord(name, Outcome.PLANNED_EMPTY.value, **common)]
    return [
        TileRecord(
            name, Outcome.TO_INFER.value, tile=t, tile_name=Tile(**json.loads(t)).name, **common
        )
        for t in planned.tiles
    ]


# -- the model stage --------------------------------------------------------------------
def _warm_numba_once_per_node() -> None:
    """Compile flow tracking's numba kernels once per node, in the background: the first
    process on a node to get here does it (an exclusive file marks the node), and every
    later process on the node finds them in numba's on-disk cache."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    mark = os.path.join(tempfile.gettempdir(), f"mediar_ray_numba_warm_{node}")
    try:
        os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except OSError:
        return  # another process on this node warms (or warmed) them

    def warm() -> None:
        from mediar_ray.dynamics.warm import warm as compile_kernels

        try:
            compile_kernels()
        except Exception as err:  # noqa: BLE001 - a cold cache only costs time
            log.warning("numba kernels not warmed on this node (%s)", err)

    threading.Thread(target=warm, name="mediar-numba-warm", daemon=True).start()


class TileInferer:
    """The model stage: a callable class run by Ray Data's actor pool. ``__init__`` loads
    the models once (:class:`~mediar_ray.pipeline.actors.InferenceActor`); ``__call__``
    infers a batch of tile rows and returns their records. It never raises for a tile: a
    failing tile becomes a :data:`Outcome.FAILED` record and fails its slide at the gate.
    """

    def __init__(self, opts: SlideOptions, gate: Any, kill_slide: str = "") -> None:
        from mediar_ray.pipeline.actors import InferenceActor

        cpus = opts.actor_cpus()
        device = "cuda" if opts.gpu else opts.device
        self.model = InferenceActor(
            opts.weights,
            opts.model_config,
            opts.tta,
            device,
            max(1, round(cpus)),
            precision=opts.precision,
            batch_size=opts.batch_size,
        )
        self.gate, self.kill_slide = gate, kill_slide
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        _warm_numba_once_per_node()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """The records of a batch of rows (columns in, columns out)."""
        return _columns([self._one(r) for r in _records(batch)])

    def _one(self, rec: TileRecord) -> TileRecord:
        import ray
        import torch

        if rec.outcome != Outcome.TO_INFER.value:
            return rec  # what became of a slide: passed on to the driver
        attempt = ray.get(self.gate.attempt.remote(rec.slide, rec.tile_name))
        if attempt == 0:
            rec.outcome = Outcome.CANCELLED.value
            return rec
        if attempt > MAX_TILE_ATTEMPTS:
            return self._failed(
                rec, f"tile {rec.tile_name} ended its model actor {MAX_TILE_ATTEMPTS} times"
            )
        if self.kill_slide and rec.slide == self.kill_slide:  # tests: a crashing tile
            logging.shutdown()
            os._exit(1)
        try:
            with torch.inference_mode():
                result = self.model.infer(rec.plan_json, rec.tile)
        except Exception as err:  # noqa: BLE001 - the slide fails, the dataset goes on
            return self._failed(rec, f"tile {rec.tile_name}: {_reason(err)}")
        rec.outcome = Outcome.INFERRED.value
        rec.actor, rec.node = self.id, result["node"]
        rec.start, rec.end = result["start"], result["end"]
        rec.windows_run, rec.windows_skipped_tile = (
            result["windows_run"],
            result["windows_skipped"],
        )
        rec.tile = ""
        return rec

    def _failed(self, rec: TileRecord, reason: str) -> TileRecord:
        self.gate.fail.remote(rec.slide)
        rec.outcome, rec.note = Outcome.FAILED.value, reason
        return rec


def build_dataset(
    slides: list[tuple[str, str, float | None]],
    output: str,
    opts: SlideOptions,
    weight_hashes: list[str],
    *,
    gate: Any,
    job: str,
    kill_slide: str = "",
):
    """The job's dataset (lazy): slides -> plan -> one tile per block -> model actors."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    rows = [{"spec": json.dumps([url, name, mpp])} for url, name, mpp in slides]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.flat_map(
        plan_rows,
        fn_kwargs=dict(gate=gate, output=output, opts=opts, weight_hashes=weight_hashes, job=job),
        num_cpus=opts.cpus_per_task,
        compute=TaskPoolStrategy(size=min(len(rows), opts.slides_in_flight())),
    )
    return ds.map_batches(
        TileInferer,
        fn_constructor_kwargs=dict(opts=opts, gate=gate, kill_slide=kill_slide),
        compute=ActorPoolStrategy(
            min_size=opts.min_workers,
            max_size=opts.max_workers,
            initial_size=opts.min_workers,
            max_tasks_in_flight_per_actor=2,
        ),
        batch_size=1,
        batch_format="numpy",
        num_cpus=opts.actor_cpus(),
        num_gpus=opts.num_gpus_per_worker or None,
    )


def data_context(opts: SlideOptions, *, wait_for_nodes: bool):
    """The Ray Data settings of the slide job (see the module docstring): a copy of the
    current :class:`ray.data.DataContext`, for ``DataContext.current(...)``, so that
    other datasets of the process keep theirs."""
    from ray.data import DataContext

    ctx = DataContext.get_current().copy()
    ctx.enable_progress_bars = False  # one progress display: the driver's lines
    ctx.print_on_execution_start = False
    ctx.execution_no_progress_timeout_s = -1  # long plans/finishes/node waits are progress
    # The minimum pool loads the models before any slide is planned: a checkpoint that
    # does not fit stops the job there, with nothing written.
    # One tile per block: Ray Data never splits a block, and a slide's tiles in one block
    # would all go to one actor. (A repartition stage would ask for a whole CPU, which a
    # 2-CPU node holding two model actors never has: the job would hang.)
    ctx.target_max_block_size = 1
    ctx.wait_for_min_actors_s = int(opts.resource_timeout) if wait_for_nodes else 3600
    ctx.actor_task_retry_on_errors = False
    return ctx


def peak_overlap(spans: Iterable[tuple[float, float]]) -> int:
    """Most intervals open at once (an actor's first tile start to its last tile end).

    >>> peak_overlap([(0, 4), (1, 2), (3, 5)])
    2
    """
    events = sorted(
        [(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], e[1])
    )
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


# -- the driver -------------------------------------------------------------------------
def _load_error(err: BaseException) -> Exception:
    """The error to raise when the model actors could not start: a
    :class:`~mediar_ray.weights.CheckpointError` when a checkpoint was at fault, a
    :class:`.cluster.ResourceError` when no node could hold one, else a RuntimeError."""
    from mediar_ray.weights import CheckpointError

    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in reversed(lines):
        name, _, message = line.partition(": ")
        if name.rsplit(".", 1)[-1] == "CheckpointError":
            return CheckpointError(message)
    if any("Timed out while starting actors" in line for line in lines):
        return ResourceError(
            "no node able to hold a model actor joined in time (--resource-timeout)"
        )
    return RuntimeError(f"the slide job stopped: {lines[-1] if lines else err}")


@dataclass
class _Slide:
    plan_json: str
    tiles_total: int
    tiles_in: int = 0
    started: float | None = None
    ended: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    windows: dict[str, int] = field(default_factory=lambda: {"run": 0, "skipped": 0})


class ArchiveRun:
    """One job over ``slides`` ((url, output name, pixel-size override)) into ``output``.

    ``run()`` returns the report: done (cells, seconds per stage), skipped, failed
    (reason), elsewhere, the pool's utilisation and sizes.
    """

    def __init__(
        self,
        slides: list[tuple[str, str, float | None]],
        output: str,
        opts: SlideOptions,
        weight_hashes: list[str],
        wait_for_nodes: bool = False,
    ) -> None:
        self.slides, self.total = slides, len(slides)
        self.output, self.opts, self.weight_hashes = output, opts, weight_hashes
        self.wait_for_nodes = wait_for_nodes
        self.report: dict[str, Any] = {
            "done": {},
            "skipped": [],
            "failed": {},
            "notes": {},
            "elsewhere": {},
        }
        self.leases = None  # a .lease.Leases: its job id is the plan tasks' too
        self.planned: dict[str, _Slide] = {}  # slides with tiles in the stream
        self.finishing: dict[str, Any] = {}  # name -> ObjectRef of its finish task
        self.ended: queue.Queue = queue.Queue()  # (name, finish future), from callbacks
        self.intervals: dict[str, list[tuple[float, float]]] = {}
        self.nodes: set[str] = set()
        self.tiles_done = 0
        self.gate = None
        self.gate_peak = 0
        self.elastic = False  # an elastic pool on an autoscaling cluster
        self._requested = -1  # model actors the autoscaler was last asked to make room for
        self._last_progress = 0.0
        self._t0 = time.perf_counter()

    def in_flight(self) -> list[str]:
        """Slides this job holds (planned or planning, not ended): their leases are kept
        alive. Asked of the gate, from the lease thread."""
        import ray

        if self.gate is None:
            return []
        r = self.report
        ended = {*r["done"], *r["failed"], *r["skipped"], *r["elsewhere"]}
        # the gate may not have heard of a slide's end yet: its lease is not renewed
        names = [
            n for n in ray.get(self.gate.state.remote(), timeout=30)["active"] if n not in ended
        ]
        if self.leases is not None:
            for name in names:  # claimed by a plan task under this job's id
                self.leases.held.setdefault(name, time.time())
        return names

    def run(self) -> dict[str, Any]:
        """Run the dataset to its end and every slide's finish; returns the report."""
        import ray
        from ray.data import DataContext

        from mediar_ray.pipeline.finish import finish_slide

        if not self.slides:
            return self._report()
        from mediar_ray.pipeline.cluster import autoscaler_present

        self.elastic = self.opts.max_workers > self.opts.min_workers and autoscaler_present()
        self.gate = (
            ray.remote(SlideGate)
            .options(num_cpus=0, max_concurrency=1000)
            .remote(self.opts.slides_in_flight())
        )
        self.finish_task = ray.remote(finish_slide).options(
            num_cpus=self.opts.cpus_per_task, max_retries=3
        )
        job = self.leases.job if self.leases is not None else uuid.uuid4().hex
        try:
            with DataContext.current(data_context(self.opts, wait_for_nodes=self.wait_for_nodes)):
                ds = build_dataset(
                    self.slides,
                    self.output,
                    self.opts,
                    self.weight_hashes,
                    gate=self.gate,
                    job=job,
                    kill_slide=os.environ.get(KILL_SLIDE_ENV, ""),
                )
                for row in ds.iter_rows():
                    self._on_record(TileRecord.from_row(row))
                    self._collect()
                    self._progress()
                    self._hint_autoscaler()
        except Exception as err:  # the dataset itself stopped (model actors could not start)
            log.debug("the dataset stopped", exc_info=True)
            self._report()
            if self.tiles_done == 0:
                raise _load_error(err) from None
            raise RuntimeError(f"the slide job stopped: {_reason(err)}") from None
        finally:
            self._hint_autoscaler(end=True)
        while self.finishing:
            self._collect(block=True)
            self._progress()
        self.gate_peak = ray.get(self.gate.state.remote())["peak"]
        ray.kill(self.gate)
        return self._report()

    # -- records ----------------------------------------------------------------------
    def _on_record(self, rec: TileRecord) -> None:
        outcome = Outcome(rec.outcome)
        if outcome is Outcome.ELSEWHERE:
            log.info("%s: in progress elsewhere (job %s holds it), left to it", rec.slide, rec.note)
            self.report["elsewhere"][rec.slide] = rec.note
        elif outcome is Outcome.SKIPPED:
            log.info(
                "%s: complete already, skipped (--overwrite to redo)%s",
                rec.slide,
                f"; {rec.note}" if rec.note else "",
            )
            self.report["skipped"].append(rec.slide)
            if rec.note:
                self.report["notes"][rec.slide] = rec.note
        elif outcome is Outcome.FAILED:
            self._fail(rec.slide, rec.note)
        elif outcome is Outcome.PLANNED_EMPTY:
            self._finish(rec.slide, self._slide(rec))
        elif outcome is Outcome.INFERRED:
            self._on_tile(rec)

    def _slide(self, rec: TileRecord) -> _Slide:
        slide = self.planned.get(rec.slide)
        if slide is None:
            slide = self.planned[rec.slide] = _Slide(rec.plan_json, rec.tiles_total)
            slide.seconds["plan"] = rec.plan_seconds
            slide.windows["skipped"] += rec.windows_skipped
            log.info(
                "%s: planned, %d tile(s) to infer%s",
                rec.slide,
                rec.tiles_total,
                " (earlier state reused)" if rec.reused else "",
            )
        return slide

    def _on_tile(self, rec: TileRecord) -> None:
        self.tiles_done += 1
        self.intervals.setdefault(rec.actor, []).append((rec.start, rec.end))
        self.nodes.add(rec.node)
        if rec.slide in self.report["failed"]:
            return
        slide = self._slide(rec)
        slide.tiles_in += 1
        slide.windows["run"] += rec.windows_run
        slide.windows["skipped"] += rec.windows_skipped_tile
        slide.started = min(slide.started or rec.start, rec.start)
        slide.ended = max(slide.ended or rec.end, rec.end)
        done, total = slide.tiles_in, slide.tiles_total
        if total >= 10 and done % max(1, total // 10) == 0:
            log.info("%s: %d/%d tiles inferred", rec.slide, done, total)
        if done == total:
            self._finish(rec.slide, slide)

    def _finish(self, name: str, slide: _Slide) -> None:
        """Start the slide's finish task; its completion callback frees the gate."""
        if slide.started is not None:
            slide.seconds["infer"] = round(slide.ended - slide.started, 3)
        ref = self.finish_task.remote(slide.plan_json, self.opts, slide.seconds, slide.windows)
        self.finishing[name] = ref
        gate, ended = self.gate, self.ended

        def done(future: Any) -> None:  # a Ray thread: never blocks on the dataset
            gate.release.remote(name)
            ended.put((name, future))

        ref.future().add_done_callback(done)

    def _collect(self, block: bool = False) -> None:
        """Record the finish tasks that ended (their gate places are free already)."""
        while True:
            try:
                name, future = (
                    self.ended.get(timeout=PROGRESS_EVERY) if block else self.ended.get_nowait()
                )
            except queue.Empty:
                return
            block = False
            self.finishing.pop(name, None)
            slide = self.planned.pop(name)
            try:
                summary = future.result()
            except Exception as err:  # noqa: BLE001 - one slide's failure
                self._fail(name, _reason(err))
                continue
            if self.leases is not None:
                self.leases.release(name)
            self.report["done"][name] = {
                "cells": summary["cells"],
                "seconds": summary["seconds"],
                "tiles_inferred": slide.tiles_total,
                "windows": slide.windows,
            }
            log.info(
                "[%d/%d] %s: %d cells", self._count_ended(), self.total, name, summary["cells"]
            )

    def _fail(self, name: str, reason: str) -> None:
        if name in self.report["failed"]:
            return
        log.error("%s: failed: %s", name, reason)
        self.report["failed"][name] = reason
        self.planned.pop(name, None)
        if self.leases is not None:
            self.leases.release(name)

    def _hint_autoscaler(self, *, end: bool = False) -> None:
        """On an autoscaling cluster, ask for room for as many model actors as the queued
        tiles can keep busy (one per 4 tiles waiting, between --workers MIN and MAX), and
        for nothing once the archive has ended. Ray Data grows its pool only within the
        resources of the nodes already up (the operator's budget), so without this hint
        an elastic pool on a cluster that starts small never grows."""
        if not self.elastic:
            return
        from ray.autoscaler.sdk import request_resources

        waiting = sum(s.tiles_total - s.tiles_in for s in self.planned.values())
        want = (
            0 if end else min(self.opts.max_workers, max(self.opts.min_workers, -(-waiting // 4)))
        )
        if want == self._requested:
            return
        self._requested = want
        bundle = {"CPU": self.opts.actor_cpus()}
        if self.opts.gpu:
            bundle["GPU"] = self.opts.num_gpus_per_worker
        request_resources(bundles=[bundle] * want)

    # -- reporting --------------------------------------------------------------------
    def _count_ended(self) -> int:
        r = self.report
        return len(r["done"]) + len(r["skipped"]) + len(r["failed"]) + len(r["elsewhere"])

    def _progress(self) -> None:
        now = time.perf_counter()
        if now - self._last_progress < PROGRESS_EVERY:
            return
        self._last_progress = now
        elapsed = now - self._t0
        rate = self.tiles_done / elapsed if elapsed > 0 else 0.0
        known = list(self.planned.values())
        left = sum(s.tiles_total - s.tiles_in for s in known)
        per_slide = (sum(s.tiles_total for s in known) / len(known)) if known else 1.0
        left += per_slide * (self.total - self._count_ended() - len(known))
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
            len(known),
            self.tiles_done,
            rate,
            eta,
        )

    def _report(self) -> dict[str, Any]:
        self.report["utilization"] = self.utilization()
        self.report["model_nodes"] = len(self.nodes)
        spans = [(min(a for a, _ in iv), max(b for _, b in iv)) for iv in self.intervals.values()]
        self.report["pool"] = {
            "min": self.opts.min_workers,
            "max": self.opts.max_workers,
            "peak": peak_overlap(spans),
        }
        self.report["slides_in_flight_peak"] = self.gate_peak
        return self.report

    def utilization(self) -> dict[str, Any]:
        """Fraction of the time between the first tile's start and the last tile's end
        in which every model actor was busy (timestamps taken inside the actors)."""
        # the pool's minimum actors were there from the start: one without a tile counts
        per_actor = list(self.intervals.values())
        per_actor += [[] for _ in range(self.opts.min_workers - len(per_actor))]
        together, span = all_busy_fraction(per_actor)
        return {
            "all_actors_busy": round(together, 4),
            "span_s": round(span, 3),
            "tiles": self.tiles_done,
            "actors": len(self.intervals),
        }
