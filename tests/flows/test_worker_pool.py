"""The per-case worker pool: warm workers are reused, hung or dead ones are replaced."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from flows.common import CaseTimeout, WorkerPool


def _gone(pid: int, within_s: float = 6.0) -> bool:
    """True once no process has `pid` (polled until `within_s`)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def pool():
    p = WorkerPool()
    yield p
    p.close()


def test_consecutive_calls_reuse_one_warm_worker(pool):
    first = pool.run(os.getpid, timeout_s=60)
    assert first != os.getpid()
    assert pool.run(os.getpid, timeout_s=60) == first


def test_a_call_past_its_timeout_kills_its_worker_and_the_next_call_gets_a_fresh_one(pool):
    before = pool.run(os.getpid, timeout_s=60)
    t0 = time.perf_counter()
    with pytest.raises(CaseTimeout, match="sleep ran past 1 s"):
        pool.run(time.sleep, 60, timeout_s=1.0)
    assert time.perf_counter() - t0 < 15
    with pytest.raises(ProcessLookupError):
        os.kill(before, 0)  # the hung worker is gone, not left sleeping
    assert pool.run(os.getpid, timeout_s=60) not in (before, os.getpid())


def test_an_exception_comes_back_and_the_worker_stays(pool):
    pid = pool.run(os.getpid, timeout_s=60)
    with pytest.raises(ValueError, match="invalid literal"):
        pool.run(int, "not a number", timeout_s=60)
    assert pool.run(os.getpid, timeout_s=60) == pid


def test_a_worker_that_dies_is_reported_and_replaced(pool):
    pid = pool.run(os.getpid, timeout_s=60)
    with pytest.raises(RuntimeError, match="_exit: its worker died with exit code 3"):
        pool.run(os._exit, 3, timeout_s=60)
    assert pool.run(os.getpid, timeout_s=60) != pid


def test_workers_are_recycled_after_max_calls_and_closed_when_idle():
    pool = WorkerPool(max_calls=2, idle_s=0.5)
    try:
        a = pool.run(os.getpid, timeout_s=60)
        assert pool.run(os.getpid, timeout_s=60) == a
        b = pool.run(os.getpid, timeout_s=60)  # a served its two calls
        assert b != a
        time.sleep(1.0)
        assert pool.run(os.getpid, timeout_s=60) != b  # b sat idle too long and was closed
        assert _gone(b), "the idle worker is still running"
    finally:
        pool.close()


def test_concurrent_calls_share_the_cores_instead_of_oversubscribing(pool):
    cores = max(1, len(os.sched_getaffinity(0)))
    assert pool.run(torch.get_num_threads, timeout_s=60) == cores
    results: list[int] = []
    gate = threading.Barrier(2)

    def call() -> None:
        gate.wait()
        pool.run(time.sleep, 1.0, timeout_s=60)  # both busy at once ...

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    results.append(pool.run(torch.get_num_threads, timeout_s=60))  # ... so a third gets a share
    for t in threads:
        t.join()
    assert results == [max(1, cores // 3)]


def test_a_worker_killed_while_idle_is_not_handed_out(pool):
    import signal

    pid = pool.run(os.getpid, timeout_s=60)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    assert pool.run(os.getpid, timeout_s=60) not in (pid, os.getpid())  # the case still runs


def test_idle_workers_are_closed_without_further_calls():
    pool = WorkerPool(idle_s=0.3)
    try:
        pid = pool.run(os.getpid, timeout_s=60)
        assert _gone(pid), "an idle worker outlived idle_s with no calls coming"
    finally:
        pool.close()


def test_a_model_load_keeps_the_pools_thread_share(pool):
    """pipeline.runtime.configure_threads (run when a model loads) must not undo the share."""
    from pipeline.runtime import configure_threads

    gate = threading.Barrier(2)

    def busy() -> None:
        gate.wait()
        pool.run(time.sleep, 1.0, timeout_s=60)

    t = threading.Thread(target=busy)
    t.start()
    gate.wait()
    time.sleep(0.3)
    cores = max(1, len(os.sched_getaffinity(0)))
    assert pool.run(configure_threads, timeout_s=60) == max(1, cores // 2)
    t.join()
