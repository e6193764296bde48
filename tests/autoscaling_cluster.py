"""An autoscaling Ray cluster on one machine: Ray's fake multi-node provider.

This is what ``ray.cluster_utils.AutoscalingCluster`` sets up, without its two problems
here: in ray 2.60 its ``start()`` and ``shutdown()`` run ``ray stop --force``, which stops
every Ray process of the user (other engineers' clusters on a shared machine), and its base
config file (``fake_multi_node/example.yaml``) is not shipped in the wheel. So the head is
started like :func:`ray_head.ray_head` (own process group, loopback, own temp dir) with
``RAY_FAKE_CLUSTER=1`` and an autoscaling config written here: the autoscaler (v1, in the
head's monitor process) launches worker "nodes" as local raylets with the resources of
their node type when tasks or actors wait for resources, and removes idle ones.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Any, Iterator

from ray_head import RayHead, free_port, new_temp_dir, ray_head

HEAD_TYPE = "ray.head.default"


def fake_cluster_config(
    gcs_address: str, worker_types: dict[str, Any], idle_timeout_minutes: float = 1.0
) -> dict[str, Any]:
    """A complete autoscaler config for the fake multi-node provider (no defaults are
    filled in by the monitor, so every key it reads is here)."""
    return {
        "cluster_name": "mediar-test",
        "max_workers": sum(t["max_workers"] for t in worker_types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "docker": {},
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,  # else the workers look for a GCS on port 6379
            "disable_launch_config_check": True,
            "disable_node_updaters": True,  # no ssh, no setup commands: local raylets
            "foreground_node_launch": True,
        },
        "auth": {"ssh_user": "ray"},
        "available_node_types": {
            HEAD_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            **worker_types,
        },
        "head_node_type": HEAD_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@contextmanager
def autoscaling_cluster(
    worker_types: dict[str, Any],
    env: dict[str, str] | None = None,
    idle_timeout_minutes: float = 1.0,
) -> Iterator[RayHead]:
    """A head with no CPUs (nothing runs on it but drivers) and an autoscaler that adds
    nodes of ``worker_types`` (``{name: {"resources": {...}, "node_config": {},
    "min_workers": 0, "max_workers": n}}``); stops head and workers on exit."""
    port, tmp = free_port(), new_temp_dir()
    config = fake_cluster_config(f"127.0.0.1:{port}", worker_types, idle_timeout_minutes)
    path = f"{tmp}/autoscaling.json"  # JSON is YAML
    with open(path, "w") as f:
        json.dump(config, f)
    fake_env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", **(env or {})}
    with ray_head(
        num_cpus=0,
        env=fake_env,
        port=port,
        temp_dir=tmp,
        extra_args=[f"--autoscaling-config={path}"],
    ) as head:
        yield head
