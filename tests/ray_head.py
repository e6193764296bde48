"""A real Ray head node for tests, started with ``ray start --head --block``.

The head's dashboard (and so the job-submission API) listens on loopback only. Terminating
the blocking ``ray start`` process stops every Ray process it started, so tests never
run ``ray stop`` (which would stop other Ray instances of the same user); processes of
the test cluster that outlive it (found by the cluster's own temp dir) are killed by pid.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    gcs_address: str  # for ray.init(address=...)
    dashboard_url: str  # for `ray job submit --address ...`
    temp_dir: str
    log: Path


@contextmanager
def ray_head(
    num_cpus: int = 2,
    env: dict[str, str] | None = None,
    port: int | None = None,
    temp_dir: str | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[RayHead]:
    """Start a Ray head on loopback; yields its addresses; stops it on exit."""
    port, dash = port or free_port(), free_port()
    tmp = temp_dir or new_temp_dir()
    log = Path(tmp) / "ray_start.log"
    cmd = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        # the agent's default port (52365) is taken by any other Ray head on the machine
        f"--dashboard-agent-listen-port={free_port()}",
        f"--temp-dir={tmp}",
        "--disable-usage-stats",
        *extra_args,
    ]
    # Loopback-only test cluster: no token auth, so `ray job submit` needs no token.
    full_env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        **(env or {}),
    }
    full_env.pop("RAY_ADDRESS", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for(url, proc, log)
        yield RayHead(f"127.0.0.1:{port}", url, tmp, log)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_leftovers(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def new_temp_dir() -> str:
    return tempfile.mkdtemp(prefix="ray_", dir="/tmp")  # short path: unix socket limits


def driver_env(address: str) -> dict[str, str]:
    """The environment of a driver subprocess of the test cluster at ``address``.

    Authentication disabled like the test heads: a driver whose mode disagrees with its
    head's either has every actor it creates cancelled or cannot connect at all."""
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": address}


def kill_leftovers(temp_dir: str) -> list[int]:
    """SIGKILL the processes whose command line names this test cluster's temp dir (its
    raylets and workers all do); returns their pids. Other Ray instances are untouched."""
    mine, killed = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == mine:
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        cmdline = raw.replace(b"\0", b" ").decode("utf-8", "replace")
        if re.search(re.escape(temp_dir) + r"(/|\s|$)", cmdline):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except ProcessLookupError:
                pass
    return killed


def submit_job(
    head: RayHead, working_dir: Path, *entrypoint: str, timeout: float = 900, attempts: int = 5
) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir WORKING_DIR -- ENTRYPOINT`; waits for the job to end.

    The dashboard may answer before the head's job agent has registered (slow on a busy
    machine); it then refuses the job ("No available agent ... try again later") without
    starting it, and the submission is repeated.
    """
    cmd = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "job",
        "submit",
        "--address",
        head.dashboard_url,
        "--working-dir",
        str(working_dir),
        "--",
        *entrypoint,
    ]
    for _ in range(attempts):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in result.stderr:
            break
        time.sleep(3)
    return result


def _wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Ray dashboard did not come up at {url}:\n{log.read_text()}")
