"""Reading microscopy images and writing label images, from any fsspec URL.

Supported inputs: TIFF (grey, RGB, multi-channel, 8/16-bit, float; OME-TIFF; SVS and
other pyramids: level 0 only), PNG, JPEG, BMP. Label images are written as zlib TIFF,
uint16 when every id fits, else uint32.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from pathlib import PurePosixPath
from typing import Sequence

import fsspec
import numpy as np
import tifffile
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "expand_inputs",
    "label_name",
    "output_names",
    "read_image",
    "stem",
    "write_labels_tiff",
]

IMAGE_EXTENSIONS = (".tif", ".tiff", ".svs", ".png", ".jpg", ".jpeg", ".bmp")
_GLOB_CHARS = set("*?[")


class ImageReadError(ValueError):
    """An input image cannot be read or is not a 2-D (multi-channel) image."""


def stem(url: str) -> str:
    """File name up to its first '.', as MEDIAR names its outputs."""
    return PurePosixPath(str(url).rstrip("/")).name.split(".")[0]


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(text: str) -> str:
    """``text`` with every character outside ``A-Z a-z 0-9 . _ -`` replaced by ``_`` and
    leading dots dropped, so it is a file name on every file system and object store."""
    return _UNSAFE.sub("_", text).lstrip(".") or "image"


def output_names(urls: Sequence[str]) -> dict[str, str]:
    """A unique output name for each input, deterministic for the same list of inputs.

    The name is MEDIAR's :func:`stem` (file name up to its first '.') made safe by
    :func:`safe_name`. Where two inputs would share a name (compared ignoring case, as
    on case-insensitive file systems), each of them gets the name of its whole file name
    less the last extension (``a.1.png`` -> ``a.1``) if that alone tells them apart, else
    ``<stem>-<8 hex digits of the SHA-1 of its full URL>`` (``f1/slide.png`` and
    ``f2/slide.png``). Inputs listed twice keep one name.

    Returns
    -------
    dict
        input URL -> output name (no folder part, never empty, never starting with '.').
    """
    urls = list(dict.fromkeys(map(str, urls)))
    first = {u: safe_name(stem(u)) for u in urls}
    clashes = Counter(n.casefold() for n in first.values())
    names = {}
    for u in urls:
        name = first[u]
        if clashes[name.casefold()] > 1:
            base = PurePosixPath(u.rstrip("/")).name
            longer = safe_name(base.rsplit(".", 1)[0] if "." in base else base)
            rivals = [v for v in urls if first[v].casefold() == name.casefold()]
            longer_all = [safe_name(PurePosixPath(v.rstrip("/")).name.rsplit(".", 1)[0])
                          for v in rivals]
            if Counter(n.casefold() for n in longer_all)[longer.casefold()] == 1 and \
                    longer.casefold() not in clashes:
                name = longer
            else:
                name = f"{name}-{hashlib.sha1(u.encode()).hexdigest()[:8]}"
        names[u] = name
    return names


def label_name(url: str) -> str:
    """``<stem>_label.tiff``: MEDIAR's name for the labels of ``url``."""
    return f"{stem(url)}_label.tiff"


def _read_bytes(url: str) -> bytes:
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageReadError(f"{url}: file not found") from None
    except PermissionError as err:
        raise ImageReadError(f"{url}: permission denied ({err})") from None
    except Exception as err:
        raise ImageReadError(f"{url}: cannot open ({type(err).__name__}: {err})") from None


