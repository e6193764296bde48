"""Labels through every reader: the real SVS through tifffile and OpenSlide (identical),
its lossless DICOM WSI conversion through wsidicom (F1 >= 0.99), OME-Zarr inputs (NGFF 0.4/zarr
v2, NGFF 0.5/zarr v3, a previous output of this job; local and on an S3 server on
loopback) equal to the TIFF input's; corrupt or unsupported files of every format fail
alone, naming the file, while the other slides finish and the job exits 1.

The label runs take minutes (several whole-slide runs): marked slow. The bad-file run
uses the small reference model and runs by default."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import ray
import tifffile
import zarr
from s3_server import environment, s3_client, s3_server
from test_sources import bad_files
from test_sources_dicom import to_dicom
from test_sources_zarr import write_ngff

from mediar_ray.io import read_image
from mediar_ray.metrics import cellseg_f1
from mediar_ray.pipeline import SlideOptions, run_slides
from mediar_ray.sources import open_slide

REPO = Path(__file__).resolve().parents[1]
SVS = "slides/CMU-1-Small-Region.svs"
SVS_NAME = "CMU-1-Small-Region"
# The bundled model, no TTA, 512-px tiles: what a quick archive run uses. Every window
# runs (no tissue mask: readers are compared here, not masks made from unlike pyramids),
# and the full image is copied into the output, which a later run reads as its input.
# 512-px windows: one per small slide, a quarter of the bundled model's own 256-px
# windows' work; what these tests compare (formats, readers) does not depend on it.
COMMON = {
    "tta": False,
    "roi_size": 512,
    "tile_size": 512,
    "halo": 128,
    "tissue": "off",
    "copy_image": True,
}
JOB_FLAGS = [
    "--no-tta",
    "--roi-size",
    "512",
    "--tile-size",
    "512",
    "--halo",
    "128",
    "--tissue",
    "off",
    "--copy-image",
]


def options(**kw) -> SlideOptions:
    return SlideOptions(**COMMON, **kw)


def labels_of(out: Path | str, name: str) -> np.ndarray:
    arr = zarr.open_array(f"{out}/{name}.zarr/labels/cells/0", mode="r")
    assert arr.dtype == np.uint32
    return np.asarray(arr[...])


def canonical(labels: np.ndarray) -> np.ndarray:
    """Ids renumbered in order of first appearance (row-major): two label images with the
    same cells get the same array whatever ids they used."""
    flat = labels.ravel()
    ids, first = np.unique(flat, return_index=True)
    order = np.argsort(first[ids > 0])
    new = np.zeros(int(ids.max()) + 1, np.uint32)
    new[ids[ids > 0][order]] = np.arange(1, order.size + 1, dtype=np.uint32)
    return new[labels]


def upload(client, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.put_object(
                Bucket="lab",
                Key=f"{prefix}/{path.relative_to(folder).as_posix()}",
                Body=path.read_bytes(),
            )


def job_main():
    spec = importlib.util.spec_from_file_location(
        "segment_slides_job", REPO / "jobs/segment_slides.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """The slow runs, each once: the job on an archive folder of every local format,
    OpenSlide on the SVS, then a previous output and the S3 zarr images as inputs."""
    tmp = tmp_path_factory.mktemp("labels")
    svs = data_dir / SVS
    pixels = read_image(str(svs))
    crop = np.ascontiguousarray(pixels[1000:2024, 600:1624])  # 4 tiles of 512
    archive = tmp / "archive"
    archive.mkdir()
    shutil.copy(svs, archive / svs.name)
    tifffile.imwrite(
        archive / "crop.tif", crop, tile=(256, 256), photometric="rgb", compression="zlib"
    )
    zarrs = tmp / "zarrs"
    write_ngff(zarrs / "crop_v2.zarr", crop, "0.4", levels=2)
    write_ngff(zarrs / "crop_v3.zarr", crop, "0.5", levels=2)
    for name in ("crop_v2.zarr", "crop_v3.zarr"):
        shutil.copytree(zarrs / name, archive / name)
    # Lossless: the model's labels move with any change of pixels (measured on this
    # slide: F1 0.959, 0.970, 0.968 after JPEG re-encoding at quality 90, 95, 98), so
    # only a conversion that keeps the pixels can keep the labels; the JPEG conversions'
    # pixels are checked in test_sources_dicom.
    from wsidicom.codec import Channels, JpegLosslessSettings

    to_dicom(str(svs), archive / "svs_dicom", JpegLosslessSettings(channels=Channels.RGB))

    with s3_server() as env, environment(env):
        client = s3_client(env, "lab")
        upload(client, zarrs, "in")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": env},
        )
        try:
            out = {k: tmp / k for k in ("job", "openslide", "again")}
            exit_code = job_main()(
                ["--input", str(archive), "--output", str(out["job"])] + JOB_FLAGS
            )
            report_job = json.loads((out["job"] / "run_summary.json").read_text())
            report_os = run_slides([str(svs)], str(out["openslide"]), options(reader="openslide"))
            report_again = run_slides(
                [
                    str(out["job"] / "crop.zarr"),
                    "s3://lab/in/crop_v2.zarr",
                    "s3://lab/in/crop_v3.zarr",
                ],
                str(out["again"]),
                options(),
            )
        finally:
            ray.shutdown()
    return {
        "out": out,
        "exit": exit_code,
        "job": report_job,
        "openslide": report_os,
        "again": report_again,
        "crop": crop,
    }


@pytest.mark.slow
def test_svs_labels_identical_through_tifffile_and_openslide(runs):
    assert runs["openslide"]["failed"] == {}
    tiff = labels_of(runs["out"]["job"], SVS_NAME)
    osl = labels_of(runs["out"]["openslide"], SVS_NAME)
    assert tiff.shape == (2967, 2220) and tiff.max() >= 50
    np.testing.assert_array_equal(canonical(osl), canonical(tiff))


@pytest.mark.slow
def test_dicom_wsi_labels_match_the_svs(runs):
    tiff = labels_of(runs["out"]["job"], SVS_NAME)
    dicom = labels_of(runs["out"]["job"], "svs_dicom")
    assert dicom.shape == tiff.shape
    assert cellseg_f1(tiff, dicom).f1 >= 0.99
    np.testing.assert_array_equal(canonical(dicom), canonical(tiff))


@pytest.mark.slow
def test_ome_zarr_labels_equal_the_tiff_input(runs):
    crop = runs["crop"]
    reference = canonical(labels_of(runs["out"]["job"], "crop"))
    assert reference.shape == crop.shape[:2] and reference.max() >= 10
    # the previous output read as an input holds the same pixels
    with open_slide(str(runs["out"]["job"] / "crop.zarr")) as src:
        assert src.reader == "ome-zarr"
        np.testing.assert_array_equal(src.read_region(0, 0, 1024, 0, 1024), crop)
    assert runs["again"]["failed"] == {}
    for out, name in (
        (runs["out"]["job"], "crop_v2"),
        (runs["out"]["job"], "crop_v3"),
        (runs["out"]["again"], "crop"),
        (runs["out"]["again"], "crop_v2"),
        (runs["out"]["again"], "crop_v3"),
    ):
        np.testing.assert_array_equal(canonical(labels_of(out, name)), reference, err_msg=name)


@pytest.mark.slow
def test_the_archive_job_finishes_every_format(runs):
    assert runs["exit"] == 0 and runs["job"]["failed"] == {}
    assert set(runs["job"]["done"]) == {SVS_NAME, "crop", "crop_v2", "crop_v3", "svs_dicom"}


def test_bad_files_fail_alone_naming_themselves_and_the_job_exits_1(data_dir, ref_dir, tmp_path):
    """A corrupt or unsupported file of every format among good slides (the small
    reference model keeps this quick)."""
    archive = tmp_path / "archive"
    bad = bad_files(archive, data_dir)
    good = read_image(str(data_dir / "stardist_nuclei/images/img2d.tif"))[:256, :256]
    tifffile.imwrite(archive / "good.tif", good, tile=(128, 128))
    params = json.loads((ref_dir / "index.json").read_text())["model_params"]
    out = tmp_path / "out"
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        code = job_main()(
            [
                "--input",
                str(archive),
                "--output",
                str(out),
                "--weights",
                str(ref_dir / "model_a.pth"),
                "--model-config",
                json.dumps(params),
                "--roi-size",
                "256",
                "--tile-size",
                "256",
                "--halo",
                "64",
                "--no-tta",
                "--tissue",
                "off",
            ]
        )
    finally:
        ray.shutdown()
    report = json.loads((out / "run_summary.json").read_text())
    assert code == 1
    assert list(report["done"]) == ["good"]
    reasons = list(report["failed"].values())
    assert len(reasons) == len(bad)
    for name in bad:
        assert len([r for r in reasons if name in r]) == 1, (name, reasons)
    for name in ("._CMU-1.svs", "fake.ndpi", "fake.mrxs", "broken.png", "bad_dicom", "bad.zarr"):
        assert any(name in r and "not a slide/image" in r for r in reasons), name
    assert any("zstack.zarr" in r and "z=4" in r for r in reasons)
