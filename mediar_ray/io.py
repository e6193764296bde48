"""Reading microscopy images and writing label images, from any fsspec URL.

Supported inputs: TIFF (grey, RGB, multi-channel, 8/16-bit, float; OME-TIFF; SVS and
other pyramids: level 0 only), PNG, JPEG, BMP. Label images are written as zlib TIFF,
uint16 when every id fits, else uint32.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import uuid
from collections import Counter
from pathlib import PurePosixPath
from typing import Sequence
from urllib.parse import urlsplit, urlunsplit

import fsspec
import numpy as np
import tifffile
from fsspec.implementations.local import LocalFileSystem

from mediar_ray.errors import UserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "atomic_open",
    "redact",
    "url_secrets",
    "ImageReadError",
    "InputError",
    "describe_error",
    "expand_inputs",
    "find_inputs",
    "image_name",
    "label_name",
    "output_names",
    "read_image",
    "safe_name",
    "safe_url",
    "stem",
    "write_labels_tiff",
]

IMAGE_EXTENSIONS = (".tif", ".tiff", ".svs", ".png", ".jpg", ".jpeg", ".bmp")
_GLOB_CHARS = set("*?[")


class ImageReadError(UserError):
    """An input image cannot be read or is not a 2-D (multi-channel) image."""


def stem(url: str) -> str:
    """File name up to its first '.', as MEDIAR names its outputs (kept for callers that
    need MEDIAR's exact name; outputs of mediar_ray are named by :func:`output_names`)."""
    return PurePosixPath(str(url).rstrip("/")).name.split(".")[0]


#: Extensions of two parts that count as one in :func:`image_name`.
COMPOUND_EXTENSIONS = (".ome.tiff", ".ome.tif")


def image_name(url: str) -> str:
    """The name of an image file: its file name less its extension.

    The extension is the text from the last '.', except that ``.ome.tif`` and
    ``.ome.tiff`` count as one (``x.ome.tif`` -> ``x``); a file name without a dot is its
    own name. For the ordinary names of MEDIAR's datasets (one dot, ``cell_00001.png``)
    this is MEDIAR's name; ``a.1.png`` is ``a.1`` (MEDIAR would cut it to ``a``), so a
    dataset's ``images/a.1.png`` and ``labels/a.1_label.tiff`` belong together, and
    ``mediar-ray segment`` writes ``a.1_label.tiff`` for it.
    """
    name = PurePosixPath(str(url).rstrip("/")).name
    lower = name.lower()
    for ext in COMPOUND_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name.rsplit(".", 1)[0] if "." in name else name


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(text: str) -> str:
    """``text`` with every character outside ``A-Z a-z 0-9 . _ -`` replaced by ``_`` and
    leading dots dropped, so it is a file name on every file system and object store."""
    return _UNSAFE.sub("_", text).lstrip(".") or "image"


def _identity(url: str) -> str:
    """What names a file across runs: its absolute path, or its full URL."""
    return url if "://" in url else os.path.abspath(url)


def output_names(urls: Sequence[str]) -> dict[str, str]:
    """A unique output name for each input, deterministic for the same list of inputs.

    The rule shared by ``segment``, ``segment-slides``, ``map-dataset`` and ``evaluate``:

    1. the name is the input's :func:`image_name` (file name less its extension) made
       safe by :func:`safe_name` (``my image.png`` -> ``my_image``);
    2. where two or more inputs of the list would share a name (compared ignoring case,
       as on case-insensitive file systems: ``f1/slide.png`` and ``f2/slide.png``, or
       ``a.png`` and ``a.tif``), each of them is named
       ``<name>-<first 8 hex digits of the SHA-1 of its absolute path or full URL>``
       (more digits in the astronomically rare case that 8 still collide).

    Inputs listed twice keep one name. A name depends on the other inputs of the run
    only through rule 2: adding ``f2/slide.png`` to a run renames ``f1/slide.png``'s
    outputs from ``slide`` to ``slide-<hash>``.

    Returns
    -------
    dict
        input URL -> output name (no folder part, never empty, never starting with '.').
    """
    urls = list(dict.fromkeys(map(str, urls)))
    first = {u: safe_name(image_name(u)) for u in urls}
    counts = Counter(n.casefold() for n in first.values())
    digits = {u: hashlib.sha1(_identity(u).encode()).hexdigest() for u in urls}
    for width in (8, 16, 40):
        names = {
            u: n if counts[n.casefold()] == 1 else f"{n}-{digits[u][:width]}"
            for u, n in first.items()
        }
        if len({n.casefold() for n in names.values()}) == len(names):
            break
    return names


def label_name(url: str) -> str:
    """``<name>_label.tiff`` for the labels of ``url`` (:func:`image_name`, made safe);
    within a run of several inputs, use :func:`output_names` so names cannot collide."""
    return f"{safe_name(image_name(url))}_label.tiff"


class InputError(UserError):
    """An input, output or URL cannot be used (missing, no access, no credentials...)."""


def describe_error(err: BaseException) -> str:
    """One line saying what went wrong with a file or URL, and what to do about it.

    Recognises missing files, permissions, missing or rejected cloud credentials, URL
    schemes fsspec does not know, and file-system packages that are not installed.
    """
    text = str(err).splitlines()[0] if str(err) else ""
    kind = type(err).__name__
    if kind == "NoCredentialsError" or "Unable to locate credentials" in text:
        return (
            "no credentials for S3: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE) in the environment, or run where an instance role "
            "provides them"
        )
    if kind in ("InvalidAccessKeyId", "SignatureDoesNotMatch") or any(
        code in text for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch")
    ):
        return "the cloud credentials were rejected: check AWS_ACCESS_KEY_ID/SECRET"
    if isinstance(err, FileNotFoundError):
        return "not found: check the path or URL"
    if isinstance(err, NotADirectoryError):
        return f"a part of the path is a file, not a folder ({text})"
    if isinstance(err, IsADirectoryError):
        return f"a folder is in the way of a file ({text})"
    if isinstance(err, PermissionError):
        return (
            f"no access ({kind}: {text}): check the file permissions, or the "
            "credentials in the environment for a cloud URL"
        )
    if isinstance(err, ValueError) and text.startswith("Protocol not known"):
        return (
            f"unknown URL scheme ({text}): use a local path or a URL fsspec knows "
            "(s3://, gs://, az://, https://, memory://)"
        )
    if isinstance(err, ImportError):
        return f"the package for this URL scheme is not installed ({text}): pip install it"
    return f"{kind}: {text}"


def safe_url(url: str) -> str:
    """``url`` as it may appear in logs, messages and summaries: without credentials, query
    or fragment.

    Examples
    --------
    >>> safe_url("s3://KEY:SECRET@bucket/slides/a.svs?X-Amz-Signature=abc")
    's3://bucket/slides/a.svs'
    >>> safe_url("/data/a.tif")
    '/data/a.tif'
    """
    parts = urlsplit(str(url))
    if not parts.scheme or len(parts.scheme) == 1:  # a path (or a Windows drive letter)
        return str(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


#: A URL with a scheme inside free text (an error message, a traceback line).
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{},]+")
#: Signed-URL and credential parameters that may appear without their URL.
_SECRET_PARAMS = re.compile(
    r"((?:X-Amz-(?:Signature|Credential|Security-Token)|Signature|sig|AWSAccessKeyId|"
    r"access_token|token|key|secret)=)[^&\s'\"]+",
    re.IGNORECASE,
)


def redact(text: object, *secrets: str) -> str:
    """``text`` (a message, a traceback) with every URL in it shown by :func:`safe_url`
    (no user info, query or fragment), signed-URL parameters blanked, and each of
    ``secrets`` (e.g. the user info of the URLs a command was given, which an fsspec or
    s3fs error may repeat without its URL) replaced by ``***``.

    Examples
    --------
    >>> redact("cannot open s3://KEY:SECRET@bucket/a.svs: denied", "KEY:SECRET")
    'cannot open s3://bucket/a.svs: denied'
    """
    out = _URL_IN_TEXT.sub(lambda m: safe_url(m.group(0)), str(text))
    out = _SECRET_PARAMS.sub(r"\1***", out)
    for secret in secrets:
        if secret:
            out = out.replace(secret, "***")
    return out


def url_secrets(urls: Sequence[str]) -> list[str]:
    """The user info of ``urls`` (``KEY:SECRET``, and each of its parts) and their query
    strings: what :func:`redact` must blank wherever it appears."""
    found: list[str] = []
    for url in urls:
        parts = urlsplit(str(url))
        if not parts.scheme or len(parts.scheme) == 1:
            continue
        userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
        found += [userinfo, *userinfo.split(":")] if userinfo else []
        found += [parts.query] if parts.query else []
    # Longest first: "KEY:SECRET" before "KEY".
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


@contextlib.contextmanager
def atomic_open(url: str, mode: str = "wb", **kwargs):
    """Open ``url`` for writing so that its final path only ever holds a complete file.

    On a local disk the data goes to a hidden temporary file beside it (``.<name>.tmp-*``,
    which table and GeoJSON readers skip), renamed over ``url`` once closed without error;
    a killed writer leaves only the hidden file. Object stores (S3, GCS, ...) publish an
    object only when its upload completes, so there ``url`` is written directly.
    """
    fs, path = fsspec.core.url_to_fs(url)
    if not isinstance(fs, LocalFileSystem):
        with fs.open(path, mode, **kwargs) as f:
            yield f
        return
    folder, _, name = path.rpartition("/")
    tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:12]}"
    fs.makedirs(folder or ".", exist_ok=True)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_bytes(url: str) -> bytes:
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageReadError(f"{safe_url(url)}: file not found") from None
    except PermissionError as err:
        raise ImageReadError(f"{safe_url(url)}: permission denied ({err})") from None
    except Exception as err:
        raise ImageReadError(f"{safe_url(url)}: cannot open ({describe_error(err)})") from None


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
    data = np.transpose(data, order)
    # ExtraSamples 1 (associated, premultiplied) or 2 (unassociated) alpha: onto white,
    # as the slide reader composites it, so that both paths see the same pixels.
    alpha = tuple(getattr(level.keyframe, "extrasamples", ()) or ())
    if data.ndim == 3 and data.shape[2] in (2, 4) and alpha and alpha[-1] in (1, 2):
        data = _onto_white(data, premultiplied=alpha[-1] == 1)
        data = data[:, :, 0] if data.shape[2] == 1 else data
    return np.ascontiguousarray(data)


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
    if arr.ndim == 3 and arr.shape[2] in (2, 4):  # LA / RGBA: onto white, as slides are
        arr = _onto_white(arr)
        arr = arr[:, :, 0] if arr.shape[2] == 1 else arr
    return np.ascontiguousarray(arr)


