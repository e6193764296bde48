"""Cluster configs: the launcher YAML validates against Ray's own schema, and the KubeRay
manifests name the image, the entry point and their autoscaling settings."""

from __future__ import annotations

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


@pytest.mark.parametrize(
    "path", sorted((CLUSTER / "kuberay").glob("*.yaml")), ids=lambda p: p.name
)
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
