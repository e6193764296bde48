"""Datasets in MEDIAR's layout and the path mapping (MEDIAR's ``generate_mapping`` step).

A dataset folder holds ``images/<stem>.<ext>`` (tif, tiff, png, bmp, jpg, jpeg) and
``labels/<stem>_label.tiff``. A root given to :func:`load_pairs` may be such a folder, or a
folder of them (each subfolder is a *source*, e.g. ``dsb2018/``). Any fsspec URL works.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import fsspec

__all__ = ["Pair", "load_pairs", "map_dataset", "split_holdout", "write_mapping"]

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".bmp", ".jpg", ".jpeg")
LABEL_SUFFIX = "_label.tiff"


@dataclass(frozen=True)
class Pair:
    """An image, its instance label image, and the source dataset it comes from."""

    image: str
    label: str
    source: str


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _join(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Back from a filesystem path to a URL the rest of mediar_ray can open."""
    return fs.unstrip_protocol(path) if fs.protocol not in ("file", ("file", "local")) \
        and "file" not in fs.protocol else path


def _dataset_dirs(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """``root`` itself if it holds images/ and labels/, else its subfolders that do."""
    if fs.isdir(f"{root}/images") and fs.isdir(f"{root}/labels"):
        return [root]
    return sorted(p for p in fs.ls(root, detail=False)
                  if fs.isdir(f"{p}/images") and fs.isdir(f"{p}/labels"))


def map_dataset(root: str) -> dict:
    """Pair every image of ``root`` with its label image.

    Returns
    -------
    dict
        ``root``, ``pairs`` (list of {image, label, source}), ``unpaired`` (images
        without a label and labels without an image) and ``unreadable`` ({path, reason}:
        empty files). Raises FileNotFoundError when ``root`` holds no dataset.
    """
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.exists(base):
        raise FileNotFoundError(f"dataset root {root} does not exist")
    dirs = _dataset_dirs(fs, base)
    if not dirs:
        raise FileNotFoundError(f"{root} has no images/ and labels/ folders (MEDIAR layout: "
                                "images/<stem>.<ext> and labels/<stem>_label.tiff)")
    out: dict = {"root": root, "pairs": [], "unpaired": [], "unreadable": []}
    for d in dirs:
        source = _name(d)
        images = {}
        for p in fs.ls(f"{d}/images", detail=True):
            name = _name(p["name"])
            if name.lower().endswith(IMAGE_EXTENSIONS):
                images[name.rsplit(".", 1)[0]] = p
        labels = {_name(p["name"])[: -len(LABEL_SUFFIX)]: p
                  for p in fs.ls(f"{d}/labels", detail=True)
                  if _name(p["name"]).endswith(LABEL_SUFFIX)}
        for stem in sorted(set(images) | set(labels)):
            if stem not in images or stem not in labels:
                out["unpaired"].append(_join(fs, (images.get(stem) or labels[stem])["name"]))
                continue
            empty = [x for x in (images[stem], labels[stem]) if not x.get("size")]
            if empty:
                out["unreadable"] += [{"path": _join(fs, x["name"]), "reason": "empty file"}
                                      for x in empty]
                continue
            out["pairs"].append({"image": _join(fs, images[stem]["name"]),
                                 "label": _join(fs, labels[stem]["name"]), "source": source})
    return out


def write_mapping(root: str, out_url: str) -> dict:
    """:func:`map_dataset` of ``root`` written as JSON to ``out_url``; returns it."""
    mapping = map_dataset(root)
    with fsspec.open(out_url, "w") as f:
        json.dump(mapping, f, indent=1)
    return mapping


def load_pairs(mappings: Iterable[str] = (), roots: Iterable[str] = ()) -> list[Pair]:
    """Pairs of the mapping JSONs and of the dataset roots (mapped on the fly)."""
    pairs = []
    for url in mappings:
        with fsspec.open(url, "r") as f:
            pairs += [Pair(**p) for p in json.load(f)["pairs"]]
    for root in roots:
        pairs += [Pair(**p) for p in map_dataset(root)["pairs"]]
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
