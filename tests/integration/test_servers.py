"""The batch inference deployment against real servers: Prefect and MLflow on PostgreSQL.

A module fixture creates two fresh PostgreSQL databases and starts `prefect server` and
`mlflow server` on them as subprocesses on free loopback ports; the deployment is served by
`batch_inference_flow.serve` in another subprocess (a long-lived worker) and every flow run is
triggered through the Prefect API. Fault tests: the worker killed mid-batch and restarted, the
MLflow server down during inference and during training, the same batch submitted twice at once.

Skipped only when PostgreSQL is not reachable on 127.0.0.1:5432 (`.ci/run` starts it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil
import psycopg2
import pytest

from pipeline.ingest import ingest
from pipeline.io.manifest import read_manifest
from pipeline.io.model_dir import load_model_dir
from pipeline.synthetic.dataset import make_demo_dataset
from pipeline.tracking.release import gate_run, register_model, train_and_log
from tests.pipeline.ingest.staging_fixture import tiny_config

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
DEPLOYMENT = "servers-test"
MODEL_NAME = "servers-seg"
N_CASES = 5
# What the served worker and the test process both use: fail fast when MLflow is down (its
# default is 7 retries with exponential backoff, minutes per request).
MLFLOW_FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}

TINY = tiny_config()


# ---------------------------------------------------------------------------------------------
# Processes and databases


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _family(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        parent = psutil.Process(proc.pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill_tree(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
    """Stop a process and all its descendants (servers and the runner start their own children,
    some in sessions of their own, so a process-group signal would miss them)."""
    family = _family(proc)
    if sig == signal.SIGKILL:
        # Freeze the tree first: a stopped process cannot fork a child that the kill would miss
        # (the flow-run process forks one child per case).
        while True:
            for p in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.suspend()
            grown = _family(proc)
            if {p.pid for p in grown} <= {p.pid for p in family}:
                break
            family = grown
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()


class Service:
    """A subprocess with a log file, started until `ready()` holds or killed at a deadline."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path, ready) -> None:
        self.name, self.argv, self.env, self.log, self.ready = name, argv, env, log, ready
        self.proc: subprocess.Popen | None = None

    def launch(self) -> Service:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            if self.ready():
                return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready after {timeout_s:.0f} s:\n{self.tail()}")

    def start(self, timeout_s: float = 120.0) -> None:
        self.launch().wait_ready(timeout_s)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _kill_tree(self.proc, sig)
        self.proc = None

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _pg():
    conn = psycopg2.connect(dbname="postgres", connect_timeout=3, **PG)
    conn.autocommit = True
    return conn


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return env | {"PYTHONUNBUFFERED": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


class Servers:
    def __init__(self, root: Path) -> None:
        try:
            _pg().close()
        except psycopg2.OperationalError as exc:
            pytest.skip(f"PostgreSQL is not reachable on 127.0.0.1:5432 (.ci/run starts it): {exc}")
        tag = uuid.uuid4().hex[:10]
        self.databases = [f"test_prefect_{tag}", f"test_mlflow_{tag}"]
        self.root = root
        prefect_port, mlflow_port = _free_port(), _free_port()
        self.prefect_api = f"http://127.0.0.1:{prefect_port}/api"
        self.mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
        self.prefect = Service(
            "prefect server",
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            _clean_env()
            | {
                "PREFECT_HOME": str(root / "prefect-server-home"),
                "PREFECT_API_DATABASE_CONNECTION_URL": (
                    f"postgresql+asyncpg://postgres@127.0.0.1:5432/{self.databases[0]}"
                ),
                "PREFECT_SERVER_UI_ENABLED": "false",
            },
            root / "prefect-server.log",
            lambda: _healthy(f"{self.prefect_api}/health"),
        )
        self.mlflow = Service(
            "mlflow server",
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"postgresql+psycopg2://postgres@127.0.0.1:5432/{self.databases[1]}",
                "--artifacts-destination",
                (root / "mlflow-artifacts").as_uri(),
            ],
            # No background job consumers: six extra processes this test never uses.
            _clean_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            root / "mlflow-server.log",
            lambda: _healthy(f"{self.mlflow_uri}/health"),
        )

    def _each_database(self, statement: str) -> None:
        """Run `statement` (with {db}) for each test database, outside a transaction."""
        conn = _pg()  # (psycopg2's `with conn` opens a transaction, where CREATE DATABASE may not run)
        try:
            with conn.cursor() as cur:
                for db in self.databases:
                    cur.execute(statement.format(db=db))
        finally:
            conn.close()

    def __enter__(self) -> Servers:
        self._each_database('CREATE DATABASE "{db}"')
        try:
            self.prefect.launch(), self.mlflow.launch()  # both start at once: their start-up overlaps
            self.prefect.wait_ready()
            self.mlflow.wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.prefect.stop()
        self.mlflow.stop()
        self._each_database('DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


class Worker:
    """`batch_inference_flow.serve(...)` in a subprocess: the deployment and its long-lived worker."""

    def __init__(self, servers: Servers, root: Path) -> None:
        env = (
            _clean_env()
            | MLFLOW_FAST_FAIL
            | {
                "PREFECT_API_URL": servers.prefect_api,
                "PREFECT_HOME": str(root / "worker-home"),
                "PREFECT_RUNNER_POLL_FREQUENCY": "1",
                "MLFLOW_TRACKING_URI": servers.mlflow_uri,
                "UNET_PIPELINE_WORKDIR": str(root / "worker-workdir"),
            }
        )
        code = (
            "from flows.inference import batch_inference_flow\n"
            f"batch_inference_flow.serve(name={DEPLOYMENT!r}, limit=4, print_starting_message=False)\n"
        )
        self.service = Service(
            "served deployment", [sys.executable, "-c", code], env, root / "worker.log", self._deployed
        )

    @staticmethod
    def _deployed() -> bool:
        from prefect import get_client
        from prefect.exceptions import ObjectNotFound

        try:
            with get_client(sync_client=True) as client:
                client.read_deployment_by_name(f"batch-inference/{DEPLOYMENT}")
            return True
        except ObjectNotFound:
            return False

    def kill(self) -> None:
        """SIGKILL the worker and everything under it (the flow-run process and its case children)."""
        self.service.stop(signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("servers")
    with Servers(root) as srv, temporary_settings(updates={PREFECT_API_URL: srv.prefect_api}):
        yield srv


@pytest.fixture(scope="module")
def world(servers, tmp_path_factory):
    """A staged tiny dataset and a model trained, logged, registered and gated on the MLflow server."""
    root = tmp_path_factory.mktemp("world")
    demo = make_demo_dataset(root / "demo", n_cases=N_CASES, seed=3, size=32)
    staging = root / "staging"
    ingest(demo.msd_root, staging, secret_file=root / "secret", workers=1)
    trained = train_and_log(staging, root / "run", TINY, tracking_uri=servers.mlflow_uri)
    assert trained.tracking_error is None, trained.tracking_error
    version = register_model(trained.model_uri, MODEL_NAME, tracking_uri=servers.mlflow_uri)
    assert gate_run(MODEL_NAME, version, root / "run", staging, TINY, tracking_uri=servers.mlflow_uri)
    case_ids = sorted(r["case_id"] for r in read_manifest(staging))
    assert len(case_ids) == N_CASES
    return {"root": root, "staging": staging, "trained": trained, "version": version, "cases": case_ids}


@pytest.fixture(scope="module")
def worker(servers, tmp_path_factory):
    w = Worker(servers, tmp_path_factory.mktemp("worker"))
    w.service.start()
    yield w
    w.service.stop()


@pytest.fixture
def mlflow_fast_fail(monkeypatch):
    for key, value in MLFLOW_FAST_FAIL.items():
        monkeypatch.setenv(key, value)


def _params(world, out: Path, model_uri: str = f"models:/{MODEL_NAME}@champion") -> dict:
    return {
        "source": str(world["staging"]),
        "out": str(out),
        "model_uri": model_uri,
        "device": "cpu",
        "batch_size": 8,
        "case_timeout_s": 120.0,
    }


def _submit(params: dict):
    """Create a flow run of the served deployment through the API; return it at once."""
    from prefect.deployments import run_deployment

    return run_deployment(name=f"batch-inference/{DEPLOYMENT}", parameters=params, timeout=0)


def _wait(flow_run_id, timeout_s: float = 120.0):
    """The flow run once it is final (polled through the API)."""
    from prefect import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"flow run {flow_run_id} still {run.state_name} after {timeout_s:.0f} s")
            time.sleep(0.5)


def _flow_run(flow_run_id):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.02)


