"""Options of a slide job, checked before any work starts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from mediar_ray.errors import UserError

__all__ = [
    "ADDED_OPTIONS",
    "LEGACY_NAMES",
    "PRECISIONS",
    "RESULT_OPTIONS",
    "OptionError",
    "SlideOptions",
]

#: Options that change a slide's result: a slide's scratch state or finished output is
#: reused only when all of them (and the input and the weights) are unchanged.
RESULT_OPTIONS = (
    "tta",
    "roi_size",
    "tile_size",
    "halo",
    "reader",
    "model_config",
    "flow_params",
    "target_mpp",
    "mpp",
    "tissue",
    "copy_image",
    "labels_level0",
    "cells",
    "geojson",
    "precision",
)

#: Result options an earlier version recorded under another name.
LEGACY_NAMES = {"tile": "tile_size"}
#: Result options added after slides were first fingerprinted, with the value an earlier
#: result is taken to have. Earlier versions ran fp32; taking their slides as "auto"
#: (bf16 on CPUs with bf16 units) keeps a finished archive from being redone on upgrade:
#: bf16 labels agree with fp32 ones at F1 >= 0.97 (tests/test_precision.py); --overwrite
#: redoes them.
ADDED_OPTIONS = {"precision": "auto"}

#: Arithmetic of the model's forward pass (``--precision``; :mod:`mediar_ray.precision`
#: says what auto picks). A torch-free copy of ``mediar_ray.precision.PRECISIONS`` so that
#: building the command line imports no torch; tests/test_precision.py checks they agree.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Largest pixel size accepted (um): coarser than any microscope objective's field of a
#: cell; a value above it is a typo (an area in um^2, a magnification).
MAX_MPP = 1000.0


def _pixel_size(value: float | None) -> bool:
    """None, or a finite positive pixel size of at most :data:`MAX_MPP` um."""
    return value is None or (math.isfinite(value) and 0 < value <= MAX_MPP)


def _pool_size(value: int | str) -> tuple[int, int] | None:
    """``--workers`` as (minimum, maximum) actors: "N" or N is (N, N), "MIN:MAX" an elastic
    pool; None when it is neither (or a bound is below 1, or MIN > MAX)."""
    if isinstance(value, bool):
        return None
    text = str(value).strip()
    low, sep, high = text.partition(":")
    try:
        bounds = (int(low), int(high) if sep else int(low))
    except ValueError:
        return None
    return bounds if 1 <= bounds[0] <= bounds[1] else None


def _flag(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A field that is also a command-line flag (``--<name with dashes>``): its default,
    its help, and any further ``argparse`` arguments (``metavar``, ``action``).
    ``list``/``dict`` as default: an empty one per instance."""
    meta = {"help": help, "argparse": argparse_kwargs}
    if default in (list, dict):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


class OptionError(UserError):
    """A job option is out of range; the message names the option and what is allowed."""


