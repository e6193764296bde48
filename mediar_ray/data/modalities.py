"""Modality discovery: K-means over image embeddings, and the modality table.

MEDIAR groups its training images into "modalities" (40 clusters of image embeddings)
so that amplified sampling (:mod:`.sampling`) can over-sample the rare ones. Here an
image is embedded either

* by a trained encoder (``checkpoint`` given): the image is normalised
  (:func:`mediar_ray.preprocess.normalize`), resized to ``size`` x ``size`` and passed
  through the checkpoint's encoder; the embedding is the global average pool of the
  deepest encoder stage, scaled to unit length; or
* by simple image statistics (no checkpoint): :func:`image_statistics` of the normalised,
  resized image, each feature standardised over the images (z-score).

The embeddings are clustered with K-means (``scipy.cluster.vq.kmeans2``, k-means++
initialisation, best of several seeded restarts). Cluster ids are renumbered by
decreasing size (ties: the cluster of the earlier image first), so a seed gives the
same table on every machine.

The modality table is JSON::

    {"version": 1, "method": "image-stats" | "encoder", "checkpoint": url | null,
     "k": clusters found, "k_requested": k asked for, "seed": int, "size": int,
     "sizes": {"0": images in cluster 0, ...}, "unreadable": [{"image", "reason"}],
     "table": {image URL: cluster id}}

The image keys are the pairs' paths relative to the dataset root they were found under
(the root given, or the ``root`` of a mapping; :func:`relative_keys`), e.g.
``dsb2018/images/x.png``: a training config that names the same data from any checkout or
folder finds every image (:class:`ModalityTable` matches a relative key against the end
of a path). Keys outside every root stay full URLs.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import warnings
from typing import Any, Callable, Iterable, Sequence

import fsspec
import numpy as np

__all__ = [
    "EncoderEmbedder",
    "ModalityTable",
    "StatisticsEmbedder",
    "discover_modalities",
    "embed_images",
    "image_statistics",
    "kmeans",
    "load_modality_table",
    "write_modality_table",
]

log = logging.getLogger("mediar_ray.modalities")

#: Names of the features of :func:`image_statistics`, in order.
STAT_FEATURES = (
    "mean",
    "std",
    "p01",
    "p10",
    "p50",
    "p90",
    "p99",
    "bright_fraction",
    "saturation",
    "red_minus_green",
    "blue_minus_green",
    "edge_strength",
)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a (C, H, W) float32 image to (C, size, size), bilinear with antialiasing.

    The aspect ratio is not kept: the embedding describes the look of the image, not
    its shape.
    """
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    out = F.interpolate(
        tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return out[0].numpy()


def image_statistics(image: np.ndarray) -> np.ndarray:
    """Intensity, colour and texture statistics of a normalised image.

    Parameters
    ----------
    image : ndarray, (3, H, W) float32 in [0, 1]
        As :func:`mediar_ray.preprocess.normalize` returns it (channels R, G, B).

    Returns
    -------
    ndarray, (12,) float64
        In the order of :data:`STAT_FEATURES`: mean and standard deviation of the grey
        image (channel mean); its 1st, 10th, 50th, 90th and 99th percentiles; the
        fraction of grey pixels above 0.5; mean saturation (max minus min channel); mean
        red minus green and blue minus green; mean gradient magnitude of the grey image
        (per pixel, central differences).
    """
    img = np.asarray(image, dtype=np.float64)
    grey = img.mean(axis=0)
    pct = np.percentile(grey, [1, 10, 50, 90, 99])
    gy, gx = np.gradient(grey)
    return np.array(
        [
            grey.mean(),
            grey.std(),
            *pct,
            float((grey > 0.5).mean()),
            float((img.max(axis=0) - img.min(axis=0)).mean()),
            float((img[0] - img[1]).mean()),
            float((img[2] - img[1]).mean()),
            float(np.hypot(gy, gx).mean()),
        ]
    )


class StatisticsEmbedder:
    """Image -> :func:`image_statistics` of the image resized to ``size`` x ``size``."""

    method = "image-stats"

    def __init__(self, size: int = 512) -> None:
        self.size = size

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return image_statistics(resize_square(image, self.size))


class EncoderEmbedder:
    """Image -> pooled deepest-stage features of a checkpoint's encoder.

    Parameters
    ----------
    checkpoint : str
        Any checkpoint :func:`mediar_ray.model.load_model` reads (path or fsspec URL).
    size : int
        Side the normalised image is resized to; a multiple of 32.
    device : str
    **params
        Model parameters for checkpoints that do not carry them (original ``.pth``).

    Calling it on a (3, H, W) float32 image in [0, 1] returns a (C,) float64 vector of
    unit length, C the channels of the deepest encoder stage (512 for ``mit_b5``).
    """

    method = "encoder"

    def __init__(
        self, checkpoint: str, size: int = 512, device: str = "cpu", **params: Any
    ) -> None:
        from mediar_ray.model import load_model

        if size % 32:
            raise ValueError(f"embedding size {size} must be a multiple of 32")
        self.encoder = load_model(checkpoint, device=device, **params).encoder.eval()
        self.size, self.device = size, device

    def __call__(self, image: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(resize_square(image, self.size))[None].to(self.device)
        with torch.inference_mode():
            deepest = self.encoder(x)[-1]
        vec = deepest.mean(dim=(2, 3))[0].double().cpu().numpy()
        return vec / max(float(np.linalg.norm(vec)), 1e-12)


def _load_normalised(url: str) -> np.ndarray:
    from mediar_ray.io import read_image
    from mediar_ray.preprocess import normalize

    return normalize(read_image(url))


def embed_images(
    urls: Sequence[str], embed: Callable[[np.ndarray], np.ndarray], progress: bool = True
) -> tuple[list[str], np.ndarray, list[dict]]:
    """Embed every image of ``urls`` (read and normalised here).

    Returns
    -------
    embedded : list of str
        The URLs that could be read, in input order.
    features : ndarray, (len(embedded), F) float64
    unreadable : list of {"image": url, "reason": str}
    """
    from tqdm import tqdm

    from mediar_ray.io import ImageReadError

    done, rows, bad = [], [], []
    for url in tqdm(urls, desc="embedding", unit="img", disable=not progress):
        try:
            rows.append(np.asarray(embed(_load_normalised(url)), dtype=np.float64))
        except ImageReadError as err:
            log.warning("skipping %s: %s", url, err)
            bad.append({"image": url, "reason": str(err)})
            continue
        done.append(url)
    features = np.stack(rows) if rows else np.zeros((0, 0))
    return done, features, bad


def standardise(features: np.ndarray) -> np.ndarray:
    """Z-score each column of an (N, F) array; constant columns become 0."""
    std = features.std(axis=0)
    return (features - features.mean(axis=0)) / np.where(std > 0, std, 1.0)


def _kmeans2(data: np.ndarray, k: int, seed: int) -> np.ndarray:
    """One run of scipy's kmeans2 (k-means++); labels (N,). Works with the ``rng`` and
    the older ``seed`` keyword."""
    from scipy.cluster.vq import kmeans2

    key = "rng" if "rng" in inspect.signature(kmeans2).parameters else "seed"
    with warnings.catch_warnings():  # an empty cluster is handled by the caller
        warnings.simplefilter("ignore")
        _, labels = kmeans2(
            data, k, iter=50, minit="++", missing="warn", **{key: np.random.default_rng(seed)}
        )
    return labels


def _inertia(data: np.ndarray, labels: np.ndarray) -> float:
    return float(
        sum(
            ((data[labels == c] - data[labels == c].mean(axis=0)) ** 2).sum()
            for c in np.unique(labels)
        )
    )


def _renumber_by_size(labels: np.ndarray) -> np.ndarray:
    """Cluster ids 0..k-1 by decreasing size; ties: the earlier first member first."""
    ids, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(len(ids)), key=lambda i: (-counts[i], first[i]))
    mapping = np.empty(int(ids.max()) + 1, np.int64)
    mapping[ids[order]] = np.arange(len(ids))
    return mapping[labels]


def kmeans(features: np.ndarray, k: int, seed: int = 0, restarts: int = 10) -> np.ndarray:
    """Seeded K-means of (N, F) features into at most ``k`` non-empty clusters.

    ``k`` is clamped to the number of distinct rows. Of ``restarts`` runs (seeds derived
    from ``seed``), the one with the lowest within-cluster sum of squares that has no
    empty cluster wins (if every run leaves one empty, the best run, with its empty
    clusters dropped). Returns (N,) int64 cluster ids, renumbered by decreasing size.
    """
    data = np.asarray(features, dtype=np.float64)
    if data.ndim != 2 or len(data) == 0:
        raise ValueError(f"features must be a non-empty (N, F) array, got {data.shape}")
    k = max(1, min(int(k), len(np.unique(data, axis=0))))
    if k == 1:
        return np.zeros(len(data), np.int64)
    seeds = np.random.default_rng(seed).integers(2**31, size=restarts)
    best, best_key = None, None
    for s in seeds:
        labels = _kmeans2(data, k, int(s))
        key = (len(np.unique(labels)) < k, _inertia(data, labels))
        if best_key is None or key < best_key:
            best, best_key = labels, key
    return _renumber_by_size(best)


def discover_modalities(
    images: Iterable[str],
    k: int = 40,
    checkpoint: str | None = None,
    seed: int = 0,
    size: int = 512,
    device: str = "cpu",
    model_params: dict | None = None,
    progress: bool = True,
) -> dict:
    """Embed ``images`` and cluster them; returns the modality table document.

    Parameters
    ----------
    images : iterable of str
        Image paths or URLs (duplicates are embedded once).
    k : int
        Clusters wanted (MEDIAR: 40); fewer when there are fewer distinct images.
    checkpoint : str, optional
        Embed with this checkpoint's encoder; image statistics when None.
    seed : int
        Seeds K-means: the same seed and images give the same table.
    size : int
        Side in pixels of the resized image that is embedded.
    device : str
        Torch device of the encoder.
    model_params : dict, optional
        Model parameters for a checkpoint that does not carry them.

    Returns
    -------
    dict, the JSON document described in the module docstring.
    """
    urls = list(dict.fromkeys(str(u) for u in images))
    if not urls:
        raise ValueError("no images to embed")
    embed = (
        EncoderEmbedder(checkpoint, size, device, **(model_params or {}))
        if checkpoint
        else StatisticsEmbedder(size)
    )
    done, features, bad = embed_images(urls, embed, progress)
    if not done:
        raise ValueError(f"none of the {len(urls)} images could be read")
    data = features if checkpoint else standardise(features)
    labels = kmeans(data, k, seed)
    sizes = np.bincount(labels)
    return {
        "version": 1,
        "method": embed.method,
        "checkpoint": checkpoint,
        "k": int(len(sizes)),
        "k_requested": int(k),
        "seed": int(seed),
        "size": int(size),
        "sizes": {str(c): int(n) for c, n in enumerate(sizes)},
        "unreadable": bad,
        "table": {u: int(c) for u, c in zip(done, labels)},
    }


def write_modality_table(doc: dict, url: str) -> None:
    """Write a :func:`discover_modalities` document as JSON to a path or fsspec URL."""
    with fsspec.open(url, "w") as f:
        json.dump(doc, f, indent=1)


def _same_file_key(url: str) -> str:
    """``url`` with a local path made absolute and normalised (``a/../b`` -> ``b``), so
    that a table written with one spelling of a local root matches another spelling;
    remote URLs are returned unchanged."""
    if "://" in url and not url.startswith("file://"):
        return url
    return os.path.normpath(os.path.abspath(url.removeprefix("file://")))


def relative_keys(table: dict[str, int], bases: Sequence[str]) -> dict[str, int]:
    """``table`` with each image key made relative to the first of ``bases`` (dataset
    roots, or the folders of mappings) that holds it; other keys are kept as they are.

    A table keyed this way (``dsb2018/images/x.png``) is found by a config that names
    the same data from another folder or another checkout (:class:`ModalityTable`).
    """
    prefixes = [_same_file_key(b).rstrip("/") + "/" for b in bases]
    out = {}
    for key, cluster in table.items():
        full = _same_file_key(key)
        base = next((p for p in prefixes if full.startswith(p)), None)
        out[full[len(base) :] if base else key] = cluster
    return out


def _is_relative(key: str) -> bool:
    return "://" not in key and not os.path.isabs(key)


class ModalityTable(dict):
    """A dict of image URL -> cluster id whose lookups (``[]``, ``in``, ``get``) treat
    different spellings of the same local path (relative, absolute, with ``..``) as one.

    Keys that are relative paths (``dsb2018/images/x.png``, written relative to the data
    root) match any image whose path ends with them, so the table works from any
    checkout and any working folder; the longest matching key wins.
    """

    def __init__(self, table: dict[str, int]) -> None:
        super().__init__({k if _is_relative(k) else _same_file_key(k): v for k, v in table.items()})
        self._relative = {k: v for k, v in self.items() if _is_relative(k)}

    def _find(self, key: str) -> str | None:
        full = _same_file_key(key)
        if super().__contains__(full):
            return full
        parts = full.split("/")
        for i in range(1, len(parts)):  # longest suffix first
            tail = "/".join(parts[i:])
            if tail in self._relative:
                return tail
        return None

    def __getitem__(self, key: str) -> int:
        found = self._find(key) if isinstance(key, str) else None
        if found is None:
            raise KeyError(key)
        return super().__getitem__(found)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._find(key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        found = self._find(key)
        return default if found is None else super().__getitem__(found)


def load_modality_table(url: str) -> dict[str, int]:
    """Image URL -> modality cluster id, from a table written by
    :func:`write_modality_table` (path or fsspec URL).

    Returns a :class:`ModalityTable`: local paths match however they are spelt
    (``../shared/data/x.png`` and ``/work/shared/data/x.png`` from ``/work/main``).

    Raises
    ------
    FileNotFoundError
        ``url`` does not exist.
    ValueError
        The file is not a modality table (no ``table`` mapping of str to int).
    """
    try:
        with fsspec.open(url, "r") as f:
            doc = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"modality table {url} is not valid JSON ({err})") from None
    table = doc.get("table") if isinstance(doc, dict) else None
    if not isinstance(table, dict) or not all(
        isinstance(key, str) and isinstance(c, int) and not isinstance(c, bool) and c >= 0
        for key, c in table.items()
    ):
        raise ValueError(
            f"{url} is not a modality table: expected a 'table' mapping "
            "image URLs to cluster ids >= 0 (written by "
            "`mediar-ray discover-modalities`)"
        )
    return ModalityTable(table)
