"""The slide pipeline reading and writing s3:// through s3fs, against a real S3 API server
(moto's standalone server) on loopback."""

from __future__ import annotations

import json
import os

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from s3_server import environment

from mediar_ray.io import read_image
from mediar_ray.pipeline import SlideOptions, run_slides


@pytest.fixture(scope="module")
def s3(s3_ray):
    return s3_ray


@pytest.fixture(scope="module")
def slide_bytes(data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("slide") / "nuclei.tif"
    image = read_image(str(data_dir / "stardist_nuclei/images/img2d.tif"))
    tifffile.imwrite(path, image, tile=(128, 128))
    return path.read_bytes(), image


# slow: two whole runs of the bundled model (one on S3, one local; 90-170 s); the default
# set keeps S3 in and out through tests/test_cells_s3.py.
@pytest.mark.slow
def test_s3_in_and_out(s3, slide_bytes, ref_dir, caplog, tmp_path):
    """Slides in and out of S3 give the labels of the same slide run from a local folder
    into a local folder (an independent run), and leave no scratch and no credentials."""
    client, env = s3
    client.put_object(Bucket="lab", Key="slides/nuclei.tif", Body=slide_bytes[0])
    # The bundled model: it finds the nuclei, so equal labels mean something.
    opts = SlideOptions(tta=False, tile_size=256, halo=64, copy_image=True)
    report = run_slides(["s3://lab/slides/"], "s3://results/mediar", opts)
    assert report["failed"] == {}
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="results")["Contents"]}
    assert "mediar/nuclei.zarr/.mediar_complete" in keys
    assert "mediar/run_summary.json" in keys and "mediar/report.html" in keys
    assert not any(".scratch" in k for k in keys)
    labels = da.from_zarr("s3://results/mediar/nuclei.zarr/labels/cells/0")
    assert labels.shape == (512, 512) and labels.dtype == np.uint32
    image = da.from_zarr("s3://results/mediar/nuclei.zarr/0")
    np.testing.assert_array_equal(image[0].compute(), slide_bytes[1])
    assert env["AWS_SECRET_ACCESS_KEY"] not in caplog.text
    # The same slide, run from and into local folders with the same options.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "nuclei.tif").write_bytes(slide_bytes[0])
    local = run_slides([str(tmp_path / "in")], str(tmp_path / "out"), opts)
    assert local["done"]["nuclei"]["cells"] == report["done"]["nuclei"]["cells"] > 0
    np.testing.assert_array_equal(
        labels.compute(), zarr.open_array(str(tmp_path / "out/nuclei.zarr/labels/cells/0"))[:]
    )


def test_missing_bucket_is_a_clear_failure(s3, slide_bytes, ref_dir, caplog):
    client, env = s3
    client.put_object(Bucket="lab", Key="one/nuclei.tif", Body=slide_bytes[0])
    opts = SlideOptions(weights=[str(ref_dir / "model_a.pth")], tile_size=256)
    with pytest.raises(Exception) as err:
        run_slides(["s3://lab/one/"], "s3://no-such-bucket/out", opts)
    assert "no-such-bucket" in str(err.value) or "NoSuchBucket" in repr(err.value)
    buckets = {b["Name"] for b in client.list_buckets()["Buckets"]}
    assert buckets == {"lab", "results"}  # nothing created elsewhere
    assert env["AWS_SECRET_ACCESS_KEY"] not in caplog.text


def test_missing_credentials_are_a_clear_failure(s3, ref_dir, caplog, tmp_path):
    client, env = s3
    # moto accepts any key pair, so "bad credentials" here means none can be found.
    none = {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    opts = SlideOptions(weights=[str(ref_dir / "model_a.pth")], tile_size=256)
    with environment(none):
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.pop(key)
        with pytest.raises(Exception) as err:
            run_slides(["s3://lab/slides/"], "s3://results/other", opts)
    assert "credentials" in repr(err.value).lower() or "Access" in repr(err.value)
    assert env["AWS_SECRET_ACCESS_KEY"] not in caplog.text
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="results").get("Contents", [])}
    assert not any(k.startswith("other/") for k in keys)


@pytest.mark.slow  # 45 s on 2 cores
def test_awkward_names_on_s3(s3, slide_bytes, ref_dir):
    """Spaces and brackets in keys, and a macOS '._' file, in a bucket: the good slides
    are done under safe, distinct names; the junk file fails alone with its reason."""
    client, env = s3
    for key in ("awk/my slide [1].tif", "awk/my slide (2).tif"):
        client.put_object(Bucket="lab", Key=key, Body=slide_bytes[0])
    client.put_object(Bucket="lab", Key="awk/._my slide [1].tif", Body=b"\x00\x05\x16\x07" * 8)
    params = json.loads((ref_dir / "index.json").read_text())["model_params"]
    opts = SlideOptions(
        weights=[str(ref_dir / "model_a.pth")],
        model_config=params,
        tta=False,
        roi_size=256,
        tile_size=256,
        halo=64,
    )
    report = run_slides(["s3://lab/awk/"], "s3://results/awk", opts)
    assert sorted(report["inputs"][n] for n in report["done"]) == [
        "s3://lab/awk/my slide (2).tif",
        "s3://lab/awk/my slide [1].tif",
    ]
    (bad,) = report["failed"]
    assert "._my slide [1].tif" in report["failed"][bad]
    for name in report["done"]:
        labels = da.from_zarr(f"s3://results/awk/{name}.zarr/labels/cells/0")
        assert labels.shape == (512, 512)
