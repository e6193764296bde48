"""Where a slide's outputs live, its tile grid, and the OME-Zarr (NGFF 0.5) metadata.

``OUTPUT/<stem>.zarr`` (zarr v3)::

    0, 1, ...                 image pyramid, (c, y, x), level 0 = the slide's level 0
    labels/cells/0, 1, ...    uint32 labels, (y, x), nearest-neighbour pyramid
    summary.json              cell count, areas, time per stage, options, version
    qc.png                    thumbnail with cell outlines
    .scratch/                 flows, provisional labels, per-tile done records (removed
                              when the slide completes)
    .mediar_complete          written last: the slide is complete
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

__all__ = ["SlideLayout", "Tile", "safe_url", "tile_grid"]

COMPLETE_MARKER = ".mediar_complete"


def safe_url(url: str) -> str:
    """``url`` without credentials, query or fragment: what may appear in logs."""
    parts = urlsplit(str(url))
    if not parts.scheme:
        return str(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


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
        return "/".join((self.root,) + parts)

    @property
    def scratch(self) -> str:
        return self.path(".scratch")

    @property
    def marker(self) -> str:
        return self.path(COMPLETE_MARKER)


def multiscales(levels: int, axes: list[dict], name: str) -> list[dict]:
    """NGFF 0.5 ``multiscales`` for arrays "0".."levels-1", each 2x smaller in y and x."""
    spatial = [a["type"] == "space" for a in axes]
    datasets = []
    for k in range(levels):
        scale = [float(2**k) if s else 1.0 for s in spatial]
        datasets.append({"path": str(k),
                         "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    return [{"name": name, "axes": axes, "datasets": datasets}]


IMAGE_AXES = [
    {"name": "c", "type": "channel"},
    {"name": "y", "type": "space", "unit": "micrometer"},
    {"name": "x", "type": "space", "unit": "micrometer"},
]
LABEL_AXES = IMAGE_AXES[1:]
