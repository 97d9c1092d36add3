"""The deployment files parse and say what the runbook relies on (no servers, no Docker)."""

from __future__ import annotations

import ast
import itertools
import json
import re
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from prefect.cli.deploy._models import PrefectYamlModel
from prefect.client.schemas.schedules import CronSchedule
from prefect.utilities.templating import apply_values

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

EXPECTED_DEPLOYMENTS = {
    "nightly-batch-inference": ("flows/inference.py:batch_inference_flow", "gpu-pool"),
    "weekly-retraining": ("flows/train.py:train_flow", "gpu-pool"),
    "ingest-on-demand": ("flows/ingest.py:ingest_flow", "cpu-pool"),
    "nightly-pacs-batch": ("flows/pacs.py:pacs_batch_flow", "gpu-pool"),
}


HEARTBEAT_S = "60"  # flow-run heartbeat period; the zombie automation allows five missed beats


def _prefect_yaml() -> dict:
    return yaml.safe_load((DEPLOY / "prefect.yaml").read_text())


def _deployments() -> dict[str, dict]:
    return {d["name"]: d for d in _prefect_yaml()["deployments"]}


def test_prefect_yaml_is_valid_for_prefect_deploy():
    model = PrefectYamlModel.model_validate(_prefect_yaml())
    assert {d.name for d in model.deployments} == set(EXPECTED_DEPLOYMENTS)
    assert model.build is None and model.push is None
    # Resolved from each flow run's environment when it starts (the image sets it).
    assert model.pull == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $UNET_PIPELINE_CODE_DIR }}"}}
    ]


@pytest.mark.parametrize("name", sorted(EXPECTED_DEPLOYMENTS))
def test_deployment_entrypoint_pool_and_job_variables(name):
    deployment = _deployments()[name]
    entrypoint, pool = EXPECTED_DEPLOYMENTS[name]
    assert deployment["entrypoint"] == entrypoint
    assert deployment["work_pool"]["name"] == pool
    assert deployment["description"].strip()
    assert deployment["tags"]
    # Shared through the YAML anchor; no secrets and no paths in job variables (the image has those).
    assert deployment["work_pool"]["job_variables"]["env"] == {
        "PREFECT_LOGGING_EXTRA_LOGGERS": "pipeline",
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": HEARTBEAT_S,
    }


