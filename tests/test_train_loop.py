"""Ray Train DDP on CPU (gloo): 2 workers, real image/label pairs, checkpoints, resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from mediar_ray.train.checkpoint import latest_checkpoint

TINY_MODEL = {"encoder_name": "mit_b0", "decoder_channels": [32, 16, 16, 16, 16],
              "decoder_pab_channels": 16}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=4, object_store_memory=200 << 20, include_dashboard=False,
             log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def small_root(tmp_path_factory, data_dir: Path) -> Path:
    """Twenty real DSB2018 pairs in MEDIAR's layout (16 for training, 4 held out)."""
    root = tmp_path_factory.mktemp("ds") / "dsb"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for lab in sorted((data_dir / "dsb2018" / "labels").glob("*_label.tiff"))[:20]:
        stem = lab.name[: -len("_label.tiff")]
        shutil.copy(next((data_dir / "dsb2018" / "images").glob(stem + ".*")), root / "images")
        shutil.copy(lab, root / "labels")
    return root


def _config(root: Path, storage: Path, epochs: int):
    from mediar_ray.train.config import TrainConfig

    return TrainConfig.from_dict({
        "name": "ddp_test", "seed": 3,
        "data": {"roots": [str(root)], "holdout_every": 5},
        "model": TINY_MODEL,
        "augment": {"crop": 64},
        "sampling": {"amplified": False},
        "optim": {"lr": 2e-3, "epochs": epochs, "batch_size": 2},
        "run": {"storage_path": str(storage), "num_workers": 2, "checkpoint_every": 1,
                "validate_every": 0, "max_steps_per_epoch": 3, "cpus_per_worker": 1,
                "loader_workers": 1, "loader_cpus": 1},
    })


def _states(run: Path) -> dict[int, dict]:
    return {json.loads((d / "state.json").read_text())["epoch"]:
            json.loads((d / "state.json").read_text())
            for d in sorted(run.glob("checkpoint_epoch_*")) if (d / "state.json").exists()}


def test_ddp_two_workers_checkpoint_and_resume(ray_local, small_root, tmp_path):
    from mediar_ray.train.loop import run_training

    storage = tmp_path / "runs"
    first = run_training(_config(small_root, storage, epochs=4), max_epochs_this_run=3)
    assert first["resumed_from"] == 0 and first["ran"] == 3
    run = storage / "ddp_test"
    states = _states(run)
    assert sorted(states) == [0, 1, 2]
    # loss decreases over the first epochs
    assert states[2]["loss"] < states[0]["loss"]
    # each worker saw its own batches: the two ranks' samples differ at every epoch
    last = run / "checkpoint_epoch_00002"
    seen = [json.loads((last / f"seen_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 3 * 2
    assert seen[0] != seen[1]
    assert (last / "model.safetensors").stat().st_size > 0 and (last / "optimizer.pt").exists()
    # the checkpoint is usable for prediction as it is
    from mediar_ray.model import load_model

    load_model(str(last / "model.safetensors"))

    second = run_training(_config(small_root, storage, epochs=4))
    assert second["resumed_from"] == 3 and second["ran"] == 1
    states = _states(run)
    assert states[3]["step"] == states[2]["step"] + 3 == 4 * 3
    # the resumed epoch runs at the learning rate the interrupted run would have used
    assert states[3]["lr"] == pytest.approx(states[2]["next_lr"], rel=1e-12)
    assert states[3]["lr"] == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    path, state = latest_checkpoint(str(run))
    assert state["epoch"] == 3 and path.endswith("checkpoint_epoch_00003")
    third = run_training(_config(small_root, storage, epochs=4))
    assert third["ran"] == 0  # finished runs are not trained again
    assert np.isfinite(states[3]["loss"])
