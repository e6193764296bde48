"""What produced a slide's scratch state or output: input identity, options, weights.

A slide's ``.scratch/plan.json`` and its ``.mediar_complete`` marker carry the
fingerprint of the run that wrote them. A rerun reuses scratch state, or skips a finished
slide, only when its own fingerprint is equal; otherwise it says what differs.
"""

from __future__ import annotations

import hashlib
from typing import Any

import fsspec

from mediar_ray.io import safe_url

__all__ = ["HEAD_BYTES", "differences", "fingerprint", "input_identity"]

#: Bytes of a file's start hashed into its identity (headers, first tiles).
HEAD_BYTES = 1 << 20
_FOLDER_METADATA = ("zarr.json", ".zattrs", ".zgroup", ".zarray", "DICOMDIR")


def _modified(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return ""


def _folder_digest(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, str]:
    """Total size and a hash of a folder slide's every file: its path inside the folder,
    size and modification stamp (mtime or ETag), and the content of its metadata files
    (array shapes, chunking, dtypes, scales). Pixels rewritten in place change a chunk's
    stamp (and mostly its size), so the slide is never taken as unchanged."""
    digest = hashlib.sha256()
    files = fs.find(path, detail=True, withdirs=False)
    size = 0
    prefix = path.rstrip("/") + "/"
    for name in sorted(files):
        info = files[name]
        rel = name.removeprefix(prefix)
        size += int(info.get("size") or 0)
        digest.update(f"{rel}\t{info.get('size')}\t{_modified(info)}\n".encode())
        if rel.rsplit("/", 1)[-1] in _FOLDER_METADATA:
            with fs.open(name, "rb") as f:
                digest.update(f.read(HEAD_BYTES))
    return size, digest.hexdigest()


def input_identity(url: str) -> dict[str, Any]:
    """Size, modification stamp (mtime or ETag) and a hash of the start of ``url``.

    For a folder slide (OME-Zarr, DICOM WSI) the size is the sum over all its files and
    the hash covers every file's relative path, size and modification stamp and the
    content of its metadata files (:func:`_folder_digest`).
    """
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(path)  # another process may have rewritten it since the last look
    info = fs.info(path)
    if info.get("type") == "directory":
        size, head = _folder_digest(fs, path)
    else:
        size = int(info.get("size") or 0)
        digest = hashlib.sha256()
        with fs.open(path, "rb") as f:
            digest.update(f.read(HEAD_BYTES))
        head = digest.hexdigest()
    return {"url": safe_url(url), "size": size, "modified": _modified(info), "head_sha256": head}


def fingerprint(
    identity: dict[str, Any], options: dict[str, Any], weights: list[str]
) -> dict[str, Any]:
    """The fingerprint of one slide's result: input identity, result options, weights'
    hashes (in ensemble order)."""
    return {"input": identity, "options": options, "weights": list(weights)}


def differences(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Human-readable keys that differ between two fingerprints (``[]`` if equal).

    >>> differences({"input": {"size": 1}, "options": {}, "weights": []},
    ...             {"input": {"size": 2}, "options": {}, "weights": []})
    ['input size']
    """
    if not old:
        return ["no record of what produced it (an earlier version or an interrupted write)"]
    out = []
    for part in ("input", "options"):
        a, b = old.get(part) or {}, new.get(part) or {}
        out += [f"{part} {k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if old.get("weights") != new.get("weights"):
        out.append("weights")
    return out
