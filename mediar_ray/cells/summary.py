"""Per-slide summary of an archive's cell table (what ``mediar-ray cells`` prints).

Reads only Parquet footers and the ``area`` column, one file at a time: cell areas are
integers, so their exact quantiles come from a histogram, whatever the slide's size.
"""

from __future__ import annotations

from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq

from mediar_ray.cells.table import partition_url, slide_infos

__all__ = ["QUANTILES", "histogram_quantiles", "summarize_archive"]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def histogram_quantiles(hist: np.ndarray, qs: tuple[float, ...] = QUANTILES) -> list[float]:
    """Quantiles (numpy's default, linear interpolation) of the integers counted in
    ``hist`` (``hist[v]`` = how many times value ``v`` occurs)."""
    cum = np.cumsum(hist)
    n = int(cum[-1]) if cum.size else 0
    if n == 0:
        return [float("nan")] * len(qs)
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo, frac = int(np.floor(pos)), pos - np.floor(pos)
        v_lo = int(np.searchsorted(cum, lo, side="right"))  # the value at sorted index lo
        v_hi = int(np.searchsorted(cum, min(lo + 1, n - 1), side="right"))
        out.append(v_lo + frac * (v_hi - v_lo))
    return out


def _area_histogram(output: str, slide: str, run: str) -> np.ndarray:
    fs, root = fsspec.core.url_to_fs(partition_url(output, slide))
    hist = np.zeros(1, np.int64)
    fs.invalidate_cache(root)
    for path in sorted(fs.ls(root, detail=False)):
        if not path.rsplit("/", 1)[-1].startswith(f"part-{run}-"):
            continue
        with fs.open(path, "rb") as f:
            areas = pq.read_table(f, columns=["area"]).column("area").to_numpy()
        counts = np.bincount(areas)
        if counts.size > hist.size:
            counts[: hist.size] += hist
            hist = counts
        else:
            hist[: counts.size] += counts
    return hist


def summarize_archive(output: str) -> list[dict[str, Any]]:
    """One dict per slide of ``OUTPUT/cells/``: ``slide``, ``cells``, ``area_px``
    quantiles (:data:`QUANTILES`), and where the pixel size is known ``area_um2``
    quantiles, the area the density refers to (``basis``: tissue when the table's
    metadata gives its area, else the whole slide), ``area_mm2`` and
    ``density_per_mm2``; ``clean`` is False when the partition holds several runs or an
    incomplete one (a killed rerun: see :func:`mediar_ray.cells.table.repair_partition`).
    """
    rows = []
    for slide, info in slide_infos(output).items():
        state = info["state"]
        hist = _area_histogram(output, slide, info["run"])
        q_px = histogram_quantiles(hist)
        row: dict[str, Any] = {
            "slide": slide,
            "cells": int(info["cells"] or 0),
            "clean": state["clean"],
            "runs": len(state["runs"]),
            "area_px": dict(zip(map(str, QUANTILES), q_px)),
        }
        size = info.get("pixel_size_um")
        sy, sx = info.get("scale") or (1.0, 1.0)
        if size:
            um2_per_px = sy * sx * size[0] * size[1]
            row["area_um2"] = {k: v * um2_per_px for k, v in row["area_px"].items()}
            if info.get("tissue_area_px") is not None:
                basis, px = "tissue", float(info["tissue_area_px"])
            else:
                basis, px = "slide", float(np.prod(info.get("shape") or (0, 0)))
            area_mm2 = px * um2_per_px / 1e6
            row.update(
                basis=basis,
                area_mm2=area_mm2,
                density_per_mm2=row["cells"] / area_mm2 if area_mm2 > 0 else None,
            )
        rows.append(row)
    return rows
