"""Slides of an archive: files, folders and globs (local paths or fsspec URLs) -> slide
URLs, sorted and deterministic."""

from __future__ import annotations

from pathlib import PurePosixPath

import fsspec
from fsspec.implementations.local import LocalFileSystem

from mediar_ray.sources.base import shown
from mediar_ray.sources.detect import folder_kind
from mediar_ray.sources.staging import companion_paths

__all__ = ["SLIDE_EXTENSIONS", "find_slides"]

#: Slide files a folder contributes, by extension (case-insensitive). Folders that are
#: slides (OME-Zarr, DICOM WSI) are found by content.
SLIDE_EXTENSIONS = (
    ".svs",
    ".tif",
    ".tiff",
    ".qptiff",
    ".ndpi",
    ".scn",
    ".bif",
    ".vms",
    ".vmu",
    ".mrxs",
    ".svslide",
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
)


def _is_slide_file(path: str) -> bool:
    return path.lower().endswith(SLIDE_EXTENSIONS)


def _name(path: str) -> str:
    return PurePosixPath(path.rstrip("/")).name


def _entries(fs: fsspec.AbstractFileSystem, path: str) -> list[tuple[str, bool]]:
    """(path, is_folder) of each entry of folder ``path``."""
    return [(e["name"].rstrip("/"), e["type"] == "directory") for e in fs.ls(path, detail=True)]


def _is_slide_folder(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    if folder_kind(path, []) is not None:  # a .zarr folder: no listing needed
        return True
    return folder_kind(path, [_name(p) for p, _ in _entries(fs, path)]) is not None


def _vms_parts(fs: fsspec.AbstractFileSystem, files: list[str]) -> set[str]:
    """Image files that Hamamatsu VMS/VMU key files in ``files`` name: parts of those
    slides, not slides of their own."""
    parts: set[str] = set()
    for f in files:
        if f.lower().endswith((".vms", ".vmu")):
            try:
                parts.update(p.rstrip("/") for p in companion_paths(fs, f))
            except (OSError, UnicodeError, ValueError):
                pass  # an unreadable key file fails later, per slide, with its own error
    return parts


def _folder_slides(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """A folder that is a slide is one; else its slide files and slide sub-folders."""
    entries = _entries(fs, path)
    if folder_kind(path, [_name(p) for p, _ in entries]) is not None:
        return [path]
    files = [p for p, is_dir in entries if not is_dir and _is_slide_file(p)]
    parts = _vms_parts(fs, files)
    slides = [f for f in files if f not in parts]
    slides += [p for p, is_dir in entries if is_dir and _is_slide_folder(fs, p)]
    return slides


def _glob_slides(fs: fsspec.AbstractFileSystem, pattern: str) -> list[str]:
    """Glob matches that are slide files or slide folders."""
    slides = []
    for match in fs.glob(pattern):
        match = match.rstrip("/")
        if fs.isdir(match):
            if _is_slide_folder(fs, match):
                slides.append(match)
        elif _is_slide_file(match):
            slides.append(match)
    return slides


def find_slides(inputs: list[str]) -> list[str]:
    """Slide URLs of ``inputs``, sorted, each once.

    Each input is a slide file (returned whatever its name: a file that is no slide
    fails when opened, per slide), a folder, or a glob. A folder that is itself a slide
    (OME-Zarr group or ``.zarr`` folder, DICOM WSI folder) is one slide; any other
    folder contributes, non-recursively, its files with a slide extension
    (:data:`SLIDE_EXTENSIONS`, except the image files a Hamamatsu VMS names) and its
    sub-folders that are slides. A path that exists is taken literally even when it
    holds ``[ ] * ?``; only a path that does not exist is a glob. Local inputs come back
    as local paths, remote ones as URLs with their protocol.

    Raises
    ------
    FileNotFoundError
        Naming the first input that matches no slide.
    """
    found: set[str] = set()
    for item in map(str, inputs):
        fs, path = fsspec.core.url_to_fs(item)
        path = path.rstrip("/") or path
        if fs.exists(path):
            slides = _folder_slides(fs, path) if fs.isdir(path) else [path]
        elif any(c in path for c in "*?["):
            slides = _glob_slides(fs, path)
        else:
            raise FileNotFoundError(f"{shown(item)}: no such file or folder")
        if not slides:
            raise FileNotFoundError(
                f"{shown(item)}: no slides found (looked for {', '.join(SLIDE_EXTENSIONS)} "
                "files, OME-Zarr and DICOM WSI folders)"
            )
        local = isinstance(fs, LocalFileSystem)
        found.update(s if local else fs.unstrip_protocol(s) for s in slides)
    return sorted(found)
