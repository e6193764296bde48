"""napari reader for ``OUTPUT/<name>.zarr``: the image pyramid, ``labels/cells`` with the
slide's cell-table rows as layer features, and ``labels/tissue``.

Every layer is multiscale over dask arrays (napari reads only the chunks on screen) and
carries the NGFF scale and translation (micrometres when the pixel size is known), so the
layers line up with each other and with the cell table's ``*_um`` columns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import dask.array as da

from mediar_ray.export.output import (
    OutputError,
    Pyramid,
    SlideOutput,
    open_output,
    read_cells,
)

__all__ = ["layer_data", "napari_get_reader", "read_output"]

log = logging.getLogger("mediar_ray.viewer")

LayerData = tuple[Any, dict[str, Any], str]


def _is_output(path: str) -> bool:
    """A zarr group written by mediar_ray (its root has ``mediar_ray`` attributes);
    other ``.zarr`` stores are left to other readers."""
    import zarr

    try:
        return "mediar_ray" in zarr.open_group(path, mode="r", zarr_format=3).attrs
    except Exception:  # noqa: BLE001 - anything zarr cannot open as a v3 group: not ours
        return False


def napari_get_reader(path: str | list[str]) -> Callable[[str | list[str]], list] | None:
    """npe2 reader contribution: :func:`read_output` for mediar_ray outputs, else None."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths or not all(
        str(p).rstrip("/").endswith(".zarr") and _is_output(str(p)) for p in paths
    ):
        return None
    return read_output


def _placement(p: Pyramid) -> dict[str, Any]:
    return {
        "scale": p.scale[0],
        "translate": p.translation[0],
        "multiscale": True,
        "units": p.unit or "pixel",
    }


def _image(out: SlideOutput) -> LayerData:
    p = out.image
    levels = p.levels
    meta = {"name": f"{out.name} image", **_placement(p)}
    if out.channels == 3 and levels[0].dtype.kind == "u":
        # RGB: napari wants the channel last; a lazy transpose of each level.
        return [da.moveaxis(a, 0, -1) for a in levels], {**meta, "rgb": True}, "image"
    if out.channels == 1:
        return [a[0] for a in levels], meta, "image"
    return levels, {**meta, "channel_axis": 0}, "image"


def layer_data(out: SlideOutput) -> list[LayerData]:
    """LayerData tuples of a slide output: image, tissue (if any), cells with features."""
    layers = [_image(out)]
    if "tissue" in out.labels:
        t = out.labels["tissue"]
        layers.append(
            (t.levels, {"name": f"{out.name} tissue", "opacity": 0.25, **_placement(t)}, "labels")
        )
    c = out.cells
    meta: dict[str, Any] = {"name": f"{out.name} cells", **_placement(c)}
    try:
        features = read_cells(out)
    except OutputError as err:  # e.g. a job run with --no-cells: show the labels alone
        log.warning("%s: cells shown without features: %s", out.name, err)
    else:
        # napari maps a label value to its feature row through the "index" column.
        features.insert(0, "index", features["id"].astype("int64"))
        meta["features"] = features
    layers.append((c.levels, meta, "labels"))
    return layers


def read_output(path: str | list[str]) -> list[LayerData]:
    """Layers of one or more outputs (napari reader function)."""
    paths = [path] if isinstance(path, str) else list(path)
    return [layer for p in paths for layer in layer_data(open_output(str(p)))]
