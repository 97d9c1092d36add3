"""Thousands of cases: orchestration cost per case and the flow's memory as the batch grows.

    python bench/scale.py                          # 10, 100 and 1000 cases of 48 x 48 x 8
    python bench/scale.py --sizes 10 100 --chunk-size 1

For each size N: the same N small synthetic NIfTI cases once through the pipeline without
Prefect (`prepare_batch`, `predict_case` per case in the flows' worker processes from as many
threads as the flow has slots, `finalize_batch`) and once
through `batch_inference_flow` (thread task runner, default chunking unless --chunk-size, no
MLflow run) on a `prefect server` on a fresh PostgreSQL database (bench/flows.py's helper; it is
dropped afterwards). Each run writes into a fresh OUT folder, so every case runs.

Printed per size: orchestration cost per case = (flow seconds - plain seconds) / N, the flow
process's peak RSS while the flow ran (sampled every 50 ms) and its growth over the RSS before
the run. Goal: cost per case at the largest size within 1.2x of the cost at the smallest, and
the memory not growing with N beyond the results table. The worker processes that run the cases
are not the flow process and are not counted (they are the same in both runs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.flows import _make_cases, _postgres_up, prefect_server_on_postgres


class PeakRss:
    """The highest RSS of this process while the block runs (sampled; the OS's peak is lifelong)."""

    def __init__(self, every_s: float = 0.05) -> None:
        import psutil

        self._proc, self._every = psutil.Process(), every_s
        self.before = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self._every):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self.before = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--shape", type=int, nargs=3, default=(48, 48, 8))
    p.add_argument(
        "--chunk-size", type=int, default=None, help="cases per predict task (default: the flow's)"
    )
    p.add_argument(
        "--footprint",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="instead: a worker's peak memory per voxel of one X x Y x Z case (BYTES_PER_VOXEL)",
    )
    args = p.parse_args(argv)
    if args.footprint:
        return [_footprint(tuple(args.footprint))]
    if not _postgres_up():
        raise SystemExit(
            "bench/scale.py needs PostgreSQL on 127.0.0.1:5432 (a Prefect server on it, as deployed)"
        )

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("UNET_PIPELINE_WORKDIR", str(tmp / "workdir"))
    try:
        with contextlib.ExitStack() as stack:
            (tmp / "server").mkdir()
            os.environ["PREFECT_API_URL"] = stack.enter_context(prefect_server_on_postgres(tmp / "server"))
            rows = _measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print(rows, args)
    return rows


def _measure(args, tmp: Path) -> list[dict]:
    from flows.inference import batch_inference_flow, chunk_size_for
    from flows.workers import run_isolated
    from pipeline.inference.batch import BatchSettings, finalize_batch, predict_case, prepare_batch
    from pipeline.system import available_cores

    model, secret = _setup(tmp)
    common = {"model_uri": str(model), "device": "cpu", "secret_file": str(secret), "mlflow_experiment": None}
    warm = tmp / "warm"
    _make_cases(warm, 2, tuple(args.shape), seed=1)
    batch_inference_flow(str(warm), str(tmp / "out-warm"), **common)  # the forkserver, the API client

    rows = []
    for n in args.sizes:
        src = tmp / f"cases-{n}"
        _make_cases(src, n, tuple(args.shape))

        out = tmp / f"out-plain-{n}"
        start = time.perf_counter()
        plan = prepare_batch(src, model, out, BatchSettings(device="cpu", secret_file=secret))
        # The flow's slots and worker processes, without Prefect: the difference is orchestration.
        with ThreadPoolExecutor(max_workers=available_cores()) as pool:
            calls = [pool.submit(run_isolated, predict_case, str(out), c, timeout_s=None) for c in plan.todo]
            for call in calls:
                call.result()
        ok = finalize_batch(out).count("ok")
        plain_s = time.perf_counter() - start
        if ok != n:
            raise RuntimeError(f"plain: {ok} of {n} cases ok")
        shutil.rmtree(out)

        out = tmp / f"out-flow-{n}"
        with PeakRss() as rss:
            start = time.perf_counter()
            summary = batch_inference_flow(str(src), str(out), chunk_size=args.chunk_size, **common)
            flow_s = time.perf_counter() - start
        if summary["ok"] != n:
            raise RuntimeError(f"flow: {summary['ok']} of {n} cases ok")
        results_kib = (out / "results.csv").stat().st_size / 1024
        shutil.rmtree(out)
        shutil.rmtree(src)
        rows.append(
            {
                "cases": n,
                "chunk": args.chunk_size or chunk_size_for(n, available_cores()),
                "plain_s": plain_s,
                "flow_s": flow_s,
                "cost_ms": 1000 * (flow_s - plain_s) / n,
                "peak_mib": rss.peak / 2**20,
                "growth_mib": (rss.peak - rss.before) / 2**20,
                "results_kib": results_kib,
            }
        )
        r = rows[-1]
        print(
            f"  {n} cases: plain {plain_s:.1f} s, flow {flow_s:.1f} s, {r['cost_ms']:.1f} ms/case",
            file=sys.stderr,
        )
    return rows