def _done(out: Path, case_ids: list[str]) -> dict[str, int]:
    """Case -> mtime_ns of its done-marker, for the cases that have one."""
    stamps = {}
    for case_id in case_ids:
        with contextlib.suppress(FileNotFoundError):
            stamps[case_id] = (out / case_id / "done.json").stat().st_mtime_ns
    return stamps


def _assert_outputs(out: Path, case_ids: list[str]) -> dict:
    for case_id in case_ids:
        assert (out / case_id / "seg.nii.gz").is_file(), f"no mask for {case_id}"
        assert (out / case_id / "done.json").is_file(), f"no done-marker for {case_id}"
    assert (out / "results.csv").is_file() and (out / "report.html").is_file()
    return json.loads((out / "run_manifest.json").read_text())


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.mark.slow
def test_served_deployment_run_through_the_api_completes_with_outputs_and_mlflow_records(
    servers, world, worker, tmp_path
):
    import mlflow
    from prefect.deployments import run_deployment

    out = tmp_path / "out"
    run = run_deployment(
        name=f"batch-inference/{DEPLOYMENT}", parameters=_params(world, out), timeout=150, poll_interval=1
    )
    assert run.state.is_completed(), f"{run.state}\n{worker.service.tail()}"

    manifest = _assert_outputs(out, world["cases"])
    assert manifest["counts"] == manifest["counts"] | {"cases": N_CASES, "ok": N_CASES, "processed": N_CASES}
    trained = world["trained"]
    assert manifest["model"]["name"] == MODEL_NAME
    assert manifest["model"]["version"] == str(world["version"])  # the alias resolved to its number
    assert manifest["model"]["run_id"] == trained.run_id

    client = mlflow.MlflowClient(servers.mlflow_uri, servers.mlflow_uri)
    assert client.get_run(trained.run_id).info.status == "FINISHED"
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.version == str(world["version"]) and champion.run_id == trained.run_id
    assert champion.tags["weights_sha256"] == manifest["model"]["sha256"]
    batch_run = client.get_run(manifest["tracking"]["run_id"])  # the batch itself, one run
    assert batch_run.info.status == "FINISHED"
    assert batch_run.data.tags["model_version"] == str(world["version"])
    assert batch_run.data.metrics["ok"] == N_CASES


