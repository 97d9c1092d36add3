"""What every flow shares: quiet, offline-safe Prefect settings, task runners and cache keys."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.system import available_cores

TASK_RUNNERS = ("threads", "dask")


def task_runner(kind: str = "threads", *, dask_address: str | None = None, workers: int | None = None):
    """The flow's task runner: threads on one machine, or Dask (a LocalCluster or `dask_address`)."""
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers or available_cores())
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
    """A forkserver with the pipeline preloaded: each worker forks from it in milliseconds."""
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


def _serve(conn) -> None:
    """A worker's loop: run each call it is sent and send back its result or its exception."""
    while True:
        try:
            call = conn.recv()
        except (EOFError, OSError):
            return
        if call is None:
            return
        fn, args, kwargs, threads = call
        _set_threads(threads)
        try:
            reply = ("ok", fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001  (sent to the parent, which re-raises it)
            reply = ("error", exc)
        try:
            conn.send(reply)
        except Exception as exc:  # noqa: BLE001  (an unpicklable result or exception)
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc} (sending {reply[0]} back)")))


def _set_threads(threads: int) -> None:
    """Compute threads for this call: the cores shared among the calls running now.

    Two cases at once, each with all cores' threads, oversubscribe the CPU and oneDNN's spinning
    OpenMP threads then slow both far more than twice.
    """
    import torch

    # pipeline.runtime.configure_threads (called when a model loads) keeps an explicit setting.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class _Worker:
    """One long-lived child process; it keeps what a call caches (the loaded model) for the next."""

    def __init__(self) -> None:
        ctx = _context()
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.calls = 0
        self.idle_since = time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.conn.close()
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.conn.close()


class WorkerPool:
    """Long-lived, killable worker processes for per-case calls.

    A call takes an idle worker (or starts one), so a task runner with N slots keeps about N warm
    workers: the model stays loaded between cases, as in one plain process. A call past its
    timeout kills its worker (C code blocked in a decoder or a convolution stops for certain) and
    the next call starts a fresh one. Workers are recycled after `max_calls` calls (bounded
    memory growth) and closed after `idle_s` seconds unused (a served deployment does not hold a
    GPU's memory between nightly runs).
    """

    def __init__(self, max_calls: int = 500, idle_s: float = 300.0) -> None:
        self.max_calls, self.idle_s = max_calls, idle_s
        self._idle: list[_Worker] = []
        self._busy = 0
        self._reaper: threading.Thread | None = None
        self._lock = threading.Lock()
        self._cores = available_cores()

    def _take_stale(self) -> list[_Worker]:
        """Remove (under the lock) the idle workers unused for `idle_s` or found dead."""
        now = time.monotonic()
        stale = [w for w in self._idle if now - w.idle_since > self.idle_s or not w.proc.is_alive()]
        self._idle = [w for w in self._idle if w not in stale]
        return stale

    def _acquire(self) -> tuple[_Worker, int]:
        with self._lock:
            stale = self._take_stale()
            worker = self._idle.pop() if self._idle else None  # the most recently used: warmest
            self._busy += 1
            threads = max(1, self._cores // self._busy)
        for w in stale:
            w.close()
        if worker is None:
            try:
                worker = _Worker()
            except BaseException:
                with self._lock:
                    self._busy -= 1
                raise
        return worker, threads

    def _reap(self) -> None:
        """Close idle workers as they pass `idle_s`, calls or not (a daemon thread)."""
        while True:
            time.sleep(max(0.05, self.idle_s / 4))
            with self._lock:
                stale = self._take_stale()
                if not self._idle and not self._busy and not stale:
                    self._reaper = None
                    return
            for w in stale:
                w.close()

    def _release(self, worker: _Worker, healthy: bool) -> None:
        with self._lock:
            self._busy -= 1
            worker.calls += 1
            keep = healthy and worker.calls < self.max_calls
            if keep:
                worker.idle_since = time.monotonic()
                self._idle.append(worker)
                if self._reaper is None:
                    self._reaper = threading.Thread(target=self._reap, name="worker-reaper", daemon=True)
                    self._reaper.start()
        if not keep:
            if healthy:
                worker.close()
            else:
                worker.kill()

    def run(self, fn, *args, timeout_s: float | None, **kwargs):
        worker, threads = self._acquire()
        name = getattr(fn, "__name__", fn)
        healthy = False
        try:
            call = (fn, args, kwargs, threads)
            try:
                worker.conn.send(call)
            except OSError:  # it died while idle: the call never reached it, so a fresh one runs it
                worker.kill()
                worker = _Worker()
                worker.conn.send(call)
            if not worker.conn.poll(timeout_s):
                raise CaseTimeout(f"{name} ran past {timeout_s:.0f} s and was stopped")
            status, value = worker.conn.recv()
            healthy = True
        except CaseTimeout:  # (a TimeoutError, so an OSError: not a dead worker)
            raise
        except (EOFError, OSError):
            worker.proc.join(timeout=1)
            raise RuntimeError(
                f"{name}: its worker died with exit code {worker.proc.exitcode} (out of memory?)"
            ) from None
        finally:
            self._release(worker, healthy)  # a worker that timed out or failed is killed
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for w in idle:
            w.close()


_POOL = WorkerPool()
atexit.register(_POOL.close)


def run_isolated(fn, *args, timeout_s: float | None, **kwargs):
    """Run `fn(*args, **kwargs)` in a worker process; kill it after `timeout_s` seconds.

    Prefect's own task timeouts cannot interrupt a thread blocked in C code (a decoder, a
    convolution); a killed process always stops. `fn`, its arguments and result must pickle.
    Workers are reused between calls (see WorkerPool), so the model loads once per worker.
    """
    return _POOL.run(fn, *args, timeout_s=timeout_s, **kwargs)
