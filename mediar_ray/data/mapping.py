"""Datasets in MEDIAR's layout and the path mapping (MEDIAR's ``generate_mapping`` step).

A dataset folder holds ``images/<name>.<ext>`` (tif, tiff, png, bmp, jpg, jpeg) and
``labels/<name>_label.tiff``. ``<name>`` is the name ``mediar-ray segment`` gives its
output for that image (:func:`mediar_ray.io.image_name`: the file name less its
extension, ``.ome.tif`` counting as one; compared in the safe form of
:func:`mediar_ray.io.safe_name`), so ``segment images/ -o pred/`` writes
``pred/<name>_label.tiff`` for exactly the pairs mapped here. Two images of one folder
with the same name (``a.png`` and ``a.tif``) are ambiguous: both are reported, neither
is paired. A root given to :func:`load_pairs` may be such a folder, or a
folder of them (each subfolder is a *source*, e.g. ``dsb2018/``). Any fsspec URL works.

:func:`map_dataset` with ``check=True`` (what ``mediar-ray map-dataset`` does) also opens
every file: images and labels whose header cannot be parsed, labels that are not a single
plane, and pairs whose image and label sizes differ are reported as unreadable (reading
the headers only, so it stays fast; ``decode=True`` decodes the pixels too).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import fsspec
import numpy as np

from mediar_ray.io import InputError

__all__ = [
    "BadPair",
    "LabelError",
    "Pair",
    "check_pair",
    "check_pairs",
    "label_problem",
    "load_pairs",
    "map_dataset",
    "read_labels",
    "split_holdout",
    "write_mapping",
]

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".bmp", ".jpg", ".jpeg")
LABEL_SUFFIX = "_label.tiff"


@dataclass(frozen=True)
class Pair:
    """An image, its instance label image, and the source dataset it comes from."""

    image: str
    label: str
    source: str


class LabelError(InputError):
    """A label image that is not one plane of non-negative whole cell ids."""


@dataclass(frozen=True)
class BadPair:
    """A pair left out of a run: the file at fault and why."""

    path: str
    reason: str


def label_problem(labels: np.ndarray) -> str | None:
    """Why ``labels`` cannot be an instance label image, or None.

    An instance label image is one plane (H, W) of whole, non-negative cell ids (0 is
    background): an integer or boolean dtype, or floats whose values are all whole
    numbers (:func:`read_labels` converts those).
    """
    if labels.ndim != 2:
        return f"label has shape {labels.shape}, expected one plane of cell ids"
    kind = labels.dtype.kind
    if kind == "f":
        if not np.isfinite(labels).all():
            return "label has NaN or infinite values; cell ids must be whole numbers"
        if not np.array_equal(labels, np.round(labels)):
            bad = labels[labels != np.round(labels)].flat[0]
            return (
                f"label has fractional values ({labels.dtype}, e.g. {bad:g}); cell ids "
                "must be whole numbers (save it as uint16/uint32)"
            )
    elif kind not in "iub":
        return f"label has dtype {labels.dtype}; cell ids must be integers"
    if kind in "if" and labels.size and labels.min() < 0:
        return f"label has negative ids (min {labels.min():g}); ids are 0 (background) or more"
    return None


def read_labels(url: str) -> np.ndarray:
    """The instance label image at ``url`` as integers (H, W).

    Floats with whole values are converted (int32, or int64 above 2**31 - 1 ids).

    Raises
    ------
    LabelError
        :func:`label_problem` finds the file unusable (the message names it).
    ImageReadError
        The file cannot be read.
    """
    from mediar_ray.io import read_image, safe_url

    labels = read_image(url)
    problem = label_problem(labels)
    if problem:
        raise LabelError(f"{safe_url(url)}: {problem}")
    if labels.dtype.kind in "fb":
        big = labels.size and labels.max() > np.iinfo(np.int32).max
        labels = labels.astype(np.int64 if big else np.int32)
    return labels


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _join(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Back from a filesystem path to a URL the rest of mediar_ray can open."""
    return (
        fs.unstrip_protocol(path)
        if fs.protocol not in ("file", ("file", "local")) and "file" not in fs.protocol
        else path
    )


