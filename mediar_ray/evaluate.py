"""Score predicted label images against ground truth, file by file.

Predictions are ``<stem>_label.tiff``; the ground truth for a stem is
``<stem>_label.tiff`` or ``<stem>.tif``/``<stem>.tiff`` in the truth folder.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass

import fsspec

from mediar_ray.io import read_image
from mediar_ray.metrics import cellseg_f1

__all__ = ["ImageScore", "evaluate_dirs", "pair_files", "write_csv"]

_SUFFIX = "_label.tiff"


@dataclass(frozen=True)
class ImageScore:
    name: str
    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int
    n_true: int
    n_pred: int


def _names(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, str]:
    return {p.rsplit("/", 1)[-1]: p for p in fs.ls(root, detail=False) if not fs.isdir(p)}


def pair_files(pred_dir: str, gt_dir: str) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(stem, prediction URL, truth URL) for every prediction with a truth; and the
    prediction stems without one."""
    pfs, proot = fsspec.core.url_to_fs(pred_dir)
    gfs, groot = fsspec.core.url_to_fs(gt_dir)
    preds, truths = _names(pfs, proot), _names(gfs, groot)
    pairs, missing = [], []
    for name in sorted(preds):
        if not name.endswith(_SUFFIX):
            continue
        stem = name[: -len(_SUFFIX)]
        for candidate in (name, f"{stem}.tif", f"{stem}.tiff"):
            if candidate in truths:
                pairs.append((stem, pfs.unstrip_protocol(preds[name]),
                              gfs.unstrip_protocol(truths[candidate])))
                break
        else:
            missing.append(stem)
    return pairs, missing


def evaluate_dirs(pred_dir: str, gt_dir: str, drop_border: bool = True) -> list[ImageScore]:
    """CellSeg F1 (IoU 0.5) of every paired image, sorted by name."""
    scores = []
    for stem, pred_url, gt_url in pair_files(pred_dir, gt_dir)[0]:
        truth, pred = read_image(gt_url), read_image(pred_url)
        m = cellseg_f1(truth, pred, drop_border=drop_border)
        scores.append(ImageScore(stem, m.precision, m.recall, m.f1, m.tp, m.fp, m.fn,
                                 m.tp + m.fn, m.tp + m.fp))
    return scores


def write_csv(scores: list[ImageScore], url: str) -> None:
    """Per-image rows, then a ``mean`` row."""
    buf = io.StringIO()
    fields = list(ImageScore.__dataclass_fields__)
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for s in scores:
        writer.writerow(asdict(s))
    if scores:
        mean = {f: sum(getattr(s, f) for s in scores) / len(scores) for f in fields[1:4]}
        writer.writerow({"name": "mean", **mean})
    with fsspec.open(url, "w") as f:
        f.write(buf.getvalue())