@pytest.mark.slow
def test_worker_killed_mid_batch_and_restarted_finishes_only_what_is_left(world, worker, tmp_path):
    out = tmp_path / "out"
    first = _submit(_params(world, out))
    _wait_for(lambda: _done(out, world["cases"]), 120, "the first done-marker")
    worker.kill()
    before = _done(out, world["cases"])
    assert 0 < len(before) < N_CASES, f"the batch finished before the kill ({len(before)} cases done)"
    assert not _flow_run(first.id).state.is_completed()  # killed: it never reported completion

    worker.service.start()
    second = _wait(_submit(_params(world, out)).id)
    assert second.state.is_completed(), f"{second.state}\n{worker.service.tail()}"
    manifest = _assert_outputs(out, world["cases"])
    after = _done(out, world["cases"])
    assert {c: after[c] for c in before} == before, "a case finished before the kill was redone"
    assert manifest["counts"]["processed"] == N_CASES - len(before)
    assert manifest["counts"]["skipped"] == len(before)


def test_same_case_submitted_twice_at_once_is_processed_once(servers, world, tmp_path, monkeypatch):
    """Two workers given the same planned case at the same moment: one runs it, one finds it done."""
    from pipeline.inference.batch import BatchSettings, predict_case, prepare_batch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers.mlflow_uri)
    out = tmp_path / "out"
    plan = prepare_batch(
        world["staging"],
        f"models:/{MODEL_NAME}@champion",
        out,
        BatchSettings(device="cpu", secret_file=tmp_path / "s"),
    )
    case_id = plan.case_ids[0]
    start = threading.Barrier(2)

    def submit(_):
        start.wait()
        return predict_case(out, case_id)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        statuses = sorted(r["status"] for r in pool.map(submit, range(2)))
    assert statuses == ["ok", "skipped"]
    assert (out / case_id / "seg.nii.gz").is_file()
    assert not any((out / c).exists() for c in plan.case_ids[1:])  # nothing else was touched


@pytest.mark.slow
def test_mlflow_down_during_inference_and_training(servers, world, worker, tmp_path, mlflow_fast_fail):
    """The batch still yields its masks, training keeps its model, and no MLflow run stays RUNNING."""
    import mlflow

    from pipeline.tracking import Tracker

    client = mlflow.MlflowClient(servers.mlflow_uri, servers.mlflow_uri)
    tracker = Tracker(experiment="servers-outage", tracking_uri=servers.mlflow_uri).start()
    tracker.log_params({"train": {"epochs": 2}})
    assert tracker.active, tracker.tracking_error

    out = tmp_path / "out"
    run = _submit(_params(world, out))
    # The model is verified and staged in OUT/.batch/ once batch.json is written: then MLflow goes.
    _wait_for(lambda: (out / ".batch" / "batch.json").is_file(), 120, "the batch plan")
    servers.mlflow.stop()
    try:
        tracker.on_epoch_end(0, {"loss": 1.0})
        tracker.flush()
        assert tracker.tracking_error and servers.mlflow_uri in tracker.tracking_error
        offline = train_and_log(world["staging"], tmp_path / "run", TINY, tracking_uri=servers.mlflow_uri)
        assert offline.model_uri is None and offline.run_id is None and offline.tracking_error
        assert load_model_dir(offline.model_dir).sha256  # the model stands, verified

        finished = _wait(run.id)
        assert finished.state.is_completed(), f"{finished.state}\n{worker.service.tail()}"
        manifest = _assert_outputs(out, world["cases"])
        assert manifest["counts"]["ok"] == N_CASES
        # The batch's own MLflow record failed: a note says so, without the server's credentials.
        tracking = manifest["tracking"]
        assert tracking["status"] == "failed" and tracking["run_id"] is None, tracking
        assert servers.mlflow_uri in tracking["error"]
    finally:
        servers.mlflow.start()
    tracker.end()  # the server is back: the run is ended, not left RUNNING
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments, "attributes.status = 'RUNNING'")
