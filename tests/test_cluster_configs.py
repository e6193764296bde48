"""Cluster configs: the launcher YAML validates against Ray's own schema, and the KubeRay
manifests name the image, the entry point and their autoscaling settings."""

from __future__ import annotations

import importlib.util
import json
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


@pytest.fixture(scope="module")
def ray_schema():
    return json.loads((resources.files("ray") / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_launcher_config_validates_against_ray_schema(path, ray_schema):
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, ray_schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 for t in workers), "workers scale from zero"
    assert any("g5" in t["node_config"]["InstanceType"] for t in workers), "a GPU worker type"
    assert "AWS_SECRET_ACCESS_KEY" not in path.read_text()


def test_a_broken_launcher_config_is_caught(ray_schema):
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    config["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema)


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


@pytest.mark.parametrize("path", sorted((CLUSTER / "kuberay").glob("*.yaml")), ids=lambda p: p.name)
def test_kuberay_manifests(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    spec = _cluster_spec(doc)
    assert spec["enableInTreeAutoscaling"] is True
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        assert container["image"].endswith("mediar-ray:0.1.0")
        assert pod["spec"]["serviceAccountName"] == "mediar-ray"  # credentials via IRSA
        assert "env" not in container or not any("SECRET" in e["name"] for e in container["env"])
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 < group["maxReplicas"]
    if doc["kind"] == "RayJob":
        entry = doc["spec"]["entrypoint"].split()
        assert entry[0] == "python" and (Path(__file__).resolve().parents[1] / entry[1]).is_file()
        assert doc["spec"]["shutdownAfterJobFinishes"] is True


def _job_parser(script: str):
    """The argument parser a RayJob's entry point script would use."""
    import argparse
    import importlib.util

    if script == "jobs/train.py":  # flags of `mediar-ray train`, shared with the job
        from mediar_ray.commands.train import add_arguments

        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return parser
    spec = importlib.util.spec_from_file_location("job_script", CLUSTER.parent / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


@pytest.mark.parametrize(
    "path", sorted((CLUSTER / "kuberay").glob("rayjob-*.yaml")), ids=lambda p: p.name
)
def test_rayjob_entrypoint_parses_with_its_job(path):
    doc = yaml.safe_load(path.read_text())
    entry = doc["spec"]["entrypoint"].split()
    args = _job_parser(entry[1]).parse_args(entry[2:])  # exits (fails) on a bad flag
    assert doc["spec"]["runtimeEnvYAML"].strip().startswith("working_dir:")
    spec = doc["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "no work on the head"
    if entry[1] != "jobs/train.py":
        return
    # Ray Train on several nodes needs shared storage, and the GPU groups must be able to
    # grow to one GPU per training worker.
    assert args.storage_path.startswith("s3://") and args.use_gpu
    from mediar_ray.train.config import load_config

    load_config(str(CLUSTER.parent / args.config))  # shipped in the image, and valid
    gpus = sum(
        g["maxReplicas"]
        * int(
            g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
        )
        for g in spec["workerGroupSpecs"]
    )
    assert args.num_workers <= gpus
    assert doc["spec"]["backoffLimit"] >= 1  # a retried job resumes from the checkpoints


def _gpu_groups(doc: dict) -> int:
    """GPUs the manifest's worker groups can grow to."""
    return sum(
        g["maxReplicas"]
        * int(
            g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
        )
        for g in _cluster_spec(doc)["workerGroupSpecs"]
    )


@pytest.mark.parametrize(
    "path", sorted((CLUSTER / "kuberay").glob("rayjob-segment*.yaml")), ids=lambda p: p.name
)
def test_gpu_slide_job_names_the_released_ensemble(path, ref_dir, monkeypatch):
    """A GPU RayJob must segment with MEDIAR's released weights, not the bundled demo
    model: its entry point (with its config file) names both released checkpoints as
    URLs the workers can read, with the model parameters that build the released
    architecture (checked against the released state dict's shapes), one GPU per actor."""
    from mediar_ray.model import build_model
    from mediar_ray.weights import parse_model_config

    doc = yaml.safe_load(path.read_text())
    assert _gpu_groups(doc) >= 1, "a slide job manifest here is a GPU job"
    entry = doc["spec"]["entrypoint"].split()
    monkeypatch.chdir(CLUSTER.parent)  # the job runs from the working dir: configs/...
    spec = importlib.util.spec_from_file_location("job_script", CLUSTER.parent / entry[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(entry[2:])
    assert args.config and (CLUSTER.parent / args.config).is_file()
    from mediar_ray.pipeline.options import SlideOptions

    pool = SlideOptions(workers=args.workers)
    # elastic: one actor to start, at most one per GPU the cluster may add
    assert args.num_gpus_per_worker == 1 and pool.min_workers == 1
    assert pool.max_workers == _gpu_groups(doc)
    assert [w.rsplit("/", 1)[-1] for w in args.weights] == ["from_phase1.pth", "from_phase2.pth"]
    assert all(w.split("://", 1)[0] in ("s3", "gs", "https") for w in args.weights)
    assert not any("your-bucket" in w or "example" in w for w in args.weights)
    assert args.tta is True
    params = parse_model_config(args.model_config)
    expected = json.loads((ref_dir / "mit_b5_state_dict_shapes.json").read_text())
    built = {k: list(v.shape) for k, v in build_model(**params).state_dict().items()}
    assert built == expected


def test_nodes_install_nothing_and_the_image_pins_torch_and_cuda():
    """Nodes of different days must run the same software: the launcher runs the built
    image and installs nothing at node start; the image pins one torch/CUDA pair, checks
    it at build time and compiles the numba kernels into the image."""
    import re

    from mediar_ray.dynamics.warm import warm

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    assert config["docker"]["image"].endswith("mediar-ray:0.1.0")
    commands = [
        c
        for key in (
            "setup_commands",
            "head_setup_commands",
            "worker_setup_commands",
            "initialization_commands",
            "head_start_ray_commands",
            "worker_start_ray_commands",
        )
        for c in config.get(key, [])
    ]
    commands += [
        c
        for t in config["available_node_types"].values()
        for key in ("worker_setup_commands", "initialization_commands")
        for c in t.get(key, [])
    ]
    assert not any("pip" in c or "conda" in c for c in commands), commands
    assert "file_mounts" not in config or not config["file_mounts"]
    docker = (CLUSTER / "Dockerfile").read_text()
    torch_pin = re.search(r"^ARG TORCH=(\d+\.\d+\.\d+)$", docker, re.M)
    cuda_pin = re.search(r"^ARG CUDA=(cu\d{3})$", docker, re.M)
    assert torch_pin and cuda_pin and re.search(r"^ARG TORCHVISION=\d+\.\d+\.\d+$", docker, re.M)
    assert "whl/${CUDA}" in docker and '"torch==${TORCH}"' in docker
    assert "torch.version.cuda" in docker  # the build fails on a torch without this CUDA
    assert "python -m mediar_ray.dynamics.warm" in docker
    assert warm() == 2  # the build step works: two touching cells found
