"""The deployment of deploy/ started and run on this machine, step by step as the runbook does it.

The services of deploy/docker-compose.yml run as local processes (tests/stack/services.py: same
entrypoints, same pinned packages as the images, compose's environment); then, as the README's
"Run it in a hospital": `prefect deploy --all`, the zombie automation, the on-demand ingest of a
first delivery, the weekly retraining and the nightly batch inference, each through the workers.
What the containers would add (images, the compose network, the GPU) is not covered here.

Run with `make stack-test` (PostgreSQL on 127.0.0.1:5432 with trust auth; venvs cached under
~/.cache/unet-pipeline/stack).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from pipeline.synthetic.dataset import make_demo_dataset
from tests.deploy.schemas import assert_compose_valid
from tests.pipeline.ingest.staging_fixture import TINY
from tests.stack.local import (
    DEPLOY,
    REPO,
    Process,
    Translation,
    base_env,
    free_port,
    healthcheck_argv,
    healthy,
    load_compose,
    torch_build,
)
from tests.stack.services import Stack

pytestmark = pytest.mark.stack

# The deployments as `prefect deployment run` names them (flow name / deployment name).
INGEST = "ingest/ingest-on-demand"
TRAIN = "train/weekly-retraining"
NIGHTLY = "batch-inference/nightly-batch-inference"
MODEL = "unet-seg"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with Stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


def _auth(stack: Stack) -> tuple[str, str]:
    user, password = stack.env["PREFECT_AUTH_STRING"].split(":", 1)
    return user, password


def _prefect(stack: Stack, method: str, path: str, **kwargs) -> httpx.Response:
    response = httpx.request(method, f"{stack.prefect_api}{path}", auth=_auth(stack), timeout=30, **kwargs)
    response.raise_for_status()
    return response


def _deployment_run(stack: Stack, name: str, params: dict, log: str) -> str:
    """`prefect deployment run NAME --params JSON --watch` as the runbook runs it; the flow run id."""
    try:
        output = stack.exec(
            ["prefect", "deployment", "run", name, "--params", json.dumps(params), "--watch"],
            log,
            timeout_s=900,
        )
    except RuntimeError as exc:  # the flow run's own output is in the workers' logs
        raise AssertionError(f"{exc}\n{stack.tails()}") from None
    # The CLI prints "UUID: <id>" when it has created the run.
    ids = re.findall(r"UUID: ([0-9a-f-]{36})", output)
    assert ids, f"no flow run id in the output of `prefect deployment run {name}`:\n{output[-3000:]}"
    return ids[-1]


def test_compose_files_follow_the_compose_specification():
    assert_compose_valid(DEPLOY / "docker-compose.yml", DEPLOY / "docker-compose.s3.yml")


def test_images_venvs_hold_the_cpu_torch_and_no_dev_tools(stack):
    assert torch_build(stack.runtime) == "2.13.0+cpu"
    for venv in (stack.runtime, stack.mlflow_venv):
        assert not (venv / "bin" / "pytest").exists() and not (venv / "bin" / "ruff").exists()
    assert not list(stack.mlflow_venv.glob("lib/python*/site-packages/torch"))


def test_services_are_healthy_and_refuse_requests_without_credentials(stack):
    # The compose healthchecks themselves, run against the running services.
    for name, port in stack.worker_ports.items():
        assert healthy(healthcheck_argv(stack.service(name), stack.runtime, port)), name
    flow_runs = f"{stack.prefect_api}/flow_runs/filter"
    assert httpx.post(flow_runs, json={}, timeout=10).status_code == 401
    assert httpx.post(flow_runs, json={}, auth=("admin", "wrong"), timeout=10).status_code == 401
    assert httpx.post(flow_runs, json={}, auth=_auth(stack), timeout=10).status_code == 200
    experiments = f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=10"
    assert httpx.get(experiments, timeout=10).status_code == 401
    assert httpx.get(experiments, auth=("admin", "wrong"), timeout=10).status_code == 401
    pipeline_user = (stack.env["MLFLOW_PIPELINE_USERNAME"], stack.env["MLFLOW_PIPELINE_PASSWORD"])
    assert httpx.get(experiments, auth=pipeline_user, timeout=10).status_code == 200  # made by init
    pools = {p["name"]: p["type"] for p in _prefect(stack, "POST", "/work_pools/filter", json={}).json()}
    assert pools.get("gpu-pool") == pools.get("cpu-pool") == "process", pools
    assert _prefect(stack, "GET", "/concurrency_limits/tag/gpu").json()["concurrency_limit"] == 1


def test_runbook_deploy_ingest_train_and_nightly_inference(stack, monkeypatch):
    import mlflow

    # Step 4: the deployments and the zombie automation, from the worker's environment.
    stack.exec(
        ["prefect", "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml"], "deploy"
    )
    stack.exec(
        ["prefect", "automation", "create", "--from-file", "deploy/automations/zombie-flow-runs.yaml"],
        "automation",
    )
    names = {d["name"] for d in _prefect(stack, "POST", "/deployments/filter", json={}).json()}
    assert {"nightly-batch-inference", "weekly-retraining", "ingest-on-demand"} <= names

    # Step 5: a first delivery, ingested and trained on (a tiny model: the stack is under test).
    first = make_demo_dataset(stack.data / "incoming" / "first", n_cases=6, seed=5, size=32)
    staging = stack.data / "staging"
    ingest_id = _deployment_run(
        stack, INGEST, {"source": str(first.dicom_root), "staging": str(staging)}, "run-ingest"
    )
    assert (staging / "manifest.jsonl").is_file()
    train_id = _deployment_run(stack, TRAIN, {"staging": str(staging), "config_overrides": TINY}, "run-train")

    # Step 6: the nightly batch on a new delivery, with the champion.
    night = make_demo_dataset(stack.data / "incoming" / "night", n_cases=2, seed=11, size=32)
    results = stack.data / "results"
    nightly_id = _deployment_run(
        stack, NIGHTLY, {"source": str(night.dicom_root), "out": str(results), "device": "cpu"}, "run-nightly"
    )

    # The model version is registered and is the champion (read with the workers' MLflow account).
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", stack.env["MLFLOW_PIPELINE_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack.env["MLFLOW_PIPELINE_PASSWORD"])
    client = mlflow.MlflowClient(stack.mlflow_uri, stack.mlflow_uri)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == "1"

    # The masks and the report are written; the batch used that champion.
    manifest = json.loads((results / "run_manifest.json").read_text())
    assert manifest["model"]["name"] == MODEL and manifest["model"]["version"] == champion.version
    assert manifest["counts"]["ok"] >= 2, manifest["counts"]
    masks = sorted(results.glob("*/seg.nii.gz"))
    assert len(masks) == manifest["counts"]["ok"]
    assert (results / "report.html").is_file() and (results / "results.csv").is_file()
    assert manifest["tracking"]["status"] == "logged", manifest["tracking"]

    # The MLflow artifacts are in the server's artifact store (the volume), not on the workers:
    # the training run's files and the registered model's weights, byte for byte.
    run_dir = next(stack.artifacts.rglob(champion.run_id), None)
    assert run_dir is not None, f"run {champion.run_id} has no folder under {stack.artifacts}"
    assert (run_dir / "artifacts" / "plan.json").is_file()
    weights = {hashlib.sha256(p.read_bytes()).hexdigest() for p in stack.artifacts.rglob("*.safetensors")}
    assert manifest["model"]["sha256"] in weights, weights
    assert not list((stack.data / "work").rglob("mlartifacts")), "artifacts were written beside a worker"

    # The Prefect API lists the three runs Completed, each with its artifacts and pipeline logs.
    expected_artifacts = {
        ingest_id: "ingest-summary",
        train_id: "train-summary",
        nightly_id: "batch-inference-summary",
    }
    for flow_run_id, key in expected_artifacts.items():
        run = _prefect(stack, "GET", f"/flow_runs/{flow_run_id}").json()
        assert run["state"]["type"] == "COMPLETED", run["state"]
        artifacts = _prefect(
            stack, "POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        ).json()
        assert key in {a["key"] for a in artifacts}, f"flow run {flow_run_id}: {artifacts}"
    train_logs = _prefect(
        stack, "POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [train_id]}}, "limit": 200}
    ).json()
    assert any(log["name"].startswith("pipeline.") for log in train_logs), {log["name"] for log in train_logs}

    # Task results persisted on the shared data volume (Prefect's storage under /data/work).
    storage = stack.data / "work" / "prefect" / "storage"
    assert storage.is_dir() and any(storage.iterdir()), f"no task results in {storage}"

    # A second ingest of the same delivery: every case comes from the cache on the shared volume.
    again_id = _deployment_run(
        stack, INGEST, {"source": str(first.dicom_root), "staging": str(staging)}, "run-ingest-again"
    )
    tasks = _prefect(
        stack,
        "POST",
        "/task_runs/filter",
        json={"flow_runs": {"id": {"any_": [again_id]}}, "task_runs": {"name": {"like_": "convert-"}}},
    ).json()
    assert tasks and {t["state"]["name"] for t in tasks} == {"Cached"}, [t["state"]["name"] for t in tasks]


def test_mlflow_artifacts_on_the_sites_s3(stack, tmp_path):
    """The overlay docker-compose.s3.yml: MLflow stores artifacts in an S3 bucket, proxied."""
    import boto3
    import mlflow

    s3_port, mlflow_port = free_port(), free_port()
    endpoint = f"http://127.0.0.1:{s3_port}"
    # An S3-compatible server on loopback (moto's, from the dev lock).
    moto_env = base_env(Path(sys.executable).parent.parent, tmp_path / "moto-home")
    stack.start(
        Process(
            "s3",
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
            moto_env,
            stack.logs / "s3.log",
        )
    ).wait_until(lambda: _answers(f"{endpoint}/"), 60)

    env = stack.env | {"MLFLOW_S3_ENDPOINT_URL": endpoint}
    service = load_compose(env, "docker-compose.s3.yml")["services"]["mlflow"]
    tag = uuid.uuid4().hex[:8]
    mlflow_env = (
        base_env(stack.mlflow_venv, tmp_path / "mlflow-home")
        # this server's own port in its URLs and allowed Host headers
        | Translation(stack.ports | {"mlflow": mlflow_port}, stack.translation.paths).env(
            service["environment"]
        )
        | {
            "MLFLOW_DB_USER": stack.db["MLFLOW_DB_USER"],
            "MLFLOW_DB_NAME": stack.create_database(f"stack_mlflow_s3_{tag}"),
            "MLFLOW_AUTH_DB_NAME": stack.create_database(f"stack_mlflow_s3_auth_{tag}"),
            "MLFLOW_HOST": "127.0.0.1",
            "MLFLOW_PORT": str(mlflow_port),
        }
    )
    uri = f"http://127.0.0.1:{mlflow_port}"
    server = stack.start(Process("mlflow-s3", Stack.mlflow_argv(), mlflow_env, stack.logs / "mlflow-s3.log"))
    server.wait_until(lambda: _answers(f"{uri}/health"), 240)

    # A client with MLflow credentials only (no S3 keys) logs an artifact through the server.
    admin = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": env["MLFLOW_ADMIN_PASSWORD"]}
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
            mp.delenv(key, raising=False)
        for key, value in admin.items():
            mp.setenv(key, value)
        client = mlflow.MlflowClient(uri, uri)
        experiment = client.create_experiment(f"s3-{tag}")
        run = client.create_run(experiment)
        client.log_text(run.info.run_id, "stored on S3", "probe/probe.txt")
        client.set_terminated(run.info.run_id)
        assert client.list_artifacts(run.info.run_id, "probe")[0].path == "probe/probe.txt"

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=env["MLFLOW_S3_ACCESS_KEY_ID"],
        aws_secret_access_key=env["MLFLOW_S3_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=env["MLFLOW_S3_BUCKET"]).get("Contents", [])]
    probe = [k for k in keys if k.endswith(f"{run.info.run_id}/artifacts/probe/probe.txt")]
    assert probe, keys
    body = s3.get_object(Bucket=env["MLFLOW_S3_BUCKET"], Key=probe[0])["Body"].read()
    assert body == b"stored on S3"


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


def test_the_runbook_names_what_this_test_runs():
    readme = (REPO / "README.md").read_text()
    for command in (
        "prefect --no-prompt deploy --all --prefect-file deploy/prefect.yaml",
        f"prefect deployment run '{INGEST}'",
        f"prefect deployment run '{TRAIN}'",
        f"prefect deployment run '{NIGHTLY}'",
        "make stack-test",
    ):
        assert command in readme, f"README's runbook lacks {shlex.quote(command)}"
