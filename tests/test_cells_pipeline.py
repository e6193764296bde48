"""Per-cell tables and GeoJSON written by the slide job itself (issue 18, must-show 1-3):
``run_slides`` on real images, its outputs checked against scikit-image on the labels
it wrote, against its level-0 labels, and read back from an S3 server on loopback."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from pathlib import Path

import dask.array as da
import dask.dataframe as dd
import duckdb
import fsspec
import numpy as np
import pandas as pd
import pytest
import shapely.geometry
import tifffile
import zarr
from skimage.draw import polygon2mask
from skimage.measure import regionprops
from test_cells import paired_mosaic
from test_cells_table import normalise
from test_pipeline import plan_as_job

from mediar_ray.cells.table import partition_state
from mediar_ray.dynamics import labels_to_flows
from mediar_ray.io import read_image
from mediar_ray.pipeline import SlideOptions, run_slides
from mediar_ray.pipeline.layout import tile_grid
from mediar_ray.pipeline.stages import mark_done, open_array
from mediar_ray.segment import resolve_weights

# 7 x 7 chunks of 448 px, the last row and column 384 px: many seams, ragged edges.
SIZE, TILE = 3072, 448


@pytest.fixture(scope="module")
def cluster(s3_ray):
    return s3_ray


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


@pytest.fixture(scope="module")
def dsb_pairs(data_dir) -> list[tuple[np.ndarray, np.ndarray]]:
    """(RGB image, labels) of the real DSB2018 pairs, densest first."""
    pairs = []
    for path in sorted((data_dir / "dsb2018" / "labels").glob("*_label.tiff")):
        lab = read_image(str(path))
        img = read_image(str(data_dir / "dsb2018" / "images" / (path.name[:-11] + ".png")))
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
        pairs.append((img, lab))
    pairs.sort(key=lambda p: len(np.unique(p[1])) / p[1].size, reverse=True)
    return pairs


def run_with_injected_flows(
    path: Path, out: Path, opts: SlideOptions, truth: np.ndarray, logit: np.ndarray
) -> None:
    """The job on the slide at ``path`` with the model's output replaced by the flows
    of ``truth`` (x 5, as the model is trained) and ``logit`` (processing grid)."""
    raw = np.concatenate([labels_to_flows(truth) * 5, logit[None]]).astype(np.float32)
    plan = plan_as_job(path, out, opts)
    assert plan.shape == truth.shape
    flows = open_array(plan.layout.scratch + "/flows", mode="r+")
    for tile in tile_grid(plan.shape, plan.tile):
        flows[:, tile.y0 : tile.y1, tile.x0 : tile.x1] = raw[
            :, tile.y0 : tile.y1, tile.x0 : tile.x1
        ]
        mark_done(plan, "infer", tile)
    report = run_slides([str(path)], str(out), opts)
    assert report["failed"] == {} and report["done"][path.stem]["tiles_inferred"] == 0


def cell_logit(truth: np.ndarray, image: np.ndarray) -> np.ndarray:
    """A logit positive exactly on the cells, varying with the image inside them (so
    that cell probabilities differ)."""
    grey = image.astype(np.float32).mean(axis=2) / 255
    return np.where(truth > 0, 0.5 + 5 * grey, -3 - 2 * grey).astype(np.float32)


@pytest.fixture(scope="module")
def mosaic_run(cluster, tiny, dsb_pairs, tmp_path_factory):
    """The 3072^2 mosaic of the densest real DSB2018 images (RGB) and their labels,
    segmented by the job with the model's output replaced by the labels' flows."""
    truth, image = paired_mosaic(dsb_pairs[:40], SIZE, seed=5)
    logit = cell_logit(truth, image)
    tmp = tmp_path_factory.mktemp("mosaic")
    path = tmp / "mosaic.tif"
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb")
    out = tmp / "out"
    opts = SlideOptions(
        weights=[tiny[0]], model_config=tiny[1], tile_size=TILE, halo=128, tissue="off"
    )
    run_with_injected_flows(path, out, opts, truth, logit)
    return out, image, logit


def cells_in_several_chunks(labels: np.ndarray, tile: int) -> set[int]:
    """Ids with pixels in more than one chunk of side ``tile`` (from the labels alone)."""
    seen: dict[int, int] = {}
    for t in tile_grid(labels.shape, tile):
        for cell in np.unique(labels[t.y0 : t.y1, t.x0 : t.x1]).tolist():
            seen[cell] = seen.get(cell, 0) + 1
    return {c for c, n in seen.items() if n > 1 and c}


def crossing_borders(labels: np.ndarray, tile: int) -> set[int]:
    """Ids with 4-adjacent pixels on both sides of an internal chunk border."""
    crossing: set[int] = set()
    for k in range(tile, labels.shape[1], tile):
        a, b = labels[:, k - 1], labels[:, k]
        crossing |= set(a[(a == b) & (a > 0)].tolist())
    for k in range(tile, labels.shape[0], tile):
        a, b = labels[k - 1], labels[k]
        crossing |= set(a[(a == b) & (a > 0)].tolist())
    return crossing


def test_job_table_equals_regionprops_of_written_labels(mosaic_run):
    """Must show 1: OUTPUT/cells of the job = regionprops of the labels it wrote, with
    the mosaic as intensity image and sigmoid(injected logit) as probability."""
    out, image, logit = mosaic_run
    labels = np.asarray(zarr.open_array(str(out / "mosaic.zarr/labels/cells/0"), mode="r")[:])
    assert [p.name for p in (out / "cells").iterdir()] == ["slide=mosaic"]
    files = sorted((out / "cells/slide=mosaic").iterdir())
    assert len(files) == 1 and files[0].name.startswith("part-")
    table = pd.read_parquet(out / "cells")
    assert set(table["slide"].astype(str)) == {"mosaic"}
    t = table.sort_values("id").reset_index(drop=True)
    n = int(labels.max())
    props = regionprops(labels.astype(np.int64), intensity_image=image)
    prob = regionprops(labels.astype(np.int64), intensity_image=sigmoid(logit))
    # Every cell once, ids exactly 1..N, those crossing chunk borders included.
    assert n > 5000 and len(t) == n and not t["id"].duplicated().any()
    assert np.array_equal(t["id"], np.arange(1, n + 1))
    assert np.array_equal(t["id"], [p.label for p in props])
    crossing = crossing_borders(labels, TILE)
    assert len(crossing) > 300 and crossing <= set(t["id"].tolist())
    # The finish task merged exactly the cells that lie in several chunks.
    summary = json.loads((out / "mosaic.zarr/summary.json").read_text())
    shared = cells_in_several_chunks(labels, TILE)
    assert summary["border_rows"] == len(shared) and shared >= crossing
    assert summary["cells"] == n == summary["cells_table_rows"]
    assert np.array_equal(t["area"], [p.area for p in props])
    bbox = t[["bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"]].to_numpy()
    assert np.array_equal(bbox, [p.bbox for p in props])
    centroid = t[["centroid_y", "centroid_x"]].to_numpy()
    assert np.abs(centroid - [p.centroid for p in props]).max() < 1e-6
    for col in ("intensity_mean", "intensity_min", "intensity_max"):
        ours = np.stack(t[col].to_numpy())
        assert ours.shape == (n, 3)
        assert np.abs(ours - [getattr(p, col) for p in props]).max() < 1e-5, col
    assert np.abs(t["prob_mean"] - [p.intensity_mean for p in prob]).max() < 1e-5
    assert np.abs(t["prob_max"] - [p.intensity_max for p in prob]).max() < 1e-5
    assert t["prob_mean"].std() > 0.01  # the probabilities really vary between cells
    for col in ("axis_major_length", "axis_minor_length", "eccentricity", "extent"):
        assert np.allclose(t[col], [getattr(p, col) for p in props], rtol=1e-9, atol=1e-9)
    # Processed at level 0 with no pixel size: level-0 = processing, micrometres unknown.
    assert np.allclose(t["centroid_y_level0"], t["centroid_y"], rtol=0, atol=1e-9)
    assert t["area_um2"].isna().all() and t["centroid_x_um"].isna().all()


def rasterise(polygon, window: tuple[int, int, int, int]) -> np.ndarray:
    """Pixels of ``window`` (y0, y1, x0, x1) whose centres lie inside ``polygon``
    (vertices (x, y) on pixel edges: pixel (i, j) spans [j, j + 1) x [i, i + 1))."""
    y0, y1, x0, x1 = window

    def ring_mask(ring) -> np.ndarray:
        xy = np.asarray(ring.coords)
        return polygon2mask(
            (y1 - y0, x1 - x0), np.stack([xy[:, 1] - 0.5 - y0, xy[:, 0] - 0.5 - x0], axis=1)
        )

    mask = ring_mask(polygon.exterior)
    for hole in polygon.interiors:
        mask &= ~ring_mask(hole)
    return mask


def check_geojson(
    out: Path, name: str, scale: float, tile: int, level0_mpp: float = 0.5
) -> list[float]:
    """The job's GeoJSON of slide ``name``: loads with json and shapely, one valid
    Polygon per cell (= table rows = labels max), in level-0 pixels (``scale`` level-0
    pixels per processing pixel); returns the IoU of each polygon rasterised on the
    level-0 grid with its cell in the job's level-0 labels (``level0_mpp``: um per
    level-0 pixel)."""
    root = out / f"{name}.zarr"
    labels = np.asarray(zarr.open_array(str(root / "labels/cells/0"), mode="r")[:])
    level0 = np.asarray(zarr.open_array(str(root / "labels/cells_level0/0"), mode="r")[:])
    with gzip.open(out / f"{name}.geojson.gz", "rt") as f:
        collection = json.load(f)
    assert collection["type"] == "FeatureCollection"
    feats = collection["features"]
    table = pd.read_parquet(out / "cells", filters=[("slide", "==", name)]).set_index("id")
    n = int(labels.max())
    assert len(feats) == len(table) == n
    ids = sorted(f["properties"]["measurements"]["id"] for f in feats)
    assert ids == list(range(1, n + 1)) and len({f["id"] for f in feats}) == n
    # Cells spanning chunks were outlined by the finish task, not lost.
    assert len(crossing_borders(labels, tile)) > 10
    ious = []
    for f in feats:
        props = f["properties"]
        assert props["objectType"] == "detection" and f["geometry"]["type"] == "Polygon"
        cell = props["measurements"]["id"]
        row = table.loc[cell]
        assert props["measurements"]["area"] == row["area"]
        poly = shapely.geometry.shape(f["geometry"])
        assert poly.is_valid
        # Level-0 pixels: the processing box times the scale.
        box = np.array([row["bbox_x0"], row["bbox_y0"], row["bbox_x1"], row["bbox_y1"]])
        assert np.allclose(poly.bounds, box * scale, atol=1e-3)
        bx0, by0 = (int(np.floor(v)) for v in poly.bounds[:2])
        bx1, by1 = (int(np.ceil(v)) for v in poly.bounds[2:])
        cell_px = level0[by0:by1, bx0:bx1] == cell
        drawn = rasterise(poly, (by0, by1, bx0, bx1))
        ious.append((drawn & cell_px).sum() / (drawn | cell_px).sum())
    # The table's level-0 centroids and micrometres follow from the same scale.
    assert np.allclose(table["centroid_x_level0"], (table["centroid_x"] + 0.5) * scale - 0.5)
    assert np.allclose(table["area_um2"], table["area"] * (scale * level0_mpp) ** 2)
    return ious


def test_geojson_in_level0_pixels(cluster, tiny, dsb_pairs, tmp_path):
    """Must show 2: a slide of real images whose level 0 is 1.6 times finer than the
    grid it is processed at (0.5 um given, 0.8 um asked for), segmented by the job with
    injected flows and --geojson: one valid Polygon per cell, in level-0 pixels, each
    overlapping its cell in the job's level-0 labels with IoU >= 0.9."""
    truth, image = paired_mosaic(dsb_pairs[:40], 1280, seed=7)
    # Level 0: the mosaic on a grid 1.6 times finer (nearest), 2048^2. A scale whose
    # multiples never fall on a level-0 pixel centre: rasterising is then unambiguous.
    src = np.minimum(((np.arange(2048) + 0.5) / 1.6).astype(int), 1279)
    path = tmp_path / "fine.tif"
    tifffile.imwrite(path, image[src[:, None], src[None, :]], tile=(256, 256), photometric="rgb")
    out = tmp_path / "out"
    opts = SlideOptions(
        weights=[tiny[0]],
        model_config=tiny[1],
        tile_size=256,
        halo=96,
        tissue="off",
        mpp=0.5,
        target_mpp=0.8,
        labels_level0=True,
        geojson=True,
    )
    run_with_injected_flows(path, out, opts, truth, cell_logit(truth, image))
    ious = check_geojson(out, "fine", 1.6, 256)
    assert len(ious) > 1000 and min(ious) >= 0.9, min(ious)
    assert np.median(ious) == 1.0  # polygons along pixel edges: exact but for bridges


