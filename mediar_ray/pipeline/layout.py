"""Where a slide's outputs live, its tile grid, and the OME-Zarr (NGFF 0.5) metadata.

``OUTPUT/<stem>.zarr`` (zarr v3)::

    0, 1, ...                 image pyramid for viewing, (c, y, x): from 1/4 of the processing
                              resolution (the full processing image with --copy-image)
    labels/cells/0, 1, ...    uint32 labels at the processing resolution, (y, x),
                              nearest-neighbour pyramid
    labels/tissue/0           the tissue mask (uint8), when one was used
    labels/cells_level0/...   with --labels-level0: the labels on the slide's level-0 grid
    summary.json              cell count, areas, time per stage, options, version
    qc.png                    thumbnail with cell outlines
    .scratch/                 flows, provisional labels, per-tile done records (removed
                              when the slide completes)
    .mediar_complete          written last: the slide is complete
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Sequence

import fsspec

__all__ = [
    "NAMES_FILE",
    "SlideLayout",
    "Tile",
    "axes",
    "multiscales",
    "record_output_names",
    "stable_output_names",
    "tile_grid",
]

COMPLETE_MARKER = ".mediar_complete"
#: The output names the output root gave its inputs (input identity -> name).
NAMES_FILE = ".mediar_names.json"


def _names_url(output: str) -> str:
    return f"{output.rstrip('/')}/{NAMES_FILE}"


def read_names(output: str) -> dict[str, str]:
    """The names recorded in ``output`` (:data:`NAMES_FILE`; empty when none)."""
    try:
        with fsspec.open(_names_url(output), "r") as f:
            names = json.loads(f.read()).get("names", {})
    except (FileNotFoundError, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in names.items()} if isinstance(names, dict) else {}


def stable_output_names(urls: Sequence[str], output: str) -> dict[str, str]:
    """Each input's output name, stable across runs on the same output root.

    An input the root has named before (recorded in ``OUTPUT/.mediar_names.json``, keyed
    by its absolute path or URL without credentials) keeps that name, so adding inputs
    never renames, and so never doubles, earlier slides. New inputs are named by
    :func:`mediar_ray.io.output_names`; one whose name another input already holds in
    this root gets the ``<name>-<hash>`` form instead. Nothing is written:
    :func:`record_output_names` records the names.

    Returns
    -------
    dict
        input URL -> output name.
    """
    from mediar_ray.io import _identity, output_names, safe_url

    def key(url: str) -> str:
        return safe_url(_identity(url))

    known = read_names(output)
    taken = {n.casefold(): k for k, n in known.items()}
    names = {u: known[key(u)] for u in urls if key(u) in known}
    new = [u for u in urls if u not in names]
    fresh = output_names(new)
    for url in new:
        name = fresh[url]
        if name.casefold() in taken and taken[name.casefold()] != key(url):
            # Held by another input of an earlier run: as if both had been in one run.
            name = output_names([url, f"{url}#other"])[url]
        names[url] = name
        taken[name.casefold()] = key(url)
    return {u: names[u] for u in urls}


def record_output_names(names: dict[str, str], output: str) -> None:
    """Add ``names`` (input URL -> output name, from :func:`stable_output_names`) to the
    output root's record, written whole and atomically. The job calls it once its checks
    have passed, right before it touches the first slide: a job stopped by a bad option
    names nothing."""
    from mediar_ray.io import _identity, atomic_open, safe_url

    known = read_names(output)
    record = {**known, **{safe_url(_identity(u)): n for u, n in names.items()}}
    if record != known:
        with atomic_open(_names_url(output), "w", encoding="utf-8") as f:
            json.dump({"names": record}, f, indent=1, sort_keys=True)


@dataclass(frozen=True)
class Tile:
    """A tile core: rows y0:y1, columns x0:x1, index (ty, tx) in the grid."""

    ty: int
    tx: int
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def name(self) -> str:
        """``"ty_tx"``: names the tile's scratch files and done markers."""
        return f"{self.ty}_{self.tx}"


def tile_grid(shape: tuple[int, int], tile: int) -> list[Tile]:
    """Cores of ``tile`` x ``tile`` pixels covering ``shape``; they equal the zarr chunks."""
    h, w = shape
    return [
        Tile(ty, tx, y, min(y + tile, h), x, min(x + tile, w))
        for ty, y in enumerate(range(0, h, tile))
        for tx, x in enumerate(range(0, w, tile))
    ]


@dataclass
class SlideLayout:
    """Paths of one slide's outputs under the output root."""

    output_root: str
    stem: str
    root: str = field(init=False)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.stem) or self.stem.startswith("."):
            raise ValueError(f"unsafe slide name {self.stem!r}")
        self.root = f"{self.output_root.rstrip('/')}/{self.stem}.zarr"

    def path(self, *parts: str) -> str:
        """The URL of ``parts`` (joined by ``/``) under the slide's ``<stem>.zarr``."""
        return "/".join((self.root,) + parts)

    @property
    def scratch(self) -> str:
        """The slide's scratch folder (``<stem>.zarr/.scratch``): intermediate state."""
        return self.path(".scratch")

    @property
    def marker(self) -> str:
        """The URL of the marker file (``<stem>.zarr/.mediar_complete``) written once the
        slide's output is complete."""
        return self.path(COMPLETE_MARKER)


def axes(channel: bool, unit: str | None) -> list[dict]:
    """NGFF axes (c,) y, x; spatial axes carry ``unit`` ("micrometer") when it is known."""
    space = [{"name": n, "type": "space", **({"unit": unit} if unit else {})} for n in "yx"]
    return ([{"name": "c", "type": "channel"}] if channel else []) + space


def multiscales(
    name: str, transforms: list[tuple[list[float], list[float]]], channel: bool, unit: str | None
) -> list[dict]:
    """NGFF 0.5 ``multiscales`` for arrays "0", "1", ...: ``transforms[k]`` is the
    (scale, translation) of array k along (y, x), in ``unit`` (or in level-0 pixels of
    the slide when the pixel size is unknown and ``unit`` is None)."""
    lead = [1.0] if channel else []
    lead_t = [0.0] if channel else []
    datasets = [
        {
            "path": str(k),
            "coordinateTransformations": [
                {"type": "scale", "scale": lead + [float(v) for v in scale]},
                {"type": "translation", "translation": lead_t + [float(v) for v in shift]},
            ],
        }
        for k, (scale, shift) in enumerate(transforms)
    ]
    return [{"name": name, "axes": axes(channel, unit), "datasets": datasets}]
