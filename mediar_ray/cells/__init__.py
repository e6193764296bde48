"""Per-cell measurements of segmented slides: exact chunk-by-chunk measurement
(:mod:`.measure`), the archive's Parquet cell table (:mod:`.table`) and QuPath GeoJSON
outlines (:mod:`.geojson`). Pure numpy and pyarrow: the slide pipeline calls them from
the tasks that already hold each chunk."""

from mediar_ray.cells.measure import (
    CellPartials,
    cells_in_several_chunks,
    finalize,
    measure_chunk,
    merge_partials,
    split_partials,
    take_rows,
    touches_neighbour,
)

__all__ = [
    "CellPartials",
    "cells_in_several_chunks",
    "finalize",
    "measure_chunk",
    "merge_partials",
    "split_partials",
    "take_rows",
    "touches_neighbour",
]
