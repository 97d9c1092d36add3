"""The per-case worker pool: warm workers are reused, hung or dead ones are replaced, calls wait
for their memory."""

from __future__ import annotations

import importlib
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from flows.workers import PRELOAD, CaseTimeout, MemoryBudget, WorkerPool, parse_bytes


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


def _dead(pid: int, within_s: float = 6.0) -> bool:
    """True once `pid` has exited (a zombie not yet reaped by the pool counts), polled until `within_s`."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("module", PRELOAD)
def test_every_preloaded_module_imports(module):
    """The forkserver drops a name that fails to import silently (every case would import it)."""
    importlib.import_module(module)


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
    assert _dead(pid), "SIGKILL did not end the idle worker"  # (a fixed sleep raced a loaded machine)
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


@pytest.mark.parametrize(
    ("text", "expected"), [("12GiB", 12 * 2**30), ("800MB", 800 * 10**6), ("4096", 4096)]
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_parse_bytes_names_the_setting():
    with pytest.raises(ValueError, match=r"UNET_PIPELINE_MEMORY_BUDGET.*12GiB.*'lots'"):
        parse_bytes("lots")


def _holder(budget: MemoryBudget, nbytes: int, entered: threading.Event, leave: threading.Event):
    def hold() -> None:
        with budget.hold(nbytes):
            entered.set()
            leave.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    return t


def test_a_case_waits_until_its_memory_fits_beside_those_running():
    budget = MemoryBudget(100)
    first_in, first_out, second_in, second_out = (threading.Event() for _ in range(4))
    first = _holder(budget, 60, first_in, first_out)
    assert first_in.wait(10)
    second = _holder(budget, 60, second_in, second_out)
    assert not second_in.wait(0.5), "60 + 60 bytes ran at once on a budget of 100"
    assert budget.used == 60
    first_out.set()
    assert second_in.wait(10)  # started once the first released its share
    second_out.set()
    first.join(), second.join()
    assert budget.used == 0


def test_small_cases_share_the_budget_and_an_oversized_one_runs_alone():
    budget = MemoryBudget(100)
    events = [(threading.Event(), threading.Event()) for _ in range(3)]
    small = [_holder(budget, 30, *e) for e in events]
    assert all(entered.wait(10) for entered, _ in events)  # 3 x 30 fit in 100
    big_in, big_out = threading.Event(), threading.Event()
    big = _holder(budget, 500, big_in, big_out)
    assert not big_in.wait(0.5)
    for _, leave in events:
        leave.set()
    assert big_in.wait(10), "a case larger than the budget never ran"
    assert budget.used == 500
    big_out.set()
    for t in (*small, big):
        t.join()


def test_the_pool_runs_calls_within_its_memory_budget():
    pool = WorkerPool(memory_budget=100)
    try:
        started: list[float] = []

        def call() -> None:
            started.append(pool.run(time.time, timeout_s=60, memory_bytes=70))
            pool.run(time.sleep, 1.0, timeout_s=60, memory_bytes=0)

        # Each thread holds 70 of 100 for its time.time call only: the calls are serialized, and
        # the sleeping calls (no planned memory) may overlap anything.
        first = pool.run(time.time, timeout_s=60, memory_bytes=70)
        threads = [threading.Thread(target=call) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(started) == 2 and min(started) >= first
        assert pool.memory.used == 0
    finally:
        pool.close()


def test_the_default_budget_follows_the_environment(monkeypatch):
    monkeypatch.setenv("UNET_PIPELINE_MEMORY_BUDGET", "3GiB")
    assert WorkerPool().memory.total == 3 * 2**30


def test_without_the_environment_the_budget_is_the_librarys_default(monkeypatch):
    from pipeline.inference import memory as predict_memory

    monkeypatch.delenv("UNET_PIPELINE_MEMORY_BUDGET", raising=False)
    monkeypatch.setattr(predict_memory, "available_memory_bytes", lambda: 8 * 2**30)
    assert WorkerPool().memory.total == int(predict_memory.DEFAULT_BUDGET_SHARE * 8 * 2**30)
