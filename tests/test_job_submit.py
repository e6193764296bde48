"""`ray job submit` end to end: a real Ray head on loopback, a real S3 API server, real
data in the bucket. The slide job's OME-Zarr labels are read back with dask; the training
job's checkpoints are read back from the bucket and loaded as a model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import boto3
import dask.array as da
import numpy as np
import pytest
import tifffile
import yaml
from ray_head import RayHead, ray_head, submit_job
from s3_server import environment, s3_server

from mediar_ray.io import read_image

REPO = Path(__file__).resolve().parents[1]


def submit(head: RayHead, *entrypoint: str) -> subprocess.CompletedProcess:
    return submit_job(head, REPO, *entrypoint)


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
            result = submit(
                head,
                "python",
                "jobs/segment_slides.py",
                "--input",
                "s3://lab/slides/",
                "--output",
                "s3://results/mediar",
                "--weights",
                str(ref_dir / "model_a.pth"),
                "--model-config",
                json.dumps(params),
                "--no-tta",
                "--roi-size",
                "256",
                "--tile-size",
                "256",
                "--halo",
                "64",
            )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "succeeded" in (result.stdout + result.stderr).lower()
        assert env["AWS_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr
        labels = da.from_zarr("s3://results/mediar/nuclei.zarr/labels/cells/0")
        assert labels.shape == (512, 512) and labels.dtype == np.uint32
        summary = json.loads(
            s3.get_object(Bucket="results", Key="mediar/run_summary.json")["Body"].read()
        )
        assert list(summary["done"]) == ["nuclei"] and summary["failed"] == {}


@pytest.mark.slow
def test_training_job_through_ray_job_submit(data_dir):
    """jobs/train.py with data, config and checkpoints in the bucket; Ray Train writes
    through s3fs with the endpoint and credentials of the head's environment."""
    import fsspec
    from test_train_loop import TINY_MODEL

    from mediar_ray.model import load_model

    labels = sorted((data_dir / "dsb2018" / "labels").glob("*_label.tiff"))[:8]
    config = {
        "name": "submitted",
        "seed": 1,
        "data": {"roots": ["s3://data/dsb"], "holdout_every": 0},
        "model": TINY_MODEL,
        "augment": {"crop": 64},
        "sampling": {"amplified": False},
        "optim": {"lr": 1e-3, "epochs": 2, "batch_size": 2},
        "run": {
            "storage_path": "s3://results/runs",
            "num_workers": 2,
            "cpus_per_worker": 0.5,
            "loader_workers": 1,
            "loader_cpus": 0.5,
            "checkpoint_every": 1,
            "validate_every": 0,
            "max_steps_per_epoch": 2,
        },
    }
    with s3_server() as env, environment(env):
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
        for bucket in ("data", "results"):
            s3.create_bucket(Bucket=bucket)
        for label in labels:
            stem = label.name[: -len("_label.tiff")]
            image = next((data_dir / "dsb2018" / "images").glob(stem + ".*"))
            s3.upload_file(str(image), "data", f"dsb/images/{image.name}")
            s3.upload_file(str(label), "data", f"dsb/labels/{label.name}")
        s3.put_object(Bucket="data", Key="train.yaml", Body=yaml.safe_dump(config).encode())
        with ray_head(env=env) as head:
            result = submit(head, "python", "jobs/train.py", "--config", "s3://data/train.yaml")
            logs = [p for p in Path(head.temp_dir).glob("session_*/logs/**/*") if p.is_file()]
            logged = [p for p in logs if env["AWS_SECRET_ACCESS_KEY"].encode() in p.read_bytes()]
        out = result.stdout + result.stderr
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "succeeded" in out.lower() and "s3://results/runs/submitted" in out
        assert env["AWS_SECRET_ACCESS_KEY"] not in out
        assert logs and logged == [], "the secret key is in the cluster's logs"
        fs = fsspec.filesystem("s3")
        run = "results/runs/submitted"
        folders = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(run) if "checkpoint_epoch_" in p)
        assert folders == ["checkpoint_epoch_00000", "checkpoint_epoch_00001"]
        for folder in folders:
            files = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{run}/{folder}")}
            assert {"model.safetensors", "optimizer.pt", "state.json"} <= files
        state = json.loads(fs.cat(f"{run}/checkpoint_epoch_00001/state.json"))
        assert state["epoch"] == 1 and state["step"] == 2 * 2 and np.isfinite(state["loss"])
        model = load_model(f"s3://{run}/checkpoint_epoch_00001/model.safetensors")
        assert sum(p.numel() for p in model.parameters()) > 0
