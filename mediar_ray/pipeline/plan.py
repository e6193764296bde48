"""The plan stage of one slide: arrays, level-0 copy, exact intensity statistics, and
which tiles still need the model.

A slide's unfinished state (``.scratch``: plan, partials, flows, done records) is reused
by a rerun only when the run that wrote it had the same fingerprint (input identity,
result options, weights); otherwise it is discarded, with a log line saying what differs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import fsspec
import numpy as np

from mediar_ray.pipeline.layout import SlideLayout, tile_grid
from mediar_ray.pipeline.options import SlideOptions
from mediar_ray.pipeline.provenance import differences, fingerprint, input_identity
from mediar_ray.pipeline.stages import (
    SlidePlan,
    create_arrays,
    measure_tiles,
    tiles_to_infer,
    windows_never_run,
)
from mediar_ray.pipeline.tasks import fan_out
from mediar_ray.sources import open_slide

__all__ = [
    "PlannedSlide",
    "plan_slide",
    "prepare_slide",
    "read_marker",
    "read_plan",
    "remove_slide_outputs",
]

log = logging.getLogger("mediar_ray.slides")

#: Tiles read and measured per task of the plan stage.
TILES_PER_COPY_TASK = 16
#: Tissue detection ("auto") runs on slides at least this many processing px on a side.
TISSUE_MIN_SIDE = 2048


@dataclass
class PlannedSlide:
    """A planned slide: its plan (JSON), the tiles the model must still infer (JSON,
    largest first), the windows no tile the model sees owns (skipped on glass), and
    whether earlier state was reused or discarded (and why)."""

    plan_json: str
    tiles: list[str]
    windows_skipped: int = 0
    reused: bool = False
    discarded: list[str] | None = None

    @property
    def plan(self) -> SlidePlan:
        """The :class:`SlidePlan` decoded from :attr:`plan_json`."""
        return SlidePlan.from_json(self.plan_json)


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def _remove(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _upgraded(fp: dict | None) -> dict | None:
    """A fingerprint recorded by an earlier version, its options named as today's
    (:meth:`.options.SlideOptions.upgrade_result_options`), so that a rename or a new
    option at its default does not make every finished slide look stale."""
    if not fp or not isinstance(fp.get("options"), dict):
        return fp
    return {**fp, "options": SlideOptions.upgrade_result_options(fp["options"])}


def read_plan(layout: SlideLayout) -> SlidePlan | None:
    """The plan in a slide's scratch, or None if there is none or it cannot be read
    (an interrupted write, or an earlier version's format)."""
    url = f"{layout.scratch}/plan.json"
    try:
        with fsspec.open(url, "r") as f:
            return SlidePlan.from_json(f.read())
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError):
        return None


def plan_slide(
    url: str,
    name: str,
    output: str,
    opts: SlideOptions,
    fingerprint: dict | None = None,
    mpp: float | None = None,
) -> PlannedSlide:
    """Plan slide ``url`` as ``OUTPUT/<name>.zarr`` (or reuse a matching earlier plan).

    The caller has checked that the slide is not complete. Anything under the slide's
    output from a run with another fingerprint is removed before planning anew. ``mpp``
    overrides the pixel size the file states (micrometres per level-0 pixel). ``opts`` are
    as :func:`.run.check_weights` leaves them (weights and ``roi_size`` resolved).
    """
    layout = SlideLayout(output, name)
    old = read_plan(layout)
    discarded = None
    if old is not None:
        diff = differences(_upgraded(old.fingerprint), fingerprint) if fingerprint else []
        if not diff:
            return _planned(old, opts, reused=True)
        discarded = diff
        log.info(
            "%s: discarding unfinished state from another run (%s differ)", name, ", ".join(diff)
        )
    # Unfinished, from another run or from before its plan: nothing of an earlier run
    # (its table rows, its GeoJSON) may outlive it beside the new one.
    remove_slide_outputs(output, name)
    plan = _new_plan(url, layout, opts, fingerprint, mpp)
    return _planned(plan, opts, discarded=discarded)


