"""`ray job submit` end to end: a real Ray head on loopback, a real S3 API server, real
slides in the bucket, the job's OME-Zarr labels read back with dask."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import boto3
import dask.array as da
import numpy as np
import pytest
import tifffile

from mediar_ray.io import read_image
from ray_head import ray_head
from s3_server import environment, s3_server

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_slide_job_through_ray_job_submit(data_dir, ref_dir, tmp_path):
    image = read_image(str(data_dir / "stardist_nuclei/images/img2d.tif"))
    slide = tmp_path / "nuclei.tif"
    tifffile.imwrite(slide, image, tile=(128, 128))
    params = json.loads((ref_dir / "index.json").read_text())["model_params"]
    with s3_server() as env, environment(env):
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
        for bucket in ("lab", "results"):
            s3.create_bucket(Bucket=bucket)
        s3.upload_file(str(slide), "lab", "slides/nuclei.tif")
        # The head gets the credentials from its environment, as from an instance profile.
        with ray_head(env=env) as head:
            result = subprocess.run(
                [sys.executable, "-m", "ray.scripts.scripts", "job", "submit",
                 "--address", head.dashboard_url, "--working-dir", str(REPO), "--",
                 "python", "jobs/segment_slides.py", "--input", "s3://lab/slides/",
                 "--output", "s3://results/mediar", "--weights", str(ref_dir / "model_a.pth"),
                 "--model-config", json.dumps(params), "--no-tta", "--roi-size", "256",
                 "--tile-size", "256", "--halo", "64"],
                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "succeeded" in (result.stdout + result.stderr).lower()
        assert env["AWS_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr
        labels = da.from_zarr("s3://results/mediar/nuclei.zarr/labels/cells/0")
        assert labels.shape == (512, 512) and labels.dtype == np.uint32
        summary = json.loads(s3.get_object(Bucket="results", Key="mediar/run_summary.json")
                             ["Body"].read())
        assert list(summary["done"]) == ["nuclei"] and summary["failed"] == {}