@pytest.mark.parametrize("name", sorted(EXPECTED_DEPLOYMENTS))
def test_entrypoint_names_a_flow_function_with_those_parameters(name):
    deployment = _deployments()[name]
    path, func = deployment["entrypoint"].split(":")
    assert re.fullmatch(r"flows/[a-z_]+\.py", path), path
    module = ROOT / path
    if not module.exists():
        pytest.skip(f"{path} is not written yet; only the entrypoint's form is checked")
    functions = {
        node.name: node
        for node in ast.walk(ast.parse(module.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    assert func in functions, f"{path} defines no function {func}"
    args = functions[func].args
    accepted = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
    unknown = set(deployment.get("parameters", {})) - accepted
    assert not unknown, f"{name} passes parameters {sorted(unknown)} that {func} does not take"


def test_schedules_are_valid_crons_with_a_timezone():
    deployments = _deployments()
    nightly = deployments["nightly-batch-inference"]["schedules"]
    weekly = deployments["weekly-retraining"]["schedules"]
    assert len(nightly) == len(weekly) == 1
    for schedule in nightly + weekly:
        # Prefect's own model rejects bad cron strings and unknown time zones.
        CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    # What the README promises: nightly at 02:00 site time, retraining once a week.
    night = _fire_times(nightly[0]["cron"])
    assert [t.strftime("%H:%M") for t in night] == ["02:00"] * 3 and _gaps(night) == {timedelta(days=1)}
    assert _gaps(_fire_times(weekly[0]["cron"])) == {timedelta(days=7)}
    assert "`nightly-batch-inference` runs at 02:00 site time" in (ROOT / "README.md").read_text()
    assert deployments["ingest-on-demand"]["schedules"] == []


def _fire_times(cron: str) -> list[datetime]:
    from cronsim import CronSim  # Prefect's cron engine

    times = CronSim(cron, datetime(2026, 1, 1))
    return [next(times) for _ in range(3)]


def _gaps(times: list[datetime]) -> set[timedelta]:
    return {b - a for a, b in itertools.pairwise(times)}


def test_nightly_inference_uses_the_champion_alias_on_the_folders_the_listener_fills():
    parameters = _deployments()["nightly-batch-inference"]["parameters"]
    assert parameters["model_uri"].endswith("@champion")
    listener = dict(a.split("=", 1) for a in _compose()["services"]["dicom-listener"]["command"] if "=" in a)
    # What the listener files the nightly run reads; both write where the stack's data volume is.
    assert Path(listener["--out"]).is_relative_to(parameters["source"])
    assert Path(listener["--results"]).is_relative_to(parameters["out"])
    for folder in (parameters["source"], parameters["out"]):
        assert Path(folder).is_relative_to("/data"), folder


def _render(template: dict) -> dict:
    """The job configuration as a worker renders it from the variables' defaults."""
    values = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    values |= {"env": {"X": "1"}, "command": "prefect flow-run execute", "name": "run", "labels": {}}
    return apply_values(template["job_configuration"], values)


def test_docker_template_requests_one_gpu():
    template = json.loads((DEPLOY / "work-pools" / "docker-gpu.json").read_text())
    assert set(template) == {"job_configuration", "variables"}
    kwargs = _render(template)["container_create_kwargs"]
    assert kwargs["device_requests"] == [{"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}]


def test_process_template_is_valid_json():
    template = json.loads((DEPLOY / "work-pools" / "process.json").read_text())
    assert set(template) == {"job_configuration", "variables"}


SECRET_KEY = re.compile(r"PASSWORD|SECRET|AUTH_STRING|ACCESS_KEY", re.IGNORECASE)
REFERENCE = re.compile(r"^\$\{[A-Z0-9_]+:\?[^}]*\}$")


def _environment_items(compose: dict):
    for name, service in compose["services"].items():
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        for key, value in environment.items():
            yield name, key, value


def test_compose_takes_every_secret_from_the_environment():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    secrets = [(s, k, v) for s, k, v in _environment_items(compose) if SECRET_KEY.search(k)]
    assert len(secrets) >= 10
    for service, key, value in secrets:
        assert REFERENCE.match(str(value)), f"{service}: {key} must be a required ${{VAR:?}} reference"
    assert "${POSTGRES_PASSWORD:?" in compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]


def test_compose_gpu_worker_reserves_an_nvidia_gpu():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    worker = compose["services"]["gpu-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert worker["command"][:5] == ["prefect", "worker", "start", "--pool", "gpu-pool"]
    server = compose["services"]["prefect-server"]["environment"]
    assert server["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    assert "PREFECT_SERVER_API_AUTH_STRING" in server


def test_env_example_has_no_values_for_secrets():
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        if SECRET_KEY.search(key):
            assert value == "", f".env.example must leave {key} empty"


def test_dockerfile_runs_as_non_root_and_pins_torch():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}
    assert re.search(r"^ARG TORCH_VERSION=\d+\.\d+\.\d+$", dockerfile, re.MULTILINE)
    assert '"torch==${TORCH_VERSION}"' in dockerfile
    assert "grep -v '^torch==' requirements.lock" in dockerfile
    assert re.search(r"^WORKDIR /opt/unet-pipeline$", dockerfile, re.MULTILINE)
    lock_torch = re.search(r"^torch==([\d.]+)", (ROOT / "requirements.lock").read_text(), re.MULTILINE)
    assert lock_torch and f"ARG TORCH_VERSION={lock_torch.group(1)}" in dockerfile


def _flow_name(module: Path, func: str) -> str:
    """The Prefect flow name of `func`: `@flow(name=...)`, else the function name with hyphens."""
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == func:
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call):
                    for keyword in decorator.keywords:
                        if keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
                            return keyword.value.value
            return func.replace("_", "-")
    raise AssertionError(f"{module} defines no function {func}")


RUN_COMMAND = re.compile(r"prefect deployment run '([^'/]+)/([^']+)'")


@pytest.mark.parametrize("document", ["README.md", "deploy/README.md", "deploy/prefect.yaml"])
def test_documented_run_commands_name_the_real_flow(document):
    commands = RUN_COMMAND.findall((ROOT / document).read_text())
    deployments = _deployments()
    for flow_name, deployment_name in commands:
        assert deployment_name in deployments, f"{document}: no deployment {deployment_name}"
        path, func = deployments[deployment_name]["entrypoint"].split(":")
        if (ROOT / path).exists():
            assert flow_name == _flow_name(ROOT / path, func), (
                f"{document}: `prefect deployment run '{flow_name}/{deployment_name}'` but the flow in "
                f"{path} is named {_flow_name(ROOT / path, func)!r}"
            )


def test_zombie_automation_is_a_valid_prefect_automation_on_flow_run_heartbeats():
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    automation = AutomationCore.model_validate(
        yaml.safe_load((DEPLOY / "automations" / "zombie-flow-runs.yaml").read_text())
    )
    trigger = automation.trigger
    assert isinstance(trigger, EventTrigger) and automation.enabled
    assert trigger.posture == Posture.Proactive and trigger.threshold == 1
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    final = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    assert trigger.expect == {"prefect.flow-run.heartbeat", *final}
    assert trigger.for_each == {"prefect.resource.id"}
    assert trigger.match.root == {"prefect.resource.id": "prefect.flow-run.*"}
    # A few beats may be late on a busy server before a run counts as dead.
    assert trigger.within.total_seconds() >= 3 * int(HEARTBEAT_S)
    (action,) = automation.actions
    assert isinstance(action, ChangeFlowRunState) and action.state == StateType.CRASHED


def test_workers_send_flow_run_heartbeats_that_prefect_accepts(monkeypatch):
    from prefect.settings import Settings

    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for worker in ("gpu-worker", "cpu-worker"):
        env = compose["services"][worker]["environment"]
        assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == HEARTBEAT_S, worker
    # The variable Prefect reads, and a value it accepts (fewer than 30 s is refused).
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", HEARTBEAT_S)
    assert Settings().flows.heartbeat_frequency == int(HEARTBEAT_S)
    readme = (ROOT / "README.md").read_text()
    assert "prefect automation create --from-file deploy/automations/zombie-flow-runs.yaml" in readme


# ---------------------------------------------------------------------------------------------
# The stack's fixes (issue: the deployment starts and runs the job)


def _compose() -> dict:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return compose


def test_compose_files_follow_the_compose_specification():
    from tests.deploy.schemas import assert_compose_valid

    assert_compose_valid(DEPLOY / "docker-compose.yml", DEPLOY / "docker-compose.s3.yml")


def test_the_compose_schema_check_catches_a_misspelt_key(tmp_path):
    from tests.deploy.schemas import compose_errors

    compose = _compose()
    compose["services"]["mlflow"]["healthchek"] = compose["services"]["mlflow"].pop("healthcheck")
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(compose))
    assert any("healthchek" in error for error in compose_errors(bad))


def _long_running() -> list[str]:
    """Every service of the default stack that compose restarts (all but one-shots like `init`).

    Services behind an opt-in profile (the Dask workers of a multi-server site) are left out: the
    Dask worker has no health endpoint yet (an open gap, see deploy/README.md).
    """
    return [
        n
        for n, s in _compose()["services"].items()
        if s.get("restart", "no") != "no" and not s.get("profiles")
    ]


def test_the_long_running_services_are_the_expected_ones():
    assert {"postgres", "prefect-server", "mlflow", "gpu-worker", "cpu-worker"} <= set(_long_running())


@pytest.mark.parametrize("name", _long_running())
def test_every_long_running_service_has_a_healthcheck(name):
    service = _compose()["services"][name]
    test = service["healthcheck"]["test"]
    assert test[0] in {"CMD", "CMD-SHELL"} and len(test) > 1
    for dependency, condition in (service.get("depends_on") or {}).items():
        one_shot = _compose()["services"][dependency].get("restart", "no") == "no"
        expected = "service_completed_successfully" if one_shot else "service_healthy"
        assert condition["condition"] == expected, f"{name} -> {dependency}"


def test_healthchecks_probe_the_documented_endpoints():
    services = _compose()["services"]
    assert "/api/health" in services["prefect-server"]["healthcheck"]["test"][-1]
    assert "/health" in services["mlflow"]["healthcheck"]["test"][-1]
    for worker in ("gpu-worker", "cpu-worker"):
        assert "--with-healthcheck" in services[worker]["command"]
        assert "127.0.0.1:8080/health" in services[worker]["healthcheck"]["test"][-1]
    init = services["init"]["depends_on"]
    assert init == {
        "prefect-server": {"condition": "service_healthy"},
        "mlflow": {"condition": "service_healthy"},
    }
    bootstrap = (DEPLOY / "init" / "bootstrap.sh").read_text()
    assert "sleep" not in bootstrap and "for attempt" not in bootstrap  # compose waits, not the script


def test_no_unpublished_image_and_no_object_store_service():
    compose = _compose()
    images = [s["image"] for s in compose["services"].values() if "image" in s]
    assert not [i for i in images if "minio" in i], images
    for image in images:
        assert ":" in image and not image.endswith(":latest"), f"{image} must be pinned"
    assert compose["services"]["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"] == "/mlflow/artifacts"
    assert "mlflow-artifacts:/mlflow/artifacts" in compose["services"]["mlflow"]["volumes"]


def test_s3_overlay_takes_its_credentials_from_the_environment():
    overlay = yaml.safe_load((DEPLOY / "docker-compose.s3.yml").read_text())
    env = overlay["services"]["mlflow"]["environment"]
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://${MLFLOW_S3_BUCKET:?set it}"
    for key in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert REFERENCE.match(env[key]), f"{key} must be a required ${{VAR:?}} reference"
    example = (DEPLOY / ".env.example").read_text()
    for name in re.findall(r"\$\{([A-Z0-9_]+)", json.dumps(overlay)):
        assert re.search(rf"^{name}=", example, re.MULTILINE), f".env.example lacks {name}"


BARE_POSTGRES_URI = re.compile(r"postgresql://")


@pytest.mark.parametrize("document", ["deploy/mlflow/entrypoint.sh", "README.md", "deploy/README.md"])
def test_database_uris_name_their_driver(document):
    """SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which no image installs."""
    assert not BARE_POSTGRES_URI.search((ROOT / document).read_text()), document


def test_prefect_settings_put_results_and_home_on_the_shared_volume():
    env = _compose()["services"]["cpu-worker"]["environment"]
    assert env["PREFECT_HOME"] == "/data/work/prefect"
    assert env["PREFECT_LOCAL_STORAGE_PATH"].startswith("/data/")
    assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "pipeline"
    assert _compose()["services"]["gpu-worker"]["environment"] == env
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for setting in (
        "PREFECT_HOME=/data/work/prefect",
        "PREFECT_LOCAL_STORAGE_PATH=/data/work/prefect/storage",
        "PREFECT_LOGGING_EXTRA_LOGGERS=pipeline",
        "UNET_PIPELINE_CODE_DIR=/opt/unet-pipeline",
    ):
        assert setting in dockerfile, setting


def test_extra_loggers_setting_is_the_one_prefect_reads(monkeypatch):
    from prefect.settings import Settings

    monkeypatch.setenv("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline")
    assert Settings().logging.extra_loggers == ["pipeline"]


# ---------------------------------------------------------------------------------------------
# Locks: the runtime set (images), the dev set (make test), the MLflow server's set


@pytest.fixture
def deploy_lock():
    """deploy/lock.py, the script `make lock` runs (loaded from its file: deploy is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("deploy_lock", DEPLOY / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEV_TOOLS = {
    "pytest",
    "pytest-timeout",
    "ruff",
    "import-linter",
    "moto",
    "kubernetes-validate",
    "check-jsonschema",
}


def test_runtime_lock_has_no_dev_tools_and_the_dev_lock_adds_them(deploy_lock):
    runtime = deploy_lock.read_pins(ROOT / "requirements.lock")
    dev = deploy_lock.read_pins(ROOT / "requirements-dev.lock")
    assert not DEV_TOOLS & set(runtime)
    assert set(dev) >= DEV_TOOLS
    assert not set(runtime) & set(dev), "a package pinned in both locks can drift"
    assert (ROOT / "requirements-dev.lock").read_text().splitlines()[:3][-1] == "-r requirements.lock"
    assert re.fullmatch(r"torch==[\d.]+\+cpu", runtime["torch"])  # CPU wheel (the image: CUDA)
    for needed in ("prefect", "mlflow", "psycopg2-binary", "asyncpg", "monai"):
        assert needed in runtime, needed


def test_mlflow_server_pins_agree_with_the_pipeline_locks(deploy_lock):
    server = deploy_lock.read_pins(DEPLOY / "mlflow" / "requirements.txt")
    pipeline = deploy_lock.read_pins(ROOT / "requirements.lock") | deploy_lock.read_pins(
        ROOT / "requirements-dev.lock"
    )
    shared = set(server) & set(pipeline)
    assert {"mlflow", "sqlalchemy", "psycopg2-binary", "boto3"} <= shared
    assert {k: server[k] for k in shared} == {k: pipeline[k] for k in shared}
    assert "flask-wtf" in server and "torch" not in server
    dockerfile = (DEPLOY / "mlflow" / "Dockerfile").read_text()
    assert "pip install -r /tmp/requirements.txt" in dockerfile


def test_images_install_the_runtime_lock():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "COPY requirements.lock ./" in dockerfile
    assert not re.search(r"^(COPY|RUN).*requirements-dev", dockerfile, re.MULTILINE)