def _setup(tmp: Path) -> tuple[Path, Path]:
    """(model folder, site secret): an untrained tiny U-Net with the demo dataset's plan."""
    from pipeline.ingest import ingest
    from pipeline.planning.plan import plan_dataset
    from pipeline.synthetic.dataset import make_demo_dataset
    from tests.pipeline.inference.predict_fixture import save_untrained_model

    demo = make_demo_dataset(tmp / "demo", n_cases=3, size=48)
    secret = tmp / "secret"
    ingest(demo.msd_root, tmp / "staging", secret_file=secret, workers=1)
    return save_untrained_model(plan_dataset(tmp / "staging"), tmp / "model"), secret


def _footprint(shape: tuple[int, int, int]) -> dict:
    """A warm worker's peak RSS growth while it predicts one case of `shape`, per input voxel."""
    import resource

    from flows.workers import WorkerPool
    from pipeline.inference.batch import BatchSettings, predict_case, prepare_batch
    from pipeline.inference.footprint import BYTES_PER_VOXEL, planned_voxels

    tmp = Path(tempfile.mkdtemp(prefix="bench-footprint-"))
    pool = WorkerPool()
    try:
        model, secret = _setup(tmp)
        outs = {}
        for name, case_shape in (("small", (48, 48, 8)), ("large", shape)):
            _make_cases(tmp / name, 1, case_shape)
            plan = prepare_batch(
                tmp / name, model, tmp / f"out-{name}", BatchSettings(device="cpu", secret_file=secret)
            )
            outs[name] = (tmp / f"out-{name}", plan.case_ids[0])
        pool.run(predict_case, *map(str, outs["small"]), timeout_s=None)  # the model loaded, warm
        before = pool.run(resource.getrusage, resource.RUSAGE_SELF, timeout_s=None).ru_maxrss * 1024
        pool.run(predict_case, *map(str, outs["large"]), timeout_s=None)
        after = pool.run(resource.getrusage, resource.RUSAGE_SELF, timeout_s=None).ru_maxrss * 1024
        voxels = planned_voxels(*outs["large"])
    finally:
        pool.close()
        shutil.rmtree(tmp, ignore_errors=True)
    per_voxel = (after - before) / voxels
    print(f"one {'x'.join(map(str, shape))} case ({voxels / 1e6:.1f} M voxels) on a warm CPU worker:")
    print(f"  peak RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB: {per_voxel:.1f} B/voxel")
    print(f"  pipeline.inference.footprint.BYTES_PER_VOXEL = {BYTES_PER_VOXEL}")
    return {"voxels": voxels, "bytes_per_voxel": per_voxel}


def _print(rows: list[dict], args) -> None:
    shape = "x".join(map(str, args.shape))
    print(
        f"batch_inference_flow at scale: cases of {shape}, CPU, thread runner, Prefect server on PostgreSQL"
    )
    print("  cases  chunk  plain s  flow s  cost ms/case  flow peak MiB  growth MiB  results.csv KiB")
    for r in rows:
        print(
            f"  {r['cases']:5d}  {r['chunk']:5d}  {r['plain_s']:7.1f}  {r['flow_s']:6.1f}"
            f"  {r['cost_ms']:12.1f}  {r['peak_mib']:13.0f}  {r['growth_mib']:10.0f}"
            f"  {r['results_kib']:15.0f}"
        )
    if len(rows) > 1 and rows[0]["cost_ms"] > 0:
        ratio = rows[-1]["cost_ms"] / rows[0]["cost_ms"]
        print(f"  cost per case, {rows[-1]['cases']} vs {rows[0]['cases']} cases: {ratio:.2f}x (goal <= 1.2)")


if __name__ == "__main__":
    main()
