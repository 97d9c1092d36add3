"""Fixtures: the demo data and tiny model (once per session), a fresh Orthanc per test."""

from __future__ import annotations

import pytest

from tests.pipeline.inference.predict_fixture import make_predict_setup
from tests.pipeline.pacs.orthanc import ORTHANC_BIN, PASSWORD, SKIP_REASON, USER, start_orthanc


@pytest.fixture(scope="session")
def pacs_setup(tmp_path_factory):
    """Demo DICOM series (6 cases, 32 px) and an untrained tiny model with its plan."""
    return make_predict_setup(tmp_path_factory.mktemp("pacs-demo"), n_cases=4, size=32)


@pytest.fixture
def orthanc(tmp_path, request):
    """A running Orthanc (stopped by PID at the end of the test) and the pipeline's credentials."""
    if ORTHANC_BIN is None:
        pytest.skip(SKIP_REASON)
    modalities = getattr(request, "param", None)
    server = start_orthanc(tmp_path / "orthanc", modalities)
    request.addfinalizer(server.stop)
    return server


@pytest.fixture
def pacs_env(monkeypatch):
    """The pipeline's PACS credentials, from the environment as in production."""
    monkeypatch.setenv("UNET_PACS_USERNAME", USER)
    monkeypatch.setenv("UNET_PACS_PASSWORD", PASSWORD)
    for name in ("UNET_PACS_TOKEN", "UNET_PUSH_USERNAME", "UNET_PUSH_PASSWORD", "UNET_PUSH_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def demo_image_files(setup) -> list:
    """Every image file of the demo cases (no SEG annotations, no broken QA series)."""
    return [setup.demo.dicom_root / f for case in setup.demo.cases for f in case.dicom_files]
