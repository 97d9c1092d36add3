"""The task_runner parameter, our Dask worker's command line, chunking and the memory budget.

The real cluster is in test_dask_cluster.py; these run in one process, without servers.
"""

from __future__ import annotations

import threading
import time

import pytest

from flows.common import MemoryBudget, WorkerPool, case_runner, check_task_runner, parse_bytes
from flows.dask_worker import worker_command
from flows.inference import chunk_size_for
from pipeline.system import available_cores


@pytest.mark.parametrize("spec", ["threads", "dask", "tcp://10.0.0.5:8786", "tls://sched.hospital:8786"])
def test_valid_task_runners(spec):
    assert check_task_runner(spec) == spec


@pytest.mark.parametrize("spec", ["thread", "process", "tcp://", "10.0.0.5:8786", "dask://host:8786", ""])
def test_an_unknown_task_runner_is_refused_with_the_options(spec):
    with pytest.raises(ValueError, match=r"threads, dask, tcp://HOST:8786, tls://HOST:8786.*got"):
        check_task_runner(spec)


def test_a_dask_cluster_without_a_prefect_server_is_refused_before_connecting():
    # conftest removes PREFECT_API_URL: the flow would be on a temporary in-process server.
    with pytest.raises(ValueError, match="set PREFECT_API_URL"), case_runner("tcp://127.0.0.1:9"):
        pass


def test_worker_command_for_a_cpu_node():
    cmd, env = worker_command("tcp://sched:8786", extra=["--name", "cpu1"])
    assert cmd[1:3] == ["-m", "distributed.cli.dask_worker"]
    args = cmd[3:]
    assert args[0] == "tcp://sched:8786"
    assert args[args.index("--preload") + 1] == "flows.dask_worker"
    assert args[args.index("--nthreads") + 1] == str(available_cores())
    assert "--resources" not in args and args[-2:] == ["--name", "cpu1"]
    assert env["DASK_DISTRIBUTED__WORKER__DAEMON"] == "False"


def test_worker_command_for_one_gpu():
    cmd, env = worker_command("tcp://sched:8786", gpu=1)
    assert cmd[cmd.index("--resources") + 1] == "GPU=1"
    assert cmd[cmd.index("--nthreads") + 1] == "1"  # one case at a time on its GPU
    assert env["CUDA_VISIBLE_DEVICES"] == "1"


@pytest.mark.parametrize("address", ["threads", "dask", "sched:8786"])
def test_worker_command_needs_a_scheduler_address(address):
    with pytest.raises(ValueError, match="scheduler"):
        worker_command(address)


@pytest.mark.parametrize(
    ("cases", "slots", "size"),
    [
        (1, 2, 1),
        (10, 2, 1),
        (200, 2, 1),
        (201, 2, 2),
        (1000, 2, 5),
        (5001, 2, 26),
        (1000, 200, 1),
        (1000, 64, 3),
    ],
)
def test_chunk_size_per_batch(cases, slots, size):
    # About 200 tasks, but at least 4 per slot so that every slot stays busy to the end.
    assert chunk_size_for(cases, slots) == size


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
