"""ingest_flow on Prefect's ephemeral API: the config is read as the CLI reads it, and the
conversions run within its memory budget."""

from __future__ import annotations

import pytest

from pipeline.io.batchdir import BatchDir
from pipeline.io.manifest import read_manifest
from tests.flows.prefect_api import temporary_prefect_api
from tests.pipeline.ingest import situations


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A temporary Prefect API for the module; yields the flows module under test."""
    with temporary_prefect_api(tmp_path_factory.mktemp("prefect-home")):
        import flows.ingest

        yield flows.ingest


@pytest.mark.slow
def test_ingest_flow_reads_the_config_and_its_budget(prefect_api, tmp_path):
    from pipeline.ingest import FIXED_OVERHEAD_BYTES

    source = tmp_path / "source"
    for i in range(3):
        situations.good_nifti(source, f"n/ct_{i}.nii.gz")
    situations.good_dicom(source)
    situations.no_orientation(source)
    budget = FIXED_OVERHEAD_BYTES + 6 * 2**20 + 1  # one case at a time
    config = tmp_path / "config.yaml"
    config.write_text(f"ingest:\n  memory_budget_gb: {budget / 2**30!r}\n  allow_no_orientation: true\n")
    staging = tmp_path / "staging"
    report = prefect_api.ingest_flow(
        str(source), str(staging), secret_file=str(tmp_path / "k"), config=str(config)
    )
    assert report["cases"] == 5 and report["balanced"] and report["quarantined"] == 0
    limits = BatchDir(staging).read_batch()["limits"]
    assert limits["memory_budget"] == int(budget) and limits["allow_no_orientation"] is True
    assert limits["max_voxels"] == 2**20  # the default limits follow from the config's budget
    assert sum(r.get("orientation") == "unknown" for r in read_manifest(staging)) == 1
    # Without the config, the same source refuses the file without orientation.
    default = prefect_api.ingest_flow(
        str(source), str(tmp_path / "staging2"), secret_file=str(tmp_path / "k")
    )
    assert default["cases"] == 4 and default["by_reason"] == {"NO_ORIENTATION": 1}


def test_a_conversion_past_its_timeout_is_recorded_and_the_batch_goes_on(prefect_api, tmp_path):
    from pipeline.errors import Reason, Status
    from pipeline.ingest import finalize_ingest, prepare_ingest

    source, staging, secret = tmp_path / "source", tmp_path / "staging", str(tmp_path / "k")
    for i in range(2):
        situations.good_nifti(source, f"n/ct_{i}.nii.gz")
    jobs = prepare_ingest(source, staging, secret_file=secret)
    hung, fine = jobs.todo
    convert = prefect_api.convert_task.fn
    timed_out = convert(str(source), str(staging), hung, jobs, secret, 0.001)
    assert (timed_out["status"], timed_out["reason"]) == (Status.FAILED, Reason.TIMEOUT)
    assert "stopped" in timed_out["message"]  # the message, apart from the reason code
    assert convert(str(source), str(staging), fine, jobs, secret, 120.0)["status"] == Status.CONVERTED
    report = finalize_ingest(source, staging)
    assert report.cases == 1 and report.balanced and report.by_reason == {"TIMEOUT": 1}
