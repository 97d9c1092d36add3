"""What every flow shares: the task runners its per-case tasks run on, and cache keys."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.system import available_cores

TASK_RUNNERS = ("threads", "dask", "tcp://HOST:8786", "tls://HOST:8786")
_SCHEDULER_SCHEMES = ("tcp://", "tls://")


def check_task_runner(spec: str) -> str:
    """`spec` if it names a task runner: threads, dask (a local cluster) or a Dask scheduler address."""
    if spec in ("threads", "dask"):
        return spec
    if spec.startswith(_SCHEDULER_SCHEMES) and len(spec.split("://", 1)[1]) > 0:
        return spec
    raise ValueError(
        f"task_runner must be one of {', '.join(TASK_RUNNERS)} (a Dask scheduler's address); got {spec!r}"
    )


def task_runner(kind: str = "threads", *, dask_address: str | None = None, workers: int | None = None):
    """A task runner: threads on this machine, or Dask (a LocalCluster, or the scheduler at
    `dask_address`; `kind` may also be that address itself, as a flow's `task_runner` parameter is).

    `workers`: thread slots (default: the cores), or the local cluster's worker processes.
    """
    check_task_runner(kind)
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers or available_cores())
    import dask
    from prefect_dask import DaskTaskRunner

    # Tasks run each case in a child process (run_isolated); daemonic Dask workers may not have
    # children. A local cluster's workers take this from here; a remote cluster's workers must
    # be started with it (python -m flows.dask_worker sets it).
    dask.config.set({"distributed.worker.daemon": False})
    address = dask_address or (kind if kind != "dask" else None)
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": workers or 2, "threads_per_worker": 1, "processes": True}
    )


def _api_url() -> str | None:
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


@contextlib.contextmanager
def case_runner(spec: str, *, device: str = "auto", slots: int | None = None):
    """The started task runner for a flow's per-case tasks, chosen by the flow's `task_runner`
    parameter; yields a CaseRunner.

    The flow's own decorator runner is not used for them: a deployment picks the runner per
    run, and Prefect's default thread pool is unbounded (one worker process per case at once).
    On Dask each case asks for one `GPU` resource when the cluster's workers advertise GPUs
    (python -m flows.dask_worker --gpu), so two cases never share a GPU unintentionally.
    """
    check_task_runner(spec)
    if spec != "threads" and not _api_url():
        raise ValueError(
            f"task_runner {spec!r} runs tasks in other processes, which report to the Prefect API: "
            "set PREFECT_API_URL to a Prefect server (the temporary in-process one cannot be shared)"
        )
    runner = task_runner(spec, workers=slots)
    with runner:
        if spec == "threads":
            yield CaseRunner(runner, slots or available_cores())
            return
        workers = runner.client.scheduler_info(n_workers=-1).get("workers", {})
        gpus = sum(w.get("resources", {}).get("GPU", 0) for w in workers.values())
        if device.startswith("cuda") and not gpus:
            raise ValueError(
                f"device {device!r}, but no worker of the Dask cluster at {spec} advertises a GPU "
                "resource: start GPU workers with `python -m flows.dask_worker SCHEDULER --gpu INDEX`"
            )
        resources = {"GPU": 1} if gpus and device != "cpu" else None
        yield CaseRunner(runner, max(1, sum(w.get("nthreads", 1) for w in workers.values())), resources)


class CaseRunner:
    """A started task runner for per-case tasks: `submit(task, **parameters)` and its `slots`."""

    def __init__(self, runner, slots: int, resources: dict[str, float] | None = None) -> None:
        self.runner, self.slots, self.resources = runner, slots, resources

    def submit(self, task, **parameters):
        if not self.resources:
            return self.runner.submit(task, parameters)
        import dask

        # Dask's scheduler starts a task only on a worker with the resource free.
        with dask.annotate(resources=self.resources):
            return self.runner.submit(task, parameters)


def content_key(*parts: Any) -> str:
    """A cache key from content hashes and versions (never from paths alone)."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()


def config_hash(config: Mapping[str, Any] | None) -> str:
    import json

    return content_key(json.dumps(config or {}, sort_keys=True, default=str))


def path_key(path: str | Path) -> str:
    """A stable, non-identifying token for a folder (hashed, so task keys never show paths)."""
    return content_key(Path(path).resolve())[:16]
