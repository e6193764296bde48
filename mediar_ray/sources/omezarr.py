"""OME-Zarr (OME-NGFF) images: zarr v2 with NGFF <= 0.4 metadata in the group attributes,
zarr v3 with NGFF 0.5 metadata under ``attributes["ome"]``; local or any fsspec URL.

The first ``multiscales`` entry is the pyramid: its datasets are the levels (level 0 the
first), their ``scale`` coordinate transformations (times the multiscale's own) give the
downsamples, and the y/x scales with the axes' units give the pixel size (None when the
axes name no unit). Axes may be any of t, c, z, y, x (NGFF order) with t and z singleton.
A ``bioformats2raw`` layout is read through its first image ("0"). Region reads go
through zarr, which fetches only the chunks a region touches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from mediar_ray.sources import pixelsize
from mediar_ray.sources.base import Level, SlideReadError, SlideSource, composite_alpha, shown

__all__ = ["OmeZarrSource", "ngff_multiscale"]

_ALPHA_LABELS = ("a", "alpha")


def ngff_multiscale(attrs: dict[str, Any]) -> tuple[dict, dict]:
    """(first multiscale, the attributes holding it) from a group's attributes, NGFF 0.5
    (``attrs["ome"]``) or earlier (``attrs``). Raises KeyError when there is none."""
    ome = attrs.get("ome", attrs)
    return ome["multiscales"][0], ome


def _axes(multiscale: dict, ndim: int) -> list[dict]:
    """Axes as dicts with name/type/unit; NGFF 0.1-0.2 had none (always t, c, z, y, x),
    0.3 had names only."""
    axes = multiscale.get("axes") or list("tczyx")[-ndim:]
    out = []
    for axis in axes:
        axis = {"name": axis} if isinstance(axis, str) else dict(axis)
        axis["name"] = str(axis.get("name", "")).lower()
        if axis["name"] == "c" and "type" not in axis:
            axis["type"] = "channel"
        out.append(axis)
    return out


def _scale(transforms: list[dict] | None, ndim: int) -> np.ndarray:
    """Product of the ``scale`` transformations in ``transforms`` (ones if none)."""
    scale = np.ones(ndim)
    for t in transforms or []:
        if t.get("type") == "scale" and "scale" in t:
            scale = scale * np.asarray(t["scale"], dtype=float)
    return scale


class OmeZarrSource(SlideSource):
    """An OME-Zarr image opened from a URL or an already opened zarr store."""

    reader = "ome-zarr"

    def __init__(self, url: str, store: Any = None) -> None:
        self.url = url
        named = shown(url)
        try:
            group = zarr.open_group(store if store is not None else url, mode="r")
            attrs = dict(group.attrs)
            top = attrs.get("ome", attrs)
            if "bioformats2raw.layout" in top and "multiscales" not in top:
                group = group["0"]  # a bioformats2raw collection: its first image
                attrs = dict(group.attrs)
            multiscale, ome = ngff_multiscale(attrs)
            datasets = multiscale["datasets"]
            self._arrays = [group[d["path"]] for d in datasets]
        except FileNotFoundError:
            raise SlideReadError(f"not a slide/image: {named} (no zarr group there)") from None
        except (KeyError, IndexError, TypeError) as err:
            raise SlideReadError(
                f"not a slide/image: {named} (a zarr group without OME-NGFF "
                f"multiscales image metadata: missing {err})"
            ) from None
        except Exception as err:
            raise SlideReadError(
                f"not a slide/image: {named} (cannot open it as OME-Zarr: "
                f"{type(err).__name__}: {err})"
            ) from None
        shape0 = self._arrays[0].shape
        self._axes = _axes(multiscale, len(shape0))
        names = [a["name"] for a in self._axes]
        self._check_axes(named, names, shape0)
        global_scale = _scale(multiscale.get("coordinateTransformations"), len(names))
        scales = [
            _scale(d.get("coordinateTransformations"), len(names)) * global_scale for d in datasets
        ]
        iy, ix = names.index("y"), names.index("x")
        shapes = [(int(a.shape[iy]), int(a.shape[ix])) for a in self._arrays]
        explicit = any(d.get("coordinateTransformations") for d in datasets)
        self.levels = [
            Level(
                s,
                (sc[iy] / scales[0][iy], sc[ix] / scales[0][ix])
                if explicit
                else (shapes[0][0] / s[0], shapes[0][1] / s[1]),
            )
            for s, sc in zip(shapes, scales)
        ]
        units = [self._axes[i].get("unit") for i in (iy, ix)]
        sizes = [pixelsize.length_in_um(scales[0][i], u) for i, u in zip((iy, ix), units)]
        self.mpp = None if None in sizes else (sizes[0], sizes[1])
        self._channel_axis = next(
            (i for i, a in enumerate(self._axes) if a.get("type") == "channel" or a["name"] == "c"),
            None,
        )
        stored = 1 if self._channel_axis is None else int(shape0[self._channel_axis])
        labels = [
            str(c.get("label", "")).lower()
            for c in (ome.get("omero") or attrs.get("omero") or {}).get("channels", [])
        ]
        self._alpha = stored in (2, 4) and len(labels) == stored and labels[-1] in _ALPHA_LABELS
        self.channels = stored - int(self._alpha)
        self.dtype = np.dtype(self._arrays[0].dtype)

    def _check_axes(self, named: str, names: list[str], shape0: tuple[int, ...]) -> None:
        extra = [
            f"{n}={size}"
            for n, size in zip(names, shape0)
            if n not in ("y", "x", "c") and size != 1
        ]
        if "y" not in names or "x" not in names or len(names) != len(shape0) or extra:
            raise SlideReadError(
                f"{named}: OME-Zarr image with axes {names} and shape {tuple(shape0)}; expected "
                "a 2-D image (y, x) with optional channels and singleton t/z"
                + (f" (has {', '.join(extra)}: save one plane per image)" if extra else "")
            )

    def read_region(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of ``level``: the level's zarr array at t = z = 0,
        reordered to (y, x, c).

        Parameters
        ----------
        level : int
            Pyramid level, an index into :attr:`levels` (0: full resolution).
        y0, y1, x0, x1 : int
            Half-open row and column bounds in pixels of ``level``, inside the level.

        Returns
        -------
        ndarray
            (y1 - y0, x1 - x0) when ``channels == 1``, else (y1 - y0, x1 - x0,
            channels); dtype :attr:`dtype`. An alpha channel is composited onto white.
        """
        index: list[slice | int] = []
        kept: list[str] = []
        for i, axis in enumerate(self._axes):
            name = axis["name"]
            if name in ("y", "x"):
                index.append(slice(y0, y1) if name == "y" else slice(x0, x1))
                kept.append(name)
            elif i == self._channel_axis:
                index.append(slice(None))
                kept.append("c")
            else:
                index.append(0)
        with self._reading(level, y0, y1, x0, x1):
            region = np.asarray(self._arrays[level][tuple(index)])
        order = [kept.index(a) for a in ("y", "x", "c") if a in kept]
        region = np.transpose(region, order)
        if region.ndim == 3 and region.shape[2] == 1:
            region = region[:, :, 0]
        elif self._alpha:
            region = composite_alpha(region)
        return np.ascontiguousarray(region)