def _onto_white(region: np.ndarray, premultiplied: bool = False) -> np.ndarray:
    """(h, w, C + 1) colour + alpha (straight, or ``premultiplied``) -> (h, w, C) composited
    onto white, the region's dtype: transparent pixels are white (glass), as the slide
    readers give them (:func:`mediar_ray.sources.base.composite_alpha`), so both paths
    see the same pixels."""
    full = float(np.iinfo(region.dtype).max) if np.issubdtype(region.dtype, np.integer) else 1.0
    color, alpha = region[..., :-1], region[..., -1:]
    if np.all(alpha == full):
        return color
    a = alpha.astype(np.float32) / full
    color = color.astype(np.float32)
    blend = (color if premultiplied else color * a) + full * (1.0 - a)
    if np.issubdtype(region.dtype, np.integer):
        blend = np.clip(np.rint(blend), 0, full)
    return blend.astype(region.dtype)


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
    if not (
        np.issubdtype(arr.dtype, np.integer)
        or np.issubdtype(arr.dtype, np.floating)
        or arr.dtype == bool
    ):
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


def _expand_one(item: str) -> list[str]:
    """The image files one input names (a file, a folder's images, a glob's matches)."""
    fs, path = fsspec.core.url_to_fs(item)
    if _GLOB_CHARS & set(path):
        candidates = fs.glob(path)
    elif fs.isdir(path):
        candidates = fs.ls(path, detail=False)
    elif fs.exists(path):
        candidates = [path]
    else:
        raise FileNotFoundError(path)
    matches = sorted(p for p in candidates if _has_image_ext(p) and not fs.isdir(p))
    local = isinstance(fs, LocalFileSystem)
    return [p if local else fs.unstrip_protocol(p) for p in matches]


