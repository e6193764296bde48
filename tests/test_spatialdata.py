"""``mediar-ray to-spatialdata`` (issue 38, must-show 2) on a real slide-job output
(:mod:`slide_output`), read back with ``spatialdata.read_zarr``: table rows equal the
cells, instance ids equal the label ids, one outline per cell covering exactly its
pixels, transformations equal the slide's pixel size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
import zarr
from skimage.draw import polygon2mask
from slide_output import MPP, build

pytestmark = pytest.mark.slow  # the shared job output takes about a minute to make


@pytest.fixture(scope="module")
def export(tmp_path_factory, data_dir) -> tuple[Path, Path, dict]:
    """(job output, SpatialData store, the command's summary), via the command line."""
    job = build(tmp_path_factory.getbasetemp() / "slide_job", data_dir)
    dest = tmp_path_factory.mktemp("sd") / "he_sd.zarr"
    cmd = [
        sys.executable,
        "-c",
        "from mediar_ray.cli import main; raise SystemExit(main())",
        "to-spatialdata",
        str(job),
        str(dest),
    ]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return job, dest, json.loads(done.stdout.strip().splitlines()[-1])


def test_table_annotates_the_cells_labels_by_id(export):
    import spatialdata as sd

    job, dest, summary = export
    sdata = sd.read_zarr(str(dest))
    labels = zarr.open_group(str(job), mode="r")["labels/cells/0"][:]
    ids = np.unique(labels[labels > 0])
    table = sdata["table"]
    assert summary["cells"] == table.n_obs == len(ids) > 10
    attrs = table.uns["spatialdata_attrs"]
    assert (attrs["region"], attrs["region_key"], attrs["instance_key"]) == (
        "cells",
        "region",
        "id",
    )
    np.testing.assert_array_equal(np.sort(table.obs["id"].to_numpy()), ids)
    assert set(table.obs["region"]) == {"cells"}
    # X: the per-channel intensities of the RGB slide; obs: the rest of the cell table.
    assert list(table.var_names) == [
        f"intensity_{s}_{c}" for s in ("mean", "min", "max") for c in range(3)
    ]
    assert {"area", "area_um2", "prob_mean", "centroid_x_um"} <= set(table.obs.columns)
    for row, cell in enumerate(table.obs["id"].to_numpy()):
        assert table.obs["area"].iloc[row] == (labels == cell).sum()
    # obsm["spatial"]: (x, y) centroids in micrometres, the table's own *_um columns.
    np.testing.assert_allclose(
        table.obsm["spatial"], table.obs[["centroid_x_um", "centroid_y_um"]].to_numpy()
    )
    # The labels read back through SpatialData are the job's.
    np.testing.assert_array_equal(np.asarray(sdata["cells"]["scale0"]["image"]), labels)


def test_one_outline_per_cell_covering_its_pixels(export):
    import spatialdata as sd

    job, dest, summary = export
    sdata = sd.read_zarr(str(dest))
    labels = zarr.open_group(str(job), mode="r")["labels/cells/0"][:]
    shapes = sdata["cell_outlines"]
    assert summary["shapes"] == len(shapes) == sdata["table"].n_obs
    np.testing.assert_array_equal(
        np.sort(shapes.index.to_numpy()), np.sort(sdata["table"].obs["id"].to_numpy())
    )
    # Appended region by region: more than one Parquet row group.
    parquet = dest / "shapes" / "cell_outlines" / "shapes.parquet"
    assert pq.ParquetFile(parquet).metadata.num_row_groups > 1
    exact = 0
    for cell, poly in zip(shapes.index.to_numpy(), shapes.geometry):
        assert isinstance(poly, shapely.Polygon) and poly.is_valid
        # Along pixel edges: the area is the pixel count, plus the pixels that join a
        # label's pieces into one polygon (outline.py) where it has several.
        count = int((labels == cell).sum())
        assert count <= poly.area <= count + 4
        exact += poly.area == count
        # Rasterised at pixel centres, the polygon gives back the cell's pixels.
        x0, y0, x1, y1 = (int(v) for v in poly.bounds)
        ring = np.asarray(poly.exterior.coords)
        mask = polygon2mask((y1 - y0, x1 - x0), ring[:, ::-1] - (y0 + 0.5, x0 + 0.5))
        np.testing.assert_array_equal(
            mask & (labels[y0:y1, x0:x1] == cell), labels[y0:y1, x0:x1] == cell
        )
    assert exact >= 0.9 * len(shapes)


def test_transformations_are_the_pixel_size(export):
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    _, dest, summary = export
    sdata = sd.read_zarr(str(dest))
    assert summary["coordinate_system"] == "global" and summary["unit"] == "micrometer"
    assert set(sdata.coordinate_systems) == {"global"}

    def matrix(name: str, axes=("x", "y")) -> np.ndarray:
        t = get_transformation(sdata[name], to_coordinate_system="global")
        return t.to_affine_matrix(input_axes=axes, output_axes=axes)

    # Labels: processing pixel (= level-0 pixel here) i has its centre at i * 0.499 um.
    np.testing.assert_allclose(matrix("cells"), [[MPP, 0, 0], [0, MPP, 0], [0, 0, 1]])
    # Viewing image: 4 px per pixel, its first pixel centred on level-0 pixel 1.5.
    np.testing.assert_allclose(
        matrix("image"), [[4 * MPP, 0, 1.5 * MPP], [0, 4 * MPP, 1.5 * MPP], [0, 0, 1]]
    )
    # Outlines in pixel-edge coordinates: edge 0 is half a pixel before centre 0.
    np.testing.assert_allclose(
        matrix("cell_outlines"), [[MPP, 0, -MPP / 2], [0, MPP, -MPP / 2], [0, 0, 1]]
    )
    # Each outline's centroid lands on its cell's centroid (um) in the global system
    # (cells outlined without joining pixels: their polygon is exactly their pixels).
    shapes = sd.transform(sdata["cell_outlines"], to_coordinate_system="global")
    obs = sdata["table"].obs.set_index("id")
    shapes = shapes[np.isclose(shapes.area / MPP**2, obs.loc[shapes.index, "area"])]
    assert len(shapes) >= 0.9 * len(obs)
    centres = np.stack([shapes.centroid.x, shapes.centroid.y], axis=1)
    np.testing.assert_allclose(
        centres, obs.loc[shapes.index, ["centroid_x_um", "centroid_y_um"]].to_numpy(), atol=1e-6
    )


def test_refuses_an_existing_destination(export, tmp_path):
    job, dest, _ = export
    cmd = [
        sys.executable,
        "-c",
        "from mediar_ray.cli import main; raise SystemExit(main())",
        "to-spatialdata",
        str(job),
        str(dest),
    ]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--overwrite" in done.stderr
    inside = [*cmd[:-1], str(job / "sd.zarr")]
    done = subprocess.run(inside, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "inside the slide output" in done.stderr
