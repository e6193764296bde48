"""Slide sources: one interface (:class:`SlideSource`) over every slide format, and
:func:`open_slide`, which picks the reader by the file's content and name."""

from __future__ import annotations

import fsspec

from mediar_ray.sources.base import Level, SlideReadError, SlideSource

__all__ = ["Level", "READERS", "SlideReadError", "SlideSource", "open_slide"]

#: Reader names accepted by :func:`open_slide` (``"auto"`` picks one by content).
READERS = ("auto", "tifffile", "pillow")


def _magic(url: str) -> bytes:
    try:
        with fsspec.open(url, "rb") as f:
            return f.read(16)
    except FileNotFoundError:
        raise SlideReadError(f"{url}: file not found") from None
    except IsADirectoryError:
        return b""
    except Exception as err:
        raise SlideReadError(f"{url}: cannot open ({type(err).__name__}: {err})") from None


def open_slide(url: str, reader: str = "auto") -> SlideSource:
    """Open ``url`` for region reads with ``reader`` (one of :data:`READERS`).

    Raises
    ------
    SlideReadError
        The file is missing, unreadable, or not a slide of any supported format; the
        message names the file.
    """
    from mediar_ray.sources.pillow import DecodedSource
    from mediar_ray.sources.tiff import TIFF_MAGIC, TiffSource

    if reader not in READERS:
        raise ValueError(f"unknown slide reader {reader!r}; choose one of {READERS}")
    if reader == "tifffile" or (reader == "auto" and _magic(url)[:4] in TIFF_MAGIC):
        return TiffSource(url)
    return DecodedSource(url)