def find_inputs(inputs: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files, folders and globs (local paths or fsspec URLs) -> image paths/URLs, and the
    inputs that gave none.

    A folder contributes its image files (not recursively), sorted; a glob its matches,
    sorted; a file itself. Local inputs come back as local paths, remote ones as URLs
    with their protocol; a file named twice is listed once.

    Returns
    -------
    images : list of str
    problems : list of (input, reason)
        Each input that matches no image file or cannot be listed (missing, no access,
        no credentials, unknown URL scheme), with a one-line reason and its fix.
    """
    found: list[str] = []
    problems: list[tuple[str, str]] = []
    for item in map(str, inputs):
        try:
            matches = _expand_one(item)
        except Exception as err:  # any listing failure is this input's problem only
            problems.append((safe_url(item), describe_error(err)))
            continue
        if not matches:
            why = f"no image files found (looked for {', '.join(IMAGE_EXTENSIONS)})"
            problems.append((safe_url(item), why))
        found.extend(matches)
    return list(dict.fromkeys(found)), problems


def expand_inputs(inputs: list[str] | tuple[str, ...]) -> list[str]:
    """:func:`find_inputs`, raising on the first input that gives no image.

    Raises
    ------
    FileNotFoundError
        Naming the first input that matches no image file.
    InputError
        An input cannot be listed (no access, no credentials, unknown URL scheme).
    """
    found, problems = find_inputs(inputs)
    for item, why in problems:
        if why.startswith(("no image files", "not found")):
            raise FileNotFoundError(f"{item}: {why}")
        raise InputError(f"{item}: {why}")
    return found