def _dataset_dirs(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """``root`` itself if it holds images/ and labels/, else its subfolders that do."""
    if fs.isdir(f"{root}/images") and fs.isdir(f"{root}/labels"):
        return [root]
    return sorted(
        p for p in fs.ls(root, detail=False) if fs.isdir(f"{p}/images") and fs.isdir(f"{p}/labels")
    )


def _header_dims(url: str) -> tuple[int, int, int]:
    """(H, W, planes) of an image file from its header only (TIFF: first series, level
    0); planes is the product of all other axes (channels, samples, z, time)."""
    import tifffile
    from PIL import Image

    with fsspec.open(url, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        if magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            with tifffile.TiffFile(f) as tif:
                series = tif.series[0]
                shape = dict(zip(series.axes, series.shape))
                if "Y" not in shape or "X" not in shape:
                    raise ValueError(f"no Y/X axes (axes {series.axes!r})")
                other = [n for a, n in shape.items() if a not in "YX"]
                return shape["Y"], shape["X"], int(np.prod(other, dtype=np.int64))
        with Image.open(f) as im:
            return im.size[1], im.size[0], len(im.getbands())


def _dims(url: str, decode: bool) -> tuple[int, int, int]:
    if not decode:
        return _header_dims(url)
    from mediar_ray.io import read_image

    arr = read_image(url)
    return arr.shape[0], arr.shape[1], arr.shape[2] if arr.ndim == 3 else 1


def check_pair(image: str, label: str, decode: bool = False) -> tuple[str, str] | None:
    """(file at fault, short reason) when the pair cannot be used, else None.

    Reads the image header (``decode``: decodes the whole image) and decodes the label,
    and checks that the label is one plane of whole, non-negative cell ids
    (:func:`label_problem`) of the image's height and width.
    """
    try:
        ih, iw, _ = _dims(image, decode)
    except Exception as err:  # any parse failure means: unreadable
        return image, f"image not readable ({type(err).__name__}: {err})"
    from mediar_ray.io import read_image

    try:
        planes = _header_dims(label)[2]  # the file's own planes (decoding drops alpha)
        labels = read_image(label)
    except Exception as err:  # noqa: BLE001 - any parse failure means: unreadable
        return label, f"label not readable ({type(err).__name__}: {err})"
    if planes != 1 or (labels.ndim == 3 and labels.shape[2] != 1):
        count = planes if planes != 1 else labels.shape[2]
        return label, f"label has {count} planes/channels, expected one"
    problem = label_problem(labels.reshape(labels.shape[:2]))
    if problem:
        return label, problem
    lh, lw = labels.shape[:2]
    if (ih, iw) != (lh, lw):
        return image, f"image is {ih}x{iw} but its label is {lh}x{lw} pixels"
    return None


def _drop_unreadable(out: dict, decode: bool, threads: int = 8) -> None:
    """Move the pairs of ``out`` that :func:`check_pair` rejects to ``unreadable``."""
    pairs = out["pairs"]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        found = list(pool.map(lambda p: check_pair(p["image"], p["label"], decode), pairs))
    out["pairs"] = [p for p, bad in zip(pairs, found) if bad is None]
    out["unreadable"] += [{"path": bad[0], "reason": bad[1]} for bad in found if bad]


def check_pairs(
    pairs: Sequence[Pair], *, decode: bool = True, threads: int = 8
) -> tuple[list[Pair], list[BadPair]]:
    """(good pairs, bad ones with the file at fault and why), by :func:`check_pair`.

    ``decode`` (default) decodes the images too, so a truncated image is found here and
    not in the middle of an epoch.
    """
    with ThreadPoolExecutor(max_workers=threads) as pool:
        found = list(pool.map(lambda p: check_pair(p.image, p.label, decode), pairs))
    good = [p for p, bad in zip(pairs, found) if bad is None]
    return good, [BadPair(*bad) for bad in found if bad]


def _image_key(file: str) -> str | None:
    from mediar_ray.io import image_name, safe_name

    return safe_name(image_name(file)) if file.lower().endswith(IMAGE_EXTENSIONS) else None


def _label_key(file: str) -> str | None:
    from mediar_ray.io import safe_name

    return safe_name(file[: -len(LABEL_SUFFIX)]) if file.endswith(LABEL_SUFFIX) else None


def _by_name(
    fs: fsspec.AbstractFileSystem, folder: str, key, out: dict
) -> tuple[dict[str, dict], set[str]]:
    """Name -> listing entry of the files of ``folder`` that ``key`` names, and the names
    that several files share: those are ambiguous, added to ``out["unreadable"]`` and
    left out."""
    found: dict[str, list[dict]] = {}
    for entry in fs.ls(folder, detail=True):
        name = key(_name(entry["name"]))
        if name is not None and entry.get("type") != "directory":
            found.setdefault(name, []).append(entry)
    for name, entries in found.items():
        if len(entries) > 1:
            files = sorted(_name(e["name"]) for e in entries)
            out["unreadable"] += [
                {
                    "path": _join(fs, e["name"]),
                    "reason": f"ambiguous: {' and '.join(files)} all have the name {name!r}; "
                    "rename all but one",
                }
                for e in entries
            ]
    unique = {name: entries[0] for name, entries in found.items() if len(entries) == 1}
    return unique, set(found) - set(unique)


def map_dataset(root: str, check: bool = False, decode: bool = False) -> dict:
    """Pair every image of ``root`` with its label image.

    Parameters
    ----------
    root : str
        A dataset folder or a folder of them, local path or fsspec URL.
    check : bool
        Also open every pair (:func:`check_pair`); rejected pairs go to ``unreadable``.
    decode : bool
        With ``check``: decode the pixels, not only the headers (slower, also catches
        truncated pixel data).

    Returns
    -------
    dict
        ``root``, ``pairs`` (list of {image, label, source}), ``unpaired`` (images
        without a label and labels without an image) and ``unreadable`` ({path, reason}:
        empty files, files of one folder that share a name, and, with ``check``, files
        that cannot be parsed or pairs of different sizes). Raises FileNotFoundError
        when ``root`` holds no dataset.
    """
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.exists(base):
        raise FileNotFoundError(f"dataset root {root} does not exist")
    dirs = _dataset_dirs(fs, base)
    if not dirs:
        raise FileNotFoundError(
            f"{root} has no images/ and labels/ folders (MEDIAR layout: "
            "images/<name>.<ext> and labels/<name>_label.tiff)"
        )
    out: dict = {"root": root, "pairs": [], "unpaired": [], "unreadable": []}
    for d in dirs:
        source = _name(d)
        images, twice = _by_name(fs, f"{d}/images", _image_key, out)
        labels, twice_labels = _by_name(fs, f"{d}/labels", _label_key, out)
        for name in sorted((set(images) | set(labels)) - twice - twice_labels):
            if name not in images or name not in labels:
                out["unpaired"].append(_join(fs, (images.get(name) or labels[name])["name"]))
                continue
            empty = [x for x in (images[name], labels[name]) if not x.get("size")]
            if empty:
                out["unreadable"] += [
                    {"path": _join(fs, x["name"]), "reason": "empty file"} for x in empty
                ]
                continue
            out["pairs"].append(
                {
                    "image": _join(fs, images[name]["name"]),
                    "label": _join(fs, labels[name]["name"]),
                    "source": source,
                }
            )
    if check:
        _drop_unreadable(out, decode)
    return out


def write_mapping(root: str, out_url: str, check: bool = False, decode: bool = False) -> dict:
    """:func:`map_dataset` of ``root`` written as JSON to ``out_url``; returns it."""
    mapping = map_dataset(root, check, decode)
    with fsspec.open(out_url, "w") as f:
        json.dump(mapping, f, indent=1)
    return mapping


def load_pairs(
    mappings: Iterable[str] = (), roots: Iterable[str] = (), problems: list[BadPair] | None = None
) -> list[Pair]:
    """Pairs of the mapping JSONs and of the dataset roots (mapped on the fly).

    ``problems``, when given, gets the files of the roots that were left out: images
    without a label, labels without an image, empty or ambiguous files.
    """
    pairs = []
    for url in mappings:
        with fsspec.open(url, "r") as f:
            pairs += [Pair(**p) for p in json.load(f)["pairs"]]
    for root in roots:
        mapping = map_dataset(root)
        pairs += [Pair(**p) for p in mapping["pairs"]]
        if problems is not None:
            problems += [
                BadPair(
                    path,
                    "label without image" if path.endswith(LABEL_SUFFIX) else "image without label",
                )
                for path in mapping["unpaired"]
            ]
            problems += [BadPair(u["path"], u["reason"]) for u in mapping["unreadable"]]
    return pairs


def _stem(pair: Pair) -> str:
    return _name(pair.image).rsplit(".", 1)[0]


def split_holdout(pairs: Sequence[Pair], every: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out): per source, sorted by stem, every ``every``-th pair held out.

    ``every`` = 0 holds nothing out. The split depends only on the file names, so it is
    the same on every machine and for every run.
    """
    train, held = [], []
    for source in sorted({p.source for p in pairs}):
        ordered = sorted((p for p in pairs if p.source == source), key=_stem)
        for i, pair in enumerate(ordered):
            (held if every and i % every == every - 1 else train).append(pair)
    return train, held


def as_dicts(pairs: Sequence[Pair]) -> list[dict]:
    return [asdict(p) for p in pairs]