def _planned(
    plan: SlidePlan, opts: SlideOptions, reused: bool = False, discarded: list[str] | None = None
) -> PlannedSlide:
    tiles = [json.dumps(asdict(t)) for t in tiles_to_infer(plan)]
    return PlannedSlide(plan.to_json(), tiles, windows_never_run(plan, opts.tta), reused, discarded)


def _new_plan(
    url: str, layout: SlideLayout, opts: SlideOptions, fingerprint: dict | None, mpp: float | None
) -> SlidePlan:
    from mediar_ray.scale import check_processing_size, choose_level, processing_shape, slide_mpp

    with open_slide(url, opts.reader) as source:
        mpp0 = slide_mpp(source, url, mpp)
        level, scale = choose_level(source.levels, mpp0, opts.target_mpp, slide=url)
        lv = source.levels[level]
        shape = processing_shape(lv.shape, scale)
        check_processing_size(
            source.levels[0], shape, target_mpp=opts.target_mpp, mpp0=mpp0, slide=url
        )
        tile = min(opts.tile, max(shape))  # a small image is one chunk of its own size
        plan = SlidePlan(
            url,
            layout,
            shape,
            source.channels,
            str(source.dtype),
            tile,
            opts.halo,
            roi_size=opts.roi_size,
            reader=opts.reader,
            fingerprint=fingerprint,
            level=level,
            scale=scale,
            mpp=mpp0,
            level_downsample=lv.downsample,
            source_shape=source.shape,
            copy_image=opts.copy_image,
        )
    plan.partial = (min(plan.spill, shape[0]), min(plan.spill, shape[1]))
    create_arrays(plan)
    tiles = tile_grid(plan.shape, plan.tile)
    groups = [tiles[i : i + TILES_PER_COPY_TASK] for i in range(0, len(tiles), TILES_PER_COPY_TASK)]
    results = fan_out(
        measure_tiles,
        [(plan, g) for g in groups],
        opts.cpus_per_task,
        progress=f"{layout.stem}: plan",
    )
    merged = results[0][0]
    for acc, _ in results[1:]:
        merged.merge(acc)
    plan.stats = merged.stats()
    thumb = _thumbnail(plan, [b for _, blocks in results for b in blocks])
    plan.tissue = store_tissue(plan, detect_tissue(plan, thumb, opts.tissue))
    with fsspec.open(f"{layout.scratch}/plan.json", "w") as f:
        f.write(plan.to_json())  # written last: a plan on disk means the arrays are ready
    return plan


