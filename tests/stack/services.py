"""The services of deploy/docker-compose.yml, started on this machine as compose would start them.

`Stack` makes fresh PostgreSQL roles and databases with deploy/postgres/init-databases.sh, then
starts the Prefect server, MLflow (deploy/mlflow/entrypoint.sh), the one-shot `init`
(deploy/init/bootstrap.sh) and the two workers, each once the services it depends on pass their
compose healthchecks; everything it started is stopped by PID and the databases and roles are
dropped when it exits, also on failure.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import uuid
from pathlib import Path

import psycopg2

from tests.stack.local import (
    DEPLOY,
    REPO,
    Process,
    Translation,
    base_env,
    free_port,
    healthcheck_argv,
    healthy,
    image_venv,
    listen_args,
    load_compose,
    run,
)

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
CODE_DIR = "/opt/unet-pipeline"  # the image's WORKDIR and UNET_PIPELINE_CODE_DIR
START_S = 240.0  # a cold server start on a busy 2-core machine (migrations, UI build)
WORKERS = ("cpu-worker", "gpu-worker")


def dockerfile_env(dockerfile: Path) -> dict[str, str]:
    """The ENV settings of a Dockerfile (what every container of the image starts with)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env |= dict(item.split("=", 1) for item in line[4:].split())
    return env


def dotenv(data: Path) -> dict[str, str]:
    """deploy/.env as an admin fills it in: every key of .env.example, secrets made like the runbook's."""
    values = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.startswith("#") or "=" not in line:
            continue
        key, default = line.split("=", 1)
        values[key] = default or secrets.token_hex(16)
    return values | {
        "PREFECT_AUTH_STRING": f"admin:{secrets.token_hex(16)}",
        "UNET_DATA_DIR": str(data),
        "BIND_ADDRESS": "127.0.0.1",
        "MLFLOW_S3_BUCKET": "mlflow-artifacts",
    }


def _pg():
    conn = psycopg2.connect(dbname="postgres", connect_timeout=5, **PG)
    conn.autocommit = True
    return conn


