"""PNG, JPEG, BMP (and any image Pillow or :func:`mediar_ray.io.read_image` reads): one
level, decoded whole once, since these formats cannot be read region by region.

Images with an alpha channel (RGBA, grey + alpha, palette with transparency) come out as
RGB (grey) composited onto white, as a viewer shows them.
"""

from __future__ import annotations

import io

import fsspec
import numpy as np

from mediar_ray.io import ImageReadError, read_image
from mediar_ray.sources import pixelsize
from mediar_ray.sources.base import Level, SlideReadError, SlideSource, composite_alpha, shown

__all__ = ["DecodedSource", "decode_image", "unknown_content"]


def unknown_content(data: bytes) -> str:
    """Why bytes that no reader recognised are no image, for the error message."""
    if data[:4] == b"\x00\x05\x16\x07":
        return "a macOS AppleDouble metadata file (._name), not an image"
    return (
        f"content of no supported format (first bytes {data[:8].hex(' ')}): not TIFF, "
        "DICOM, OME-Zarr, a vendor format OpenSlide reads, PNG, JPEG or BMP"
    )


def decode_image(data: bytes, url: str) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Decode a Pillow-readable image.

    Returns
    -------
    image : ndarray
        (H, W) grey or (H, W, C) colour, native dtype, alpha composited onto white.
    mpp : (y, x) float or None
        Micrometres per pixel from the file's density (PNG pHYs, JPEG JFIF, BMP), None
        when absent or a software default (72/96 dpi).

    Raises :class:`SlideReadError` naming ``url``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise SlideReadError(
                    f"{shown(url)}: holds {im.n_frames} frames; expected one image"
                )
            if im.mode in ("P", "PA") or (im.mode in ("L", "RGB") and "transparency" in im.info):
                im = im.convert("RGBA" if im.mode != "L" else "LA")
            elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV", "1"):
                im = im.convert("RGB" if im.mode != "1" else "L")
            alpha = im.mode in ("RGBA", "LA")
            dpi = im.info.get("dpi")
            arr = np.asarray(im)
    except SlideReadError:
        raise
    except UnidentifiedImageError:
        raise SlideReadError(f"not a slide/image: {shown(url)} ({unknown_content(data)})") from None
    except (OSError, ValueError) as err:
        raise SlideReadError(f"not a slide/image: {shown(url)} ({err})") from None
    mpp = pixelsize.tiff_resolution_mpp(dpi[0], dpi[1], 2) if dpi else None
    return (composite_alpha(arr) if alpha else np.ascontiguousarray(arr)), mpp


class DecodedSource(SlideSource):
    """A single-level image held in memory."""

    reader = "pillow"

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            with fsspec.open(url, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise SlideReadError(f"{shown(url)}: file not found") from None
        except Exception as err:
            raise SlideReadError(
                f"{shown(url)}: cannot open ({type(err).__name__}: {err})"
            ) from None
        if not data:
            raise SlideReadError(f"not a slide/image: {shown(url)} (the file is empty)")
        self.mpp = None
        if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            try:
                self._array = read_image(url)  # TIFF decoded whole (reader="pillow" asked)
            except ImageReadError as err:
                raise SlideReadError(f"not a slide/image: {err}") from None
        else:
            self._array, self.mpp = decode_image(data, url)
        if self._array.ndim not in (2, 3) or min(self._array.shape[:2]) == 0:
            raise SlideReadError(
                f"not a slide/image: {shown(url)} (pixel array of shape {self._array.shape})"
            )
        self.levels = [Level(tuple(self._array.shape[:2]), (1.0, 1.0))]
        self.channels = 1 if self._array.ndim == 2 else int(self._array.shape[2])
        self.dtype = np.dtype(self._array.dtype)

    def read_region(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of the image held in memory.

        Parameters
        ----------
        level : int
            0, the only level.
        y0, y1, x0, x1 : int
            Half-open row and column bounds in pixels, inside the image.

        Returns
        -------
        ndarray
            (y1 - y0, x1 - x0) when ``channels == 1``, else (y1 - y0, x1 - x0,
            channels); dtype :attr:`dtype`. A view of the decoded image (alpha was
            composited onto white when it was decoded).
        """
        with self._reading(level, y0, y1, x0, x1):
            return self._array[y0:y1, x0:x1]
