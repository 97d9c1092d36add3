"""What every flow shares: quiet, offline-safe Prefect settings, task runners and cache keys."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TASK_RUNNERS = ("threads", "dask")


def task_runner(kind: str = "threads", *, dask_address: str | None = None, workers: int | None = None):
    """The flow's task runner: threads on one machine, or Dask (a LocalCluster or `dask_address`)."""
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers or max(1, len(os.sched_getaffinity(0))))
    if kind == "dask":
        import dask
        from prefect_dask import DaskTaskRunner

        # Tasks run each case in a child process (run_isolated); daemonic Dask workers may not
        # have children. Workers of a remote cluster need the same setting in their config.
        dask.config.set({"distributed.worker.daemon": False})

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": workers or 2, "threads_per_worker": 1, "processes": True}
        )
    raise ValueError(f"task runner must be one of {', '.join(TASK_RUNNERS)}; got {kind!r}")


def content_key(*parts: Any) -> str:
    """A cache key from content hashes and versions (never from paths alone)."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()


def config_hash(config: Mapping[str, Any] | None) -> str:
    import json

    return content_key(json.dumps(config or {}, sort_keys=True, default=str))


def path_key(path: str | Path) -> str:
    """A stable, non-identifying token for a folder (hashed, so task keys never show paths)."""
    return content_key(Path(path).resolve())[:16]


class CaseTimeout(TimeoutError):
    """A case ran past its time limit; its worker process was killed."""


_FORKSERVER = None


def _context():
    """A forkserver with the pipeline preloaded: each isolated call forks from it in milliseconds."""
    global _FORKSERVER
    if _FORKSERVER is None:
        import multiprocessing

        ctx = multiprocessing.get_context("forkserver")
        # Everything a case imports lazily, too: MONAI alone takes seconds to import per child.
        ctx.set_forkserver_preload(
            [
                "pipeline.ingest",
                "pipeline.inference",
                "pipeline.transforms",
                "pipeline.plan",
                "pipeline.export",
                "highdicom",
                "matplotlib.figure",
            ]
        )
        _FORKSERVER = ctx
    return _FORKSERVER


def _child(conn, fn, args, kwargs) -> None:
    try:
        conn.send(("ok", fn(*args, **kwargs)))
    except BaseException as exc:  # noqa: BLE001  (sent to the parent, which re-raises it)
        conn.send(("error", exc))
    finally:
        conn.close()


def run_isolated(fn, *args, timeout_s: float | None, **kwargs):
    """Run `fn(*args, **kwargs)` in a child process; kill it after `timeout_s` seconds.

    Prefect's own task timeouts cannot interrupt a thread blocked in C code (a decoder, a
    convolution); a killed process always stops. `fn`, its arguments and result must pickle.
    """
    ctx = _context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args, kwargs), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout_s):
            proc.kill()
            raise CaseTimeout(f"{getattr(fn, '__name__', fn)} ran past {timeout_s:.0f} s and was stopped")
        try:
            status, value = parent.recv()
        except EOFError:
            proc.join()
            raise RuntimeError(
                f"{getattr(fn, '__name__', fn)} died with exit code {proc.exitcode} (out of memory?)"
            ) from None
    finally:
        parent.close()
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
    if status == "error":
        raise value
    return value
