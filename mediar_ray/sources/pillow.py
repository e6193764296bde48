"""PNG, JPEG, BMP (and any image :func:`mediar_ray.io.read_image` reads): one level,
decoded whole once, since these formats cannot be read region by region."""

from __future__ import annotations

import numpy as np

from mediar_ray.io import ImageReadError, read_image
from mediar_ray.sources.base import Level, SlideReadError, SlideSource

__all__ = ["DecodedSource"]


class DecodedSource(SlideSource):
    """A single-level image held in memory."""

    reader = "pillow"

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self._array = read_image(url)
        except ImageReadError as err:
            raise SlideReadError(str(err)) from None
        self.levels = [Level(tuple(self._array.shape[:2]), (1.0, 1.0))]
        self.channels = 1 if self._array.ndim == 2 else int(self._array.shape[2])
        self.dtype = np.dtype(self._array.dtype)
        self.mpp = None

    def read_region(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if level != 0:
            raise IndexError(f"{self.url} has one level; level {level} asked")
        return self._array[y0:y1, x0:x1]
