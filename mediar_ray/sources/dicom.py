"""DICOM whole-slide images (VL Whole Slide Microscopy Image Storage) through wsidicom.

A slide is a folder of DICOM files (one instance per pyramid level, plus label and
overview images, which are ignored), a DICOMDIR, or a list of files; local or any fsspec
URL (wsidicom reads through fsspec itself). Levels are the pyramid's, level 0 first;
pixel size from the level-0 Pixel Spacing (millimetres) as micrometres; regions are
decoded from the tiles they touch only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath

import numpy as np

from mediar_ray.sources.base import Level, SlideReadError, SlideSource, composite_alpha, shown

__all__ = ["DicomSource"]


def _open(target: str | Sequence[str]):
    from wsidicom import WsiDicom

    if isinstance(target, str) and PurePosixPath(target.rstrip("/")).name.upper() == "DICOMDIR":
        return WsiDicom.open_dicomdir(target)
    return WsiDicom.open(target if isinstance(target, str) else list(target))


class DicomSource(SlideSource):
    """A DICOM WSI pyramid (the first pyramid of the series)."""

    reader = "wsidicom"

    def __init__(self, url: str | Sequence[str]) -> None:
        self.url = url if isinstance(url, str) else ",".join(url)
        named = shown(self.url)
        self._wsi = None
        try:
            self._wsi = _open(url)
            self._levels = list(self._wsi.pyramid.levels)
        except FileNotFoundError:
            self.close()
            raise SlideReadError(f"{named}: file not found") from None
        except Exception as err:
            self.close()
            raise SlideReadError(
                f"not a slide/image: {named} (wsidicom finds no readable DICOM "
                f"WSI pyramid: {type(err).__name__}: {err})"
            ) from None
        if not self._levels:
            self.close()
            raise SlideReadError(f"not a slide/image: {named} (no DICOM WSI pyramid levels)")
        sizes = [(int(lv.size.height), int(lv.size.width)) for lv in self._levels]
        self.levels = [
            Level(s, self._downsample(lv, sizes[0], s)) for lv, s in zip(self._levels, sizes)
        ]
        self.mpp = self._level0_mpp()
        try:
            probe = self._read(0, 0, 1, 0, 1)
        except Exception as err:
            self.close()
            raise SlideReadError(
                f"not a slide/image: {named} (its tiles cannot be decoded: "
                f"{type(err).__name__}: {err})"
            ) from None
        self._alpha = probe.ndim == 3 and probe.shape[2] in (2, 4)
        self.channels = 1 if probe.ndim == 2 else int(probe.shape[2]) - int(self._alpha)
        self.dtype = np.dtype(probe.dtype)

    def _downsample(
        self, level, size0: tuple[int, int], size: tuple[int, int]
    ) -> tuple[float, float]:
        """From the Pixel Spacing ratio when both levels state it (exact), else sizes."""
        try:
            base, this = self._levels[0].pixel_spacing, level.pixel_spacing
            return (this.height / base.height, this.width / base.width)
        except Exception:
            return (size0[0] / size[0], size0[1] / size[1])

    def _level0_mpp(self) -> tuple[float, float] | None:
        try:
            spacing = self._levels[0].pixel_spacing  # SizeMm, millimetres per pixel
        except Exception:  # WsiDicomNoResolutionError: the file does not say
            return None
        y, x = float(spacing.height) * 1000.0, float(spacing.width) * 1000.0
        return (y, x) if y > 0 and x > 0 else None

    def _read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        from wsidicom.geometry import Point, Region, Size

        image = self._levels[level].get_region(Region(Point(x0, y0), Size(x1 - x0, y1 - y0)))
        return np.asarray(image)

    def read_region(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of ``level``, decoded from the level's DICOM tiles.

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
        with self._reading(level, y0, y1, x0, x1):
            region = self._read(level, y0, y1, x0, x1)
        return composite_alpha(region) if self._alpha else region

    def close(self) -> None:
        """Close the DICOM files (a second call does nothing)."""
        if self._wsi is not None:
            self._wsi.close()
            self._wsi = None
