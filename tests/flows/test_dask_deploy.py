"""The Dask deployment files say what the flows and flows.dask_worker rely on (no Docker, no cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.common import check_task_runner
from flows.dask_worker import PRELOAD, main

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_dask_profile_has_a_scheduler_and_a_worker_per_gpu():
    services = _compose()["services"]
    dask = {name: s for name, s in services.items() if "dask" in s.get("profiles", [])}
    assert set(dask) == {"dask-scheduler", "dask-gpu-worker-0"}
    assert dask["dask-scheduler"]["command"][:2] == ["dask", "scheduler"]
    worker = dask["dask-gpu-worker-0"]
    cmd = worker["command"]
    assert cmd[:3] == ["python", "-m", "flows.dask_worker"]
    assert cmd[cmd.index("--gpu") + 1] == "0"
    assert "tcp://dask-scheduler:8786" in cmd[3]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["device_ids"] == ["0"]
    # The shared data folder at the same path as the flow runs', and the pipeline's settings.
    assert worker["volumes"] == services["gpu-worker"]["volumes"]
    env = worker["environment"]
    assert env["UNET_PIPELINE_WORKDIR"] == "/data/work"
    assert env["PREFECT_API_URL"].endswith(":4200/api") and "PREFECT_API_AUTH_STRING" in env
    # Services of other profiles are untouched: the default `up` starts no Dask.
    assert all("profiles" not in s for n, s in services.items() if n not in dask)


def test_kubernetes_dask_cluster_runs_our_worker_with_the_shared_volume():
    cluster = yaml.safe_load((DEPLOY / "kubernetes" / "dask" / "daskcluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("kubernetes.dask.org/v1", "DaskCluster")
    pod = cluster["spec"]["worker"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[:4] == ["python", "-m", "flows.dask_worker", "$(DASK_SCHEDULER_ADDRESS)"]
    assert args[args.index("--gpu") + 1] == "0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["data"] == "/data"
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    assert claims["data"] == "unet-pipeline-data"
    assert {"secretRef": {"name": "unet-pipeline-env"}} in container["envFrom"]
    scheduler_ports = {p["port"] for p in cluster["spec"]["scheduler"]["service"]["ports"]}
    assert 8786 in scheduler_ports


@pytest.mark.parametrize("name", ["nightly-batch-inference", "ingest-on-demand"])
def test_deployments_choose_a_valid_task_runner(name):
    deployments = {d["name"]: d for d in yaml.safe_load((DEPLOY / "prefect.yaml").read_text())["deployments"]}
    assert check_task_runner(deployments[name]["parameters"]["task_runner"]) == "threads"


def test_the_preload_is_importable_by_its_name():
    import importlib

    assert hasattr(importlib.import_module(PRELOAD), "dask_setup")


def test_the_entrypoint_refuses_a_wrong_scheduler_address(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["localhost:8786"])
    assert exc.value.code == 2
    assert "tcp://HOST:8786" in capsys.readouterr().err
