"""Ray Train DDP on CPU (gloo): 2 workers, real image/label pairs, checkpoints, resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from mediar_ray.train.checkpoint import latest_checkpoint

TINY_MODEL = {
    "encoder_name": "mit_b0",
    "decoder_channels": [32, 16, 16, 16, 16],
    "decoder_pab_channels": 16,
}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(
        num_cpus=4, object_store_memory=200 << 20, include_dashboard=False, log_to_driver=False
    )
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

    return TrainConfig.from_dict(
        {
            "name": "ddp_test",
            "seed": 3,
            "data": {"roots": [str(root)], "holdout_every": 5},
            "model": TINY_MODEL,
            "augment": {"crop": 64},
            "sampling": {"amplified": False},
            "optim": {"lr": 2e-3, "epochs": epochs, "batch_size": 2},
            "run": {
                "storage_path": str(storage),
                "num_workers": 2,
                "checkpoint_every": 1,
                "validate_every": 0,
                "max_steps_per_epoch": 3,
                "cpus_per_worker": 1,
                "loader_workers": 1,
                "loader_cpus": 1,
            },
        }
    )


def _states(run: Path) -> dict[int, dict]:
    return {
        json.loads((d / "state.json").read_text())["epoch"]: json.loads(
            (d / "state.json").read_text()
        )
        for d in sorted(run.glob("checkpoint_epoch_*"))
        if (d / "state.json").exists()
    }


def _cut_copy(run: Path, epoch: int) -> None:
    """A copy of the checkpoint after ``epoch`` - 1 as it looks when Ray Train was killed
    while copying the checkpoint after ``epoch`` into storage: ``state.json`` already
    written (its epoch and step advanced), ``model.safetensors`` cut short."""
    old = run / f"checkpoint_epoch_{epoch - 1:05d}"
    new = run / f"checkpoint_epoch_{epoch:05d}"
    shutil.copytree(old, new)
    state = json.loads((new / "state.json").read_text())
    state.update(epoch=epoch, step=state["step"] + 3)
    (new / "state.json").write_text(json.dumps(state))
    model = (new / "model.safetensors").read_bytes()
    (new / "model.safetensors").write_bytes(model[: len(model) * 95 // 100])


def test_ddp_two_workers_checkpoint_and_resume(ray_local, small_root, tmp_path):
    from mediar_ray.train.config import ConfigError
    from mediar_ray.train.loop import prepare_data, run_training
    from mediar_ray.train.stream import plan_stream

    storage = tmp_path / "runs"
    first = run_training(_config(small_root, storage, epochs=5), max_epochs_this_run=3)
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

    # Killed while copying the checkpoint of epoch 3 (state.json there, the model cut
    # short). The old driver trusted the state.json and planned epochs 4..4 while the
    # workers restored Ray's epoch-2 checkpoint and trained epoch 3 on epoch 4's batches.
    _cut_copy(run, 3)
    second = run_training(_config(small_root, storage, epochs=5))
    assert second["resumed_from"] == 3 and second["ran"] == 2
    states = _states(run)
    assert sorted(states) == [2, 3, 4]  # run.keep_checkpoints: 3
    assert states[3]["step"] == states[2]["step"] + 3 == 4 * 3
    assert states[4]["step"] == 5 * 3
    # epoch 3 was trained on the batches planned for epoch 3
    cfg = _config(small_root, storage, epochs=5)
    plan = plan_stream(cfg, prepare_data(cfg).clusters, 0, 2, 0)
    planned = sorted(
        f"main:{i}" for r in plan.rows if r["epoch"] == 3 for _, i in json.loads(r["items"])
    )
    trained = sorted(
        sum(
            (
                json.loads((run / "checkpoint_epoch_00003" / f"seen_rank{r}.json").read_text())
                for r in (0, 1)
            ),
            [],
        )
    )
    assert trained == planned
    # the resumed epoch runs at the learning rate the interrupted run would have used
    assert states[3]["lr"] == pytest.approx(states[2]["next_lr"], rel=1e-12)
    assert states[3]["lr"] == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 5)))
    path, state = latest_checkpoint(str(run))
    assert state["epoch"] == 4 and path.endswith("checkpoint_epoch_00004")
    third = run_training(_config(small_root, storage, epochs=5))
    assert third["ran"] == 0  # finished runs are not trained again
    assert np.isfinite(states[4]["loss"])
    # the loss reported is the mean over the two workers, not rank 0's
    for state in states.values():
        assert len(state["loss_ranks"]) == 2
        assert state["loss"] == pytest.approx(np.mean(state["loss_ranks"]), rel=1e-12)

    # The same name with another config is refused before Ray Train starts (it used to
    # resume silently); --overwrite deletes the run instead.
    other = _config(small_root, storage, epochs=5)
    other.augment.crop = 96
    with pytest.raises(ConfigError, match="augment.crop.*new --name, or --overwrite"):
        run_training(other)
    from mediar_ray.train.preflight import check_run_name, pairs_fingerprint

    train = prepare_data(other).train
    check_run_name(str(run), other, pairs_fingerprint(train), overwrite=True)
    assert not run.exists()
