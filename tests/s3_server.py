"""A real S3 API server (moto's standalone server) on loopback, for s3:// tests.

Credentials reach s3fs only through the environment, as on a cluster with an instance
profile: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import os
import urllib.request
from contextlib import contextmanager
from typing import Iterator

from moto.server import ThreadedMotoServer
from ray_head import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret"}


@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """Start the server; yields the environment that points s3fs at it."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        **CREDENTIALS,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    # Every moto server in a process shares one in-memory backend: start each test's
    # server empty, or buckets of an earlier test show through.
    urllib.request.urlopen(
        urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST"),
        timeout=30,
    ).close()
    try:
        yield env
    finally:
        server.stop()


def s3_client(env: dict[str, str], *buckets: str):
    """A boto3 client of the server that ``env`` points at, with ``buckets`` created."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    for bucket in buckets:
        client.create_bucket(Bucket=bucket)
    return client


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block (and clear fsspec's cached filesystems)."""
    import fsspec

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.filesystem("s3").clear_instance_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        fsspec.filesystem("s3").clear_instance_cache()
