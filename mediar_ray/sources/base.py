"""The slide-source interface: what every reader of a slide format provides.

A slide is a 2-D image, possibly with channels, stored as a pyramid of levels. Readers
give its levels (shape and downsample from level 0), pixel size, channels and dtype, and
read any region of any level without reading the rest. A reader holds open files, so it
is never pickled: every Ray task and actor opens its own with :func:`open_slide`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from mediar_ray.errors import UserError

__all__ = ["Level", "SlideReadError", "SlideSource", "composite_alpha", "shown", "white_value"]


class SlideReadError(UserError):
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
        """Release files and handles (a no-op by default).

        Not abstract on purpose: a source that holds nothing open need not override it.
        """
        return None

    @contextmanager
    def _reading(self, level: int, y0: int, y1: int, x0: int, x1: int) -> Iterator[None]:
        """Check a region request, and turn a failure of the reader library inside the
        block (a corrupt tile, a lost connection) into a :class:`SlideReadError` naming
        the slide and the region."""
        if not 0 <= level < len(self.levels):
            raise IndexError(
                f"{shown(self.url)} has {len(self.levels)} level(s); level {level} asked"
            )
        h, w = self.levels[level].shape
        if not (0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w):
            raise IndexError(
                f"{shown(self.url)}: region [{y0}:{y1}, {x0}:{x1}] is outside "
                f"level {level} ({h} x {w})"
            )
        try:
            yield
        except (SlideReadError, IndexError):
            raise
        except Exception as err:
            raise SlideReadError(
                f"{shown(self.url)}: cannot read level {level} region [{y0}:{y1}, {x0}:{x1}] "
                f"with {self.reader} ({type(err).__name__}: {err}); the file may be corrupt or "
                "truncated"
            ) from None

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


def shown(url: object) -> str:
    """``url`` as it may appear in a message: without credentials, query or fragment."""
    from mediar_ray.io import safe_url

    return safe_url(str(url))


def white_value(dtype: np.dtype) -> float:
    """Full intensity of ``dtype``: 255 for uint8, 65535 for uint16, 1.0 for floats."""
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def composite_alpha(
    region: np.ndarray, background: tuple[float, ...] | None = None, premultiplied: bool = False
) -> np.ndarray:
    """Composite colour + alpha over a solid background, as a viewer shows it.

    Parameters
    ----------
    region : ndarray
        (h, w, C + 1): C colour channels (3 for RGB, 1 for grey) then alpha, integer or
        float (alpha range 0..max of the integer type, or 0..1 for floats).
    background : tuple of float, optional
        C values in the region's intensity range (OpenSlide's background colour);
        default white.
    premultiplied : bool
        Colour already multiplied by alpha (TIFF associated alpha) instead of straight
        (PNG, OpenSlide's Python regions, TIFF unassociated alpha).

    Returns
    -------
    ndarray
        (h, w, C) (or (h, w) when C is 1), the region's dtype: colour where alpha is
        full, the background where alpha is 0 (never black), a blend in between.
    """
    full = white_value(region.dtype)
    color, alpha = region[..., :-1], region[..., -1:]
    if np.all(alpha == full):  # opaque: the colour itself, bit for bit
        out = color
    else:
        bg = np.broadcast_to(
            np.asarray(
                background if background is not None else (full,) * color.shape[-1], np.float32
            ),
            color.shape[-1:],
        )
        a = alpha.astype(np.float32) / full
        c = color.astype(np.float32)
        blend = (c if premultiplied else c * a) + bg * (1.0 - a)
        if np.issubdtype(region.dtype, np.integer):
            blend = np.clip(np.rint(blend), 0, full)
        out = blend.astype(region.dtype)
    return out[..., 0] if out.shape[-1] == 1 else np.ascontiguousarray(out)
