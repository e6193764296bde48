"""TIFF-family slides (SVS, OME-TIFF, tiled or striped TIFF pyramids) through tifffile.

Every level is read through tifffile's zarr store over the file's tiles or strips, so a
region costs only the tiles it touches.
"""

from __future__ import annotations

import fsspec
import numpy as np
import tifffile
import zarr

from mediar_ray.sources.base import Level, SlideReadError, SlideSource

__all__ = ["TiffSource", "TIFF_MAGIC"]

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class TiffSource(SlideSource):
    """A TIFF pyramid: level k is ``series[0].levels[k]``."""

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
            self._arrays = [zarr.open_array(series.aszarr(level=k), mode="r")
                            for k in range(len(levels))]
        except FileNotFoundError:
            self.close()
            raise SlideReadError(f"{url}: file not found") from None
        except Exception as err:
            self.close()
            raise SlideReadError(f"{url}: not a readable TIFF slide ({type(err).__name__}: "
                                 f"{err})") from None
        axes = levels[0].axes.replace("S", "C")
        shape0 = self._arrays[0].shape
        self._keep = [i for i, (a, n) in enumerate(zip(axes, shape0)) if n > 1 or a in "YX"]
        self.axes = "".join(axes[i] for i in self._keep)
        if self.axes not in ("YX", "YXC", "CYX"):
            self.close()
            raise SlideReadError(
                f"{url}: slide level 0 has axes {axes!r} (shape {shape0}); expected a 2-D "
                "image with optional channels")
        self._full_axes = axes
        self.levels = []
        for arr in self._arrays:
            sizes = dict(zip(axes, arr.shape))
            self.levels.append(Level((int(sizes["Y"]), int(sizes["X"])), (1.0, 1.0)))
        h0, w0 = self.levels[0].shape
        self.levels = [Level(lv.shape, (h0 / lv.shape[0], w0 / lv.shape[1])) for lv in self.levels]
        self.channels = int(dict(zip(axes, shape0)).get("C", 1))
        self.dtype = np.dtype(self._arrays[0].dtype)
        self.mpp = None

    def read_region(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        arr = self._arrays[level]
        index = []
        for a, n in zip(self._full_axes, arr.shape):
            index.append(slice(y0, y1) if a == "Y" else slice(x0, x1) if a == "X" else
                         slice(None) if a == "C" and n > 1 else 0)
        region = np.asarray(arr[tuple(index)])
        return np.moveaxis(region, 0, -1) if self.axes == "CYX" else region

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None
        if self._file is not None:
            self._file.close()
            self._file = None
