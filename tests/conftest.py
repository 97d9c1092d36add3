import os

import pytest
import torch

# Tests measure behaviour, not speed: keep them reproducible and let pytest-xdist-free runs
# use the machine's cores.
torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_stray_workdir(tmp_path, monkeypatch):
    """Every test gets its own work directory: no test touches ~/.unet-pipeline."""
    monkeypatch.setenv("UNET_PIPELINE_WORKDIR", str(tmp_path / "workdir"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    yield
    os.environ.pop("UNET_PIPELINE_TEST_MARKER", None)
