"""Shared pytest fixtures: paths to the real data and the MEDIAR reference outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Every Ray cluster a test starts listens on loopback only, with token authentication
# off. Set for the whole session because a local ``ray.init()`` with the mode unset turns
# it on in this process's environment, and heads or drivers started after it (by
# ray.cluster_utils or subprocesses) would then disagree with earlier ones.
os.environ["RAY_AUTH_MODE"] = "disabled"

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
FIXTURES = SHARED / "fixtures" / "mediar_reference"


_SESSION: list[pytest.Session] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    _SESSION.append(session)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the test process with pytest's exit status once pytest is done with it.

    CI twice ended in a segmentation fault after every test had passed and the summary
    was printed (2026-12-02, exit code 139), the second time with ``PYTHONFAULTHANDLER=1``
    and yet no Python stack: the crash came after Python had torn faulthandler down, in the
    C++ static destructors that ``exit()`` runs while threads of the native libraries
    this session loaded (Ray's core worker and gRPC after many ``ray.init``/
    ``ray.shutdown`` cycles, torch, numba) are still alive. Ray ends its own worker
    processes with ``os._exit`` for the same reason. The ``atexit`` handlers still run
    first, with faulthandler on (Ray's among them: it shuts down a Ray that in-process
    jobs left connected): only the native teardown is skipped. The job commands
    are not affected (their tests run them in subprocesses and check exit codes)."""
    if not _SESSION:
        return
    import atexit
    import sys

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(_SESSION[0].exitstatus))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert DATA.is_dir(), f"real data expected at {DATA} (clone beside ../shared)"
    return DATA


@pytest.fixture(scope="session")
def ref_dir() -> Path:
    assert FIXTURES.is_dir(), f"MEDIAR reference fixtures expected at {FIXTURES}"
    return FIXTURES


@pytest.fixture()
def dsb_config(data_dir: Path, tmp_path: Path):
    """make(n) -> (config, root): a training config over the first ``n`` real DSB2018
    pairs, copied into ``root`` (images/, labels/; source "dsb"), every 2nd held out."""
    import shutil

    import yaml

    def make(n: int) -> tuple[Path, Path]:
        root = tmp_path / "ds" / "dsb"
        (root / "images").mkdir(parents=True)
        (root / "labels").mkdir()
        for lab in sorted((data_dir / "dsb2018/labels").glob("*_label.tiff"))[:n]:
            stem = lab.name[: -len("_label.tiff")]
            shutil.copy(next((data_dir / "dsb2018/images").glob(stem + ".*")), root / "images")
            shutil.copy(lab, root / "labels")
        config = tmp_path / "cfg.yaml"
        config.write_text(
            yaml.safe_dump({"name": "t", "data": {"roots": [str(root)], "holdout_every": 2}})
        )
        return config, root

    return make


@pytest.fixture(scope="module")
def single_threaded():
    """Run a module's tests with one torch and one numba thread (``pytestmark =
    pytest.mark.usefixtures("single_threaded")``). On this shared 2-core machine the
    OpenMP threads of numba's parallel loops keep spinning after a loop ends, and small
    torch/numpy operations that follow run ~20x slower; one thread each avoids it."""
    import numba
    import torch

    before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    numba.set_num_threads(before[1])


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs for a module's tests (the machine's size)."""
    import logging

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_ray():
    """An S3 server on loopback (moto) with buckets ``lab`` and ``results``, and a local
    Ray of 2 CPUs whose workers get its credentials through the runtime environment, as
    on a cluster; yields (boto3 client, environment)."""
    import logging

    import ray
    from s3_server import environment, s3_client, s3_server

    with s3_server() as env, environment(env):
        client = s3_client(env, "lab", "results")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": env},
        )
        yield client, env
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny(ref_dir: Path) -> tuple[str, dict]:
    """The small reference checkpoint of the fixtures and its model parameters."""
    import json

    params = json.loads((ref_dir / "index.json").read_text())["model_params"]
    return str(ref_dir / "model_a.pth"), params
