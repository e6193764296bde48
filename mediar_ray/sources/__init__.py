"""Slide sources: one interface (:class:`SlideSource`) over every slide format, and
:func:`open_slide`, which picks the reader by the slide's content and name.

Readers: ``tifffile`` (SVS, OME-TIFF, TIFF pyramids), ``openslide`` (MRXS, NDPI, VMS,
SCN, BIF, SVSLIDE, or any file OpenSlide reads when asked), ``wsidicom`` (DICOM WSI
folders, DICOMDIRs, lists of files), ``ome-zarr`` (OME-NGFF 0.4 on zarr v2 and 0.5 on
zarr v3), ``pillow`` (PNG, JPEG, BMP, decoded whole). :func:`mediar_ray.sources.discover.
find_slides` turns files, folders and globs into slide URLs.
"""

from __future__ import annotations

from collections.abc import Sequence

from mediar_ray.sources.base import Level, SlideReadError, SlideSource, shown

__all__ = ["Level", "READERS", "SlideReadError", "SlideSource", "open_slide"]

#: Reader names accepted by :func:`open_slide` (``"auto"`` picks one by content).
READERS = ("auto", "tifffile", "openslide", "wsidicom", "ome-zarr", "pillow")


def _construct(reader: str, url: str | Sequence[str]) -> SlideSource:
    if reader == "tifffile":
        from mediar_ray.sources.tiff import TiffSource

        return TiffSource(url)
    if reader == "openslide":
        from mediar_ray.sources.openslide_source import OpenSlideSource

        return OpenSlideSource(url)
    if reader == "wsidicom":
        from mediar_ray.sources.dicom import DicomSource

        return DicomSource(url)
    if reader == "ome-zarr":
        from mediar_ray.sources.omezarr import OmeZarrSource

        return OmeZarrSource(url)
    from mediar_ray.sources.pillow import DecodedSource

    return DecodedSource(url)


def open_slide(url: str | Sequence[str], reader: str = "auto") -> SlideSource:
    """Open ``url`` for region reads with ``reader`` (one of :data:`READERS`).

    Parameters
    ----------
    url : str or list of str
        Local path or fsspec URL of a slide file or slide folder (OME-Zarr, DICOM WSI);
        a list of DICOM files of one slide.
    reader : str
        "auto" chooses by content and name (:func:`mediar_ray.sources.detect.
        choose_reader`); a reader name forces it.

    Raises
    ------
    SlideReadError
        The file is missing, unreadable, or not a slide of any supported format
        ("not a slide/image: <url> (why)"); the message names the file.
    ValueError
        ``reader`` is not one of :data:`READERS`.
    """
    if reader not in READERS:
        raise ValueError(f"unknown slide reader {reader!r}; choose one of {', '.join(READERS)}")
    multi = not isinstance(url, str)
    if multi and reader not in ("auto", "wsidicom"):
        raise ValueError(
            f"a list of files is one DICOM WSI slide (reader 'wsidicom' or "
            f"'auto'), not for reader {reader!r}"
        )
    if reader == "auto":
        from mediar_ray.sources.detect import choose_reader

        reader = "wsidicom" if multi else choose_reader(url)
    try:
        return _construct(reader, url)
    except SlideReadError:
        raise
    except Exception as err:  # a reader library failing in a way it does not document
        named = shown(url if isinstance(url, str) else ",".join(url))
        raise SlideReadError(
            f"not a slide/image: {named} ({reader} cannot read it: {type(err).__name__}: {err})"
        ) from None
