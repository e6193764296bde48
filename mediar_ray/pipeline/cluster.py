"""Connecting to Ray and checking, within seconds, that the cluster can run the job."""

from __future__ import annotations

import logging
import os

from mediar_ray.pipeline.options import SlideOptions

__all__ = ["ResourceError", "autoscaler_present", "check_resources", "ensure_ray"]

log = logging.getLogger("mediar_ray.slides")


class ResourceError(RuntimeError):
    """The cluster cannot provide what the job asks for (GPUs, CPUs per actor)."""


#: Seconds a Ray worker process may stay idle before the node stops it, on a local Ray
#: this job starts. Ray's default (1 s, once a node has as many workers as CPUs) stops the
#: CPU-stage workers whenever the model actors hold the cores for a moment, and each slide
#: of an archive of small images then paid a new worker process (Ray, numba, zarr,
#: pyarrow imports: about 3 CPU-seconds) for 0.2 s of work.
IDLE_WORKER_SECONDS = 300


def ensure_ray(dashboard: bool = True) -> None:
    """Connect to the cluster in RAY_ADDRESS, or start Ray in this process.

    A Ray started here keeps idle workers for :data:`IDLE_WORKER_SECONDS`; without
    ``dashboard`` it starts no dashboard (2-3 s less start-up and no background CPU; the
    job logs its own progress). A cluster's own settings are not touched: see
    ``cluster/README.md`` for the same setting on a cluster.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    local: dict = (
        {}
        if address
        else {
            "include_dashboard": dashboard,
            "_system_config": {"idle_worker_killing_time_threshold_ms": IDLE_WORKER_SECONDS * 1000},
        }
    )
    ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING, **local)


def autoscaler_present() -> bool:
    """True when an autoscaler that can add nodes watches this cluster (a v1 monitor with
    a cluster config, or autoscaler v2), so resources that no node has now may come.

    Every Ray head runs a monitor; without a cluster config it reports through a
    read-only provider whose node types are the nodes' own ids ("node_<id>"): that one
    adds nothing.
    """
    import json

    import ray
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        raw = _internal_kv_get("__autoscaling_status")  # the v1 monitor's report
    except Exception:  # noqa: BLE001 - no KV access: ask v2 below
        raw = None
    if raw:
        report = json.loads(raw).get("autoscaler_report") or {}
        types = report.get("node_type_mapping") or {}
        return bool(types) and any(t != f"node_{node}" for node, t in types.items())
    try:
        from ray._raylet import GcsClient
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

        address = ray.get_runtime_context().gcs_address
        reply = GetClusterStatusReply()
        reply.ParseFromString(GcsClient(address=address).get_cluster_status(timeout_s=5))
        return reply.autoscaling_state.autoscaler_state_version > 0
    except Exception:  # noqa: BLE001 - an older GCS without the v2 API
        return False


def check_resources(opts: SlideOptions) -> bool:
    """Check that some node can hold a model actor (its CPUs and GPUs).

    Returns False when one can now, True when none can yet but an autoscaler may add
    one (the caller then waits at most ``opts.resource_timeout`` for the first actor).

    Raises
    ------
    ResourceError
        No node can hold an actor and no autoscaler can add one (for example GPUs
        asked for on a machine without any).
    """
    import ray

    cpus, gpus = opts.actor_cpus(), opts.num_gpus_per_worker
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        if not autoscaler_present():
            _check_room_for_stages(opts, nodes)
        return False
    if autoscaler_present():
        log.info(
            "no node can hold a model actor yet (%s CPU, %s GPU): waiting up to %.0f s "
            "for the autoscaler",
            cpus,
            gpus,
            opts.resource_timeout,
        )
        return True
    total_gpus = sum(r.get("GPU", 0) for r in nodes)
    if gpus > 0 and max((r.get("GPU", 0) for r in nodes), default=0) < gpus:
        raise ResourceError(
            f"--num-gpus-per-worker {gpus:g}: no node of this Ray cluster has {gpus:g} GPU(s) "
            f"(GPUs in the cluster: {total_gpus:g}) and no autoscaler can add one; run "
            "without --num-gpus-per-worker on CPUs, or on a cluster with GPU nodes"
        )
    most = max((r.get("CPU", 0) for r in nodes), default=0)
    raise ResourceError(
        f"--cpus-per-worker {cpus:g}: no node of this Ray cluster has that many CPUs "
        f"(largest: {most:g}) and no autoscaler can add one; ask for fewer"
    )


def _check_room_for_stages(opts: SlideOptions, nodes: list[dict]) -> None:
    """The actors live for the whole job: if those that fit leave less than one CPU
    stage task's CPUs on a fixed cluster, no slide could ever be planned or finished."""
    cpus, gpus = opts.actor_cpus(), opts.num_gpus_per_worker
    fits = 0
    for r in nodes:
        per_node = int(r.get("CPU", 0) // cpus) if cpus else opts.max_workers
        if gpus:
            per_node = min(per_node, int(r.get("GPU", 0) // gpus))
        fits += per_node
    total = sum(r.get("CPU", 0) for r in nodes)
    held = min(fits, opts.max_workers) * cpus  # the pool may grow to its maximum
    if total - held < opts.cpus_per_task - 1e-9:
        raise ResourceError(
            f"--workers {opts.workers} x --cpus-per-worker {cpus:g} hold {held:g} of this "
            f"cluster's {total:g} CPUs, leaving less than --cpus-per-task "
            f"{opts.cpus_per_task:g} for planning and finishing slides; ask for fewer "
            "workers or CPUs per worker"
        )
