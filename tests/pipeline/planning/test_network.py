import pytest
import torch

from pipeline.config import PipelineConfig, PreprocessConfig
from pipeline.planning import network
from pipeline.planning.network import activation_bytes, plan_network
from pipeline.planning.plan import make_plan
from pipeline.runtime import DeviceInfo
from tests.pipeline.planning.test_plan import _fp

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _plan(cases=20, slices=40, patch=96):
    """A plan of `cases` volumes of `slices` axial 3 mm slices, patch `patch`."""
    fp = _fp([(1.0, 1.0, 3.0)] * cases, [(patch, patch, slices)] * cases)
    return make_plan(fp, PreprocessConfig(max_patch_size=patch))


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device of the given memory (GiB), seen by the planner only."""

    def fake(gib):
        info = DeviceInfo("cuda", "Fake GPU", gib, 0)
        monkeypatch.setattr(network, "describe_device", lambda device: info)
        monkeypatch.setattr(network, "resolve_precision", lambda precision, device: torch.bfloat16)

    return fake


def test_cpu_plans_a_small_width_and_batch_and_says_why():
    plan = plan_network(_plan(), PipelineConfig(), CPU)
    assert (plan.base_channels, plan.batch_size) == (16, 8)
    assert plan.reasons["base_channels"].startswith("CPU: 16")
    assert "more updates per CPU minute" in plan.reasons["batch_size"]
    assert "patch_size" in plan.reasons  # make_plan's reason is kept


@pytest.mark.parametrize(
    ("gib", "base", "batch"),
    [
        (80.0, 64, 40),  # the seed's width; the batch is capped by 5 % of 20 x 40 slices
        (1.0, 32, 12),  # 64 fits 7 patches in half a GiB: 32 fits 15, rounded down to 4s
        (0.3, 16, 8),  # 9 patches of base 16 fit
    ],
)
def test_gpu_plans_the_seeds_width_when_memory_allows_and_batch_from_memory(gpu, gib, base, batch):
    gpu(gib)
    plan = plan_network(_plan(), PipelineConfig(), CUDA)
    assert (plan.base_channels, plan.batch_size) == (base, batch)
    assert plan.batch_size % PipelineConfig().train.slices_per_volume == 0
    assert "Fake GPU" in plan.reasons["base_channels"] and "MiB of activations" in plan.reasons["batch_size"]


def test_the_batch_never_exceeds_a_twentieth_of_a_small_dataset(gpu):
    gpu(80.0)
    plan = plan_network(_plan(cases=3, slices=30), PipelineConfig(), CUDA)
    assert plan.batch_size == 4 and "5% of the dataset's ~90 slices" in plan.reasons["batch_size"]


def test_config_values_beat_the_plan_and_the_reason_says_so(gpu):
    gpu(80.0)
    config = PipelineConfig().replace(model={"base_channels": 24}, train={"batch_size": 12})
    plan = plan_network(_plan(), config, CUDA)
    assert (plan.base_channels, plan.batch_size) == (24, 12)
    assert plan.reasons["base_channels"].startswith(
        "model.base_channels set in the config (explicit beats automatic; the plan would choose 64:"
    )
    assert plan.reasons["batch_size"].startswith("train.batch_size set in the config")


def test_activation_estimate_grows_with_width_patch_and_precision():
    small = activation_bytes(16, 4, 64, 4)
    assert activation_bytes(32, 4, 64, 4) == 2 * small
    assert activation_bytes(16, 4, 128, 4) == 4 * small
    assert activation_bytes(16, 4, 64, 2) * 2 == small


@pytest.mark.parametrize("context", [1, 3, 5])
def test_the_network_takes_the_plans_context_slices_as_input_channels(context):
    fp = _fp([(1.0, 1.0, 3.0)] * 3, [(64, 64, 20)] * 3)
    plan = plan_network(make_plan(fp, PreprocessConfig(context_slices=context)), PipelineConfig(), CPU)
    assert network.unet_config(plan, PipelineConfig().model).in_channels == context