@pytest.mark.slow
def test_geojson_of_the_svs_slide_with_the_model(cluster, data_dir, tmp_path):
    """Must show 2 on real H&E pixels and the bundled model (slow: about 100 windows of
    inference). A 1536^2 crop of the SVS's level 0 (0.499 um/px) upsampled 2x as a
    0.25 um/px tiled TIFF, processed at 0.4 um: 1.6 level-0 px per processing pixel, and
    at about the pixel size the model sees nuclei best (at the SVS's own 0.8 um it finds
    too few nuclei on the tile borders to check that they are kept)."""
    from PIL import Image

    with tifffile.TiffFile(data_dir / "slides/CMU-1-Small-Region.svs") as tf:
        crop = tf.pages[0].asarray()[1024:2560, 256:1792]
    fine = np.asarray(Image.fromarray(crop).resize((3072, 3072), Image.Resampling.BICUBIC))
    slide = tmp_path / "he.tif"
    tifffile.imwrite(slide, fine, tile=(256, 256), photometric="rgb")
    out = tmp_path / "out"
    opts = SlideOptions(
        weights=resolve_weights(None),
        tta=False,
        tile_size=512,
        halo=128,
        workers=2,
        tissue="off",
        target_mpp=0.4,
        mpp=0.25,
        labels_level0=True,
        geojson=True,
    )
    report = run_slides([str(slide)], str(out), opts)
    assert report["failed"] == {}
    ious = check_geojson(out, "he", 1.6, 512, level0_mpp=0.25)
    assert len(ious) > 100 and min(ious) >= 0.9, min(ious)


