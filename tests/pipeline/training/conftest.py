import pytest

from tests.pipeline.ingest.staging_fixture import make_staging


@pytest.fixture(scope="module")
def staging(tmp_path_factory):
    """Four labelled phantom cases, staged (axial, sagittal, axial, oblique)."""
    return make_staging(tmp_path_factory.mktemp("staging"), n_cases=4, size=32)