class Stack:
    """The compose services as local processes; a context manager that always cleans up."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.data = root / "data"
        for sub in ("incoming", "staging", "results", "work"):
            (self.data / sub).mkdir(parents=True, exist_ok=True)
        self.artifacts = root / "mlflow-artifacts"
        self.env = dotenv(self.data)
        tag = uuid.uuid4().hex[:8]
        self.db = {
            "PREFECT_DB_USER": f"stack_prefect_{tag}",
            "PREFECT_DB_NAME": f"stack_prefect_{tag}",
            "MLFLOW_DB_USER": f"stack_mlflow_{tag}",
            "MLFLOW_DB_NAME": f"stack_mlflow_{tag}",
            "MLFLOW_AUTH_DB_NAME": f"stack_mlflow_auth_{tag}",
        }
        self.extra_databases: list[str] = []
        self.ports = {"prefect-server": free_port(), "mlflow": free_port(), "postgres": PG["port"]}
        self.worker_ports = {name: free_port() for name in WORKERS}
        self.processes: list[Process] = []
        self.compose = load_compose(self.env)
        self.translation = Translation(
            self.ports, {"/data": self.data, "/mlflow/artifacts": self.artifacts, CODE_DIR: REPO}
        )
        self.prefect_api = f"http://127.0.0.1:{self.ports['prefect-server']}/api"
        self.mlflow_uri = f"http://127.0.0.1:{self.ports['mlflow']}"

    # -- the images' venvs -------------------------------------------------------------------

    def build_venvs(self) -> None:
        self.runtime = image_venv("pipeline", REPO / "requirements.lock", self.logs / "venv-pipeline.log")
        self.mlflow_venv = image_venv(
            "mlflow", DEPLOY / "mlflow" / "requirements.txt", self.logs / "venv-mlflow.log"
        )

    # -- services ----------------------------------------------------------------------------

    def service(self, name: str) -> dict:
        return self.compose["services"][name]

    def pipeline_env(self, name: str, home: str) -> dict[str, str]:
        """A pipeline-image container's environment: the image's ENV, then the service's."""
        image = {
            k: v
            for k, v in dockerfile_env(DEPLOY / "Dockerfile").items()
            if k not in {"PATH", "VIRTUAL_ENV"} and not k.startswith("NVIDIA_")
        }
        env = base_env(self.runtime, self.root / home)
        env |= self.translation.env(image | self.service(name)["environment"])
        # The image installs the code into its venv; here the venv holds only the pinned packages.
        return env | {"PYTHONPATH": str(REPO)}

    def _start(self, process: Process) -> Process:
        self.processes.append(process)
        return process.start()

    def _wait_healthy(self, process: Process, name: str, venv: Path, port: int) -> None:
        argv = healthcheck_argv(self.service(name), venv, port)
        process.wait_until(lambda: healthy(argv), START_S)

    def create_databases(self) -> None:
        env = base_env(self.runtime, self.root / "postgres-home") | {
            "POSTGRES_USER": PG["user"],
            "PGHOST": PG["host"],
            "PGPORT": str(PG["port"]),
            **self.service("postgres")["environment"],
            **self.db,
        }
        env.pop("POSTGRES_PASSWORD")  # trust auth on loopback here
        run(
            "init-databases",
            ["bash", str(DEPLOY / "postgres" / "init-databases.sh")],
            env,
            self.logs / "postgres-init.log",
            60,
        )

    def start_servers(self) -> None:
        server = self.service("prefect-server")
        prefect_env = base_env(self.runtime, self.root / "prefect-server-home")
        prefect_env |= self.translation.env(server["environment"]) | {
            "PREFECT_SERVER_DATABASE_USER": self.db["PREFECT_DB_USER"],
            "PREFECT_SERVER_DATABASE_NAME": self.db["PREFECT_DB_NAME"],
        }
        prefect = self._start(
            Process(
                "prefect-server",
                listen_args(server["command"], self.ports["prefect-server"]),
                prefect_env,
                self.logs / "prefect-server.log",
            )
        )
        mlflow_env = base_env(self.mlflow_venv, self.root / "mlflow-home")
        mlflow_env |= self.translation.env(self.service("mlflow")["environment"]) | {
            "MLFLOW_DB_USER": self.db["MLFLOW_DB_USER"],
            "MLFLOW_DB_NAME": self.db["MLFLOW_DB_NAME"],
            "MLFLOW_AUTH_DB_NAME": self.db["MLFLOW_AUTH_DB_NAME"],
            "MLFLOW_HOST": "127.0.0.1",
            "MLFLOW_PORT": str(self.ports["mlflow"]),
        }
        self.mlflow_env = mlflow_env
        mlflow = self._start(Process("mlflow", self.mlflow_argv(), mlflow_env, self.logs / "mlflow.log"))
        self._wait_healthy(prefect, "prefect-server", self.runtime, self.ports["prefect-server"])
        self._wait_healthy(mlflow, "mlflow", self.mlflow_venv, self.ports["mlflow"])

    @staticmethod
    def mlflow_argv() -> list[str]:
        # The image's ENTRYPOINT is this script, copied to /usr/local/bin/mlflow-entrypoint.
        return ["/bin/sh", str(DEPLOY / "mlflow" / "entrypoint.sh")]

    def run_init(self) -> str:
        init = self.service("init")
        argv = [*init["entrypoint"], *init.get("command", [])]
        return run("init", argv, self.pipeline_env("init", "init-home"), self.logs / "init.log", 300)

    def start_workers(self) -> None:
        started = []
        for name in WORKERS:
            env = self.pipeline_env(name, f"{name}-home") | {
                "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
                "PREFECT_WORKER_WEBSERVER_PORT": str(self.worker_ports[name]),
            }
            started.append(
                self._start(Process(name, self.service(name)["command"], env, self.logs / f"{name}.log"))
            )
        for name, process in zip(WORKERS, started, strict=True):
            self._wait_healthy(process, name, self.runtime, self.worker_ports[name])

    def exec(self, argv: list[str], log: str, timeout_s: float = 600) -> str:
        """A command in the cpu-worker's environment (the runbook's `dc exec cpu-worker ...`)."""
        return run(
            log, argv, self.pipeline_env("cpu-worker", "exec-home"), self.logs / f"{log}.log", timeout_s
        )

    # -- extra databases (the S3 variant's MLflow) --------------------------------------------

    def create_database(self, name: str) -> str:
        conn = _pg()
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}" OWNER "{self.db["MLFLOW_DB_USER"]}"')
        finally:
            conn.close()
        self.extra_databases.append(name)
        return name

    def start(self, process: Process) -> Process:
        return self._start(process)

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        try:
            self.build_venvs()
            self.create_databases()
            self.start_servers()
            self.run_init()
            self.start_workers()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for process in reversed(self.processes):  # workers first, servers last
            process.stop()
        self.processes.clear()
        self.drop_databases()

    def drop_databases(self) -> None:
        with contextlib.closing(_pg()) as conn, conn.cursor() as cur:
            for db in (
                *self.extra_databases,
                self.db["PREFECT_DB_NAME"],
                self.db["MLFLOW_DB_NAME"],
                self.db["MLFLOW_AUTH_DB_NAME"],
            ):
                cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            for role in (self.db["PREFECT_DB_USER"], self.db["MLFLOW_DB_USER"]):
                cur.execute(f'DROP ROLE IF EXISTS "{role}"')

    def tails(self) -> str:
        """The end of every service's log, for a failure message."""
        return "\n".join(f"--- {p.name}\n{p.tail(30)}" for p in self.processes)