def _thumbnail(plan: SlidePlan, blocks: list[tuple[int, int, np.ndarray]]) -> np.ndarray:
    """The processing image's block means (``thumb_factor`` px), assembled from tiles."""
    f = plan.thumb_factor
    shape = (-(-plan.shape[0] // f), -(-plan.shape[1] // f))
    thumb = np.zeros(shape + blocks[0][2].shape[2:], np.float32)
    for row, col, block in blocks:
        thumb[row : row + block.shape[0], col : col + block.shape[1]] = block
    return thumb


def detect_tissue(plan: SlidePlan, thumb: np.ndarray, mode: str) -> np.ndarray | None:
    """The slide's tissue mask on the thumbnail grid, or None to run every window.

    ``mode`` "off": None; "auto": detected (:func:`mediar_ray.tissue.tissue_mask`,
    widened by the halo, the largest cell diameter) on slides of at least
    :data:`TISSUE_MIN_SIDE` px, None on smaller ones, which hold little glass to skip;
    otherwise the URL of a mask image (``{name}`` is replaced by the slide's name).
    """
    from mediar_ray.tissue import load_mask, tissue_mask

    if mode == "off":
        return None
    if mode == "auto":
        if max(plan.shape) < TISSUE_MIN_SIDE:
            return None
        return tissue_mask(thumb, margin=plan.halo / plan.thumb_factor + 1)
    return load_mask(mode.replace("{name}", plan.layout.stem), thumb.shape[:2])


def store_tissue(plan: SlidePlan, mask: np.ndarray | None) -> bool:
    """Write ``labels/tissue/0`` (uint8, 1 = tissue) if there is a mask; True if so."""
    import zarr

    if mask is None:
        return False
    group = zarr.open_group(plan.layout.path("labels", "tissue"), mode="a", zarr_format=3)
    array = group.create_array(
        "0",
        shape=mask.shape,
        chunks=(1024, 1024),
        dtype="uint8",
        fill_value=0,
        dimension_names=["y", "x"],
        overwrite=True,
    )
    array[:] = mask.astype(np.uint8)
    return True


def read_marker(layout: SlideLayout) -> dict | None:
    """The completion marker of a slide's output, or None if the slide is not complete:
    no marker, or one that is empty or unreadable (a write cut short by an earlier
    version, a disk that filled up): such a slide is redone, never skipped."""
    try:
        with fsspec.open(layout.marker, "r") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        marker = json.loads(text)
    except ValueError:
        log.warning("%s: its completion marker is empty or unreadable: redone", layout.stem)
        return None
    return marker if isinstance(marker, dict) and marker.get("complete") else None


def remove_slide_outputs(output: str, name: str) -> list[str]:
    """Remove every artefact of slide ``name``'s earlier runs under ``output``: its
    ``<name>.zarr`` (labels, level-0 labels, tissue mask, scratch), its partition of the
    cell table and its GeoJSON. Returns the URLs removed."""
    from mediar_ray.cells.table import partition_url

    root = output.rstrip("/")
    removed = []
    for url in (
        SlideLayout(output, name).root,
        partition_url(output, name),
        f"{root}/{name}.geojson.gz",
    ):
        if _exists(url):
            _remove(url)
            removed.append(url)
    return removed


def prepare_slide(
    url: str,
    name: str,
    output: str,
    opts: SlideOptions,
    weight_hashes: list[str],
    mpp: float | None = None,
) -> dict:
    """Decide what to do with one slide of the archive, then plan it if needed.

    Returns ``{"kind": "skip" | "stale" | "planned", ...}``: "skip" when its output is
    complete from a run with the same fingerprint (``"note"`` when the marker predates
    fingerprints), "stale" (with ``"reason"``) when it is complete from another input,
    options or weights and ``--overwrite`` is not given, else "planned" with
    ``"planned"`` (:class:`PlannedSlide`) and ``"seconds"``. ``mpp``: the pixel size
    to use instead of the file's (``--mpp`` or the slide's row of ``--mpp-csv``).
    """
    import time

    start = time.perf_counter()
    layout = SlideLayout(output, name)
    fp = fingerprint(input_identity(url), {**opts.result_options(), "mpp": mpp}, weight_hashes)
    marker = read_marker(layout)
    if marker is not None and opts.overwrite:
        log.info("%s: complete, redone (--overwrite)", name)
        remove_slide_outputs(output, name)
    elif marker is not None and "fingerprint" not in marker:
        return {
            "kind": "skip",
            "note": "complete from an earlier version that did not "
            "record its inputs and options; --overwrite redoes it",
        }
    elif marker is not None:
        diff = differences(_upgraded(marker["fingerprint"]), fp)
        if not diff:
            return {"kind": "skip"}
        return {
            "kind": "stale",
            "reason": (
                f"{name}.zarr is complete from another run ({', '.join(diff)} differ); "
                "--overwrite replaces it, or write to another output root"
            ),
        }
    planned = plan_slide(url, name, output, opts, fp, mpp)
    return {"kind": "planned", "planned": planned, "seconds": round(time.perf_counter() - start, 3)}
