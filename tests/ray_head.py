"""A real Ray head node for tests, started with ``ray start --head --block``.

The head's dashboard (and so the job-submission API) listens on loopback only. Terminating
the blocking ``ray start`` process stops every Ray process it started, so tests never
run ``ray stop`` (which would stop other Ray instances of the same user).
"""

from __future__ import annotations

import os
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
from typing import Iterator


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
def ray_head(num_cpus: int = 2, env: dict[str, str] | None = None) -> Iterator[RayHead]:
    """Start a Ray head on loopback; yields its addresses; stops it on exit."""
    port, dash = free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="ray_", dir="/tmp")  # short path: unix socket limits
    log = Path(tmp) / "ray_start.log"
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        f"--port={port}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--temp-dir={tmp}", "--disable-usage-stats",
    ]
    # Loopback-only test cluster: no token auth, so `ray job submit` needs no token.
    full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)
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
