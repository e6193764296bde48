"""`jobs/` entry points: options from flags and a config file (flags win), where the
outputs went, the run summary, and exit codes (0 ok, 1 failed, 2 bad options)."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
import yaml
import zarr

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "mediar_ray" / "assets" / "demo" / "images"


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def slides_job():
    return load_job("segment_slides")


def test_slide_job_options_from_config_file_and_flags(slides_job, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": "s3://lab/slides/",
                "output": "s3://out/",
                "tile_size": 2048,
                "halo": 96,
                "tta": False,
                "num-gpus-per-worker": 1,
            }
        )
    )
    args = slides_job.parse_args(["--config", str(config), "--halo", "200"])
    assert args.input == ["s3://lab/slides/"] and args.output == "s3://out/"
    assert (args.tile_size, args.halo, args.tta, args.num_gpus_per_worker) == (2048, 200, False, 1)
    args = slides_job.parse_args(
        ["--config", str(config), "--input", "a.svs", "b.svs", "--output", "out", "--tta"]
    )
    assert args.input == ["a.svs", "b.svs"] and args.output == "out" and args.tta is True
    # a config anywhere fsspec reaches (here: memory://), JSON as well as YAML
    with fsspec.open("memory://cfg/job.json", "w") as f:
        json.dump({"input": ["x.tif"], "output": "o", "workers": 3}, f)
    assert slides_job.parse_args(["--config", "memory://cfg/job.json"]).workers == 3


@pytest.mark.parametrize(
    "content, argv, message",
    [
        ({"input": "x.tif", "output": "o", "tile": 512}, [], "unknown option(s) ['tile']"),
        ({"tile_size": 512}, [], "--input and --output are required"),
        (
            None,
            ["--input", "x.tif", "--output", "o", "--config", "missing.yaml"],
            "cannot read config missing.yaml",
        ),
    ],
)
def test_slide_job_bad_options_exit_2(
    slides_job, tmp_path, monkeypatch, capsys, content, argv, message
):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        Path("job.yaml").write_text(yaml.safe_dump(content))
        argv = ["--config", "job.yaml", *argv]
    with pytest.raises(SystemExit) as exit_info:
        slides_job.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_train_job_bad_config_exit_2(tmp_path, caplog):
    train_job = load_job("train")
    bad = tmp_path / "train.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "optim": {"epochs": 0}}))
    with caplog.at_level(logging.ERROR):
        assert train_job.main(["--config", str(bad)]) == 2
        assert train_job.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "optim.epochs = 0 is not allowed" in caplog.text and "not found" in caplog.text


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(
        num_cpus=2,
        object_store_memory=100 << 20,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    yield
    ray.shutdown()


@pytest.mark.slow
def test_slide_job_summary_output_location_and_exit_code(slides_job, local_ray, tmp_path, capsys):
    """One good slide and one unreadable one: the good one is done, the bad one failed
    with its reason, exit code 1; a rerun skips the done slide."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(DEMO / "dsb_tissue_f952cc65.png", src / "tissue.png")
    (src / "broken.tif").write_bytes(b"not a tiff")
    out = tmp_path / "out"
    argv = [
        "--input",
        str(src),
        "--output",
        str(out),
        "--no-tta",
        "--roi-size",
        "256",
        "--tile-size",
        "256",
        "--halo",
        "64",
    ]
    assert slides_job.main(argv) == 1
    printed = capsys.readouterr().out
    assert f"outputs: {out}/<slide>.zarr" in printed and f"{out}/run_summary.json" in printed
    summary = json.loads((out / "run_summary.json").read_text())
    assert list(summary["done"]) == ["tissue"] and summary["skipped"] == []
    assert list(summary["failed"]) == ["broken"] and summary["failed"]["broken"]
    assert summary["output"] == str(out)
    done = summary["done"]["tissue"]
    labels = np.asarray(zarr.open_array(str(out / "tissue.zarr/labels/cells/0"), mode="r"))
    assert done["cells"] == int(labels.max()) == len(np.unique(labels)) - 1 > 0
    assert set(done["seconds"]) == {"plan", "infer", "track", "cells", "finish"}
    assert all(s >= 0 for s in done["seconds"].values())

    assert slides_job.main(argv) == 1  # the broken slide still fails
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["skipped"] == ["tissue"] and summary["done"] == {}
    assert list(summary["failed"]) == ["broken"]
