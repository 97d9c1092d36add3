"""A Dask worker for the flows' tasks, and its preload.

    python -m flows.dask_worker tcp://SCHEDULER:8786                 # a CPU node
    python -m flows.dask_worker tcp://SCHEDULER:8786 --gpu 0         # one worker per GPU
    python -m flows.dask_worker tcp://SCHEDULER:8786 --gpu 1 --name gpu1 --memory-limit 48GiB

Starts `dask worker` (the process is replaced: its PID is the worker's nanny) with what our tasks
need, so no site has to remember it:

- `distributed.worker.daemon = False`: each case runs in a child process of the worker (the
  killable WorkerPool); daemonic processes may not have children.
- threads: one per core on a CPU node (the pool shares the cores among the cases running);
  one on a GPU node, where the worker sees only its GPU (CUDA_VISIBLE_DEVICES) and advertises the
  resource `GPU=1`, which each case task asks for: two cases never share a GPU unintentionally.
- the Prefect API: tasks report to the flow's server (PREFECT_API_URL, and
  PREFECT_API_AUTH_STRING where the server has basic auth, in the worker's environment);
- this module as `--preload`: in the worker process `dask_setup` sets the pipeline's logging
  (cases log to the worker's stderr, level $UNET_PIPELINE_LOG_LEVEL, default INFO) and the
  memory budget of the cases in flight (the library's DEFAULT_BUDGET_SHARE of the worker's memory
  limit, as elsewhere of the memory available).

The code must be importable on every node as on the flow's (the installed package, same version
as the flow run's image) and the data folders (source, OUT, the site secret, the work
directory) mounted at the same paths.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("flows.dask_worker")

PRELOAD = "flows.dask_worker"  # this module by its import name (run with -m it is __main__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVEL_ENV = "UNET_PIPELINE_LOG_LEVEL"


def worker_command(
    scheduler: str, *, gpu: int | None = None, nthreads: int | None = None, extra: list[str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The `dask worker` command line and environment for a worker of ours (see the module doc)."""
    from flows.common import check_task_runner
    from pipeline.system import available_cores

    if scheduler in ("threads", "dask"):
        raise ValueError(f"expected a Dask scheduler's address such as tcp://HOST:8786, got {scheduler!r}")
    check_task_runner(scheduler)
    env = dict(os.environ)
    # Read by the nanny before it starts the worker process (a preload would be too late).
    env["DASK_DISTRIBUTED__WORKER__DAEMON"] = "False"
    env.setdefault(LOG_LEVEL_ENV, "INFO")
    args = [scheduler, "--preload", PRELOAD]
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        args += ["--resources", "GPU=1"]
    args += ["--nthreads", str(nthreads or (1 if gpu is not None else available_cores()))]
    return [sys.executable, "-m", "distributed.cli.dask_worker", *args, *(extra or [])], env


def dask_setup(worker) -> None:
    """Dask preload hook, run in each worker process when it starts."""
    from flows.workers import MEMORY_BUDGET_ENV, worker_pool
    from pipeline.inference.memory import DEFAULT_BUDGET_SHARE

    level = os.environ.get(LOG_LEVEL_ENV, "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    for name in ("pipeline", "flows"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not logger.handlers:
            logger.addHandler(handler)
    limit = worker.memory_manager.memory_limit
    if limit and not os.environ.get(MEMORY_BUDGET_ENV):
        worker_pool().set_memory_budget(int(DEFAULT_BUDGET_SHARE * limit))
    if not os.environ.get("PREFECT_API_URL"):
        log.warning("PREFECT_API_URL is not set on this worker: tasks use the flow's setting")
    log.info(
        "worker %s ready: %d threads, resources %s, case memory budget %.1f GiB",
        worker.name,
        worker.state.nthreads,
        dict(worker.state.total_resources) or "none",
        worker_pool().memory.total / 2**30,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m flows.dask_worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Other options (--name, --memory-limit, --nworkers, ...) go to `dask worker` unchanged.",
    )
    p.add_argument("scheduler", help="the Dask scheduler's address, tcp://HOST:8786")
    p.add_argument("--gpu", type=int, default=None, help="the GPU index this worker uses alone")
    p.add_argument("--nthreads", type=int, default=None, help="task slots (default: cores; 1 with --gpu)")
    args, extra = p.parse_known_args(argv)
    try:
        cmd, env = worker_command(args.scheduler, gpu=args.gpu, nthreads=args.nthreads, extra=extra)
    except ValueError as exc:
        p.error(str(exc))
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