SLIDES3 = {  # three real images of different kinds, each a small slide
    "nuclei": ("stardist_nuclei/images/img2d.tif", None),  # grey uint16
    "phase": ("usiigaci_phase/images/train_set1.tif", (512, 768)),  # grey uint16, cropped
    "tissue": ("nuinsseg/images", None),  # RGB uint8 H&E
}


def put_slides(client, data_dir: Path, tmp: Path) -> None:
    for name, (rel, crop) in SLIDES3.items():
        src = data_dir / rel
        if src.is_dir():
            src = sorted(src.iterdir())[0]
        image = read_image(str(src))
        image = image[..., :3] if image.ndim == 3 else image
        if crop:
            image = image[: crop[0], : crop[1]]
        path = tmp / f"{name}.tif"
        tifffile.imwrite(
            path, image, tile=(128, 128), photometric="rgb" if image.ndim == 3 else "minisblack"
        )
        client.put_object(Bucket="lab", Key=f"archive/{name}.tif", Body=path.read_bytes())


def objects(client, prefix: str) -> dict[str, str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="results", Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def read_three_ways(out: str) -> dict[str, pd.DataFrame]:
    con = duckdb.connect()
    con.register_filesystem(fsspec.filesystem("s3"))  # s3fs, credentials from the env
    return {
        "pandas": pd.read_parquet(f"{out}/cells"),
        "dask": dd.read_parquet(f"{out}/cells").compute(),
        "duckdb": con.sql(
            f"SELECT * FROM read_parquet('{out}/cells/*/*.parquet', "
            "hive_partitioning = true, hive_types = {'slide': VARCHAR})"
        ).df(),
    }


@pytest.mark.slow  # 1 min on 2 cores
def test_archive_tables_on_s3_read_alike_and_rerun_replaces_one(cluster, data_dir, tmp_path):
    """Must show 3: a 3-slide archive segmented by the job from s3:// to s3://; its
    table read with pandas, dask and DuckDB gives the same rows, one per cell of each
    slide's labels; --overwrite of one slide replaces its partition only."""
    client, env = cluster
    put_slides(client, data_dir, tmp_path)
    out = "s3://results/archive"
    opts = SlideOptions(
        weights=resolve_weights(None), tta=False, tile_size=256, halo=64, workers=2, roi_size=512
    )  # one window per small slide: faster
    report = run_slides(["s3://lab/archive/"], out, opts)
    assert report["failed"] == {} and sorted(report["done"]) == sorted(SLIDES3)
    frames = read_three_ways(out)
    expected = normalise(frames["pandas"])
    for reader, df in frames.items():
        pd.testing.assert_frame_equal(normalise(df), expected, check_dtype=False, obj=reader)
    for name in SLIDES3:  # one row per cell of the labels the job wrote
        n = int(da.from_zarr(f"{out}/{name}.zarr/labels/cells/0").max().compute())
        rows = expected[expected["slide"] == name]
        assert n > 10 and rows["id"].tolist() == list(range(1, n + 1)), name
        assert partition_state(out, name)["clean"]
    channels = expected.groupby("slide")["intensity_mean"].agg(lambda s: {len(v) for v in s})
    assert channels.to_dict() == {"nuclei": {1}, "phase": {1}, "tissue": {3}}

    before = {s: objects(client, f"archive/cells/slide={s}/") for s in SLIDES3}
    report = run_slides(["s3://lab/archive/phase.tif"], out, replace(opts, overwrite=True))
    assert list(report["done"]) == ["phase"]
    after = {s: objects(client, f"archive/cells/slide={s}/") for s in SLIDES3}
    assert after["nuclei"] == before["nuclei"] and after["tissue"] == before["tissue"]
    assert len(after["phase"]) == 1 and not set(after["phase"]) & set(before["phase"])
    assert partition_state(out, "phase")["clean"]
    reread = read_three_ways(out)
    for reader, df in reread.items():  # same input and model: the same rows again
        pd.testing.assert_frame_equal(normalise(df), expected, check_dtype=False, obj=reader)
    assert env["AWS_SECRET_ACCESS_KEY"] not in json.dumps(report)
