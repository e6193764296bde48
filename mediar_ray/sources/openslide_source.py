"""Vendor slide formats through OpenSlide (``openslide-python`` with the ``openslide-bin``
wheel, no system library): 3DHISTECH MRXS, Hamamatsu NDPI/VMS/VMU, Leica SCN, Ventana
BIF, Sakura SVSLIDE, and every format OpenSlide reads when ``reader="openslide"`` is
asked (Aperio SVS, generic tiled TIFF, Philips TIFF, DICOM files).

OpenSlide needs a local path: remote slides are copied once per worker process to local
scratch (:mod:`mediar_ray.sources.staging`) and released when the source is closed.
OpenSlide regions are RGBA with transparent pixels where nothing was scanned; they come
out as RGB composited over the slide's background colour (white when it names none).
"""

from __future__ import annotations

import numpy as np

from mediar_ray.sources.base import Level, SlideReadError, SlideSource, composite_alpha, shown
from mediar_ray.sources.staging import is_local, staged

__all__ = ["OpenSlideSource", "OPENSLIDE_EXTENSIONS"]

#: Formats only OpenSlide reads correctly (the TIFF-based ones among them have layouts
#: tifffile does not assemble: overlapping BIF tiles, SCN collections, NDPI restarts).
OPENSLIDE_EXTENSIONS = (".mrxs", ".ndpi", ".vms", ".vmu", ".scn", ".bif", ".svslide")


def background_rgb(properties: dict) -> tuple[int, int, int]:
    """The slide's ``openslide.background-color`` ("RRGGBB" hex) as (r, g, b), white when
    absent or malformed."""
    text = str(properties.get("openslide.background-color", "") or "")
    try:
        return tuple(int(text[i : i + 2], 16) for i in (0, 2, 4)) if len(text) == 6 else (255,) * 3
    except ValueError:
        return (255, 255, 255)


def _mpp(properties: dict) -> tuple[float, float] | None:
    try:
        y, x = float(properties["openslide.mpp-y"]), float(properties["openslide.mpp-x"])
    except (KeyError, TypeError, ValueError):
        return None
    return (y, x) if y > 0 and x > 0 else None


class OpenSlideSource(SlideSource):
    """A slide opened with OpenSlide; levels as OpenSlide lists them."""

    reader = "openslide"

    def __init__(self, url: str) -> None:
        import openslide

        self.url = url
        self._slide = None
        self._staged = not is_local(url)
        try:
            local = staged.acquire(url) if self._staged else url
        except FileNotFoundError:
            raise SlideReadError(f"{shown(url)}: file not found") from None
        except Exception as err:
            raise SlideReadError(
                f"{shown(url)}: cannot copy it to local scratch for OpenSlide "
                f"({type(err).__name__}: {err})"
            ) from None
        try:
            self._slide = openslide.OpenSlide(local)
        except Exception as err:
            self.close()
            raise SlideReadError(
                f"not a slide/image: {shown(url)} (OpenSlide cannot read it: "
                f"{type(err).__name__}: {err})"
            ) from None
        props = dict(self._slide.properties)
        (w0, h0) = self._slide.level_dimensions[0]
        self.levels = [
            Level((int(h), int(w)), (h0 / h, w0 / w)) for w, h in self._slide.level_dimensions
        ]
        self._downsamples = list(self._slide.level_downsamples)
        self.channels = 3
        self.dtype = np.dtype(np.uint8)
        self.mpp = _mpp(props)
        self.background = background_rgb(props)

    def read_region(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """OpenSlide positions regions in level-0 pixels: a level-k region starts at its
        corner times OpenSlide's downsample of the level, rounded. Where that downsample
        is not an integer, OpenSlide may shift such a region by a fraction of a pixel."""
        with self._reading(level, y0, y1, x0, x1):
            ds = self._downsamples[level]
            location = (int(round(x0 * ds)), int(round(y0 * ds)))
            rgba = np.asarray(self._slide.read_region(location, level, (x1 - x0, y1 - y0)))
        return composite_alpha(rgba, self.background)

    def close(self) -> None:
        """Close the slide and release its staged local copy, if any (a second call does
        nothing)."""
        if self._slide is not None:
            self._slide.close()
            self._slide = None
        if self._staged:
            staged.release(self.url)
            self._staged = False
