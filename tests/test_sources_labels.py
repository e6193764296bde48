"""Labels through every reader: the real SVS through tifffile and OpenSlide (identical),
its DICOM WSI conversion through wsidicom (F1 >= 0.99), OME-Zarr inputs (NGFF 0.4/zarr
v2, NGFF 0.5/zarr v3, a previous output of this job; local and on an S3 server on
loopback) equal to the TIFF input's; corrupt or unsupported files of every format fail
alone, naming the file, while the other slides finish and the job exits 1."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import boto3
import numpy as np
import pytest
import ray
import tifffile
import zarr

from mediar_ray.io import read_image
from mediar_ray.metrics import cellseg_f1
from mediar_ray.pipeline import SlideOptions, run_slides
from mediar_ray.sources import open_slide
from s3_server import environment, s3_server
from test_sources_dicom import to_dicom
from test_sources_zarr import write_ngff

REPO = Path(__file__).resolve().parents[1]
SVS = "slides/CMU-1-Small-Region.svs"
SVS_NAME = "CMU-1-Small-Region"
# The bundled model, no TTA, 512-px tiles: what a quick archive run uses.
COMMON = {"tta": False, "tile": 512, "halo": 128}
# This job's own outputs are inputs here: keep the full image copy where the job offers
# a choice (issue 17 makes the copy optional).
COPY = {"copy_image": True} if "copy_image" in SlideOptions.__dataclass_fields__ else {}


def options(**kw) -> SlideOptions:
    return SlideOptions(**COMMON, **COPY, **kw)


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


def bad_files(folder: Path, data_dir: Path) -> dict[str, Path]:
    """A corrupt or unsupported input of every format; returns file name -> path."""
    folder.mkdir()
    svs = (data_dir / SVS).read_bytes()
    made = {}
    made["._CMU-1.svs"] = folder / "._CMU-1.svs"  # macOS AppleDouble metadata
    made["._CMU-1.svs"].write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"\x00" * 500)
    made["cut.svs"] = folder / "cut.svs"  # truncated: tiles beyond the end
    made["cut.svs"].write_bytes(svs[: len(svs) // 3])
    made["fake.ndpi"] = folder / "fake.ndpi"  # TIFF header, nothing behind it
    made["fake.ndpi"].write_bytes(b"II*\x00\x08\x00\x00\x00" + b"\xff" * 100)
    made["fake.mrxs"] = folder / "fake.mrxs"
    made["fake.mrxs"].write_text("[GENERAL]\nno slide here\n")
    made["broken.png"] = folder / "broken.png"
    png = sorted((data_dir / "nuinsseg/images").glob("*.png"))[0].read_bytes()
    made["broken.png"].write_bytes(png[: len(png) // 2])
    made["bad_dicom"] = folder / "bad_dicom"
    made["bad_dicom"].mkdir()
    (made["bad_dicom"] / "x.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x01" * 200)
    made["bad.zarr"] = folder / "bad.zarr"
    zarr.open_group(str(made["bad.zarr"]), mode="w", zarr_format=3).attrs["note"] = "no image"
    made["zstack.zarr"] = folder / "zstack.zarr"
    group = zarr.open_group(str(made["zstack.zarr"]), mode="w", zarr_format=3)
    group.create_array("0", shape=(4, 32, 32), dtype="uint8")
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [
        {"name": "z", "type": "space"}, {"name": "y", "type": "space"},
        {"name": "x", "type": "space"}], "datasets": [{"path": "0"}]}]}
    return made


def upload(client, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.put_object(Bucket="lab", Key=f"{prefix}/{path.relative_to(folder).as_posix()}",
                              Body=path.read_bytes())


def job_main():
    spec = importlib.util.spec_from_file_location("segment_slides_job", REPO / "jobs/segment_slides.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """All runs of the module, each once: the job on the archive folder (all local
    formats plus the bad files), OpenSlide on the SVS, then previous output + S3 zarr."""
    tmp = tmp_path_factory.mktemp("labels")
    svs = data_dir / SVS
    pixels = read_image(str(svs))
    crop = np.ascontiguousarray(pixels[1000:2024, 600:1624])  # 4 tiles of 512
    archive = tmp / "archive"
    archive.mkdir()
    shutil.copy(svs, archive / svs.name)
    tifffile.imwrite(archive / "crop.tif", crop, tile=(256, 256), photometric="rgb",
                     compression="zlib")
    zarrs = tmp / "zarrs"
    write_ngff(zarrs / "crop_v2.zarr", crop, "0.4", levels=2)
    write_ngff(zarrs / "crop_v3.zarr", crop, "0.5", levels=2)
    for name in ("crop_v2.zarr", "crop_v3.zarr"):
        shutil.copytree(zarrs / name, archive / name)
    from wsidicom.codec import JpegSettings
    to_dicom(str(svs), archive / "svs_dicom", JpegSettings(quality=90))
    bad = bad_files(tmp / "bad", data_dir)
    for name, path in bad.items():
        (shutil.copytree if path.is_dir() else shutil.copy)(path, archive / name)

    with s3_server() as env, environment(env):
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"],
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                              region_name="us-east-1")
        client.create_bucket(Bucket="lab")
        upload(client, zarrs, "in")
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": env})
        try:
            out = {k: tmp / k for k in ("job", "openslide", "again")}
            argv = ["--input", str(archive), "--output", str(out["job"]), "--no-tta",
                    "--tile-size", "512", "--halo", "128"]
            exit_code = job_main()(argv + (["--copy-image"] if COPY else []))
            report_job = json.loads((out["job"] / "run_summary.json").read_text())
            report_os = run_slides([str(svs)], str(out["openslide"]), options(reader="openslide"))
            report_again = run_slides(
                [str(out["job"] / "crop.zarr"), "s3://lab/in/crop_v2.zarr",
                 "s3://lab/in/crop_v3.zarr"], str(out["again"]), options())
        finally:
            ray.shutdown()
    return {"out": out, "exit": exit_code, "job": report_job, "openslide": report_os,
            "again": report_again, "bad": bad, "crop": crop, "archive": archive}


def test_svs_labels_identical_through_tifffile_and_openslide(runs):
    assert runs["openslide"]["failed"] == {}
    tiff = labels_of(runs["out"]["job"], SVS_NAME)
    osl = labels_of(runs["out"]["openslide"], SVS_NAME)
    assert tiff.shape == (2967, 2220) and tiff.max() >= 50
    np.testing.assert_array_equal(canonical(osl), canonical(tiff))


def test_dicom_wsi_labels_match_the_svs(runs):
    tiff = labels_of(runs["out"]["job"], SVS_NAME)
    dicom = labels_of(runs["out"]["job"], "svs_dicom")
    assert dicom.shape == tiff.shape
    assert cellseg_f1(tiff, dicom).f1 >= 0.99


def test_ome_zarr_labels_equal_the_tiff_input(runs):
    crop = runs["crop"]
    reference = canonical(labels_of(runs["out"]["job"], "crop"))
    assert reference.shape == crop.shape[:2] and reference.max() >= 10
    # the previous output read as an input holds the same pixels
    with open_slide(str(runs["out"]["job"] / "crop.zarr")) as src:
        assert src.reader == "ome-zarr"
        np.testing.assert_array_equal(src.read_region(0, 0, 1024, 0, 1024), crop)
    assert runs["again"]["failed"] == {}
    for out, name in ((runs["out"]["job"], "crop_v2"), (runs["out"]["job"], "crop_v3"),
                      (runs["out"]["again"], "crop"), (runs["out"]["again"], "crop_v2"),
                      (runs["out"]["again"], "crop_v3")):
        np.testing.assert_array_equal(canonical(labels_of(out, name)), reference, err_msg=name)


def test_bad_files_fail_alone_naming_themselves_and_the_job_exits_1(runs):
    report = runs["job"]
    assert runs["exit"] == 1
    assert set(report["done"]) == {SVS_NAME, "crop", "crop_v2", "crop_v3", "svs_dicom"}
    reasons = list(report["failed"].values())
    assert len(reasons) == len(runs["bad"])
    for name in runs["bad"]:
        hits = [r for r in reasons if name in r]
        assert len(hits) == 1, (name, reasons)
    for name in ("._CMU-1.svs", "fake.ndpi", "fake.mrxs", "broken.png", "bad_dicom",
                 "bad.zarr"):
        assert any(name in r and "not a slide/image" in r for r in reasons), name
    assert any("zstack.zarr" in r and "z=4" in r for r in reasons)
