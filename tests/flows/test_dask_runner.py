"""The task_runner parameter, our Dask worker's command line, chunking and planned case memory.

The real cluster is in test_dask_cluster.py; these run in one process, without servers.
"""

from __future__ import annotations

import pytest

from flows.common import case_runner, check_task_runner
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
