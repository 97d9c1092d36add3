"""deploy/kubernetes/ and the Kubernetes work-pool template: valid against the Kubernetes API
schemas (no cluster needed), within the "restricted" Pod Security Standard, secrets by reference.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prefect.utilities.templating import apply_values

from tests.deploy.schemas import kubernetes_errors

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
NAMESPACE = "unet-pipeline"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH_STRING|API_KEY|TOKEN", re.IGNORECASE)
# Volume types the restricted profile allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def _manifests() -> list[dict]:
    documents = []
    for path in sorted(KUBE.glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


def _by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _manifests() if d["kind"] == kind}


def _worker_env() -> dict[str, dict]:
    (container,) = _by_kind("Deployment")["prefect-worker"]["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container["env"]}


def render_job(**values) -> dict:
    """The Job a Kubernetes worker of this pool creates for a flow run, from the template's defaults.

    Rendered as prefect-kubernetes does it: the template's variables applied, the env mapping made
    a list of {name, value}, and (the worker being configured by deploy/kubernetes/worker.yaml
    with PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME/_KEY) the Prefect auth
    string replaced by a reference to that Secret.
    """
    template = json.loads((ROOT / "deploy" / "work-pools" / "kubernetes-gpu.json").read_text())
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    worker_env = {
        "PREFECT_API_URL": "http://prefect-server.unet-pipeline.svc:4200/api",
        "PREFECT_API_AUTH_STRING": "admin:not-a-real-secret",
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "60",
    }
    rendered = apply_values(
        template["job_configuration"],
        defaults
        | {"env": worker_env, "command": "prefect flow-run execute", "name": "run-1", "labels": {}}
        | values,
    )
    job = rendered["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    secret = _worker_env()
    ref = {
        "name": secret["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME"]["value"],
        "key": secret["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY"]["value"],
    }
    container["env"] = [
        {"name": k, "valueFrom": {"secretKeyRef": ref}}
        if k == "PREFECT_API_AUTH_STRING"
        else {"name": k, "value": v}
        for k, v in container["env"].items()
    ]
    container["args"] = container["args"].split()
    job["metadata"]["name"] = "run-1-abcde"  # generateName's result
    return job


def _pod_specs():
    """(name, pod spec) of every pod the manifests and the pool's Job create."""
    yield "worker", _by_kind("Deployment")["prefect-worker"]["spec"]["template"]["spec"]
    yield "flow-run job", render_job()["spec"]["template"]["spec"]


def restricted_violations(pod: dict) -> list[str]:
    """What breaks the restricted Pod Security Standard (the checks of its policy table)."""
    found = []
    pod_sc = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.append(key)
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {kinds}")
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container.get("securityContext", {})
        name = container["name"]
        if sc.get("privileged"):
            found.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation must be false")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            found.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in {"RuntimeDefault", "Localhost"}:
            found.append(f"{name}: seccompProfile {seccomp}")
        capabilities = sc.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities must drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds {capabilities['add']}")
        for port in container.get("ports", []):
            if "hostPort" in port:
                found.append(f"{name}: hostPort")
    return found


@pytest.mark.parametrize("document", _manifests(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_manifest_is_valid_against_the_kubernetes_api_schema(document):
    assert not kubernetes_errors(document)
    assert document["kind"] == "Namespace" or document["metadata"]["namespace"] == NAMESPACE


def test_the_schema_check_catches_a_misplaced_field():
    job = render_job()
    job["spec"]["template"]["spec"]["parallelism"] = 1  # a Job field written into the pod spec
    assert kubernetes_errors(job)


def test_the_pool_template_renders_a_valid_job_with_one_gpu():
    job = render_job()
    assert not kubernetes_errors(job)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["serviceAccountName"] == "unet-pipeline"
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    # The data volume is the RWX claim of deploy/kubernetes/pvc.yaml.
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    (pvc,) = _by_kind("PersistentVolumeClaim").values()
    assert claims == {pvc["metadata"]["name"]} and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]


def test_the_pool_values_override_the_defaults():
    job = render_job(
        image="registry.hospital.local/unet-pipeline:0.2.0", namespace="seg", memory_limit="64Gi"
    )
    assert not kubernetes_errors(job)
    assert job["metadata"]["namespace"] == "seg"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.hospital.local/unet-pipeline:0.2.0"
    assert container["resources"]["limits"]["memory"] == "64Gi"


@pytest.mark.parametrize("name_pod", list(_pod_specs()), ids=lambda p: p[0])
def test_pods_meet_the_restricted_pod_security_standard(name_pod):
    name, pod = name_pod
    assert not restricted_violations(pod), name


def test_the_restricted_check_would_catch_a_root_container():
    pod = render_job()["spec"]["template"]["spec"]
    pod["securityContext"].pop("runAsNonRoot")
    pod["containers"][0]["securityContext"].pop("runAsNonRoot")
    pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    assert len(restricted_violations(pod)) == 2


def test_namespace_enforces_the_restricted_profile():
    (namespace,) = _by_kind("Namespace").values()
    assert namespace["metadata"]["name"] == NAMESPACE
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("name_pod", list(_pod_specs()), ids=lambda p: p[0])
def test_secrets_are_references_never_values(name_pod):
    name, pod = name_pod
    for container in pod["containers"]:
        for env in container.get("env", []):
            if SECRET_NAME.search(env["name"]) and not env["name"].endswith(("_SECRET_NAME", "_SECRET_KEY")):
                assert "value" not in env and "secretKeyRef" in env["valueFrom"], f"{name}: {env['name']}"
    assert not [m for m in _manifests() if m["kind"] == "Secret"], (
        "Secrets are created by the admin, not committed"
    )


def test_worker_rbac_is_namespaced_and_minimal():
    (role,) = _by_kind("Role").values()
    (binding,) = _by_kind("RoleBinding").values()
    assert not _by_kind("ClusterRole") and not _by_kind("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "prefect-worker", "namespace": NAMESPACE}
    ]
    jobs = next(r for r in role["rules"] if r["resources"] == ["jobs"])
    assert "create" in jobs["verbs"] and jobs["apiGroups"] == ["batch"]
    secrets = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert secrets == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["prefect-api-auth"], "verbs": ["get"]}
    ]
    accounts = _by_kind("ServiceAccount")
    assert accounts["unet-pipeline"]["automountServiceAccountToken"] is False
    worker = _by_kind("Deployment")["prefect-worker"]["spec"]["template"]["spec"]
    assert worker["serviceAccountName"] == "prefect-worker"
    assert "--with-healthcheck" in worker["containers"][0]["command"]
    assert worker["containers"][0]["livenessProbe"]["httpGet"]["path"] == "/health"
