"""Options of a slide job, checked before any work starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any
from mediar_ray.errors import UserError

__all__ = ["OptionError", "SlideOptions", "RESULT_OPTIONS"]

#: Options that change a slide's result: a slide's scratch state or finished output is
#: reused only when all of them (and the input and the weights) are unchanged.
RESULT_OPTIONS = ("tta", "roi_size", "tile", "halo", "reader", "model_config", "flow_params",
                  "target_mpp", "mpp", "tissue", "copy_image", "labels_level0", "cells",
                  "geojson", "precision")


class OptionError(UserError):
    """A job option is out of range; the message names the option and what is allowed."""


@dataclass
class SlideOptions:
    """Options of a slide job (defaults: the single-image path's).

    ``workers`` model actors live for the whole job; ``max_slides_in_flight`` bounds the
    slides planned but not finished (0: ``2 x workers + 4``), which bounds scratch
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

    Cells: ``cells`` writes the slide's partition of the per-cell Parquet table
    (``OUTPUT/cells``), ``geojson`` also ``OUTPUT/<name>.geojson.gz`` for QuPath.
    """

    weights: list[str] = field(default_factory=list)
    model_config: dict[str, Any] = field(default_factory=dict)
    tta: bool = True
    roi_size: int | None = None
    tile: int = 1024
    halo: int = 128
    workers: int = 1
    num_gpus_per_worker: float = 0.0
    device: str = "cpu"
    overwrite: bool = False
    reader: str = "auto"
    flow_params: dict[str, Any] = field(default_factory=dict)
    max_slides_in_flight: int = 0
    cpus_per_worker: float = 0.0
    cpus_per_task: float = 0.25
    resource_timeout: float = 600.0
    target_mpp: float | None = None
    mpp: float | None = None
    mpp_csv: str | None = None
    tissue: str = "auto"
    copy_image: bool = False
    labels_level0: bool = False
    cells: bool = True
    geojson: bool = False
    # Added minimally by issue 42 (the network forward); issue 39 owns the flags.
    precision: str = "auto"
    batch_size: int = 0

    def validate(self) -> "SlideOptions":
        """Raise :class:`OptionError` for the first option out of range; else ``self``."""
        from mediar_ray.sources import READERS

        rules = [
            ("--tile-size", self.tile, self.tile >= 64 and self.tile % 16 == 0,
             "a multiple of 16, at least 64"),
            ("--roi-size", self.roi_size, self.roi_size is None or (
                self.roi_size >= 32 and self.roi_size % 32 == 0),
             "a positive multiple of 32 (the network halves the size 5 times)"),
            ("--halo", self.halo, 0 <= self.halo <= self.tile,
             f"an integer from 0 to the tile size ({self.tile}); at least the largest "
             "cell diameter"),
            ("--workers", self.workers, self.workers >= 1, "an integer >= 1"),
            ("--num-gpus-per-worker", self.num_gpus_per_worker,
             self.num_gpus_per_worker >= 0, ">= 0"),
            ("--device", self.device, self.device in ("cpu", "cuda") or
             self.device.startswith("cuda:"), "cpu or cuda"),
            ("--reader", self.reader, self.reader in READERS, f"one of {', '.join(READERS)}"),
            ("--max-slides-in-flight", self.max_slides_in_flight,
             self.max_slides_in_flight >= 0, "an integer >= 1, or 0 for the default"),
            ("--cpus-per-worker", self.cpus_per_worker, self.cpus_per_worker >= 0,
             "> 0, or 0 for the default"),
            ("--cpus-per-task", self.cpus_per_task, self.cpus_per_task > 0, "> 0"),
            ("--resource-timeout", self.resource_timeout, self.resource_timeout > 0,
             "> 0 seconds"),
            ("--target-mpp", self.target_mpp, self.target_mpp is None or self.target_mpp > 0,
             "a positive pixel size in micrometres"),
            ("--mpp", self.mpp, self.mpp is None or self.mpp > 0,
             "a positive pixel size in micrometres"),
            ("--tissue", self.tissue, bool(self.tissue), "auto, off, or the URL of a mask image"),
            ("--geojson", self.geojson, self.cells or not self.geojson,
             "only with the cell table (not with --no-cells)"),
        ]
        for name, value, ok, allowed in rules:
            if not ok:
                raise OptionError(f"{name} {value!r} is not allowed: {allowed}")
        return self

    @property
    def gpu(self) -> bool:
        return self.num_gpus_per_worker > 0

    def slides_in_flight(self) -> int:
        return self.max_slides_in_flight or 2 * self.workers + 4

    def actor_cpus(self) -> float:
        return self.cpus_per_worker or (1.0 if self.gpu else 0.75)

    def result_options(self) -> dict[str, Any]:
        """The options that change a slide's result (:data:`RESULT_OPTIONS`)."""
        d = asdict(self)
        return {k: d[k] for k in RESULT_OPTIONS}

    def public(self) -> dict[str, Any]:
        """All options except the weights' URLs (which may carry credentials)."""
        return {k: v for k, v in asdict(self).items() if k != "weights"}
