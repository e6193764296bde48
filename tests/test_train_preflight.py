"""What a training run checks before Ray Train starts (issue 43): resources the machine
cannot give, a storage path that cannot be written, ``model.init`` filling or refusing
the model section, and the order in which a worker builds model and optimizer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mediar_ray.train.config import ConfigError, TrainConfig, load_config
from mediar_ray.train.preflight import resolve_model_init

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "encoder_name": "mit_b0",
    "decoder_channels": [32, 16, 16, 16, 16],
    "decoder_pab_channels": 16,
}


def _train_cli(config: Path, *flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "mediar_ray.cli", "train", "--config", str(config), *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=config.parent,
        check=False,
    )


def _small_config(dsb_config, tmp_path: Path, **run) -> Path:
    config, _ = dsb_config(4)
    data = yaml.safe_load(config.read_text())
    data.update(
        {
            "model": TINY,
            "augment": {"crop": 64},
            "optim": {"epochs": 1},
            "run": {"storage_path": str(tmp_path / "runs"), **run},
        }
    )
    config.write_text(yaml.safe_dump(data))
    return config


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_workers_the_machine_cannot_hold_exit_2_before_ray_starts(dsb_config, tmp_path):
    """``--num-workers`` more than the machine's CPUs (1 CPU each + the loader's) used to
    wait forever for "(pending: 1 CPU)"; ``--use-gpu`` without GPUs retried the worker
    group's start without limit. Both now end at once with one line naming the option.
    (On the old code both subprocesses run into the timeout.)"""
    config = _small_config(dsb_config, tmp_path)
    too_many = str((os.cpu_count() or 1) + 1)
    line = _one_error_line(_train_cli(config, "--num-workers", too_many, timeout=90))
    assert f"--num-workers {too_many}" in line and "CPUs" in line
    if torch.cuda.is_available():
        return  # the GPU half needs a machine without GPUs
    line = _one_error_line(_train_cli(config, "--use-gpu", timeout=90))
    assert "--use-gpu" in line and "0 GPUs" in line
    assert not (tmp_path / "runs" / "t").exists()  # nothing started


def test_storage_path_that_cannot_be_written_is_one_line(dsb_config, tmp_path):
    """A read-only storage path used to end in exit 1 and an 80-line Ray traceback."""
    config = _small_config(dsb_config, tmp_path)
    line = _one_error_line(_train_cli(config, "--storage-path", "/proc/mediar_runs"))
    assert "run.storage_path /proc/mediar_runs cannot be written" in line
    assert "--storage-path" in line


def test_model_init_fills_the_model_section_from_the_checkpoint(tmp_path):
    """``model: {init: configs/cpu_small_stage1.safetensors}`` alone used to build the
    default mit_b5 and fail "does not fit" in every worker; now the checkpoint's own
    settings fill the keys the config leaves out, and the weights load."""
    from mediar_ray.train.loop import build_training

    init = str(REPO / "configs" / "cpu_small_stage1.safetensors")
    path = tmp_path / "init.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "model": {"init": init}}))
    cfg = resolve_model_init(load_config(str(path)))
    assert cfg.model.encoder_name == "mit_b0"
    assert cfg.model.decoder_channels == [64, 32, 16, 16, 16]
    assert cfg.model.decoder_pab_channels == 16
    model = build_training(cfg, "cpu")[0]
    from safetensors.torch import load_file

    stored = load_file(init)
    assert torch.equal(model.state_dict()["cellprob_head.3.bias"], stored["cellprob_head.3.bias"])


def test_model_init_conflict_and_missing_file_are_named(tmp_path):
    init = str(REPO / "configs" / "cpu_small_stage1.safetensors")
    path = tmp_path / "init.yaml"
    path.write_text(
        yaml.safe_dump({"name": "x", "model": {"init": init, "encoder_name": "mit_b1"}})
    )
    with pytest.raises(
        ConfigError,
        match=r"model.encoder_name = 'mit_b1' but the checkpoint "
        r"has 'mit_b0'.*remove those keys",
    ):
        resolve_model_init(load_config(str(path)))
    missing = TrainConfig.from_dict({"name": "x", "model": {"init": str(tmp_path / "no.pth")}})
    with pytest.raises(ConfigError, match="model.init: .*no.pth does not exist"):
        resolve_model_init(missing)


def test_model_is_on_its_device_before_the_optimizer_state_is_loaded(tmp_path):
    """A resumed worker must move the model before AdamW is made and its state loaded:
    ``Optimizer.load_state_dict`` puts each moment on its parameter's device, so moving
    afterwards (the old order) left them on the CPU and the first GPU step failed. The
    'meta' device stands in for a GPU: every moment must follow the parameters there."""
    from mediar_ray.train.checkpoint import save_training_state
    from mediar_ray.train.loop import build_training, train_step

    cfg = TrainConfig.from_dict({"name": "m", "model": TINY, "optim": {"epochs": 3}})
    model, optimizer, scheduler, _, _ = build_training(cfg, "cpu")
    batch = {
        "image": torch.rand(1, 3, 64, 64),
        "flows": torch.zeros(1, 2, 64, 64),
        "cell": torch.zeros(1, 64, 64),
        "valid": torch.ones(1, 64, 64),
    }
    train_step(model, optimizer, batch)
    folder = tmp_path / "checkpoint_epoch_00000"
    save_training_state(folder, model, optimizer, scheduler, {"epoch": 0, "step": 1})
    model, optimizer, _, epoch, step = build_training(
        cfg, "meta", resume_from=str(folder), stream_start=1
    )
    assert (epoch, step) == (1, 1)
    assert next(model.parameters()).device.type == "meta"
    moments = [
        (k, t.device.type)
        for st in optimizer.state.values()
        for k, t in st.items()
        if torch.is_tensor(t) and k != "step"
    ]  # AdamW keeps its step count on CPU
    assert len(moments) == 2 * len(list(model.parameters()))
    assert {device for _, device in moments} == {"meta"}


def test_resource_problem_places_workers_and_loader_on_nodes():
    """The arithmetic behind the check: workers, then loader actors, first-fit on nodes
    (the issue's cases: 2 x 1 CPU + 1 loader CPU on 2 cores does not fit; cpu_small's
    2 x 0.75 + 0.5 does; a worker cannot be split across two nodes)."""
    from mediar_ray.train.preflight import ResourceNeeds, resource_problem

    two_cores = [{"CPU": 2.0}]
    assert "need 3 CPUs" in resource_problem(ResourceNeeds(2, 1.0, 0.0, 1, 1.0), two_cores)
    assert "need 2.5 CPUs" in resource_problem(ResourceNeeds(2, 1.0, 0.0, 1, 0.5), two_cores)
    assert resource_problem(ResourceNeeds(2, 0.75, 0.0, 1, 0.5), two_cores) is None
    split = [{"CPU": 1.5}, {"CPU": 1.5}]
    assert resource_problem(ResourceNeeds(1, 2.0, 0.0, 1, 0.5), split) is not None
    assert resource_problem(ResourceNeeds(2, 1.0, 0.0, 1, 0.5), split) is None
    gpus = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert resource_problem(ResourceNeeds(2, 4.0, 1.0, 2, 1.0), gpus) is None
    assert "GPU" in resource_problem(ResourceNeeds(3, 4.0, 1.0, 1, 1.0), gpus)
    assert "--use-gpu" in resource_problem(ResourceNeeds(1, 1.0, 1.0, 1, 1.0), two_cores)


def test_autoscaling_cluster_wait_is_bounded(monkeypatch):
    """Where an autoscaler may add nodes the check waits, but only ``run.resource_timeout``
    seconds, then ends with one line saying what it waited for (a real one-CPU Ray; the
    autoscaler's presence is the only thing stood in for)."""
    import ray

    from mediar_ray.pipeline import cluster
    from mediar_ray.train.preflight import TrainResourceError, check_resources

    monkeypatch.setattr(cluster, "autoscaler_present", lambda: True)
    run = TrainConfig.from_dict(
        {"name": "x", "run": {"num_workers": 2, "resource_timeout": 1.0}}
    ).run
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(
            TrainResourceError,
            match=r"after waiting 1 s \(run.resource_timeout\)"
            r".*need 3 CPUs.*has 1 CPUs",
        ):
            check_resources(run, poll_seconds=0.2)
    finally:
        ray.shutdown()


def test_reused_name_with_other_data_is_refused(tmp_path, data_dir):
    """A run's ``--name`` reused with other pairs used to resume silently on them."""
    from mediar_ray.data.mapping import load_pairs
    from mediar_ray.train.checkpoint import save_training_state
    from mediar_ray.train.loop import build_training
    from mediar_ray.train.preflight import check_run_name, pairs_fingerprint

    pairs = load_pairs(roots=[str(data_dir / "dsb2018")])
    cfg = TrainConfig.from_dict({"name": "r", "model": TINY, "optim": {"epochs": 3}})
    model, optimizer, scheduler, _, _ = build_training(cfg, "cpu")
    run = tmp_path / "runs" / "r"
    save_training_state(
        run / "checkpoint_epoch_00000",
        model,
        optimizer,
        scheduler,
        {"epoch": 0, "step": 1, "config": cfg.to_dict(), "pairs": pairs_fingerprint(pairs)},
    )
    check_run_name(str(run), cfg, pairs_fingerprint(pairs))  # same run: resumes
    fewer = pairs_fingerprint(pairs[:-1])
    with pytest.raises(
        ConfigError,
        match=r"different config or data \(training pairs\): "
        "give a new --name, or --overwrite",
    ):
        check_run_name(str(run), cfg, fewer)
    check_run_name(str(run), cfg, fewer, overwrite=True)
    assert not run.exists()
