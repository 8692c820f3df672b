"""deploy/kuberay, parsed: the Kubernetes objects valid against Kubernetes' own schemas (the
RayCluster's pod templates too), the RayCluster on the pinned Ray with a CPU and a GPU worker group
within autoscaling bounds, the API Deployment and Service wired to the ConfigMap and the Secret,
and every LADLE_* variable one the settings read."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import kubernetes_validate
import pytest

from service.settings import Settings
from tests.deploy.conftest import (CLUSTER_SETTINGS, KUBERAY, env_file, ladle_env_names, load_yaml, load_yaml_all,
                                   pinned_ray_version)

K8S_VERSION = "1.30"          # the oldest Kubernetes the manifests are checked against


def objects(folder) -> list[dict]:
    kustomization = load_yaml(folder / "kustomization.yaml")
    return [doc for name in kustomization["resources"] for doc in load_yaml_all(folder / name)]


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects(KUBERAY)}


@pytest.fixture(scope="module")
def secret_keys() -> dict[str, str]:
    return env_file(KUBERAY / "secrets.env.example")


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec["containers"] + pod_spec.get("initContainers", [])


def validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def ray_pod_specs(cluster: dict) -> dict[str, dict]:
    spec = cluster["spec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    return pods


def test_kustomization_makes_the_secret_from_a_file_that_is_not_committed():
    k = load_yaml(KUBERAY / "kustomization.yaml")
    [gen] = k["secretGenerator"]
    assert gen["name"] == "ladle-secrets" and gen["envs"] == ["secrets.env"]
    assert k["generatorOptions"]["disableNameSuffixHash"] is True      # referenced by name from the RayCluster
    assert "deploy/kuberay/secrets.env" in (KUBERAY.parents[1] / ".gitignore").read_text().split()
    for name in k["resources"]:
        assert (KUBERAY / name).is_file()


@pytest.mark.parametrize("folder", [KUBERAY, KUBERAY / "dev"], ids=["ladle", "dev"])
def test_kubernetes_objects_are_valid(folder):
    for obj in objects(folder):
        if obj["apiVersion"].startswith("ray.io/"):
            for name, pod in ray_pod_specs(obj).items():    # KubeRay's own schema is not at hand: its pods are
                validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": pod})
        else:
            validate(obj)


def test_raycluster_runs_the_pinned_ray_in_the_ladle_image_with_token_auth(manifests):
    cluster = manifests["RayCluster", "ladle"]
    api_image = manifests["Deployment", "ladle-api"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == pinned_ray_version()
    for name, pod in ray_pod_specs(cluster).items():
        assert {c["image"] for c in pod["containers"]} == {api_image}, name
        shm = [m for c in pod["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm, f"{name}: no /dev/shm for Ray's object store"
    assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": "ladle-secrets"}
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265} <= ports


def test_raycluster_autoscales_a_cpu_and_a_gpu_worker_group_within_bounds(manifests):
    spec = manifests["RayCluster", "ladle"]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    assert groups["gpu"]["minReplicas"] == 0                            # no idle GPU nodes
    assert groups["cpu"]["maxReplicas"] > groups["cpu"]["minReplicas"]
    gpus = {name: [c["resources"].get("limits", {}).get("nvidia.com/gpu") for c in g["template"]["spec"]["containers"]]
            for name, g in groups.items()}
    assert gpus == {"cpu": [None], "gpu": ["1"]}
    tolerations = groups["gpu"]["template"]["spec"].get("tolerations", [])
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


def test_api_deployment_migrates_then_serves_and_its_service_reaches_it(manifests):
    dep = manifests["Deployment", "ladle-api"]
    pod = dep["spec"]["template"]
    [api] = pod["spec"]["containers"]
    assert api["command"][0] == "/app/deploy/prestart.sh"
    assert api["command"][1:5] == ["ladle", "serve", "--host", "0.0.0.0"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"   # one dispatcher
    port = next(p for p in api["ports"] if p["containerPort"] == 8000)
    for probe in ("readinessProbe", "livenessProbe"):
        assert api[probe]["httpGet"] == {"path": "/api/v1/health", "port": port["name"]}
    svc = manifests["Service", "ladle-api"]
    labels = pod["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == [port["name"]]


def test_config_and_secret_references_resolve(manifests, secret_keys):
    configmaps = {name for kind, name in manifests if kind == "ConfigMap"}
    for folder in (KUBERAY, KUBERAY / "dev"):
        for obj in objects(folder):
            pod = obj.get("spec", {}).get("template", {}).get("spec")
            if obj["kind"] in ("Deployment", "Job") and pod:
                for c in containers(pod):
                    for src in c.get("envFrom", []):
                        if "configMapRef" in src:
                            assert src["configMapRef"]["name"] in configmaps
                        else:
                            assert src["secretRef"]["name"] == "ladle-secrets"
                    for e in c.get("env", []):
                        ref = e.get("valueFrom", {}).get("secretKeyRef")
                        if ref:
                            assert ref["name"] == "ladle-secrets" and ref["key"] in secret_keys, e
    assert "auth_token" in secret_keys                                  # KubeRay's token key


def test_ladle_variables_are_settings_and_the_cluster_settings_are_all_given(manifests, secret_keys, monkeypatch):
    config = manifests["ConfigMap", "ladle-config"]["data"]
    given = {k for k in {**config, **secret_keys} if k.startswith("LADLE_")}
    assert given <= ladle_env_names(), given - ladle_env_names()
    assert CLUSTER_SETTINGS <= given
    assert "LADLE_DATABASE_URL" in secret_keys and "LADLE_DATABASE_URL" not in config   # it holds a password
    # the API reaches the RayCluster's head Service (KubeRay names it <cluster>-head-svc)
    cluster = manifests["RayCluster", "ladle"]["metadata"]["name"]
    assert config["LADLE_RAY_ADDRESS"] == f"http://{cluster}-head-svc:8265"
    assert config["LADLE_ARTIFACTS"].startswith("s3://")
    # the dev object store is the endpoint the config names
    dev = {(o["kind"], o["metadata"]["name"]): o for o in objects(KUBERAY / "dev")}
    endpoint = urlsplit(config["AWS_ENDPOINT_URL"])
    assert ("Service", endpoint.hostname) in dev
    assert endpoint.port in {p["port"] for p in dev["Service", endpoint.hostname]["spec"]["ports"]}
    assert (dev["Job", "ladle-bucket"]["spec"]["template"]["spec"]["containers"][0]["command"]
            == ["python", "/app/deploy/create_bucket.py"])
    # the settings accept the API's environment once the secrets are filled in
    for k in list(os.environ):
        if k.startswith("LADLE_"):
            monkeypatch.delenv(k)
    for k, v in {**config, **secret_keys, "LADLE_ADMIN_TOKEN": "an-admin-token-of-some-length"}.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert (s.ray_address, s.artifacts) == (config["LADLE_RAY_ADDRESS"], config["LADLE_ARTIFACTS"])
    assert s.database_url.startswith("postgresql+psycopg://")


def test_every_ray_pod_has_the_credentials_drivers_are_not_sent(manifests, secret_keys):
    """Drivers get the database URL without its password and no object-store keys (a Ray job's
    runtime_env is readable by anyone who lists jobs): every Ray container takes them from the Secret."""
    cluster = next(obj for (kind, _), obj in manifests.items() if kind == "RayCluster")
    assert "PGPASSWORD" in secret_keys
    for group, pod in ray_pod_specs(cluster).items():
        for c in containers(pod):
            refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c.get("env", []) if "valueFrom" in e}
            assert {k: r["key"] for k, r in refs.items()} == {
                "PGPASSWORD": "PGPASSWORD", "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}, group
            assert all(r["name"] == "ladle-secrets" for r in refs.values()), group
