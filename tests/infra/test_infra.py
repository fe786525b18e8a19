"""infra/ and prefect.yaml, checked offline: everything parses, Kubernetes objects match the API models of
the `kubernetes` client with no unknown fields, the RayCluster has KubeRay's structure, the Dockerfile pins
the same stack as pyproject.toml, deployments point at real flows, the shell scripts parse."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from kubernetes.client import ApiClient

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S_MODELS = {("v1", "ConfigMap"): "V1ConfigMap", ("v1", "Secret"): "V1Secret", ("apps/v1", "Deployment"): "V1Deployment",
              ("v1", "Service"): "V1Service"}


def _docs():
    for path in sorted(INFRA.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


class _Response:
    def __init__(self, data):
        self.data = json.dumps(data)


def _validated(data: dict, model: str) -> None:
    """Deserialize into the client's model (required fields, types), then check nothing was dropped."""
    api = ApiClient()
    obj = api.deserialize(_Response(data), model)
    back = api.sanitize_for_serialization(obj)
    _same_keys(data, back, model)


def _same_keys(given, back, where: str) -> None:
    if isinstance(given, dict):
        unknown = set(given) - set(back or {})
        assert not unknown, f"{where}: unknown fields {sorted(unknown)}"
        for key, value in given.items():
            _same_keys(value, back[key], f"{where}.{key}")
    elif isinstance(given, list):
        for i, (a, b) in enumerate(zip(given, back)):
            _same_keys(a, b, f"{where}[{i}]")


def test_every_yaml_parses():
    files = [*INFRA.rglob("*.yaml"), ROOT / "prefect.yaml", *(ROOT / "requant").rglob("*.yaml")]
    assert len(files) >= 8
    for path in files:
        list(yaml.safe_load_all(path.read_text()))


def test_kubernetes_objects_match_the_api_models():
    kinds = []
    for path, doc in _docs():
        key = (doc["apiVersion"], doc["kind"])
        if doc["kind"] == "RayCluster":
            continue
        assert key in K8S_MODELS, f"{path}: no offline schema for {key}"
        _validated(doc, K8S_MODELS[key])
        assert doc["metadata"].get("namespace") == "requant", path
        kinds.append(doc["kind"])
    assert {"ConfigMap", "Secret", "Deployment"} <= set(kinds)


def test_typos_are_caught_by_the_schema_check():
    bad = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespce": "requant"}}
    with pytest.raises(AssertionError, match="namespce"):
        _validated(bad, "V1ConfigMap")


RAYCLUSTER_SCHEMA = {  # the KubeRay v1 RayCluster fields this project relies on
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "spec": {
            "type": "object", "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
            "additionalProperties": False,
            "properties": {
                "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
                "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"], "additionalProperties": False,
                                  "properties": {"serviceType": {"type": "string"}, "template": {"type": "object"},
                                                 "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}}}},
                "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["groupName", "rayStartParams", "template"], "additionalProperties": False,
                    "properties": {"groupName": {"type": "string"}, "replicas": {"type": "integer"},
                                   "minReplicas": {"type": "integer"}, "maxReplicas": {"type": "integer"},
                                   "template": {"type": "object"},
                                   "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}}}}},
            },
        },
    },
}


def test_raycluster_for_mi350x():
    import jsonschema

    [doc] = [d for _, d in _docs() if d["kind"] == "RayCluster"]
    jsonschema.validate(doc, RAYCLUSTER_SCHEMA)
    spec = doc["spec"]
    _validated(spec["headGroupSpec"]["template"], "V1PodTemplateSpec")
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert f"ray=={spec['rayVersion']}" in pyproject["project"]["dependencies"]
    [workers] = spec["workerGroupSpecs"]
    _validated(workers["template"], "V1PodTemplateSpec")
    container = workers["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["amd.com/gpu"] == workers["rayStartParams"]["num-gpus"] == "8"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/dev/shm", "/scratch"} <= mounts
    shm = next(v for v in workers["template"]["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert int(workers["rayStartParams"]["object-store-memory"]) <= 32 << 30          # fits the 32Gi /dev/shm


def _pins(text: str) -> dict[str, str]:
    return {m.group(1).lower().split("[")[0]: m.group(2) for m in re.finditer(r"([A-Za-z0-9_.\-\[\]]+)==([0-9][^\s\"',]*)", text)}


def test_dockerfile_pins_agree_with_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _pins(" ".join(pyproject["dependencies"] + [d for ds in pyproject["optional-dependencies"].values() for d in ds]))
    docker = _pins((INFRA / "Dockerfile").read_text())
    assert {"torch", "amd-quark", "compressed-tensors", "transformers", "prefect", "prefect-ray", "ray", "lm-eval"} <= set(docker)
    for name, version in docker.items():
        assert declared.get(name) == version, f"Dockerfile pins {name}=={version}, pyproject {declared.get(name)}"


def test_deployments_point_at_real_flows():
    import importlib

    from prefect.client.schemas.schedules import CronSchedule

    from requant.flows.watch import run_parameters

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    flows = {}
    for dep in config["deployments"]:
        module, attr = dep["entrypoint"].split(":")
        flow = flows[dep["name"]] = getattr(importlib.import_module(module), attr)
        assert set(dep.get("parameters", {})) <= set(flow.parameters.properties), dep["name"]
        flow.validate_parameters(dep.get("parameters", {}))  # Prefect's own check: every group's fields and types
        for schedule in dep.get("schedules", []):
            CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))   # Prefect's own validation
    assert {name: flow.name for name, flow in flows.items()} == {
        "requantize": "requantize", "evaluate": "evaluate", "watch-upstream": "watch-upstream"}
    requantize = config["deployments"][0]["parameters"]
    assert {"upstream", "output", "recipe", "evaluation"} <= set(requantize) and requantize["evaluation"]["engine"]
    watcher = config["deployments"][2]["parameters"]  # what each run it starts gets on top of its own groups
    flows["requantize"].validate_parameters(run_parameters("s3://m/snapshots/abc", "abc", "s3://o", watcher["recipe"],
                                                           watcher["upstream"], watcher["parameters"]))


def test_shell_scripts_parse():
    for script in (INFRA / "bare-metal").glob("*.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)
