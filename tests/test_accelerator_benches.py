"""The accelerator benches run end to end on this machine's CPU in their quick form
(the figures themselves are taken by the lead on an idle machine; none is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path, timeout: int) -> dict:
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run(
        [sys.executable, *args, "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # about 2 min on 2 cores
def test_gpu_check_runs_on_a_cpu(tmp_path):
    """The same code as on a GPU, small sizes: every part runs or says why not."""
    result = _run(["bench/gpu_check.py", "--device", "cpu", "--quick"], tmp_path, 600)
    modes = {(r["mode"], r["batch"]) for r in result["forward"]}
    assert modes == {("fp32", 1), ("bf16", 1), ("fp32", 2), ("bf16", 2)}
    fp32 = [r for r in result["forward"] if r["mode"] == "fp32"]
    assert all(r["rel_err"] == 0.0 for r in fp32)  # exact fp32 against itself
    assert all(0 < r["rel_err"] < 0.1 for r in result["forward"] if r["mode"] == "bf16")
    assert result["ensemble"]["mp_per_s"] > 0
    slide = result["slide"]
    assert slide["run"] and "failed" not in slide and 0 < slide["all_actors_busy"] <= 1
    resume = result["train_resume"]
    assert resume["run"] and resume["loss_after_resume"] > 0
    oom = result["oom_tile"]  # batches of 16 halved down to the stand-in limit of 2; the
    # odd window left over runs alone, and a batch's size may change the last bits
    assert max(oom["forward_sizes_ran"]) == 2 and oom["rel_diff_vs_batch_2"] < 1e-5


@pytest.mark.slow  # under 3 min on 2 cores (the bench's --quick promise)
def test_accelerator_capacity_quick(tmp_path):
    result = _run(["bench/accelerator_capacity.py", "--quick"], tmp_path, 600)
    stages = result["stage_cpu_s_per_mp"]
    assert {
        "plan",
        "read_normalise",
        "partial_writes",
        "gather",
        "tracking",
        "relabel",
        "cell_table",
        "pyramids",
        "qc",
    } <= set(stages)
    assert all(v >= 0 for v in stages.values()) and stages["tracking"] > 0
    facts = result["slide_facts"]  # the stand-in's flows are real cells, found again
    assert facts["cells_found"] > 100 and facts["cells_in_flows"] > 100
    assert [r["mp_per_s"] for r in result["standin"]] == [1.0, 8.0]
    for row in result["standin"]:
        assert 0 < row["all_actors_busy"] <= 1 and row["achieved_mp_per_s"] > 0
    assert (
        float(result["cores_per_accelerator"]["8.0"])
        > float(result["cores_per_accelerator"]["1.0"])
        > 0
    )
