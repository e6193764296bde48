"""Leases: which job is working on which slide of an output root.

Two jobs started on the same output root must not work on the same slide: the one that
finishes first removes the slide's scratch under the other. Before a job plans a slide it
claims the slide's lease, ``OUTPUT/.scratch/leases/<name>.json``, and refreshes the lease's
heartbeat while the slide is in flight. A slide whose lease another job holds with a
recent heartbeat is left to that job and reported as "in progress elsewhere"; a lease
whose heartbeat is older than :data:`LEASE_TTL` belongs to a dead job and is taken over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["HEARTBEAT_EVERY", "LEASE_TTL", "Leases"]

log = logging.getLogger("mediar_ray.slides")

#: Seconds between heartbeats of a held lease.
HEARTBEAT_EVERY = 20.0
#: A lease whose heartbeat is older than this (seconds) is stale: its job is dead.
LEASE_TTL = 120.0


@dataclass
class Leases:
    """The leases one job holds on the slides of ``output``."""

    output: str
    job: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    ttl: float = LEASE_TTL
    held: dict[str, float] = field(default_factory=dict)  # name -> last heartbeat written

    def url(self, name: str) -> str:
        """The URL of slide ``name``'s lease file (under ``output/.scratch/leases/``)."""
        return f"{self.output.rstrip('/')}/.scratch/leases/{name}.json"

    def read(self, name: str) -> dict | None:
        """The lease of slide ``name``, or None (none, or unreadable: free to take)."""
        try:
            with fsspec.open(self.url(name), "r") as f:
                lease = json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return None
        return lease if isinstance(lease, dict) else None

    def holder(self, name: str) -> str | None:
        """The job holding a live lease on ``name`` other than this one, else None."""
        lease = self.read(name)
        if lease is None or lease.get("job") == self.job:
            return None
        if time.time() - float(lease.get("heartbeat", 0)) > self.ttl:
            return None
        return str(lease.get("job"))

    def _write(self, name: str, exclusive: bool) -> bool:
        """Write this job's lease; with ``exclusive``, only if there is none (local disks:
        an exclusive create; object stores: write, then read back who won)."""
        now = time.time()
        text = json.dumps({"job": self.job, "heartbeat": now})
        fs, path = fsspec.core.url_to_fs(self.url(name))
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            if exclusive:
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as f:
                    f.write(text)
            else:
                tmp = f"{path}.{self.job}.tmp"
                with open(tmp, "w") as f:
                    f.write(text)
                os.replace(tmp, path)
        else:
            with fs.open(path, "w") as f:
                f.write(text)
        self.held[name] = now
        return True

    def claim(self, name: str) -> str | None:
        """Take the lease of slide ``name``; returns None when taken, else the job that
        holds it (alive: its heartbeat is recent)."""
        holder = self.holder(name)
        if holder is not None:
            return holder
        if self.read(name) is None and self._write(name, exclusive=True):
            return None
        # A stale lease (or one made between our read and write): take it over, then
        # check that no other job did the same at the same moment.
        if self.holder(name) is not None:
            return self.holder(name)
        self._write(name, exclusive=False)
        lease = self.read(name)
        if lease is not None and lease.get("job") != self.job:
            self.held.pop(name, None)
            return str(lease.get("job"))
        return None

    def beat(self, active: Iterable[str], *, grace: float = 5.0) -> None:
        """Refresh the heartbeat of the leases of ``active`` slides, and release the others
        held for more than ``grace`` seconds (their slides ended)."""
        now = time.time()
        active = set(active)
        for name, last in list(self.held.items()):
            if name in active:
                if now - last >= HEARTBEAT_EVERY:
                    self._write(name, exclusive=False)
            elif now - last > grace:
                self.release(name)

    def release(self, name: str) -> None:
        """Give up the lease of ``name`` (if it is still this job's)."""
        self.held.pop(name, None)
        lease = self.read(name)
        if lease is not None and lease.get("job") == self.job:
            fs, path = fsspec.core.url_to_fs(self.url(name))
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass

    def release_all(self) -> None:
        """Give up every lease this job holds (see :meth:`release`)."""
        for name in list(self.held):
            self.release(name)

    def keep_alive(
        self, active: Callable[[], Iterable[str]], every: float = 5.0
    ) -> Callable[[], None]:
        """Beat in a background thread every ``every`` seconds with ``active()`` (the
        names of the slides in flight); returns a function that stops it and releases
        every lease this job holds."""
        stop = threading.Event()

        def names() -> list[str]:
            for _ in range(10):  # the driver may change the dict while it is copied
                try:
                    return list(active())
                except RuntimeError:
                    continue
            return list(self.held)  # keep everything alive this round

        def loop() -> None:
            while not stop.wait(every):
                try:
                    self.beat(names())
                except Exception as err:  # noqa: BLE001 - a missed beat is retried
                    log.warning("lease heartbeat failed (%s); retrying", type(err).__name__)

        thread = threading.Thread(target=loop, name="mediar-leases", daemon=True)
        thread.start()

        def end() -> None:
            stop.set()
            thread.join()
            self.release_all()

        return end
