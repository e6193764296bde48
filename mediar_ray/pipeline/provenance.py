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


def input_identity(url: str) -> dict[str, Any]:
    """Size, modification stamp (mtime or ETag) and a hash of the start of ``url``.

    For a folder slide (OME-Zarr, DICOM WSI) the size is the sum over its top-level
    entries and the hash covers their names and sizes and its metadata files.
    """
    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    digest = hashlib.sha256()
    if info.get("type") == "directory":
        entries = sorted(fs.ls(path, detail=True), key=lambda e: e["name"])
        size = 0
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            size += int(entry.get("size") or 0)
            digest.update(f"{name}\t{entry.get('size')}\n".encode())
            if name in _FOLDER_METADATA and entry.get("type") == "file":
                with fs.open(entry["name"], "rb") as f:
                    digest.update(f.read(HEAD_BYTES))
    else:
        size = int(info.get("size") or 0)
        with fs.open(path, "rb") as f:
            digest.update(f.read(HEAD_BYTES))
    return {"url": safe_url(url), "size": size, "modified": _modified(info),
            "head_sha256": digest.hexdigest()}


def fingerprint(identity: dict[str, Any], options: dict[str, Any],
                weights: list[str]) -> dict[str, Any]:
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
