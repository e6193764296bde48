"""Reading a slide region by region, never whole when the format allows it.

TIFF, OME-TIFF and SVS (level 0) are read through tifffile's zarr store over the file's
tiles or strips, so a region costs only the tiles it touches. PNG/JPEG/BMP cannot be read
partially: they are decoded once (the plan stage then copies them into a chunked store).
tifffile stores cannot be pickled, so each Ray task opens its own :class:`SlideReader`.
"""

from __future__ import annotations

import fsspec
import numpy as np
import tifffile
import zarr

from mediar_ray.io import ImageReadError, read_image

__all__ = ["SlideReader"]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class SlideReader:
    """Region reader of level 0 of a slide: ``reader.shape`` (H, W), ``reader[y0:y1, x0:x1]``.

    Regions come back as (h, w) or (h, w, C) in the slide's dtype. Use as a context
    manager (or call :meth:`close`).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._file = None
        self._tif = None
        try:
            self._file = fsspec.open(url, "rb").open()
            magic = self._file.read(4)
            self._file.seek(0)
        except FileNotFoundError:
            raise ImageReadError(f"{url}: file not found") from None
        except Exception as err:
            raise ImageReadError(f"{url}: cannot open ({type(err).__name__}: {err})") from None
        if magic in _TIFF_MAGIC:
            self._open_tiff()
        else:
            self._file.close()
            self._file = None
            self._array = read_image(url)  # not region-readable: decode once
            self.axes = "YX" if self._array.ndim == 2 else "YXC"
        kept = [self._array.shape[i] for i in getattr(self, "_keep", range(self._array.ndim))]
        sizes = dict(zip(self.axes, kept))
        self.shape = (int(sizes["Y"]), int(sizes["X"]))
        self.dtype = np.dtype(self._array.dtype)
        self.channels = int(sizes.get("C", 1))

    def _open_tiff(self) -> None:
        try:
            self._tif = tifffile.TiffFile(self._file)
            series = self._tif.series[0]
            level = series.levels[0] if series.levels else series
            axes = level.axes.replace("S", "C")
            store = series.aszarr(level=0)
            self._array = zarr.open_array(store, mode="r")
        except Exception as err:
            self.close()
            raise ImageReadError(f"{self.url}: not a readable TIFF slide ({err})") from None
        squeezed = "".join(a for a, n in zip(axes, self._array.shape) if n > 1 or a in "YX")
        if squeezed not in ("YX", "YXC", "CYX"):
            self.close()
            raise ImageReadError(
                f"{self.url}: slide level 0 has axes {axes!r} (shape {self._array.shape}); "
                "expected a 2-D image with optional channels"
            )
        self._keep = [i for i, (a, n) in enumerate(zip(axes, self._array.shape))
                      if n > 1 or a in "YX"]
        self.axes = squeezed

    @property
    def full_shape(self) -> tuple[int, ...]:
        return self.shape + (() if self.channels == 1 else (self.channels,))

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        ys, xs = key
        if self._tif is None:
            return np.asarray(self._array[ys, xs])
        index = []
        for i, n in enumerate(self._array.shape):
            axis = self.axes[self._keep.index(i)] if i in self._keep else None
            index.append(ys if axis == "Y" else xs if axis == "X" else
                         slice(None) if axis == "C" else 0)
        region = np.asarray(self._array[tuple(index)])
        return np.moveaxis(region, 0, -1) if self.axes == "CYX" else region

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
