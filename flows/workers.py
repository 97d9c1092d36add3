"""Killable worker processes for per-case calls: `run_isolated`, the pool behind it, its memory budget.

Prefect's own task timeouts cannot interrupt a thread blocked in C code (a decoder, a
convolution), so each case runs in a child process that a timeout kills. What the pool does,
together: a hard per-call timeout that kills the worker, warm workers that keep a loaded model
between cases (one per task slot), admission of a call only once its planned memory fits the
budget, the cores shared among the calls running, and workers forked from a preloaded
forkserver. No maintained library does all of it: pebble's ProcessPool kills a worker on a task
timeout and recycles after `max_tasks`, but has a fixed size, no idle close and no memory
admission; loky (joblib's) and concurrent.futures' ProcessPoolExecutor cannot stop one running
call (a killed worker breaks the whole executor), and their timeouts are idle timeouts.
No Prefect here; it lives in flows because only flow tasks run cases this way (the library runs
a batch in-process).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time

from pipeline.inference.memory import default_budget
from pipeline.logs import logging_state, worker_logging
from pipeline.system import available_cores


class CaseTimeout(TimeoutError):
    """A case ran past its time limit; its worker process was killed."""


# Imported once by the forkserver, so workers fork with them loaded: everything a case imports
# lazily, too (MONAI alone takes seconds to import per child). The forkserver skips a name that
# does not import without a word, so a test imports each.
PRELOAD = (
    "pipeline.ingest.batch",
    "pipeline.inference.batch",
    "pipeline.planning.transforms",
    "pipeline.planning.plan",
    "pipeline.outputs.masks",
    "highdicom",
    "matplotlib.figure",
)

_FORKSERVER = None


def _context():
    """A forkserver with the pipeline preloaded: each worker forks from it in milliseconds."""
    global _FORKSERVER
    if _FORKSERVER is None:
        import multiprocessing

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(PRELOAD))
        _FORKSERVER = ctx
    return _FORKSERVER


def _serve(conn, log_level: int, terminal: tuple[bool, str | None] | None = None) -> None:
    """A worker's loop: run each call it is sent and send back its result or its exception.

    Started from the command line (`terminal`: its `logging_state()`), the worker keeps the
    terminal's rules (`pipeline.logs`). Otherwise the pipeline's log records go to stderr
    (inherited: the flow's or the Dask worker's) at the parent's level; without a handler here a
    case's log would be lost with its process.
    """
    import sys

    if terminal is not None:
        worker_logging(terminal)
    elif log_level < logging.WARNING:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger = logging.getLogger("pipeline")
        logger.setLevel(log_level)
        logger.addHandler(handler)
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
        level = logging.getLogger("pipeline").getEffectiveLevel()
        self.proc = ctx.Process(target=_serve, args=(child, level, logging_state()), daemon=True)
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


MEMORY_BUDGET_ENV = "UNET_PIPELINE_MEMORY_BUDGET"


def parse_bytes(text: str) -> int:
    """'12GiB', '800MB', '4e9' or a plain byte count."""
    import dask.utils

    try:
        return int(dask.utils.parse_bytes(text))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{MEMORY_BUDGET_ENV}: expected a size like 12GiB or 800MB, got {text!r}") from exc


def default_memory_budget() -> int:
    """$UNET_PIPELINE_MEMORY_BUDGET, else the library's default budget for cases in flight
    (pipeline.inference.memory.default_budget: a share of the memory this process may still use)."""
    text = os.environ.get(MEMORY_BUDGET_ENV)
    return parse_bytes(text) if text else default_budget()


class MemoryBudget:
    """Planned bytes of the cases in flight in one process, held below `total`.

    A call waits until its planned bytes fit beside those running; one larger than the whole
    budget runs alone rather than never. Cores alone would let a worker take as many large CTs
    at once as small ones.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int):
        nbytes = max(0, int(nbytes))
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + nbytes <= self.total)
            self.used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()


class WorkerPool:
    """Long-lived, killable worker processes for per-case calls.

    A call takes an idle worker (or starts one), so a task runner with N slots keeps about N warm
    workers: the model stays loaded between cases, as in one plain process. A call past its
    timeout kills its worker (C code blocked in a decoder or a convolution stops for certain) and
    the next call starts a fresh one. Workers are recycled after `max_calls` calls (bounded
    memory growth) and closed after `idle_s` seconds unused (a served deployment does not hold a
    GPU's memory between nightly runs).
    """

    def __init__(self, max_calls: int = 500, idle_s: float = 300.0, memory_budget: int | None = None) -> None:
        self.max_calls, self.idle_s = max_calls, idle_s
        # Resolved on first use: importing never reads the environment.
        self._memory: MemoryBudget | None = None if memory_budget is None else MemoryBudget(memory_budget)
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

    @property
    def memory(self) -> MemoryBudget:
        with self._lock:
            if self._memory is None:
                self._memory = MemoryBudget(default_memory_budget())
            return self._memory

    def set_memory_budget(self, total: int) -> None:
        """Change the budget (a Dask worker sets its own memory limit's share at start)."""
        self.memory.total = total

    def run(self, fn, *args, timeout_s: float | None, memory_bytes: int = 0, **kwargs):
        """`fn(*args, **kwargs)` in a worker, once `memory_bytes` (the call's planned memory)
        fit in the budget beside the calls running; the timeout counts from the start."""
        with self.memory.hold(memory_bytes):
            return self._run(fn, *args, timeout_s=timeout_s, **kwargs)

    def _run(self, fn, *args, timeout_s: float | None, **kwargs):
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


def worker_pool() -> WorkerPool:
    """This process's pool (a Dask worker's preload sets its memory budget)."""
    return _POOL


def run_isolated(fn, *args, timeout_s: float | None, memory_bytes: int = 0, **kwargs):
    """Run `fn(*args, **kwargs)` in a worker process; kill it after `timeout_s` seconds.

    It starts once its planned `memory_bytes` fit in this process's budget (see MemoryBudget).

    Prefect's own task timeouts cannot interrupt a thread blocked in C code (a decoder, a
    convolution); a killed process always stops. `fn`, its arguments and result must pickle.
    Workers are reused between calls (see WorkerPool), so the model loads once per worker.
    """
    return _POOL.run(fn, *args, timeout_s=timeout_s, memory_bytes=memory_bytes, **kwargs)
