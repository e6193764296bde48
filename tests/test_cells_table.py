"""The archive's cell table (OUTPUT/cells/, Parquet partitioned by slide) on local disk:
written from staged per-chunk parts of real images, read back as one table by pandas,
dask, DuckDB and Ray Data; one slide's partition replaced without touching the others;
an interrupted replacement detected and repaired; ``mediar-ray cells``."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import dask.dataframe as dd
import duckdb
import numpy as np
import pandas as pd
import pytest

from mediar_ray.cells import (
    cells_in_several_chunks,
    finalize,
    measure_chunk,
    merge_partials,
    split_partials,
)
from mediar_ray.cells.summary import QUANTILES, summarize_archive
from mediar_ray.cells.table import (
    cells_dataset,
    cells_table,
    commit_slide,
    partition_state,
    repair_partition,
    slide_infos,
    write_part,
)
from mediar_ray.cli import main
from mediar_ray.io import read_image
from mediar_ray.pipeline.layout import tile_grid

LIST_COLUMNS = ("intensity_mean", "intensity_min", "intensity_max")
# Three real images of different kinds: grey uint16 phase contrast, grey uint16
# fluorescence, RGB uint8 tissue. Pixel size known for two of them.
SLIDES = {
    "phase": ("usiigaci_phase", "train_set1", ".tif", (0.65, 0.65)),
    "nuclei": ("stardist_nuclei", "img2d", ".tif", None),
    "tissue": ("dsb2018", None, ".png", (0.5, 0.5)),
}


def load_slide(data_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    source, stem, ext, _ = SLIDES[name]
    labels_dir = data_dir / source / "labels"
    if stem is None:  # the DSB2018 colour tissue image with the most cells
        cats = (data_dir / source / "categories.csv").read_text().splitlines()
        tissue = [line.split(",")[0] for line in cats if line.endswith(",color")]
        stem = max(
            tissue, key=lambda s: len(np.unique(read_image(str(labels_dir / f"{s}_label.tiff"))))
        )
    labels = read_image(str(labels_dir / f"{stem}_label.tiff")).astype(np.uint32)
    image = read_image(str(data_dir / source / "images" / f"{stem}{ext}"))
    return labels, image


def stage_slide(
    labels: np.ndarray, image: np.ndarray, scratch: str, tile: int, pixel_size
) -> tuple[list[str], int, pd.DataFrame]:
    """Measure chunk by chunk as the pipeline does and stage one part per chunk plus
    one for the cells merged across chunks; returns (part URLs, rows, expected rows)."""
    grey = image.astype(np.float32).reshape(*labels.shape, -1).mean(axis=2)
    logit = ((grey - grey.mean()) / (grey.std() + 1e-6)).astype(np.float32)
    tiles = tile_grid(labels.shape, tile)
    parts = [
        measure_chunk(
            labels[t.y0 : t.y1, t.x0 : t.x1],
            (t.y0, t.x0),
            logit[t.y0 : t.y1, t.x0 : t.x1],
            image[t.y0 : t.y1, t.x0 : t.x1],
        )
        for t in tiles
    ]
    shared = cells_in_several_chunks([p.ids for p in parts])
    urls, total, expected, border = [], 0, [], []
    for t, p in zip(tiles, parts):
        complete, rest = split_partials(p, shared)
        border.append(rest)
        table = cells_table(finalize(complete, pixel_size_um=pixel_size))
        urls.append(f"{scratch}/cells/{t.name}.parquet")
        total += write_part(table, urls[-1])
        expected.append(table)
    table = cells_table(finalize(merge_partials(border), pixel_size_um=pixel_size))
    urls.append(f"{scratch}/cells/border.parquet")
    total += write_part(table, urls[-1])
    expected.append(table)
    return urls, total, pd.concat([t.to_pandas() for t in expected])


def write_archive(
    data_dir: Path, output: str, tile: int = 256, rows_per_file: int = 40, row_group: int = 16
) -> pd.DataFrame:
    """The three slides' tables under ``output``; returns the rows expected back."""
    expected = []
    for name, (*_, pixel_size) in SLIDES.items():
        labels, image = load_slide(data_dir, name)
        urls, rows, rows_df = stage_slide(
            labels, image, f"{output}/{name}.zarr/.scratch", tile, pixel_size
        )
        info = {
            "shape": list(labels.shape),
            "scale": [1.0, 1.0],
            "pixel_size_um": list(pixel_size) if pixel_size else None,
            "channels": 1 if image.ndim == 2 else image.shape[2],
        }
        result = commit_slide(
            output, name, urls, info, rows=rows, rows_per_file=rows_per_file, row_group=row_group
        )
        assert result["rows"] == rows and len(result["files"]) == -(-rows // rows_per_file)
        expected.append(rows_df.assign(slide=name))
    return pd.concat(expected)


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in a reader-independent form: slide as str, list columns as tuples, sorted."""
    df = df.copy()
    df["slide"] = df["slide"].astype(str)
    for c in LIST_COLUMNS:
        df[c] = [tuple(float(x) for x in v) for v in df[c]]
    for c in df.columns:  # Arrow-backed columns (Ray Data) to numpy, null -> NaN
        if c not in LIST_COLUMNS and c != "slide":
            kind = df[c].dtype.kind
            df[c] = df[c].to_numpy(
                dtype="float64" if kind == "f" else "int64",
                na_value=np.nan if kind == "f" else None,
            )
    df = df[sorted(df.columns)].sort_values(["slide", "id"]).reset_index(drop=True)
    return df


@pytest.fixture(scope="module")
def archive(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("archive") / "out"
    expected = write_archive(data_dir, str(out))
    return out, normalise(expected)


def test_readers_see_one_table(archive):
    out, expected = archive
    assert set(expected["slide"]) == set(SLIDES) and len(expected) > 300
    # Each slide's cells once, sorted by id, and the tiny row groups/files really used.
    assert not expected.duplicated(["slide", "id"]).any()
    assert len(list((out / "cells" / "slide=phase").glob("part-*.parquet"))) > 1
    frames = {
        "pandas": pd.read_parquet(out / "cells"),
        "dask": dd.read_parquet(str(out / "cells")).compute(),
        "duckdb": duckdb.sql(
            f"SELECT * FROM read_parquet('{out}/cells/*/*.parquet', hive_partitioning = true, "
            "hive_types = {'slide': VARCHAR})"
        ).df(),
        "cells_dataset": cells_dataset(str(out)).to_table().to_pandas(),
    }
    for reader, df in frames.items():
        got = normalise(df)
        assert list(got.columns) == list(expected.columns), reader
        pd.testing.assert_frame_equal(got, expected, check_dtype=False, obj=reader)
    # Per-channel columns keep each slide's channel count (1 grey, 3 colour).
    pandas = frames["pandas"]
    channels = pandas.groupby("slide", observed=True)["intensity_mean"].agg(
        lambda s: {len(v) for v in s}
    )
    assert channels.to_dict() == {"nuclei": {1}, "phase": {1}, "tissue": {3}}
    # The slide's info travels in the files' metadata.
    infos = slide_infos(str(out))
    assert infos["phase"]["pixel_size_um"] == [0.65, 0.65]
    assert infos["nuclei"]["pixel_size_um"] is None
    assert {s: i["cells"] for s, i in infos.items()} == expected.groupby("slide").size().to_dict()


@pytest.mark.slow  # a Ray session: about 15 s on 2 cores
def test_ray_data_reads_the_table(archive):
    import ray

    out, expected = archive
    ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)
    try:
        got = ray.data.read_parquet(str(out / "cells")).to_pandas()
    finally:
        ray.shutdown()
    pd.testing.assert_frame_equal(normalise(got), expected, check_dtype=False)


def test_cells_command_summary(archive, capsys):
    out, expected = archive
    rows = {r["slide"]: r for r in summarize_archive(str(out))}
    for slide, group in expected.groupby("slide"):
        r = rows[slide]
        assert r["cells"] == len(group) and r["clean"]
        assert np.allclose(
            [r["area_px"][str(q)] for q in QUANTILES], np.quantile(group["area"], QUANTILES)
        )
    phase = rows["phase"]
    h, w = read_shape(out, "phase")
    assert phase["basis"] == "slide"
    assert np.isclose(phase["density_per_mm2"], phase["cells"] / (h * w * 0.65**2 / 1e6))
    assert "density_per_mm2" not in rows["nuclei"]  # pixel size unknown
    assert main(["cells", str(out)]) == 0
    text = capsys.readouterr().out
    assert all(s in text for s in SLIDES) and f"{len(expected):,}" in text
    assert main(["cells", str(out), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {d["slide"]: d["cells"] for d in lines} == {s: r["cells"] for s, r in rows.items()}


def read_shape(out: Path, slide: str) -> tuple[int, int]:
    return tuple(slide_infos(str(out))[slide]["shape"])


def partition_files(out: Path, slide: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "cells" / f"slide={slide}").iterdir())}


def test_rerun_replaces_one_partition_only(data_dir, tmp_path):
    out = tmp_path / "out"
    write_archive(data_dir, str(out))
    others = {s: partition_files(out, s) for s in ("nuclei", "tissue")}
    old_phase = set(partition_files(out, "phase"))
    # Rerun "phase" with other chunks (and a smaller image: its top half).
    labels, image = load_slide(data_dir, "phase")
    urls, rows, expected = stage_slide(
        labels[:512], image[:512], str(tmp_path / "rerun"), 200, (0.65, 0.65)
    )
    commit_slide(str(out), "phase", urls, {"shape": [512, labels.shape[1]]}, rows_per_file=150)
    assert not old_phase & set(partition_files(out, "phase"))  # old files all gone
    assert {s: partition_files(out, s) for s in others} == others  # byte for byte
    got = pd.read_parquet(out / "cells", filters=[("slide", "==", "phase")])
    pd.testing.assert_frame_equal(
        normalise(got), normalise(expected.assign(slide="phase")), check_dtype=False
    )
    assert partition_state(str(out), "phase")["clean"]


def test_interrupted_replacement_is_detected_and_repaired(data_dir, tmp_path, capsys):
    out, side = tmp_path / "out", tmp_path / "side"
    write_archive(data_dir, str(out))
    old = partition_files(out, "phase")
    # A second run of "phase" written elsewhere; its files copied into the partition as
    # a commit killed before removing the old run's files would leave them.
    labels, image = load_slide(data_dir, "phase")
    urls, rows, _ = stage_slide(labels[:400], image[:400], str(tmp_path / "s"), 200, None)
    commit_slide(str(side), "phase", urls, {"shape": [400, labels.shape[1]]}, rows_per_file=10)
    new = sorted((side / "cells" / "slide=phase").iterdir())
    assert len(new) >= 2
    part = out / "cells" / "slide=phase"
    for p in new[:-1]:  # killed while writing: its last file missing
        shutil.copy(p, part / p.name)
    state = partition_state(str(out), "phase")
    assert not state["clean"] and len(state["runs"]) == 2 and len(state["complete"]) == 1
    assert main(["cells", str(out)]) == 1
    assert "interrupted" in capsys.readouterr().out
    assert repair_partition(str(out), "phase") == state["complete"][0]
    assert partition_files(out, "phase") == old  # the complete old run kept
    # Killed after writing all its files: the newest complete run wins.
    for p in new:
        shutil.copy(p, part / p.name)
    run = new[0].name.split("-")[1]
    assert repair_partition(str(out), "phase") == run
    assert set(partition_files(out, "phase")) == {p.name for p in new}
    assert partition_state(str(out), "phase")["clean"]


def test_slide_without_cells_keeps_its_metadata(tmp_path):
    out = str(tmp_path / "out")
    result = commit_slide(out, "blank", [], {"shape": [300, 400], "pixel_size_um": [1.0, 1.0]})
    assert result["rows"] == 0 and len(result["files"]) == 1
    assert len(pd.read_parquet(tmp_path / "out" / "cells")) == 0
    (row,) = summarize_archive(out)
    assert row["cells"] == 0 and row["density_per_mm2"] == 0.0 and row["clean"]


def test_cells_command_without_a_table_is_a_usage_error(tmp_path, caplog):
    assert main(["cells", str(tmp_path / "nowhere")]) == 2
    assert "no cell table under" in caplog.text and "nowhere" in caplog.text
