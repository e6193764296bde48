"""TIFF-family slides (Aperio SVS, OME-TIFF, tiled or striped TIFF pyramids) through
tifffile, from a local path or any fsspec URL.

Every level is read through tifffile's zarr store over the file's tiles or strips, so a
region costs only the tiles it touches. Pixel size comes from the SVS ``MPP`` field, the
OME-XML ``PhysicalSizeX/Y``, ImageJ's unit with the resolution tags, or the plain TIFF
resolution tags, in that order (:mod:`mediar_ray.sources.pixelsize`).
"""

from __future__ import annotations

import fsspec
import numpy as np
import tifffile
import zarr

from mediar_ray.sources import pixelsize
from mediar_ray.sources.base import Level, SlideReadError, SlideSource, composite_alpha, shown

__all__ = ["TiffSource", "TIFF_MAGIC", "tiff_mpp"]

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

_EXTRASAMPLE_ASSOCALPHA, _EXTRASAMPLE_UNASSALPHA = 1, 2
_COLOUR = (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)


def _tag(page: tifffile.TiffPage, name: str):
    tag = page.tags.get(name)
    return None if tag is None else tag.value


def tiff_mpp(tif: tifffile.TiffFile) -> tuple[float, float] | None:
    """(y, x) micrometres per level-0 pixel of the first series, from the file's own
    metadata, or None when it does not say."""
    page = tif.pages.first
    if tif.is_svs:
        return pixelsize.svs_mpp(page.description)
    if tif.is_ome and tif.ome_metadata:
        mpp = pixelsize.ome_xml_mpp(tif.ome_metadata)
        if mpp is not None:
            return mpp
    xres, yres = _tag(page, "XResolution"), _tag(page, "YResolution")
    if tif.is_imagej and tif.imagej_metadata:
        mpp = pixelsize.imagej_mpp(tif.imagej_metadata.get("unit"), xres, yres)
        if mpp is not None:
            return mpp
    unit = _tag(page, "ResolutionUnit")
    return pixelsize.tiff_resolution_mpp(xres, yres, None if unit is None else int(unit))


class TiffSource(SlideSource):
    """A TIFF pyramid: level k is ``series[0].levels[k]``.

    RGBA (or grey + alpha) slides come out as RGB (grey) composited onto white."""

    reader = "tifffile"

    def __init__(self, url: str) -> None:
        self.url = url
        self._file = None
        self._tif = None
        try:
            self._file = fsspec.open(url, "rb").open()
            self._tif = tifffile.TiffFile(self._file)
            series = self._tif.series[0]
            levels = list(series.levels) if series.levels else [series]
            keyframe = levels[0].keyframe
            # Tiles missing from the file (never scanned) read as white on RGB slides.
            fill = 255 if keyframe.photometric in _COLOUR and keyframe.dtype == np.uint8 else 0
            self._arrays = [
                zarr.open_array(series.aszarr(level=k, fillvalue=fill), mode="r")
                for k in range(len(levels))
            ]
            self.mpp = tiff_mpp(self._tif)
        except FileNotFoundError:
            self.close()
            raise SlideReadError(f"{shown(url)}: file not found") from None
        except Exception as err:
            self.close()
            raise SlideReadError(
                f"not a slide/image: {shown(url)} (tifffile cannot read it: "
                f"{type(err).__name__}: {err}; the file may be truncated or "
                "corrupt)"
            ) from None
        axes = levels[0].axes.replace("S", "C")
        shape0 = self._arrays[0].shape
        kept = "".join(a for a, n in zip(axes, shape0) if n > 1 or a in "YX")
        if kept not in ("YX", "YXC", "CYX"):
            self.close()
            raise SlideReadError(
                f"{shown(url)}: slide level 0 has axes {axes!r} (shape {shape0}); expected a "
                "2-D image with optional channels (save one plane per file)"
            )
        self._full_axes = axes
        self.axes = kept
        sizes = [dict(zip(axes, arr.shape)) for arr in self._arrays]
        shapes = [(int(s["Y"]), int(s["X"])) for s in sizes]
        (h0, w0) = shapes[0]
        self.levels = [Level(s, (h0 / s[0], w0 / s[1])) for s in shapes]
        stored = int(sizes[0].get("C", 1))
        self._alpha = self._alpha_kind(keyframe, stored)
        self.channels = stored - 1 if self._alpha else stored
        self.dtype = np.dtype(self._arrays[0].dtype)

    @staticmethod
    def _alpha_kind(page: tifffile.TiffPage, channels: int) -> str | None:
        """Return "straight"/"premultiplied" when the last sample of an RGB or grey page is
        alpha (TIFF ExtraSamples), else None."""
        extra = tuple(getattr(page, "extrasamples", ()) or ())
        colour = {tifffile.PHOTOMETRIC.RGB: 3, tifffile.PHOTOMETRIC.MINISBLACK: 1}.get(
            page.photometric
        )
        if colour is None or channels != colour + 1 or len(extra) != 1:
            return None
        return {_EXTRASAMPLE_ASSOCALPHA: "premultiplied", _EXTRASAMPLE_UNASSALPHA: "straight"}.get(
            int(extra[0])
        )

    def read_region(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of ``level``, read from the level's TIFF pages.

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
            channels); dtype :attr:`dtype`. An alpha channel (straight or premultiplied) is
            composited onto white.
        """
        with self._reading(level, y0, y1, x0, x1):
            arr = self._arrays[level]
            index = [
                slice(y0, y1)
                if a == "Y"
                else slice(x0, x1)
                if a == "X"
                else slice(None)
                if a == "C" and n > 1
                else 0
                for a, n in zip(self._full_axes, arr.shape)
            ]
            region = np.asarray(arr[tuple(index)])
        if self.axes == "CYX":
            region = np.moveaxis(region, 0, -1)
        if self._alpha:
            region = composite_alpha(region, premultiplied=self._alpha == "premultiplied")
        return region

    def close(self) -> None:
        """Close the TIFF and the file under it (a second call does nothing)."""
        if self._tif is not None:
            self._tif.close()
            self._tif = None
        if self._file is not None:
            self._file.close()
            self._file = None