def _tiff_to_yxc(tif: tifffile.TiffFile, url: str) -> np.ndarray:
    """Level 0 of the first series of a TIFF as (H, W) or (H, W, C)."""
    series = tif.series[0]
    level = series.levels[0] if getattr(series, "levels", None) else series
    data = level.asarray()
    axes = level.axes
    # Drop singleton axes, then expect Y, X and at most one channel-like axis.
    keep = [i for i, n in enumerate(data.shape) if n > 1 or axes[i] in "YX"]
    data = data.reshape([data.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    extra = [a for a in axes if a not in "YX"]
    if len(extra) > 1 or (extra and extra[0] not in "SC"):
        raise ImageReadError(
            f"{url}: a {len(axes)}-D image with axes {axes!r} and shape {data.shape}; "
            "mediar_ray segments 2-D images (optionally with channels): save one plane "
            "per file, or pass the slide through segment-slides"
        )
    if "Y" not in axes or "X" not in axes:
        raise ImageReadError(f"{url}: no Y/X image axes found (axes {axes!r})")
    order = [axes.index("Y"), axes.index("X")] + [axes.index(a) for a in extra]
    return np.ascontiguousarray(np.transpose(data, order))


def _read_tiff(data: bytes, url: str) -> np.ndarray:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            return _tiff_to_yxc(tif, url)
    except ImageReadError:
        raise
    except Exception as err:
        raise ImageReadError(f"{url}: not a readable TIFF ({type(err).__name__}: {err})") from None


def _read_pillow(data: bytes, url: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise ImageReadError(f"{url}: holds {im.n_frames} frames; expected one image")
            if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
            arr = np.asarray(im)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageReadError(f"{url}: not a readable image ({err})") from None
    if arr.ndim == 3 and arr.shape[2] in (2, 4):  # LA / RGBA: drop alpha
        arr = arr[:, :, : arr.shape[2] - 1]
        arr = arr[:, :, 0] if arr.shape[2] == 1 else arr
    return np.ascontiguousarray(arr)


def read_image(path_or_url: str) -> np.ndarray:
    """Read a 2-D image, with channels last, in its native dtype.

    Parameters
    ----------
    path_or_url : str
        Local path or fsspec URL of a TIFF/OME-TIFF/SVS (level 0), PNG, JPEG or BMP file.

    Returns
    -------
    ndarray
        (H, W) for grey, (H, W, C) for colour or multi-channel images (RGBA and LA lose
        their alpha channel; a channels-first OME-TIFF is moved to channels-last); dtype
        as stored (uint8, uint16, float32, ...).

    Raises
    ------
    ImageReadError
        The file is missing, empty, corrupt, has no pixels, or is a 3-D/time stack.
    """
    url = str(path_or_url)
    data = _read_bytes(url)
    if not data:
        raise ImageReadError(f"{url}: the file is empty (0 bytes)")
    is_tiff = data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    arr = _read_tiff(data, url) if is_tiff else _read_pillow(data, url)
    if arr.size == 0 or min(arr.shape[:2]) == 0:
        raise ImageReadError(f"{url}: the image has no pixels (shape {arr.shape})")
    if arr.ndim not in (2, 3):
        raise ImageReadError(f"{url}: unexpected image shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
            or arr.dtype == bool):
        raise ImageReadError(f"{url}: unsupported pixel type {arr.dtype}")
    return arr


def write_labels_tiff(labels: np.ndarray, path_or_url: str) -> None:
    """Write an (H, W) label image as zlib TIFF: uint16 when max id <= 65535, else uint32."""
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {lab.shape}")
    dtype = np.uint16 if lab.size == 0 or int(lab.max()) <= np.iinfo(np.uint16).max else np.uint32
    buf = io.BytesIO()
    tifffile.imwrite(buf, lab.astype(dtype, copy=False), compression="zlib")
    with fsspec.open(str(path_or_url), "wb") as f:
        f.write(buf.getvalue())


def _has_image_ext(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def expand_inputs(inputs: list[str] | tuple[str, ...]) -> list[str]:
    """Files, folders and globs (local paths or fsspec URLs) -> image paths/URLs.

    A folder contributes its image files (not recursively), sorted; a glob its matches,
    sorted; a file itself. Local inputs come back as local paths, remote ones as URLs
    with their protocol.

    Raises
    ------
    FileNotFoundError
        Naming the first input that matches no image file.
    """
    found: list[str] = []
    for item in map(str, inputs):
        fs, path = fsspec.core.url_to_fs(item)
        if _GLOB_CHARS & set(path):
            candidates = fs.glob(path)
        elif fs.isdir(path):
            candidates = fs.ls(path, detail=False)
        elif fs.exists(path):
            candidates = [path]
        else:
            candidates = []
        matches = sorted(p for p in candidates if _has_image_ext(p) and not fs.isdir(p))
        if not matches:
            raise FileNotFoundError(
                f"{item}: no image files found (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        local = isinstance(fs, LocalFileSystem)
        found.extend(p if local else fs.unstrip_protocol(p) for p in matches)
    return found
