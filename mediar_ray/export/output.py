"""A finished slide output, opened lazily: what the napari reader and the SpatialData
export both show.

``OUTPUT/<name>.zarr`` (:mod:`mediar_ray.pipeline.layout`) holds the viewing image
pyramid, ``labels/cells`` and (when a mask was used) ``labels/tissue``, each with NGFF
0.5 ``multiscales`` whose scale and translation are micrometres from the centre of the
slide's first level-0 pixel (level-0 pixels without a unit when the pixel size is
unknown). The slide's rows of the cell table are ``OUTPUT/cells/slide=<name>/``.

Every array here is a dask array over the zarr chunks: nothing is read until a chunk is
shown or exported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dask.array as da
import fsspec
import numpy as np
import pandas as pd
import zarr

from mediar_ray.errors import UserError
from mediar_ray.io import safe_url

__all__ = ["OutputError", "Pyramid", "SlideOutput", "open_output", "read_cells"]


class OutputError(UserError):
    """The path is not a complete slide output of ``mediar-ray segment-slides``."""


@dataclass
class Pyramid:
    """One NGFF multiscale image: ``levels[k]`` (dask, (c,) y, x) finest first;
    ``scale[k]`` and ``translation[k]`` along (y, x) in ``unit`` per pixel (unit None:
    level-0 pixels of the slide)."""

    name: str
    levels: list[da.Array]
    scale: list[tuple[float, float]]
    translation: list[tuple[float, float]]
    unit: str | None
    channel: bool = False


@dataclass
class SlideOutput:
    """A slide's output: its image, labels and where its cell rows are."""

    url: str
    output_root: str
    name: str
    image: Pyramid
    labels: dict[str, Pyramid] = field(default_factory=dict)
    channels: int = 1

    @property
    def cells(self) -> Pyramid:
        """The pyramid of the cell labels (``labels["cells"]``)."""
        return self.labels["cells"]


def _pyramid(group: zarr.Group, url: str) -> Pyramid:
    ome = dict(group.attrs).get("ome", {})
    try:
        ms = ome["multiscales"][0]
    except (KeyError, IndexError):
        raise OutputError(
            f"{safe_url(url)}: no NGFF 0.5 'multiscales' metadata; open "
            "an output of mediar-ray segment-slides (OUTPUT/<name>.zarr)"
        ) from None
    space = [k for k, a in enumerate(ms["axes"]) if a.get("type") == "space"]
    unit = ms["axes"][space[-1]].get("unit")
    levels, scales, shifts = [], [], []
    for ds in ms["datasets"]:
        array = group[ds["path"]]
        # zarr.Array is array-like; dask reads it chunk by chunk (one task per chunk).
        levels.append(da.from_zarr(array))
        t = {c["type"]: c for c in ds["coordinateTransformations"]}
        scale = t["scale"]["scale"]
        shift = t.get("translation", {}).get("translation", [0.0] * len(scale))
        scales.append((float(scale[space[0]]), float(scale[space[1]])))
        shifts.append((float(shift[space[0]]), float(shift[space[1]])))
    return Pyramid(ms.get("name", ""), levels, scales, shifts, unit, channel=len(ms["axes"]) == 3)


def open_output(url: str) -> SlideOutput:
    """Open ``OUTPUT/<name>.zarr`` lazily.

    Parameters
    ----------
    url : str
        Local path or fsspec URL of a slide's output group.

    Returns
    -------
    SlideOutput
        The image pyramid, every label image listed under ``labels`` (``cells``,
        ``tissue`` when present), and the output root that holds the cell table.

    Raises
    ------
    OutputError
        Not a zarr group with NGFF metadata, or the slide is not complete (no
        ``.mediar_complete`` marker: the job is still running or failed).
    """
    root_url = url.rstrip("/")
    try:
        group = zarr.open_group(root_url, mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as err:
        raise OutputError(
            f"{safe_url(url)}: not a zarr v3 group ({type(err).__name__}); "
            "give OUTPUT/<name>.zarr written by mediar-ray segment-slides"
        ) from None
    fs, path = fsspec.core.url_to_fs(root_url)
    if not fs.exists(f"{path}/.mediar_complete"):
        raise OutputError(
            f"{safe_url(url)}: the slide is not complete (no .mediar_complete); "
            "wait for the job, or rerun mediar-ray segment-slides on it"
        )
    name = root_url.rsplit("/", 1)[-1]
    name = name.removesuffix(".zarr")
    image = _pyramid(group, url)
    labels = {}
    names = (
        dict(group["labels"].attrs).get("ome", {}).get("labels", []) if "labels" in group else []
    )
    for label in names:
        labels[label] = _pyramid(group[f"labels/{label}"], f"{url}/labels/{label}")
    if "cells" not in labels:
        raise OutputError(f"{safe_url(url)}: no labels/cells; rerun mediar-ray segment-slides")
    channels = int(image.levels[0].shape[0]) if image.channel else 1
    return SlideOutput(
        url=root_url,
        output_root=root_url.rsplit("/", 1)[0],
        name=name,
        image=image,
        labels=labels,
        channels=channels,
    )


def read_cells(out: SlideOutput, *, flat: bool = True) -> pd.DataFrame:
    """The slide's rows of the cell table (``OUTPUT/cells/slide=<name>``), sorted by id.

    Parameters
    ----------
    out : SlideOutput
    flat : bool
        Split each per-channel list column (``intensity_mean`` ...) into one float
        column per channel, ``<name>_<c>`` (napari's feature table and AnnData's
        ``obs`` hold scalars).

    Returns
    -------
    DataFrame
        One row per cell; the columns of :data:`mediar_ray.cells.table.COLUMNS`.

    Raises
    ------
    OutputError
        The slide has no partition, or its partition holds more than one run (a killed
        commit): rerun the slide, or keep the newest complete run with
        :func:`mediar_ray.cells.table.repair_partition`.
    """
    import pyarrow.dataset as pads

    from mediar_ray.cells.table import arrow_filesystem, partition_state, partition_url

    state = partition_state(out.output_root, out.name)
    if not state["runs"]:
        raise OutputError(
            f"{safe_url(partition_url(out.output_root, out.name))}: no cell "
            "table for this slide; rerun mediar-ray segment-slides with cells on"
        )
    if not state["clean"]:
        raise OutputError(
            f"{safe_url(partition_url(out.output_root, out.name))}: the "
            "partition holds more than one run (a killed commit); rerun "
            "mediar-ray segment-slides --overwrite on the slide"
        )
    filesystem, path = arrow_filesystem(partition_url(out.output_root, out.name))
    table = pads.dataset(path, filesystem=filesystem, format="parquet").to_table()
    frame = table.to_pandas().sort_values("id", ignore_index=True)
    if flat:
        frame = flatten_channels(frame)
    return frame


def flatten_channels(frame: pd.DataFrame) -> pd.DataFrame:
    """Each list-valued column (one value per channel) as scalar columns ``<name>_<c>``."""
    out = {}
    for name in frame.columns:
        col = frame[name]
        if len(col) and isinstance(col.iloc[0], (list, np.ndarray)):
            values = np.stack(col.to_numpy()).astype(np.float64)
            for c in range(values.shape[1]):
                out[f"{name}_{c}"] = values[:, c]
        elif len(col) == 0 and col.dtype == object:
            continue  # an empty list column: no channel to name
        else:
            out[name] = col.to_numpy()
    return pd.DataFrame(out)
