"""pacs_batch_flow on Prefect's ephemeral API against a real Orthanc: StudyDate=yesterday is
resolved when the run starts, credentials come from a Prefect Secret block, the SEG is pushed
once and only once."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from zoneinfo import ZoneInfo

import pydicom
import pytest

from tests.flows.prefect_api import temporary_prefect_api
from tests.pipeline.inference.predict_fixture import make_predict_setup
from tests.pipeline.pacs.orthanc import ORTHANC_BIN, PASSWORD, SKIP_REASON, USER, start_orthanc

pytestmark = pytest.mark.slow  # a Prefect API, Orthanc and a trained model: about a minute

TZ = "Europe/Berlin"


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A temporary Prefect API for the module; yields the flows module under test."""
    with temporary_prefect_api(tmp_path_factory.mktemp("prefect-home")):
        import flows.pacs

        yield flows.pacs


@pytest.fixture
def orthanc(tmp_path, request):
    if ORTHANC_BIN is None:
        pytest.skip(SKIP_REASON)
    server = start_orthanc(tmp_path / "orthanc")
    request.addfinalizer(server.stop)
    return server


def _upload_with_yesterday(orthanc, setup, tmp_path) -> str:
    """Upload the demo series; the first case's study is re-dated to yesterday (site time).
    Returns that case's series UID."""
    yesterday = (dt.datetime.now(ZoneInfo(TZ)).date() - dt.timedelta(days=1)).strftime("%Y%m%d")
    first = setup.demo.cases[0]
    for case in setup.demo.cases:
        for rel in case.dicom_files:
            ds = pydicom.dcmread(setup.demo.dicom_root / rel)
            if case is first:
                ds.StudyDate = yesterday
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            path = tmp_path / "upload.dcm"
            path.write_bytes(buf.getvalue())
            orthanc.upload([path])
    return first.series_uid


def test_nightly_pull_predict_push_with_a_secret_block(prefect_api, orthanc, tmp_path, monkeypatch):
    from prefect.blocks.system import Secret

    for name in ("USERNAME", "PASSWORD", "TOKEN"):  # only the block may provide them
        monkeypatch.delenv(f"UNET_PACS_{name}", raising=False)
        monkeypatch.delenv(f"UNET_PUSH_{name}", raising=False)
    Secret(value=json.dumps({"username": USER, "password": PASSWORD})).save("orthanc-test", overwrite=True)
    setup = make_predict_setup(tmp_path / "setup", n_cases=3, size=32)
    series_uid = _upload_with_yesterday(orthanc, setup, tmp_path)
    out = tmp_path / "out"

    def run():
        return prefect_api.pacs_batch_flow(
            f"{orthanc.dicomweb_url}?StudyDate=yesterday",
            str(out),
            push=orthanc.dicomweb_url,
            model_uri=str(setup.model_dir),
            device="cpu",
            secret_file=str(setup.secret),
            site_timezone=TZ,
            credentials_block="orthanc-test",
            push_credentials_block="orthanc-test",
            mlflow_experiment=None,
            return_state=True,
        )

    state = run()

    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["pull"]["counts"]["series_complete"] == 1  # only yesterday's study
    assert summary["push"] == {
        "destination_given": True,
        "pushed": 1,
        "pushed_now": 1,
        "push_failed": 0,
        "reasons": [],
    }
    assert PASSWORD not in json.dumps(summary)
    segs = [pydicom.dcmread(io.BytesIO(orthanc.file(i["id"]))) for i in orthanc.instances(modality="SEG")]
    assert len(segs) == 1
    assert segs[0].ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    with open(out / "results.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["push_status"], row["pushed_sop_instance_uids"]) == ("pushed", segs[0].SOPInstanceUID)

    again = run()
    assert again.is_completed(), again.message
    assert again.result()["push"]["pushed_now"] == 0
    assert len(orthanc.instances(modality="SEG")) == 1


def test_a_down_push_destination_fails_the_run_but_keeps_the_masks(
    prefect_api, orthanc, tmp_path, monkeypatch
):
    from tests.pipeline.pacs.orthanc import free_port

    monkeypatch.setenv("UNET_PACS_USERNAME", USER)
    monkeypatch.setenv("UNET_PACS_PASSWORD", PASSWORD)
    setup = make_predict_setup(tmp_path / "setup", n_cases=2, size=32)
    orthanc.upload([setup.demo.dicom_root / f for c in setup.demo.cases for f in c.dicom_files])
    out = tmp_path / "out"
    state = prefect_api.pacs_batch_flow(
        orthanc.dicomweb_url,
        str(out),
        push=f"dimse://NOBODY@127.0.0.1:{free_port()}",
        model_uri=str(setup.model_dir),
        device="cpu",
        secret_file=str(setup.secret),
        mlflow_experiment=None,
        return_state=True,
    )
    assert state.is_failed()
    summary = state.result(raise_on_failure=False)
    assert summary["push"]["push_failed"] == 2 and summary["push"]["reasons"] == ["PUSH_UNREACHABLE"]
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["status"] for r in rows} == {"ok"} and {r["push_status"] for r in rows} == {"push_failed"}
    assert all((out / r["case_id"] / "seg.nii.gz").is_file() for r in rows)


def test_the_nightly_pacs_deployment_resolves_dates_in_its_schedule_time_zone():
    from pathlib import Path

    import yaml
    from prefect.client.schemas.schedules import CronSchedule

    from pipeline.pacs.push import destination
    from pipeline.pacs.url import parse_pacs_url

    root = Path(__file__).resolve().parents[2]
    deployments = yaml.safe_load((root / "deploy" / "prefect.yaml").read_text())["deployments"]
    (pacs,) = [d for d in deployments if d["name"] == "nightly-pacs-batch"]
    (schedule,) = pacs["schedules"]
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    params = pacs["parameters"]
    assert params["site_timezone"] == schedule["timezone"]
    assert parse_pacs_url(params["source"]).query["StudyDate"] == "yesterday"
    destination(params["push"])  # a valid push destination, no credentials in it


def test_ingest_flow_takes_a_dicomweb_source(prefect_api, orthanc, tmp_path, monkeypatch):
    import flows.ingest

    monkeypatch.setenv("UNET_PACS_USERNAME", USER)
    monkeypatch.setenv("UNET_PACS_PASSWORD", PASSWORD)
    setup = make_predict_setup(tmp_path / "setup", n_cases=2, size=32)
    files = [setup.demo.dicom_root / f for c in setup.demo.cases for f in c.dicom_files]
    orthanc.upload(files)
    orthanc.upload([setup.demo.dicom_root / c.seg for c in setup.demo.cases])  # labels travel too
    report = flows.ingest.ingest_flow(orthanc.dicomweb_url, str(tmp_path / "staging"), str(setup.secret))
    assert report["cases"] == 2 and report["quarantined"] == 0
    assert report["discovered"] == len(files) + 2 == report["accepted"]
    assert len(list((tmp_path / "staging" / "labels").glob("*.nii.gz"))) == 2
