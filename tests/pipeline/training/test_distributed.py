import pytest
import torch.distributed as dist

from pipeline.training import distributed
from pipeline.training.distributed import DistContext, process_group
from pipeline.training.loop import TrainCallback, train
from tests.pipeline.ingest.staging_fixture import tiny_config


@pytest.fixture
def gloo_group(tmp_path, monkeypatch):
    """`init_distributed` starts a real gloo group of one process, as torchrun's environment would
    (which starts none for a world of one), and the group is cleaned up whatever the test does."""

    def start(device_request):
        store = dist.FileStore(str(tmp_path / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        return DistContext(0, 1, 0, owns_group=True)

    monkeypatch.setattr(distributed, "init_distributed", start)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


class FailsAtStart(TrainCallback):
    def on_train_start(self, *, config, plan, split):
        raise RuntimeError("the tracking server went away")


def test_the_group_a_failing_run_started_is_destroyed(staging, tmp_path, gloo_group):
    with pytest.raises(RuntimeError, match="the tracking server went away"):
        train(staging, tmp_path / "run", tiny_config(epochs=1), callbacks=[FailsAtStart()])
    assert not dist.is_initialized()


def test_process_group_destroys_its_group_when_the_block_raises(gloo_group):
    with pytest.raises(ValueError, match="boom"), process_group("cpu") as ctx:
        assert ctx.owns_group and ctx.enabled and dist.is_initialized()
        raise ValueError("boom")
    assert not dist.is_initialized()


def test_without_torchrun_there_is_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with process_group("cpu") as ctx:
        assert ctx == DistContext() and not ctx.enabled and ctx.main
    assert not dist.is_initialized()
