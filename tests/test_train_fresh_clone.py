"""The README's training command, run from a fresh clone (issue 39): the committed
config and modality table must work from any checkout whose ../shared holds the data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_train_command_from_a_fresh_clone(tmp_path: Path, data_dir: Path) -> None:
    """``git clone`` of this commit into a new folder beside a ``shared/`` that links to
    the data, then ``mediar-ray train --config configs/cpu_small.yaml`` for one short
    epoch (the clone's config cut to 2 steps per worker): it ends with a whole
    checkpoint. The old table, keyed by /work/main/../shared/data/..., found none of
    the clone's images."""
    from mediar_ray.train.checkpoint import latest_checkpoint

    clone = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    subprocess.run(["git", "checkout", "-q", head], cwd=clone, check=True)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(data_dir)
    config = clone / "configs" / "cpu_small.yaml"
    data = yaml.safe_load(config.read_text())
    data["run"]["max_steps_per_epoch"] = 2
    data["optim"]["warmup_epochs"] = 0  # one epoch in all
    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": str(clone)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mediar_ray.cli",
            "train",
            "--config",
            "configs/cpu_small.yaml",
            "--epochs",
            "1",
            "--storage-path",
            str(tmp_path / "runs"),
        ],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert summary["epochs_done"] == 1 and summary["ran"] == 1
    path, state = latest_checkpoint(str(tmp_path / "runs" / "cpu_small"))
    assert state["epoch"] == 0 and path.endswith("checkpoint_epoch_00000")
    assert state["config"]["model"]["encoder_name"] == "mit_b0"