@dataclass
class SlideOptions:
    """Options of a slide job (defaults: the single-image path's).

    ``workers`` is the pool of model actors: N (fixed) or "MIN:MAX" (elastic: Ray Data
    grows it while tiles queue, up to MAX, and shrinks it when they drain);
    ``max_slides_in_flight`` bounds the slides planned but not finished (0:
    ``2 x max workers + 4``), which bounds scratch
    storage and memory whatever the archive's size. ``cpus_per_worker`` is the CPU
    request of each model actor (0: 1 with GPUs, else 0.75, so that a node holding an
    actor keeps room for the CPU stages); ``cpus_per_task`` that of each CPU stage task.

    Resolution and glass: ``target_mpp`` (micrometres per pixel; None keeps each slide's
    level 0) picks the pyramid level and resampling; ``mpp`` (all slides) and ``mpp_csv``
    (a ``slide,mpp`` table) override the pixel sizes files state; ``tissue`` is "auto"
    (detect), "off" or the URL of a mask image; ``copy_image`` keeps a full copy of the
    processing image in the output; ``labels_level0`` also writes the labels on the
    slide's level-0 grid.

    ``roi_size`` None: the weights' own window size
    (:func:`mediar_ray.weights.window_size`), set when the job resolves its weights.

    Model: ``precision`` is the forward pass's arithmetic (:data:`PRECISIONS`; part of
    the result), ``batch_size`` the windows per forward pass (0: the device's default;
    not part of the result).

    Cells: ``cells`` writes the slide's partition of the per-cell Parquet table
    (``OUTPUT/cells``), ``geojson`` also ``OUTPUT/<name>.geojson.gz`` for QuPath.
    """

    weights: list[str] = _flag(  # noqa: RUF009 - a Field with a default_factory
        list,
        "checkpoint path or URL; repeat for an ensemble (default: bundled model)",
        metavar="CKPT",
        action="append",
    )
    model_config: dict[str, Any] = _flag(  # noqa: RUF009 - as above
        dict, "model parameters (file or inline JSON)", metavar="JSON"
    )
    tta: bool = _flag(True, "test-time augmentation (default: on)")
    roi_size: int | None = _flag(
        None,
        "sliding-window size (default: the crop size the weights were trained on, "
        "stored in mediar_ray checkpoints: 256 for the bundled model; else MEDIAR's 512)",
    )
    tile_size: int = _flag(
        1024,
        "tile and chunk side in pixels (memory per worker grows with it; a slide "
        "smaller than a tile is one chunk of its own size)",
    )
    halo: int = _flag(128, "flow-tracking halo in pixels (at least the largest cell diameter)")
    workers: int | str = _flag(
        1,
        "model actors: N (a fixed pool) or MIN:MAX (a pool that grows while tiles queue "
        "and shrinks when they drain; on GPUs one actor per GPU)",
        metavar="N|MIN:MAX",
    )
    num_gpus_per_worker: float = _flag(0.0, "GPUs per model actor; > 0 runs the models on CUDA")
    device: str = _flag("cpu", "cpu, or cuda / cuda:N with --num-gpus-per-worker > 0")
    overwrite: bool = _flag(False, "redo slides that are complete")
    reader: str = _flag(
        "auto",
        "slide reader: auto (by content and name) or a reader's name (tifffile, "
        "openslide, wsidicom, ome-zarr, pillow)",
    )
    flow_params: dict[str, Any] = field(default_factory=dict)  # no flag: from Python only
    max_slides_in_flight: int = _flag(
        0,
        "slides prepared, inferred or finished at once (bounds scratch storage and "
        "memory; default 0: 2 x the maximum of --workers + 4)",
        metavar="N",
    )
    cpus_per_worker: float = _flag(
        0.0,
        "CPUs each model actor requests (default: 1 with GPUs, else 0.75, leaving "
        "room on its node for the CPU stages)",
    )
    cpus_per_task: float = _flag(
        0.25, "CPUs each CPU-stage task requests (plan, gather, track, ...)"
    )
    resource_timeout: float = _flag(
        600.0,
        "on an autoscaling cluster, how long to wait for a node that can hold a model actor",
        metavar="SECONDS",
    )
    target_mpp: float | None = _flag(
        None,
        "process every slide at this pixel size (micrometres per pixel): read from "
        "the pyramid level closest to it without being coarser, resampled tile by tile "
        "(default: each slide's level 0)",
        metavar="UM",
    )
    mpp: float | None = _flag(
        None, "pixel size of level 0 for all slides, instead of their metadata", metavar="UM"
    )
    mpp_csv: str | None = _flag(
        None,
        "per-slide pixel sizes: a CSV with columns slide,mpp (slide = file name, name "
        "without extension, or URL); a slide matched by rows that disagree is an error, "
        "rows matching no input a warning",
        metavar="CSV",
    )
    tissue: str = _flag(
        "auto",
        "skip windows that touch no tissue: detect it (auto: slides of 2048 px or "
        "more), off, or a mask image ({name} = the slide's name)",
        metavar="auto|off|MASK_URL",
    )
    copy_image: bool = _flag(
        False,
        "keep a full copy of the processed image in the output (default: a viewing "
        "pyramid from 1/4 of the processing resolution)",
    )
    labels_level0: bool = _flag(
        False,
        "also write the labels on the slide's level-0 grid (labels/cells_level0) "
        "when processing at another resolution",
    )
    cells: bool = _flag(
        True, "write the per-cell table OUTPUT/cells (Parquet, partitioned by slide; default: on)"
    )
    geojson: bool = _flag(False, "also write OUTPUT/<name>.geojson.gz: cell outlines for QuPath")
    precision: str = _flag(
        "auto",
        "arithmetic of the network forward (default auto: bf16 on CPUs with AMX or "
        "AVX512-BF16 and on CUDA GPUs of compute capability 8.0 or more, fp16 on older "
        "GPUs, else fp32); part of a slide's result",
        metavar="|".join(PRECISIONS),
    )
    batch_size: int = _flag(
        0, "windows per forward pass (default 0: the device's default)", metavar="N"
    )

    def __post_init__(self) -> None:
        self.validate()  # options out of range never exist, whoever makes them

    def validate(self) -> "SlideOptions":
        """Raise :class:`OptionError` for the first option out of range; else ``self``."""
        from mediar_ray.sources import READERS

        rules = [
            (
                "--tile-size",
                self.tile_size,
                self.tile_size >= 64 and self.tile_size % 16 == 0,
                "a multiple of 16, at least 64",
            ),
            (
                "--roi-size",
                self.roi_size,
                self.roi_size is None or (32 <= self.roi_size <= 4096 and self.roi_size % 32 == 0),
                "a multiple of 32 from 32 to 4096 (the network halves the size 5 times)",
            ),
            (
                "--halo",
                self.halo,
                0 <= self.halo <= self.tile_size,
                f"an integer from 0 to the tile size ({self.tile_size}); at least the largest "
                "cell diameter",
            ),
            (
                "--workers",
                self.workers,
                _pool_size(self.workers) is not None,
                "N (an integer >= 1) or MIN:MAX (integers, 1 <= MIN <= MAX)",
            ),
            (
                "--num-gpus-per-worker",
                self.num_gpus_per_worker,
                self.num_gpus_per_worker >= 0,
                ">= 0",
            ),
            (
                "--device",
                self.device,
                self.device in ("cpu", "cuda") or self.device.startswith("cuda:"),
                "cpu or cuda",
            ),
            (
                "--device",
                self.device,
                self.device == "cpu" or self.gpu,
                (
                    "cuda only with --num-gpus-per-worker > 0 (the model actors must be given "
                    "GPUs); use --device cpu, or add --num-gpus-per-worker 1"
                ),
            ),
            (
                "--precision",
                self.precision,
                self.precision in PRECISIONS,
                f"one of {', '.join(PRECISIONS)}",
            ),
            (
                "--batch-size",
                self.batch_size,
                0 <= self.batch_size <= 1024,
                "windows per forward pass from 1 to 1024, or 0 for the device's default",
            ),
            ("--reader", self.reader, self.reader in READERS, f"one of {', '.join(READERS)}"),
            (
                "--max-slides-in-flight",
                self.max_slides_in_flight,
                self.max_slides_in_flight >= 0,
                "an integer >= 1, or 0 for the default",
            ),
            (
                "--cpus-per-worker",
                self.cpus_per_worker,
                self.cpus_per_worker >= 0,
                "> 0, or 0 for the default",
            ),
            ("--cpus-per-task", self.cpus_per_task, self.cpus_per_task > 0, "> 0"),
            ("--resource-timeout", self.resource_timeout, self.resource_timeout > 0, "> 0 seconds"),
            (
                "--target-mpp",
                self.target_mpp,
                _pixel_size(self.target_mpp),
                f"a finite positive pixel size in micrometres, at most {MAX_MPP:g}",
            ),
            (
                "--mpp",
                self.mpp,
                _pixel_size(self.mpp),
                f"a finite positive pixel size in micrometres, at most {MAX_MPP:g}",
            ),
            ("--tissue", self.tissue, bool(self.tissue), "auto, off, or the URL of a mask image"),
            (
                "--geojson",
                self.geojson,
                self.cells or not self.geojson,
                "only with the cell table (not with --no-cells)",
            ),
        ]
        for name, value, ok, allowed in rules:
            if not ok:
                raise OptionError(f"{name} {value!r} is not allowed: {allowed}")
        return self

    @property
    def gpu(self) -> bool:
        """True when the model actors ask Ray for GPUs."""
        return self.num_gpus_per_worker > 0

    @property
    def min_workers(self) -> int:
        """Model actors the pool starts with and never goes below (``--workers``)."""
        return _pool_size(self.workers)[0]

    @property
    def max_workers(self) -> int:
        """Model actors the pool may grow to while tiles queue (``--workers``)."""
        return _pool_size(self.workers)[1]

    def slides_in_flight(self) -> int:
        """The bound on slides planned and not finished (default ``2 x max workers + 4``)."""
        return self.max_slides_in_flight or 2 * self.max_workers + 4

    def actor_cpus(self) -> float:
        """CPUs each model actor asks for (default 1 with GPUs, else 0.75)."""
        return self.cpus_per_worker or (1.0 if self.gpu else 0.75)

    @property
    def tile(self) -> int:
        """``tile_size`` under the name the pipeline's plan uses."""
        return self.tile_size

    def result_options(self) -> dict[str, Any]:
        """The options that change a slide's result (:data:`RESULT_OPTIONS`)."""
        d = self._shown()
        return {k: d[k] for k in RESULT_OPTIONS}

    def _shown(self) -> dict[str, Any]:
        """The fields with the URLs a user gave (mask, pixel-size table) without
        credentials: they are written into summaries, markers and plans."""
        from mediar_ray.io import safe_url

        d = asdict(self)
        for key in ("tissue", "mpp_csv"):
            if d[key] is not None:
                d[key] = safe_url(d[key])
        return d

    @staticmethod
    def upgrade_result_options(old: dict[str, Any]) -> dict[str, Any]:
        """Result options recorded by an earlier version, as this one names them: renamed
        keys (:data:`LEGACY_NAMES`) renamed, and the options added since
        (:data:`ADDED_OPTIONS`) at the value that reproduces what that version did."""
        old = {LEGACY_NAMES.get(k, k): v for k, v in (old or {}).items()}
        return {**{k: v for k, v in ADDED_OPTIONS.items() if k not in old}, **old}

    def public(self) -> dict[str, Any]:
        """All options except the weights' URLs (which may carry credentials)."""
        return {k: v for k, v in self._shown().items() if k != "weights"}
