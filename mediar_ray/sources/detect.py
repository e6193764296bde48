"""Which reader a slide needs, from its content (magic bytes, folder contents) and name."""

from __future__ import annotations

from pathlib import PurePosixPath

import fsspec

from mediar_ray.sources.base import SlideReadError, shown
from mediar_ray.sources.openslide_source import OPENSLIDE_EXTENSIONS
from mediar_ray.sources.tiff import TIFF_MAGIC

__all__ = ["ZARR_METADATA", "choose_reader", "folder_kind", "is_dicom_name"]

#: Files that make a folder a zarr group (v3, v2).
ZARR_METADATA = ("zarr.json", ".zattrs", ".zgroup")


def is_dicom_name(name: str) -> bool:
    """A DICOM part-10 file name (``*.dcm``) or a DICOMDIR."""
    return name.lower().endswith(".dcm") or name.upper() == "DICOMDIR"


def folder_kind(path: str, names: list[str]) -> str | None:
    """Reader of a folder that is itself one slide, from its name and the names of the
    entries in it: "ome-zarr" (a ``.zarr`` folder or a zarr group), "wsidicom" (holds
    ``.dcm`` files or a DICOMDIR), or None (a folder of slides, or of anything else)."""
    if PurePosixPath(path.rstrip("/")).suffix.lower() == ".zarr":
        return "ome-zarr"
    if any(n in ZARR_METADATA for n in names):
        return "ome-zarr"
    if any(is_dicom_name(n) for n in names):
        return "wsidicom"
    return None


def _children(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    return [PurePosixPath(p.rstrip("/")).name for p in fs.ls(path, detail=False)]


def choose_reader(url: str) -> str:
    """The reader of ``url`` (a name in :data:`mediar_ray.sources.READERS`).

    Folders: OME-Zarr (zarr metadata or a ``.zarr`` name) or DICOM WSI (``.dcm`` files).
    Files: OpenSlide for the formats only it reads (by extension), tifffile for any other
    TIFF (magic bytes), wsidicom for a DICOM file (``DICM`` at byte 128 or ``.dcm``),
    Pillow for the rest (it fails, naming the file, on what is no image).

    Raises
    ------
    SlideReadError
        Nothing at ``url``, or a folder that is not a slide.
    """
    try:
        fs, path = fsspec.core.url_to_fs(url)
        if fs.isdir(path):
            kind = folder_kind(path, _children(fs, path))
            if kind is None:
                raise SlideReadError(
                    f"not a slide/image: {shown(url)} (a folder with neither OME-Zarr metadata "
                    "nor DICOM files; to segment the slides in it, pass it as an input folder)"
                )
            return kind
        with fs.open(path, "rb") as f:
            magic = f.read(132)
    except SlideReadError:
        raise
    except FileNotFoundError:
        raise SlideReadError(f"{shown(url)}: file not found") from None
    except Exception as err:
        raise SlideReadError(f"{shown(url)}: cannot open ({type(err).__name__}: {err})") from None
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in OPENSLIDE_EXTENSIONS:
        return "openslide"
    if magic[:4] in TIFF_MAGIC:
        return "tifffile"
    if magic[128:132] == b"DICM" or suffix == ".dcm":
        return "wsidicom"
    return "pillow"
