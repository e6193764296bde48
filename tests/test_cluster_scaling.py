"""The slide job on multi-node Ray clusters on one machine (slow set).

- Scale-out: an autoscaling cluster (Ray's fake multi-node provider) starts with a head
  that has no CPUs and no worker nodes; the slide job (its driver connected through
  RAY_ADDRESS) makes the autoscaler add worker nodes, and finishes with complete outputs.
- Node loss: on a ``ray.cluster_utils.Cluster``, the worker node that runs the inference
  actor is killed while tiles are being inferred; a fresh node takes over and the labels
  equal those of an uninterrupted run of the same slide.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
from autoscaling_cluster import autoscaling_cluster
from ray_head import driver_env, free_port, kill_leftovers, new_temp_dir

from mediar_ray.io import read_image

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "mediar_ray" / "assets" / "demo" / "images"
# Small windows and tiles so that these few small images still make several tiles.
FLAGS = ["--no-tta", "--roi-size", "256", "--tile-size", "256", "--halo", "64"]


def check_outputs(out: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Every slide complete, labels readable with dask, ids 1..cells each used; returns
    the labels by slide."""
    summary = json.loads((out / "run_summary.json").read_text())
    assert sorted(summary["done"]) == sorted(names) and summary["failed"] == {}
    labels = {}
    for name in names:
        root = out / f"{name}.zarr"
        assert (root / ".mediar_complete").exists() and not (root / ".scratch").exists()
        lazy = da.from_zarr(str(root / "labels/cells/0"))
        assert lazy.dtype == np.uint32
        labels[name] = lazy.compute()
        cells = summary["done"][name]["cells"]
        assert cells > 0
        np.testing.assert_array_equal(np.unique(labels[name]), np.arange(cells + 1))
    return labels


@pytest.mark.slow
def test_slide_job_scales_out_from_zero_worker_nodes(tmp_path):
    """A 4-slide archive on a cluster that starts with no worker node: the autoscaler
    adds nodes, the model actors run on more than one of them, every slide completes."""
    slides = tmp_path / "slides"
    shutil.copytree(DEMO, slides)
    tifffile.imwrite(
        slides / "phase.tif",
        read_image(str(REPO.parent / "shared/data/usiigaci_phase/images/train_set1.tif"))[
            :512, :512
        ],
    )
    names = sorted(p.name.split(".")[0] for p in slides.iterdir())
    assert len(names) == 4
    out = tmp_path / "out"
    workers = {
        "cpu": {
            "resources": {"CPU": 1, "object_store_memory": 150 << 20},
            "node_config": {},
            "min_workers": 0,
            "max_workers": 3,
        }
    }
    with autoscaling_cluster(workers) as head:
        # The cluster's nodes are read by a driver in another process, as the job's.
        before = cluster_nodes(head.gcs_address)
        assert len(before) == 1 and "CPU" not in before[0]["Resources"]  # head only
        # The job's driver as `ray job submit` runs it, with RAY_ADDRESS. Not through
        # the job API here: the fake nodes share the head's temp dir and so one copy
        # of a --working-dir package, and in a trial run slides failed with
        # FileNotFoundError as nodes came and went (test_job_submit.py covers the API).
        result = subprocess.run(
            [
                sys.executable,
                str(REPO / "jobs/segment_slides.py"),
                "--input",
                str(slides),
                "--output",
                str(out),
                "--workers",
                "2",
                *FLAGS,
            ],
            env=driver_env(head.gcs_address),
            capture_output=True,
            text=True,
            timeout=1200,
        )
        ids = {n["NodeID"] for n in before}
        added = [n for n in cluster_nodes(head.gcs_address) if n["NodeID"] not in ids]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # the autoscaler added worker nodes of the "cpu" type: every task and actor ran there
    assert len(added) >= 1
    assert all(n["Resources"].get("CPU", 1) == 1 for n in added)
    assert f"outputs: {out}" in result.stdout
    check_outputs(out, names)
    # the two model actors were spread over two worker nodes
    assert json.loads((out / "run_summary.json").read_text())["model_nodes"] == 2


def cluster_nodes(address: str) -> list[dict]:
    """``ray.nodes()`` of the cluster at ``address``, from a driver in a subprocess."""
    code = (
        "import json, ray; ray.init(address=%r, logging_level='ERROR'); "
        "print('NODES', json.dumps([{'NodeID': n['NodeID'], 'Resources': n['Resources']} "
        "for n in ray.nodes() if n['Alive']]))" % address
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=driver_env(address),
    )
    line = next(x for x in result.stdout.splitlines() if x.startswith("NODES "))
    return json.loads(line[len("NODES ") :])


def _slide_job(slide_dir: Path, out: Path) -> list[str]:
    """The slide job as a driver process on this machine (RAY_ADDRESS names the cluster);
    one inference actor, 16 tiles of 128 px on a 512 x 512 slide."""
    return [
        sys.executable,
        str(REPO / "jobs/segment_slides.py"),
        "--input",
        str(slide_dir),
        "--output",
        str(out),
        "--workers",
        "1",
        "--no-tta",
        "--roi-size",
        "128",
        "--tile-size",
        "128",
        "--halo",
        "48",
    ]


@pytest.mark.slow
def test_losing_the_inference_node_mid_job_gives_identical_labels(tmp_path):
    from ray.cluster_utils import Cluster

    slides = tmp_path / "slides"
    slides.mkdir()
    tifffile.imwrite(slides / "nuclei.tif", read_image(str(DEMO / "stardist_img2d.tif")))
    tmp = new_temp_dir()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "gcs_server_port": free_port(),
            "temp_dir": tmp,
            "include_dashboard": False,
            "dashboard_agent_listen_port": free_port(),
            "object_store_memory": 100 << 20,
        },
    )
    proc = None
    try:
        first = cluster.add_node(num_cpus=1, object_store_memory=100 << 20)
        env = driver_env(cluster.address)
        ref, out = tmp_path / "ref", tmp_path / "out"
        subprocess.run(_slide_job(slides, ref), env=env, check=True, capture_output=True)
        log = tmp_path / "job.log"  # a file, not a pipe: a full pipe would stall the job
        with open(log, "w") as f:
            proc = subprocess.Popen(
                _slide_job(slides, out), env=env, stdout=f, stderr=subprocess.STDOUT
            )
        # Per-tile done records of the stage that runs the model, the first stage to
        # write any (done/windows, or done/infer where tiles are inferred whole).
        done = out / "nuclei.zarr/.scratch/done"
        deadline = time.monotonic() + 600
        while not (done.is_dir() and any(any(d.iterdir()) for d in done.iterdir())):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no tile was inferred"
            time.sleep(0.05)
        # The only worker node (the head has no CPUs) holds the inference actor: it dies,
        # and a replacement node joins, as an autoscaler would bring one.
        cluster.remove_node(first, allow_graceful=False)
        records_at_loss = {d.name: len(list(d.iterdir())) for d in done.iterdir()}
        cluster.add_node(num_cpus=1, object_store_memory=100 << 20)
        assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        cluster.shutdown()
        kill_leftovers(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    # 512 x 512 in 128-px tiles: the node died while tiles were still being inferred
    assert len(records_at_loss) == 1 and 0 < max(records_at_loss.values()) < 16, records_at_loss
    labels, expected = check_outputs(out, ["nuclei"]), check_outputs(ref, ["nuclei"])
    np.testing.assert_array_equal(labels["nuclei"], expected["nuclei"])
