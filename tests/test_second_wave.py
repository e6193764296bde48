"""Nothing stale, nothing doubled, nothing leaked (issue 39).

One test per row of the issue's table, on real images (the SVS crop, NuInsSeg and
DSB2018 fields and OME-Zarr / pyramidal TIFF built from them): each failed on the code
before the fix for the reason the row gives. Most call the step that decided wrongly
(identity, level choice, names, options, masks, measurements) on real files; the few
that need the slide job run it on one small field.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from PIL import Image

from mediar_ray.cli import main
from mediar_ray.io import read_image
from mediar_ray.pipeline.options import OptionError, SlideOptions
from mediar_ray.sources import open_slide

REPO = Path(__file__).resolve().parents[1]
SVS = "slides/CMU-1-Small-Region.svs"
NUINSSEG = "nuinsseg/images/human_bladder_01.png"
DEMO = REPO / "mediar_ray" / "assets" / "demo" / "images" / "dsb_tissue_f952cc65.png"
SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEKEY"
ACCESS = "AKIAIOSFODNN7EXAMPLE"


@pytest.fixture(scope="module")
def svs(data_dir) -> np.ndarray:
    with open_slide(str(data_dir / SVS)) as source:
        return source.read_region(0, 0, 1024, 0, 1024)


def error_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# -------------------------------------------------------------- changed OME-Zarr input


def test_ome_zarr_rewritten_in_place_is_a_changed_input(svs, tmp_path):
    """Row 1: the identity of a folder looked only at its top-level names and sizes, so
    pixels rewritten in place (same shape, same metadata) left it unchanged and the
    slide was skipped as complete."""
    from test_sources_zarr import write_ngff

    from mediar_ray.pipeline.provenance import differences, input_identity

    path = tmp_path / "slide.zarr"
    write_ngff(path, svs, "0.5", levels=2)
    before = input_identity(str(path))
    time.sleep(0.01)  # a later modification time, as a rewrite hours later has
    level0 = zarr.open_array(str(path / "0"), mode="r+")
    level0[0, :, 0, :256, :256] = 255 - level0[0, :, 0, :256, :256]  # another field
    after = input_identity(str(path))
    assert differences({"input": before}, {"input": after}) != []
    assert input_identity(str(path)) == after  # and stable while unchanged


# -------------------------------------------------------------- pyramid levels


def test_pyramid_level_of_another_region_is_not_used(svs, tmp_path, caplog):
    """Row 2: a pyramid whose level 1 shows another region than level 0 was read at
    --target-mpp 1.25 (wrong region, 0 cells, exit 0)."""
    from test_sources_zarr import write_ngff

    from mediar_ray.scale import choose_level, level_mpp

    path = tmp_path / "odd.zarr"
    write_ngff(path, svs, "0.4", levels=2)  # 0.499 um, level 1 at 2x
    group = zarr.open_group(str(path), mode="r+")
    other = np.moveaxis(svs[:292, :682], -1, 0)  # level 1 replaced by another region
    group.create_array(
        "1",
        shape=other.shape,
        chunks=(3, 256, 256),
        dtype=other.dtype,
        overwrite=True,
        chunk_key_encoding={"name": "v2", "separator": "/"},
    )
    group["1"][...] = other
    with open_slide(str(path)) as source, caplog.at_level(logging.WARNING):
        assert len(source.levels) == 2 and source.levels[1].shape == (292, 682)
        level, scale = choose_level(source.levels, source.mpp, 1.25, slide=str(path))
        assert level == 0 and scale == pytest.approx(1.25 / 0.499)
        assert level_mpp(source.mpp, source.levels[level]) * scale == pytest.approx(1.25)
    assert any("level 1 not used" in r.getMessage() for r in caplog.records)


def test_real_pyramid_levels_are_still_used(svs, tmp_path):
    """The check keeps the levels of a real pyramid (odd sizes rounded up)."""
    from test_sources import write_pyramid

    from mediar_ray.scale import choose_level, usable_levels

    path = tmp_path / "pyr.tif"
    write_pyramid(
        path,
        svs[:1001, :999],
        levels=3,
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
    )
    with open_slide(str(path)) as source:
        assert usable_levels(source.levels) == [0, 1, 2]
        assert choose_level(source.levels, source.mpp, 2.0)[0] == 2


# -------------------------------------------------------------- names across runs


def test_adding_inputs_keeps_the_names_earlier_runs_gave(data_dir, tmp_path):
    """Row 3: `a/` then `a/ b/` with slide.png in both renamed the first run's slide to
    slide-<hash>, doubling it in the output root and the cell table."""
    from mediar_ray.pipeline.layout import record_output_names, stable_output_names

    def names(urls: list[str]) -> dict[str, str]:  # one run: named, then recorded
        given = stable_output_names(urls, str(out))
        record_output_names(given, str(out))
        return given

    image = read_image(str(data_dir / NUINSSEG))
    a = tmp_path / "a"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(image).save(tmp_path / folder / "slide.png")
    out = tmp_path / "out"
    out.mkdir()
    first = names([str(a / "slide.png")])
    second = names([str(a / "slide.png"), str(tmp_path / "b/slide.png")])
    assert first == {str(a / "slide.png"): "slide"}
    assert second[str(a / "slide.png")] == "slide"
    assert second[str(tmp_path / "b/slide.png")].startswith("slide-")
    # A third run naming only b keeps b's name too.
    assert names([str(tmp_path / "b/slide.png")]) == {
        str(tmp_path / "b/slide.png"): second[str(tmp_path / "b/slide.png")]
    }


# -------------------------------------------------------------- options up front


@pytest.mark.parametrize(
    "flags, option",
    [
        (["--target-mpp", "inf"], "--target-mpp"),
        (["--target-mpp", "1e400"], "--target-mpp"),
        (["--mpp", "inf"], "--mpp"),
        (["--device", "cuda"], "--device"),
        (["--device", "cuda:0"], "--device"),
        (["--precision", "fp8"], "--precision"),
        (["--batch-size", "-1"], "--batch-size"),
    ],
)
def test_absurd_options_stop_before_ray_with_exit_2(
    data_dir, tmp_path, caplog, capsys, flags, option
):
    """Row 7: inf pixel sizes passed the checks and every slide failed after Ray started,
    exit 1, without naming the option. (--device cuda without GPUs for the actors: the
    same; issue 42.)"""
    import ray

    out = tmp_path / "out"
    code = main(["segment-slides", str(data_dir / NUINSSEG), str(out), *flags])
    assert code == 2
    text = " ".join(error_lines(caplog)) + capsys.readouterr().err
    assert option in text
    assert not ray.is_initialized() and not list(out.glob("*.zarr"))


def test_precision_is_a_result_option_and_batch_size_is_not():
    opts = SlideOptions(precision="bf16", batch_size=8)
    assert opts.result_options()["precision"] == "bf16"
    assert "batch_size" not in opts.result_options()
    with pytest.raises(OptionError, match="--num-gpus-per-worker"):
        SlideOptions(device="cuda")
    assert SlideOptions(device="cuda", num_gpus_per_worker=1).gpu


def test_target_far_finer_than_the_slide_is_refused_with_its_size(data_dir):
    """Row 6: --target-mpp 1e-4 on a 0.499 um slide made a 5,109,760^2 label array and
    planning never ended; now the slide is refused, naming the size it would have."""
    from mediar_ray.scale import check_processing_size, choose_level, processing_shape

    with open_slide(str(data_dir / SVS)) as source:
        level, scale = choose_level(source.levels, source.mpp, 1e-4)
        shape = processing_shape(source.levels[level].shape, scale)
        assert shape[0] > 10_000_000
        with pytest.raises(
            ValueError,
            match=r"--target-mpp 0.0001 would make a processing "
            r"image of 14,805,330 x 11,077,800 px",
        ):
            check_processing_size(
                source.levels[0], shape, target_mpp=1e-4, mpp0=source.mpp, slide=str(data_dir / SVS)
            )
        ok = processing_shape(source.levels[0].shape, 0.25 / 0.499)
        check_processing_size(source.levels[0], ok, target_mpp=0.25, mpp0=source.mpp)


# -------------------------------------------------------------- credentials


def test_credentials_in_urls_never_reach_the_output(data_dir, tmp_path, caplog, capsys):
    """Row 5: s3://KEY:SECRET@bucket/... as input, output root or --mpp-csv printed the
    secret in the error line (the input's in a traceback)."""
    from mediar_ray.io import redact, url_secrets

    url = f"s3://{ACCESS}:{SECRET}@bucket/slides/a.svs?X-Amz-Signature=abcdef123456"
    # fsspec/s3fs repeat the user info without its URL ("Invalid bucket name '...@bucket'").
    text = f"Traceback ...\nValueError: Invalid bucket name '{ACCESS}:{SECRET}@bucket': {url}"
    shown = redact(text, *url_secrets([url]))
    assert SECRET not in shown and ACCESS not in shown and "abcdef123456" not in shown
    assert "s3://bucket/slides/a.svs" in shown
    # Summaries, markers and plans record the options: the mask and table URLs too.
    opts = SlideOptions(tissue=url.replace("a.svs", "{name}.png"), mpp_csv=url)
    recorded = json.dumps([opts.public(), opts.result_options()])
    assert SECRET not in recorded and ACCESS not in recorded
    for argv in (
        ["segment-slides", f"s3://{ACCESS}:{SECRET}@no-such-bucket/a.svs", str(tmp_path / "o")],
        ["segment-slides", str(data_dir / NUINSSEG), f"s3://{ACCESS}:{SECRET}@no-such-bucket/o"],
        [
            "segment-slides",
            str(data_dir / NUINSSEG),
            str(tmp_path / "o2"),
            "--mpp-csv",
            f"s3://{ACCESS}:{SECRET}@no-such-bucket/mpp.csv",
        ],
    ):
        caplog.clear()
        env = {
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
            "AWS_MAX_ATTEMPTS": "1",
            "AWS_RETRY_MODE": "standard",
        }
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            code = main(argv)
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        captured = capsys.readouterr()
        everything = " ".join(r.getMessage() for r in caplog.records) + captured.out + captured.err
        assert code == 2, everything
        assert SECRET not in everything and ACCESS not in everything


# -------------------------------------------------------------- tissue and pixel sizes


def test_tissue_mask_missing_or_of_another_shape_is_refused(data_dir, tmp_path, caplog):
    """Row 11: a --tissue file that does not exist failed every slide after Ray started
    (half-made .zarr folders left); a 4:1 mask on a square slide was stretched."""
    import ray

    from mediar_ray.tissue import load_mask

    out = tmp_path / "out"
    code = main(
        [
            "segment-slides",
            str(data_dir / NUINSSEG),
            str(out),
            "--tissue",
            str(tmp_path / "missing_{name}.png"),
        ]
    )
    assert code == 2 and not ray.is_initialized() and not list(out.glob("*.zarr"))
    assert any(
        "--tissue" in line and "missing_human_bladder_01.png" in line
        for line in error_lines(caplog)
    )
    image = read_image(str(data_dir / NUINSSEG))  # 512 x 512
    wide = tmp_path / "wide.png"
    Image.fromarray((np.tile(image[:128].min(axis=2), (1, 4)) < 128).astype(np.uint8) * 255).save(
        wide
    )
    with pytest.raises(ValueError, match="stretched"):
        load_mask(str(wide), (32, 32))
    square = tmp_path / "square.png"
    Image.fromarray((image.min(axis=2) < 128).astype(np.uint8) * 255).save(square)
    assert load_mask(str(square), (32, 32)).shape == (32, 32)


def test_mpp_csv_conflicting_and_unmatched_rows(data_dir, tmp_path, caplog):
    """Row 12: rows `nompp,0.5` and `nompp.tif,0.25` both matching a slide used 0.25
    silently; a row matching no input was ignored silently."""
    from mediar_ray.pipeline.run import pixel_size_overrides

    image = read_image(str(data_dir / NUINSSEG))
    slide = tmp_path / "nompp.tif"
    tifffile.imwrite(slide, image, photometric="rgb")
    table = tmp_path / "mpp.csv"
    table.write_text("slide,mpp\nnompp,0.5\nnompp.tif,0.25\n")
    opts = SlideOptions(mpp_csv=str(table))
    with pytest.raises(OptionError, match="--mpp-csv") as err:
        pixel_size_overrides([str(slide)], opts)
    assert "nompp,0.5" in str(err.value) and "nompp.tif,0.25" in str(err.value)
    table.write_text("slide,mpp\nnompp.tif,0.25\nother_slide,0.5\n")
    with caplog.at_level(logging.WARNING):
        assert pixel_size_overrides([str(slide)], opts) == {str(slide): 0.25}
    assert any(
        "other_slide" in r.getMessage() and "match no input" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize("kind", ["blank", "black", "noisy"])
def test_glass_without_tissue_runs_no_window(data_dir, tmp_path, kind):
    """Row 14: blank, black and noisy-glass 2048^2 slides were 100% tissue."""
    from test_tissue import thumbnail_of

    from mediar_ray.tissue import tissue_mask

    rng = np.random.default_rng(3)
    glass = {
        "blank": np.full((2048, 2048, 3), 255, np.uint8),
        "black": np.zeros((2048, 2048, 3), np.uint8),
        "noisy": np.clip(rng.normal(232, 14, (2048, 2048, 3)), 0, 255).astype(np.uint8),
    }
    thumb = thumbnail_of(glass[kind], tmp_path / "glass.tif", 16)
    assert not tissue_mask(thumb).any()
    # The same glass with a real H&E field on it: the field is tissue, the glass is not.
    image = read_image(str(data_dir / NUINSSEG))
    slide = glass[kind].copy()
    slide[512:1024, 1024:1536] = image
    mask = tissue_mask(thumbnail_of(slide, tmp_path / "field.tif", 16))
    assert mask[32:64, 64:96].mean() > 0.9 and mask.mean() < 0.2


def test_transparent_pixels_are_white_in_both_paths(data_dir, tmp_path):
    """Row 15: an RGBA PNG's transparent strip kept its hidden colour in `segment` (8
    cells, one inside it) and became white in `segment-slides` (7)."""
    image = read_image(str(data_dir / NUINSSEG))
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    rgba[:, 200:300, 3] = 0  # a transparent strip over real cells
    rgba[:, 300:320, 3] = 128  # and a half-transparent one
    png, tif = tmp_path / "strip.png", tmp_path / "strip.tif"
    Image.fromarray(rgba, "RGBA").save(png)
    tifffile.imwrite(tif, rgba, photometric="rgb", extrasamples=["unassalpha"])
    for path in (png, tif):
        single = read_image(str(path))
        with open_slide(str(path)) as source:
            slide = source.read_region(0, 0, source.shape[0], 0, source.shape[1])
        assert single.shape == image.shape
        np.testing.assert_array_equal(single, slide)
        assert (single[:, 200:300] == 255).all()


def test_nan_pixels_are_left_out_of_cell_intensities(data_dir):
    """Row 16: a NaN pixel inside a cell made its intensity_mean/min/max NaN."""
    from mediar_ray.cells import finalize, merge_partials
    from mediar_ray.cells.measure import measure_chunk

    labels = read_image(str(data_dir / "nuinsseg/labels/human_bladder_01_label.tiff"))
    grey = read_image(str(data_dir / NUINSSEG)).astype(np.float32).mean(axis=2)
    cell = int(np.bincount(labels.ravel())[1:].argmax()) + 1
    ys, xs = np.nonzero(labels == cell)
    holed = grey.copy()
    holed[ys[::3], xs[::3]] = np.nan  # a third of the cell's pixels
    # Measured in two chunks and merged, as cells across chunk borders are.
    cut = int(np.median(xs))
    parts = [
        measure_chunk(labels[:, :cut], (0, 0), image=holed[:, :cut]),
        measure_chunk(labels[:, cut:], (0, cut), image=holed[:, cut:]),
    ]
    rows = finalize(merge_partials(parts))
    i = int(np.flatnonzero(rows["id"] == cell)[0])
    finite = holed[labels == cell]
    finite = finite[np.isfinite(finite)]
    assert rows["intensity_mean"][i, 0] == pytest.approx(finite.mean())
    assert rows["intensity_min"][i, 0] == finite.min()
    assert rows["intensity_max"][i, 0] == finite.max()
    assert rows["area"][i] == ys.size  # the cell itself is unchanged
    assert np.isfinite(rows["intensity_mean"]).all()


# -------------------------------------------------------------- complete files only


def test_an_empty_marker_does_not_count(tmp_path):
    """Row 13: a 0-byte .mediar_complete counted as complete."""
    from mediar_ray.pipeline.layout import SlideLayout
    from mediar_ray.pipeline.plan import read_marker

    layout = SlideLayout(str(tmp_path), "slide")
    Path(layout.root).mkdir()
    Path(layout.marker).write_text("")
    assert read_marker(layout) is None
    Path(layout.marker).write_text('{"complete": true, "cells": 3}')
    assert read_marker(layout) == {"complete": True, "cells": 3}


KILLED_COMMIT = """
import os, sys
import numpy as np
import pyarrow.parquet as pq
from mediar_ray.cells import finalize, measure_chunk
from mediar_ray.cells.table import cells_table, commit_slide, write_part
from mediar_ray.cells.geojson import write_feature_collection
from mediar_ray.io import read_image

out, labels_url, what = sys.argv[1:4]
labels = read_image(labels_url)
rows = finalize(measure_chunk(labels, (0, 0)))
part = os.path.join(out, "staged.parquet")
write_part(cells_table(rows), part)
if what == "parquet":
    real = pq.ParquetWriter.write_table
    def killed(self, table, *a, **k):  # kill -9 halfway through the commit
        real(self, table.slice(0, 5), *a, **k)
        os._exit(9)
    pq.ParquetWriter.write_table = killed
    commit_slide(out, "slide", [part], {"shape": list(labels.shape)}, row_group=10)
else:
    def pieces():
        yield piece
        os._exit(9)
    piece = os.path.join(out, "piece.json")
    open(piece, "w").write('{"type":"Feature"}' * 1000)
    write_feature_collection(os.path.join(out, "slide.geojson.gz"), pieces())
"""


@pytest.mark.parametrize("what", ["parquet", "geojson"])
def test_a_killed_commit_leaves_no_partial_file(data_dir, tmp_path, what):
    """Row 9: kill -9 while committing the Parquet partition (or GeoJSON) left a partial
    file at its final path, and the whole archive's table could not be read."""
    from mediar_ray.cells import finalize, measure_chunk
    from mediar_ray.cells.table import cells_table, commit_slide, write_part

    out = tmp_path / "out"
    out.mkdir()
    labels_url = str(data_dir / "nuinsseg/labels/human_bladder_01_label.tiff")
    # Another slide's partition, complete: it must stay readable.
    labels = read_image(labels_url)
    staged = tmp_path / "other.parquet"
    write_part(cells_table(finalize(measure_chunk(labels, (0, 0)))), str(staged))
    commit_slide(str(out), "other", [str(staged)], {"shape": list(labels.shape)})
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_COMMIT, str(out), labels_url, what],
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 9, proc.stderr
    visible = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if what == "parquet":
        assert not list((out / "cells" / "slide=slide").glob("part-*.parquet"))
        table = pd.read_parquet(out / "cells")
        assert set(table["slide"]) == {"other"} and len(table) == int(labels.max())
    else:
        assert not (out / "slide.geojson.gz").exists()
    assert all(p.stat().st_size > 0 for p in visible)


def test_run_summary_that_cannot_be_written_is_one_line(tmp_path, caplog):
    """Row 8: the output root turning read-only mid-run ended in a traceback writing
    run_summary.json after the slides were listed."""
    from mediar_ray.pipeline.run import write_summary

    (tmp_path / "run_summary.json").mkdir()  # something in the way, even for root
    with caplog.at_level(logging.ERROR):
        assert write_summary(str(tmp_path), {"done": {}, "failed": {}}) is False
    lines = error_lines(caplog)
    assert len(lines) == 1 and "run_summary.json" in lines[0] and "\n" not in lines[0]
    assert write_summary(str(tmp_path / "ok"), {"done": {}}) is True
    assert json.loads((tmp_path / "ok" / "run_summary.json").read_text()) == {"done": {}}


# -------------------------------------------------------------- two jobs on one root


def test_a_live_lease_is_left_to_its_job_and_a_stale_one_taken_over(tmp_path):
    """Row 10 (leases): a slide another live job holds is not this job's to plan."""
    from mediar_ray.pipeline.lease import Leases

    mine, theirs = Leases(str(tmp_path)), Leases(str(tmp_path))
    assert theirs.claim("slide") is None
    assert mine.claim("slide") == theirs.job  # live: left to it
    stale = json.loads(Path(theirs.url("slide")).read_text())
    stale["heartbeat"] -= 10 * mine.ttl  # its job died long ago
    Path(theirs.url("slide")).write_text(json.dumps(stale))
    assert mine.claim("slide") is None and mine.read("slide")["job"] == mine.job
    mine.release_all()
    assert not Path(mine.url("slide")).exists()


# -------------------------------------------------------------- the slide job (Ray)

FLAGS = ["--no-tta", "--roi-size", "256", "--tile-size", "256", "--halo", "64"]


@pytest.mark.slow  # three small slide jobs: about 40 s on 2 cores
def test_overwrite_leaves_nothing_of_the_earlier_run_and_a_held_slide_is_left(local_ray, tmp_path):
    """Row 4: `--overwrite --no-cells` (or without --geojson) on a slide done before with
    them kept the old table partition and GeoJSON. Row 10: a slide another live job
    holds is reported "in progress elsewhere", not failed, and left alone."""
    from mediar_ray.pipeline.lease import Leases

    field = read_image(str(DEMO))[:256, :320]
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(field).save(src / "tissue.png")
    out = tmp_path / "out"

    def run(*flags: str) -> tuple[int, dict]:
        code = main(["segment-slides", str(src), str(out), *FLAGS, *flags])
        return code, json.loads((out / "run_summary.json").read_text())

    code, report = run("--geojson")
    assert code == 0 and "tissue" in report["done"]
    assert list((out / "cells" / "slide=tissue").glob("part-*.parquet"))
    assert (out / "tissue.geojson.gz").exists()
    code, report = run("--overwrite", "--no-cells")
    assert code == 0 and "tissue" in report["done"]
    assert not (out / "cells" / "slide=tissue").exists()
    assert not (out / "tissue.geojson.gz").exists()
    marker = (out / "tissue.zarr" / ".mediar_complete").read_text()

    other = Leases(str(out))  # another job, alive, working on the slide
    assert other.claim("tissue") is None
    code, report = run("--overwrite")
    assert code == 0 and report["failed"] == {} and report["done"] == {}
    assert report["elsewhere"] == {"tissue": other.job}
    assert (out / "tissue.zarr" / ".mediar_complete").read_text() == marker
    other.release_all()


def test_fingerprints_of_the_earlier_version_still_match():
    """Renaming ``tile`` to ``tile_size`` and adding ``precision`` must not make every
    slide finished by the earlier version look stale on a rerun."""
    from mediar_ray.pipeline.plan import _upgraded
    from mediar_ray.pipeline.provenance import differences, fingerprint

    opts = SlideOptions(tile_size=512, roi_size=256)
    new = fingerprint({"size": 1}, {**opts.result_options(), "mpp": None}, ["w"])
    old_options = {
        ("tile" if k == "tile_size" else k): v
        for k, v in new["options"].items()
        if k != "precision"
    }
    old = {"input": {"size": 1}, "options": old_options, "weights": ["w"]}
    assert differences(_upgraded(old), new) == []
    changed = SlideOptions(tile_size=1024, roi_size=256, precision="bf16")
    newer = fingerprint({"size": 1}, {**changed.result_options(), "mpp": None}, ["w"])
    assert differences(_upgraded(old), newer) == ["options precision", "options tile_size"]
