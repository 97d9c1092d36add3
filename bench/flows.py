"""Orchestration overhead: `batch_inference_flow` over the same pipeline calls without Prefect.

    python bench/flows.py                      # 50 cases of 48 x 48 x 24, thread task runner
    python bench/flows.py --cases 20 --repeats 2

Without Prefect: `prepare_batch`, then `predict_case` for each case in this process, then
`finalize_batch` and `track_batch` (the batch's MLflow run, in a local store). With Prefect:
`batch_inference_flow` (thread task runner, each case in a long-lived worker process killed at
its timeout, per-case caching, artifacts, the MLflow run) on Prefect's ephemeral API,
started and warmed up before timing. Each run writes into a fresh OUT folder, so every case runs.
Ratio = flow seconds / plain seconds (target <= 1.10). The model is an untrained tiny U-Net with a
plan from a small demo dataset (speed does not depend on the weights).

--api postgres (the default when PostgreSQL answers on 127.0.0.1:5432) runs the flow against a
`prefect server` on PostgreSQL, as deployed; --api ephemeral uses Prefect's temporary SQLite
server. On SQLite, concurrent task-run writes meet SQLITE_BUSY: the server answers 503 and the
client backs off 2 s each time, so there the ratio measures SQLite's locking, not our flow.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _make_cases(src: Path, n: int, shape: tuple[int, int, int], seed: int = 0) -> None:
    """`n` synthetic NIfTI volumes: a bright ellipsoid on noise, 1 x 1 x 2.5 mm voxels."""
    rng = np.random.default_rng(seed)
    src.mkdir(parents=True)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    for i in range(n):
        radii = rng.uniform(0.3, 0.7, size=3)[:, None, None, None]
        blob = ((grid / radii) ** 2).sum(axis=0) < 1
        data = (rng.normal(0, 20, shape) + 100 + 300 * blob).astype(np.int16)
        nib.save(nib.Nifti1Image(data, affine), src / f"bench_{i:03d}.nii.gz")


def _postgres_up(host: str = "127.0.0.1", port: int = 5432) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


@contextlib.contextmanager
def prefect_server_on_postgres(home: Path):
    """A `prefect server` on a fresh PostgreSQL database, on a free loopback port; yields its API URL."""
    import httpx
    import psycopg2

    db = f"bench_flows_{os.getpid()}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{db}"')
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://postgres@127.0.0.1:5432/{db}",
    }
    log = open(home.parent / "prefect-server.log", "wb")  # noqa: SIM115  (closed below)
    prefect = str(Path(sys.executable).parent / "prefect")
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start; see {log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield api
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.close()


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=50)
    p.add_argument("--shape", type=int, nargs=3, default=(48, 48, 24))
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each (the best counts)")
    p.add_argument(
        "--api",
        choices=["postgres", "ephemeral"],
        default="postgres" if _postgres_up() else "ephemeral",
        help="Prefect server on PostgreSQL (as deployed), or the temporary SQLite one",
    )
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-flows-"))
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("UNET_PIPELINE_WORKDIR", str(tmp / "workdir"))
    try:
        with contextlib.ExitStack() as stack:
            if args.api == "postgres":
                (tmp / "server").mkdir()
                api = stack.enter_context(prefect_server_on_postgres(tmp / "server"))
                os.environ["PREFECT_API_URL"] = api
            result = _measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shape = "x".join(map(str, args.shape))
    print(f"batch inference, {args.cases} cases of {shape}, CPU, Prefect API: {args.api}")
    print(f"  without Prefect {result['plain_s']:.2f} s; batch_inference_flow {result['flow_s']:.2f} s")
    print(f"  ratio flow / plain = {result['ratio']:.3f} (target <= 1.10)")
    return result


def _measure(args, tmp: Path) -> dict[str, float]:
    from flows.common import task_runner
    from flows.inference import batch_inference_flow
    from pipeline.inference.batch import BatchSettings, finalize_batch, predict_case, prepare_batch
    from pipeline.ingest import ingest
    from pipeline.planning.plan import plan_dataset
    from pipeline.synthetic.dataset import make_demo_dataset
    from pipeline.tracking.batch import track_batch
    from tests.pipeline.inference.predict_fixture import save_untrained_model

    demo = make_demo_dataset(tmp / "demo", n_cases=3, size=48)
    secret = tmp / "secret"
    ingest(demo.msd_root, tmp / "staging", secret_file=secret, workers=1)
    model = save_untrained_model(plan_dataset(tmp / "staging"), tmp / "model")
    src = tmp / "cases"
    _make_cases(src, args.cases, tuple(args.shape))
    warm = tmp / "warm"
    _make_cases(warm, 2, tuple(args.shape), seed=1)
    flow = batch_inference_flow.with_options(task_runner=task_runner("threads"))
    common = {"model_uri": str(model), "device": "cpu", "secret_file": str(secret)}
    flow(str(warm), str(tmp / "out-warm"), **common)  # starts the API server and the forkserver

    def plain(out: Path) -> int:
        plan = prepare_batch(src, model, out, BatchSettings(device="cpu", secret_file=secret))
        for case_id in plan.todo:
            predict_case(out, case_id)
        ok = finalize_batch(out).count("ok")
        track_batch(out)  # the flow records the batch in MLflow too
        return ok

    def orchestrated(out: Path) -> int:
        return flow(str(src), str(out), **common)["ok"]

    best = {"plain": float("inf"), "flow": float("inf")}
    for r in range(args.repeats):
        for name, fn in (("plain", plain), ("flow", orchestrated)):
            out = tmp / f"out-{name}-{r}"
            start = time.perf_counter()
            ok = fn(out)
            best[name] = min(best[name], time.perf_counter() - start)
            if ok != args.cases:
                raise RuntimeError(f"{name}: {ok} of {args.cases} cases ok")
            shutil.rmtree(out)
    return {"plain_s": best["plain"], "flow_s": best["flow"], "ratio": best["flow"] / best["plain"]}


if __name__ == "__main__":
    main()
