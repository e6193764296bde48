"""The slide-source interface: what every reader of a slide format provides.

A slide is a 2-D image, possibly with channels, stored as a pyramid of levels. Readers
give its levels (shape and downsample from level 0), pixel size, channels and dtype, and
read any region of any level without reading the rest. A reader holds open files, so it
is never pickled: every Ray task and actor opens its own with :func:`open_slide`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

__all__ = ["Level", "SlideReadError", "SlideSource"]


class SlideReadError(ValueError):
    """A slide cannot be opened or read; the message names the file and, where there is
    one, the fix."""


@dataclass(frozen=True)
class Level:
    """One pyramid level: its (height, width) in pixels and its downsample factor from
    level 0 along y and x (1.0 for level 0; real pyramids are not always exact powers
    of two)."""

    shape: tuple[int, int]
    downsample: tuple[float, float]


class SlideSource(ABC):
    """A slide opened for region reads.

    Attributes
    ----------
    url : str
        Where the slide is (local path or fsspec URL; a folder for DICOM WSI/OME-Zarr).
    levels : list of Level
        Level 0 first, then coarser levels in order of increasing downsample.
    channels : int
        Channels of every region (1 for grey; 3 for brightfield RGB).
    dtype : numpy.dtype
        Pixel type of every region.
    mpp : tuple of float or None
        Micrometres per pixel (y, x) at level 0, from the file's own metadata; None when
        the file does not say.
    reader : str
        Name of the reader ("tifffile", "openslide", "wsidicom", "ome-zarr", "pillow").
    """

    url: str
    levels: list[Level]
    channels: int
    dtype: np.dtype
    mpp: tuple[float, float] | None = None
    reader: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of level 0."""
        return self.levels[0].shape

    @abstractmethod
    def read_region(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of ``level`` (half-open, inside the level).

        Returns
        -------
        ndarray
            (h, w) when ``channels == 1``, else (h, w, channels); dtype ``self.dtype``.
            Brightfield regions with transparency or outside the scanned area come back
            as white RGB, never black.
        """

    def close(self) -> None:
        """Release files and handles (a no-op by default)."""

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        """``source[y0:y1, x0:x1]``: a region of level 0."""
        ys, xs = key
        h, w = self.shape
        y0, y1, _ = ys.indices(h)
        x0, x1, _ = xs.indices(w)
        return self.read_region(0, y0, y1, x0, x1)

    def __enter__(self) -> "SlideSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
