"""Checks of a training run that need no Ray Train: done before the workers start, so a
run that cannot work ends at once with one line naming the option and the fix.

- :func:`resolve_model_init`: ``model.init`` exists, its stored model settings fill the
  model keys the config leaves out, and the weights fit the model.
- :func:`check_storage`: ``run.storage_path`` can be written.
- :func:`check_run_name`: a run of this name holds checkpoints of the same config and data.
- :func:`check_resources`: the Ray cluster can hold the workers and the loader (on an
  autoscaling cluster: waits at most ``run.resource_timeout`` seconds for nodes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import struct
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec

from mediar_ray.errors import UserError
from mediar_ray.train.config import ConfigError

__all__ = [
    "ResourceNeeds",
    "TrainResourceError",
    "check_resources",
    "check_run_name",
    "check_storage",
    "pairs_fingerprint",
    "resolve_model_init",
    "resource_problem",
]

log = logging.getLogger("mediar_ray.train")

#: Model keys a checkpoint stores (mediar_ray.model.model_params) that the config sets.
MODEL_KEYS = ("encoder_name", "decoder_channels", "decoder_pab_channels")


class TrainResourceError(UserError):
    """The Ray cluster cannot give the workers or the loader what the run asks for."""


# --------------------------------------------------------------------------- model.init


def _safetensors_header(url: str) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor shapes and ``__metadata__``)."""
    with fsspec.open(url, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def _init_header(url: str) -> dict[str, Any] | None:
    """The safetensors header of ``model.init`` (None for a .pth state_dict).

    Raises
    ------
    ConfigError
        The file does not exist or its header does not parse.
    """
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise ConfigError(
            f"model.init: {url} does not exist; give the path of a .safetensors "
            "or .pth checkpoint (relative to the folder you run from)"
        )
    if not url.endswith(".safetensors"):
        return None
    try:
        return _safetensors_header(url)
    except (OSError, ValueError, struct.error) as err:
        raise ConfigError(
            f"model.init: {url} is not a readable safetensors file ({err}); "
            "download or copy it again"
        ) from None


def _shapes_that_differ(params: dict[str, Any], header: dict[str, Any]) -> list[str]:
    """Tensor names whose shape in ``header`` differs from a model built with ``params``,
    and names missing on one side. (The model is built on the CPU: smp's encoders call
    ``.item()`` while they are built, which the meta device cannot.)"""
    from mediar_ray.model import build_model

    expected = {k: tuple(v.shape) for k, v in build_model(**params).state_dict().items()}
    stored = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    return sorted(k for k in set(expected) | set(stored) if expected.get(k) != stored.get(k))


def resolve_model_init(cfg: Any) -> Any:
    """``cfg`` with its model keys filled from ``model.init``'s stored settings.

    Keys the config file set itself win over the checkpoint's; when one differs, the
    conflict is named, and when the weights then do not fit the model the run is refused
    here rather than in every worker.

    Raises
    ------
    ConfigError
        ``model.init`` is missing or unreadable, or its weights do not fit the model.
    """
    init = cfg.model.init
    if not init:
        return cfg
    header = _init_header(init)
    if header is None:
        return cfg
    meta = header.get("__metadata__") or {}
    stored = json.loads(meta.get("mediar_ray_model_params", "{}"))
    given = getattr(cfg.model, "_given", frozenset(MODEL_KEYS))
    fill = {k: stored[k] for k in MODEL_KEYS if k in stored and k not in given}
    conflicts = [
        f"model.{k} = {getattr(cfg.model, k)!r} but the checkpoint has {stored[k]!r}"
        for k in MODEL_KEYS
        if k in stored and k in given and getattr(cfg.model, k) != stored[k]
    ]
    model = dataclasses.replace(cfg.model, **fill)
    model._given = given
    params = {k: getattr(model, k) for k in MODEL_KEYS}
    wrong = _shapes_that_differ(params, header)
    if wrong:
        why = (
            "; ".join(conflicts) + ": remove those keys to use the checkpoint's own"
            if conflicts
            else "set model.encoder_name, decoder_channels and "
            "decoder_pab_channels to those it was trained with"
        )
        raise ConfigError(
            f"model.init {init} does not fit the model {params} "
            f"({len(wrong)} tensors differ, e.g. {wrong[0]}): {why}"
        )
    for conflict in conflicts:
        log.warning("model.init %s: %s; the config's value is used", init, conflict)
    return dataclasses.replace(cfg, model=model)


# --------------------------------------------------------------------------- storage


def check_storage(url: str) -> None:
    """Create ``url`` (``run.storage_path``) if needed and write and delete a probe file.

    Raises
    ------
    ConfigError
        The folder or bucket cannot be created or written (read-only file system, no
        permission, a file in the way, wrong credentials).
    """
    from mediar_ray.io import describe_error, safe_url

    fs, root = fsspec.core.url_to_fs(url)
    probe = f"{root.rstrip('/')}/.mediar_ray_write_test_{uuid.uuid4().hex}"
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as err:  # noqa: BLE001 - any failure means: cannot be written
        raise ConfigError(
            f"run.storage_path {safe_url(url)} cannot be written "
            f"({describe_error(err)}): give a writable folder or bucket "
            "with --storage-path"
        ) from None


# --------------------------------------------------------------------------- run name


def pairs_fingerprint(pairs: Sequence[Any]) -> str:
    """SHA-256 (hex, 16 digits) of the sorted (image, label) paths of ``pairs``."""
    text = "\n".join(sorted(f"{p.image}\t{p.label}" for p in pairs))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a config that make a run what it is: all but ``run`` (where and on
    what it runs), ``name``, ``data.strict``, ``optim.epochs`` (a schedule may be
    lengthened) and ``model.init`` (a resumed run loads its own weights; the path
    differs between checkouts)."""
    out = {k: v for k, v in config.items() if k not in ("run", "name")}
    out["model"] = {k: v for k, v in (out.get("model") or {}).items() if k != "init"}
    out["optim"] = {k: v for k, v in (out.get("optim") or {}).items() if k != "epochs"}
    out["data"] = {k: v for k, v in (out.get("data") or {}).items() if k != "strict"}
    return json.loads(json.dumps(out, default=str))  # JSON turns int keys into str


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for k in sorted(set(old) | set(new), key=str)
            for d in _differences(old.get(k), new.get(k), f"{path}{k}.")
        ]
    return [] if old == new else [path.rstrip(".")]


def check_run_name(run_url: str, cfg: Any, fingerprint: str, *, overwrite: bool = False) -> None:
    """Refuse to resume a run whose stored config or pairs differ from this one.

    ``fingerprint``: :func:`pairs_fingerprint` of this run's training pairs. With
    ``overwrite`` the run's folder is deleted instead (the run starts again).

    Raises
    ------
    ConfigError
        A checkpoint of this run was made with another config or other pairs.
    """
    from mediar_ray.io import safe_url
    from mediar_ray.train.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_url)
    if latest is None:
        return
    state = latest[1]
    differ = _differences(_comparable(state.get("config") or {}), _comparable(cfg.to_dict()))
    if state.get("pairs") not in (None, fingerprint):
        differ.append("training pairs")
    if not differ:
        return
    if overwrite:
        log.warning(
            "--overwrite: deleting run %s (made with a different %s)",
            safe_url(run_url),
            ", ".join(differ),
        )
        fs, path = fsspec.core.url_to_fs(run_url)
        fs.rm(path, recursive=True)
        return
    raise ConfigError(
        f"run {cfg.name} in {safe_url(run_url)} was made with a different "
        f"config or data ({', '.join(differ[:5])}"
        f"{' ...' if len(differ) > 5 else ''}): give a new --name, or "
        "--overwrite to delete it and start again"
    )


# --------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class ResourceNeeds:
    """What a run asks of the cluster: ``workers`` training workers of ``worker_cpus``
    CPUs and ``worker_gpus`` GPUs each, ``loaders`` loader actors of ``loader_cpus``."""

    workers: int
    worker_cpus: float
    worker_gpus: float
    loaders: int
    loader_cpus: float

    @classmethod
    def of(cls, run: Any) -> ResourceNeeds:
        return cls(
            run.num_workers,
            run.cpus_per_worker,
            1.0 if run.use_gpu else 0.0,
            run.loader_workers,
            run.loader_cpus,
        )


def resource_problem(needs: ResourceNeeds, nodes: Sequence[dict[str, float]]) -> str | None:
    """Why ``nodes`` (each a Ray resource dict: "CPU", "GPU") cannot hold the run, or None.

    Places the workers, then the loader actors, on the nodes first-fit (Ray Train and
    Ray Data hold them for the whole run, so a run that does not fit waits forever).
    """
    eps = 1e-6
    free = [[n.get("CPU", 0.0), n.get("GPU", 0.0)] for n in nodes]
    gpus = sum(g for _, g in free)
    if needs.worker_gpus and max((g for _, g in free), default=0) < needs.worker_gpus:
        return (
            f"--use-gpu: this Ray cluster has {gpus:g} GPUs; run without --use-gpu "
            "(run.use_gpu: false) or on a cluster with GPU nodes"
        )
    asks = [(needs.worker_cpus, needs.worker_gpus)] * needs.workers + [
        (needs.loader_cpus, 0.0)
    ] * needs.loaders
    for cpus, gpu in asks:
        node = next((n for n in free if n[0] + eps >= cpus and n[1] + eps >= gpu), None)
        if node is None:
            total = sum(n.get("CPU", 0.0) for n in nodes)
            want = needs.workers * needs.worker_cpus + needs.loaders * needs.loader_cpus
            what = (
                f"{needs.workers} GPU(s) on nodes with {needs.worker_cpus:g} CPUs free"
                if gpu
                else f"{want:g} CPUs"
            )
            return (
                f"--num-workers {needs.workers} x run.cpus_per_worker "
                f"{needs.worker_cpus:g} + run.loader_workers {needs.loaders} x "
                f"run.loader_cpus {needs.loader_cpus:g} need {what}, but this Ray "
                f"cluster has {total:g} CPUs and {gpus:g} GPUs: lower --num-workers, "
                "run.cpus_per_worker or run.loader_cpus"
            )
        node[0] -= cpus
        node[1] -= gpu
    return None


def _alive_nodes() -> list[dict[str, float]]:
    """Resources of the nodes of the connected Ray cluster; before Ray is started in this
    process (no RAY_ADDRESS), the one node ``ray.init`` will start: this machine's CPUs
    (as Ray counts them, within a container's limit) and CUDA GPUs."""
    import os

    import ray

    if ray.is_initialized():
        return [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if os.environ.get("RAY_ADDRESS"):
        raise RuntimeError("connect to the cluster (ensure_ray) before checking it")
    import torch

    try:
        from ray._private.utils import get_num_cpus

        cpus = float(get_num_cpus())
    except Exception:  # noqa: BLE001 - another Ray version
        cpus = float(os.cpu_count() or 1)
    return [{"CPU": cpus, "GPU": float(torch.cuda.device_count())}]


def check_resources(run: Any, *, poll_seconds: float = 5.0) -> None:
    """Check that the Ray cluster can hold the run's workers and loader.

    Call it before ``ensure_ray`` where Ray would start in this process (the machine is
    checked, and nothing starts), after it where RAY_ADDRESS names a cluster. On a
    fixed cluster a run that does not fit is refused at once; where an autoscaler
    can add nodes, waits up to ``run.resource_timeout`` seconds (logging what it waits
    for) and then refuses.

    Raises
    ------
    TrainResourceError
        The cluster cannot hold the run (one line naming the options to change).
    """
    from mediar_ray.pipeline.cluster import autoscaler_present

    needs = ResourceNeeds.of(run)
    problem = resource_problem(needs, _alive_nodes())
    if problem is None:
        return
    import ray

    if not ray.is_initialized() or not autoscaler_present():
        raise TrainResourceError(problem + " (no autoscaler can add nodes)")
    log.info(
        "waiting up to %.0f s (run.resource_timeout) for the autoscaler: %s",
        run.resource_timeout,
        problem,
    )
    deadline = time.monotonic() + run.resource_timeout
    while time.monotonic() < deadline:
        time.sleep(poll_seconds)
        problem = resource_problem(needs, _alive_nodes())
        if problem is None:
            return
    raise TrainResourceError(
        f"after waiting {run.resource_timeout:.0f} s "
        f"(run.resource_timeout) for the autoscaler: {problem}"
    )
