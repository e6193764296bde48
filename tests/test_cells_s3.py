"""The cell table of a 3-slide archive on s3:// (moto's S3 server on loopback): written
through fsspec, read back with pandas, dask and DuckDB as the same rows; a rerun replaces
one slide's partition and leaves the others' objects untouched; GeoJSON streamed from
pieces on s3://."""

from __future__ import annotations

import json

import dask.dataframe as dd
import duckdb
import fsspec
import numpy as np
import pandas as pd
import pytest
import shapely.geometry
from s3_server import environment, s3_client, s3_server
from test_cells_table import SLIDES, load_slide, normalise, stage_slide, write_archive

from mediar_ray.cells import (
    cells_in_several_chunks,
    finalize,
    measure_chunk,
    merge_partials,
    split_partials,
    take_rows,
)
from mediar_ray.cells.geojson import (
    features,
    outline_regions,
    write_feature_collection,
    write_piece,
)
from mediar_ray.cells.summary import summarize_archive
from mediar_ray.cells.table import commit_slide, partition_state
from mediar_ray.cli import main
from mediar_ray.pipeline.layout import tile_grid

OUT = "s3://results/archive"


@pytest.fixture(scope="module")
def s3_archive(data_dir):
    with s3_server() as env, environment(env):
        client = s3_client(env, "results")
        expected = normalise(write_archive(data_dir, OUT))
        yield client, env, expected


def objects(client, prefix: str) -> dict[str, str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="results", Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def test_readers_agree_on_s3(s3_archive):
    client, env, expected = s3_archive
    keys = objects(client, "archive/cells/")
    assert {k.split("/")[2] for k in keys} == {f"slide={s}" for s in SLIDES}
    con = duckdb.connect()
    # DuckDB reads s3:// through fsspec (s3fs, credentials from the environment).
    con.register_filesystem(fsspec.filesystem("s3"))
    frames = {
        "pandas": pd.read_parquet(f"{OUT}/cells"),
        "dask": dd.read_parquet(f"{OUT}/cells").compute(),
        "duckdb": con.sql(
            f"SELECT * FROM read_parquet('{OUT}/cells/*/*.parquet', "
            "hive_partitioning = true, hive_types = {'slide': VARCHAR})"
        ).df(),
    }
    for reader, df in frames.items():
        pd.testing.assert_frame_equal(normalise(df), expected, check_dtype=False, obj=reader)


def test_cells_command_on_s3(s3_archive, capsys):
    client, env, expected = s3_archive
    rows = {r["slide"]: r for r in summarize_archive(OUT)}
    assert {s: r["cells"] for s, r in rows.items()} == expected.groupby("slide").size().to_dict()
    assert main(["cells", OUT]) == 0
    text = capsys.readouterr().out
    assert all(s in text for s in SLIDES)
    assert env["AWS_SECRET_ACCESS_KEY"] not in text


def test_rerun_on_s3_replaces_one_partition(s3_archive, data_dir):
    client, env, expected = s3_archive
    before = {s: objects(client, f"archive/cells/slide={s}/") for s in SLIDES}
    labels, image = load_slide(data_dir, "nuclei")
    urls, rows, new_rows = stage_slide(labels, image, "s3://results/rerun", 128, None)
    commit_slide(OUT, "nuclei", urls, {"shape": list(labels.shape)}, rows=rows)
    after = {s: objects(client, f"archive/cells/slide={s}/") for s in SLIDES}
    assert after["phase"] == before["phase"] and after["tissue"] == before["tissue"]
    assert not set(after["nuclei"]) & set(before["nuclei"]) and len(after["nuclei"]) == 1
    assert partition_state(OUT, "nuclei")["clean"]
    got = normalise(pd.read_parquet(f"{OUT}/cells"))
    want = pd.concat(
        [expected[expected["slide"] != "nuclei"], normalise(new_rows.assign(slide="nuclei"))]
    )
    pd.testing.assert_frame_equal(got, normalise(want), check_dtype=False)


def test_geojson_streamed_to_s3(s3_archive, data_dir):
    """Pieces staged on s3:// per chunk and for the cells across chunks, streamed into
    one gzip FeatureCollection on s3://; one valid Polygon per cell."""
    labels, _ = load_slide(data_dir, "nuclei")
    tiles = tile_grid(labels.shape, 128)
    parts = [measure_chunk(labels[t.y0 : t.y1, t.x0 : t.x1], (t.y0, t.x0)) for t in tiles]
    shared = cells_in_several_chunks([p.ids for p in parts])
    scratch = f"{OUT}/nuclei.zarr/.scratch/geojson"
    pieces, border = [], []
    for t, p in zip(tiles, parts):
        complete, rest = split_partials(p, shared)
        border.append(rest)
        pieces.append(f"{scratch}/{t.name}.json")
        write_piece(
            pieces[-1],
            features(
                labels[t.y0 : t.y1, t.x0 : t.x1], (t.y0, t.x0), finalize(complete), slide="nuclei"
            ),
        )
    merged = finalize(merge_partials(border))
    for k, ((y0, y1, x0, x1), idx) in enumerate(outline_regions(merged, 128)):
        pieces.append(f"{scratch}/border_{k}.json")
        write_piece(
            pieces[-1],
            features(labels[y0:y1, x0:x1], (y0, x0), take_rows(merged, idx), slide="nuclei"),
        )
    write_feature_collection(f"{OUT}/nuclei.geojson.gz", pieces)
    with fsspec.open(f"{OUT}/nuclei.geojson.gz", "rt", compression="gzip") as f:
        feats = json.load(f)["features"]
    ids = sorted(f["properties"]["measurements"]["id"] for f in feats)
    assert ids == np.unique(labels[labels > 0]).tolist() and len(shared) > 0
    assert all(shapely.geometry.shape(f["geometry"]).is_valid for f in feats)
