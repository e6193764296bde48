"""Score predicted label images against ground truth, file by file.

Predictions are ``<name>_label.tiff``; the ground truth for a name is
``<name>_label.tiff`` or ``<name>.tif``/``<name>.tiff`` in the truth folder. Names are
compared in their safe form (:func:`mediar_ray.io.safe_name`), the form in which
``mediar-ray segment`` writes them, so ``labels/my image_label.tiff`` is the truth of
the prediction ``my_image_label.tiff``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from mediar_ray.io import describe_error, image_name, safe_name, safe_url
from mediar_ray.metrics import cellseg_f1

__all__ = ["ImageScore", "evaluate_dirs", "pair_files", "score_pair", "write_csv"]

_SUFFIX = "_label.tiff"


@dataclass(frozen=True)
class ImageScore:
    """CellSeg scores of one image (from :func:`score_pair`).

    Attributes
    ----------
    name : str
        The image name (the prediction's file name less ``_label.tiff``).
    precision, recall, f1 : float
        At IoU 0.5, after border cells are dropped (unless told not to).
    tp, fp, fn : int
        Matched cells, unmatched predicted cells, unmatched true cells.
    n_true, n_pred : int
        Cells in the truth (``tp + fn``) and in the prediction (``tp + fp``).
    """

    name: str
    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int
    n_true: int
    n_pred: int


def _names(fs: fsspec.AbstractFileSystem, root: str, option: str) -> dict[str, str]:
    """File name -> path of the files in folder ``root``.

    Raises
    ------
    FileNotFoundError
        ``root`` is missing or not a folder (one line naming the option).
    """
    try:
        if not fs.isdir(root):
            raise FileNotFoundError(root)
        listing = fs.ls(root, detail=True)
    except Exception as err:
        raise FileNotFoundError(
            f"{option}: not a readable folder ({describe_error(err)})"
        ) from None
    return {
        p["name"].rsplit("/", 1)[-1]: p["name"] for p in listing if p.get("type") != "directory"
    }


def _truth_name(file: str) -> tuple[str, int] | None:
    """(safe name, preference) of a ground-truth file; lower preference wins."""
    if file.endswith(_SUFFIX):
        return safe_name(file[: -len(_SUFFIX)]), 0
    if file.lower().endswith((".tif", ".tiff")):
        return safe_name(image_name(file)), 1
    return None


def pair_files(pred_dir: str, gt_dir: str) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(name, prediction URL, truth URL) for every prediction with a truth; and the
    prediction names without one. Raises FileNotFoundError if a folder is missing."""
    pfs, proot = fsspec.core.url_to_fs(pred_dir)
    gfs, groot = fsspec.core.url_to_fs(gt_dir)
    preds = _names(pfs, proot, f"--pred {safe_url(pred_dir)}")
    truths = _names(gfs, groot, f"--gt {safe_url(gt_dir)}")
    best: dict[str, tuple[int, str]] = {}
    for file in sorted(truths):
        found = _truth_name(file)
        if found and (found[0] not in best or found[1] < best[found[0]][0]):
            best[found[0]] = (found[1], file)
    pairs, missing = [], []
    for file in sorted(preds):
        if not file.endswith(_SUFFIX):
            continue
        name = file[: -len(_SUFFIX)]
        truth = best.get(safe_name(name))
        if truth is None:
            missing.append(name)
            continue
        pairs.append((name, _url(pfs, preds[file]), _url(gfs, truths[truth[1]])))
    return pairs, missing


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path of ``fs`` as the rest of mediar_ray opens it (local files stay paths)."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def score_pair(name: str, pred_url: str, gt_url: str, drop_border: bool = True) -> ImageScore:
    """CellSeg F1 (IoU 0.5) of one prediction against its truth.

    Raises
    ------
    ValueError
        A file is unreadable, is not a single-plane label image of whole non-negative
        ids, or the two differ in size (one line naming the file).
    """
    from mediar_ray.data.mapping import read_labels

    # Labels are checked and whole-valued floats converted (a float label used to end in
    # a TypeError inside the metric); a bad file raises LabelError naming it.
    truth, pred = read_labels(gt_url), read_labels(pred_url)
    for what, url, arr in (("truth", gt_url, truth), ("prediction", pred_url, pred)):
        if arr.ndim != 2:
            raise ValueError(
                f"{what} {safe_url(url)} is not a label image (shape "
                f"{arr.shape}; expected one plane of cell ids)"
            )
    if truth.shape != pred.shape:
        raise ValueError(
            f"prediction {safe_url(pred_url)} is {pred.shape[0]}x{pred.shape[1]} pixels but "
            f"its truth {safe_url(gt_url)} is {truth.shape[0]}x{truth.shape[1]}: they are "
            "not of the same image"
        )
    m = cellseg_f1(truth, pred, drop_border=drop_border)
    return ImageScore(name, m.precision, m.recall, m.f1, m.tp, m.fp, m.fn, m.tp + m.fn, m.tp + m.fp)


def evaluate_dirs(
    pred_dir: str,
    gt_dir: str,
    drop_border: bool = True,
    failures: list[tuple[str, str]] | None = None,
) -> list[ImageScore]:
    """CellSeg F1 (IoU 0.5) of every paired image, sorted by name.

    A pair that cannot be scored (:func:`score_pair`) raises, unless ``failures`` is
    given: then (name, reason) is appended to it and the other pairs are still scored.
    """
    scores = []
    for name, pred_url, gt_url in pair_files(pred_dir, gt_dir)[0]:
        try:
            scores.append(score_pair(name, pred_url, gt_url, drop_border))
        except Exception as err:  # one bad pair must not lose the other scores
            if failures is None:
                raise
            failures.append(
                (name, str(err) if isinstance(err, ValueError) else describe_error(err))
            )
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
