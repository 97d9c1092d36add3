"""PACS round trips against a real Orthanc: pull (QIDO + WADO) -> predict -> push (STOW-RS / C-STORE).

Each test starts its own Orthanc (loopback, free ports, authentication on, AE allow-list) and
uploads the demo series; the CLI is driven in-process with the credentials in the environment.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from typer.testing import CliRunner

from pipeline.cli import app
from tests.pipeline.pacs.conftest import demo_image_files
from tests.pipeline.pacs.orthanc import PASSWORD, USER, free_port

runner = CliRunner()


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _predict(setup, source: str, out: Path, *extra: str):
    args = ["predict", source, "--model", str(setup.model_dir), "--out", str(out)]
    args += ["--secret-file", str(setup.secret), "--device", "cpu", *extra]
    return runner.invoke(app, args)


def _orthanc_segs(orthanc) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(io.BytesIO(orthanc.file(i["id"]))) for i in orthanc.instances(modality="SEG")]


def _source_instances(orthanc) -> dict[str, pydicom.Dataset]:
    """SOP Instance UID -> header of every image instance Orthanc holds."""
    out = {}
    for inst in orthanc.instances():
        if inst["modality"] in ("SEG", "SR"):
            continue
        ds = pydicom.dcmread(io.BytesIO(orthanc.file(inst["id"])), stop_before_pixels=True)
        out[str(ds.SOPInstanceUID)] = ds
    return out


def test_pull_predict_push_round_trip_over_dicomweb(pacs_setup, orthanc, pacs_env, tmp_path):
    files = demo_image_files(pacs_setup)
    orthanc.upload(files)
    out = tmp_path / "out"

    result = _predict(pacs_setup, orthanc.dicomweb_url, out, "--push", orthanc.dicomweb_url)

    assert result.exit_code == 0, result.output
    n_cases = len(pacs_setup.demo.cases)
    assert f"pull: {n_cases} series found: {n_cases} complete" in result.output
    report = json.loads((out / "pull_report.json").read_text())
    assert report["counts"]["instances_listed"] == len(files) == report["counts"]["instances_fetched"]
    rows = _rows(out)
    assert len(rows) == n_cases and {r["status"] for r in rows} == {"ok"}
    assert {r["push_status"] for r in rows} == {"pushed"}
    segs = _orthanc_segs(orthanc)
    assert len(segs) == n_cases
    assert sorted(r["pushed_sop_instance_uids"] for r in rows) == sorted(str(s.SOPInstanceUID) for s in segs)

    sources = _source_instances(orthanc)
    by_uid = {str(s.SOPInstanceUID): s for s in segs}
    for row in rows:
        seg_ds = by_uid[row["pushed_sop_instance_uids"]]
        seg = hd.seg.Segmentation.from_dataset(seg_ds)
        # It references exactly one source series held by the PACS, and every one of its instances.
        (ref_series,) = seg_ds.ReferencedSeriesSequence
        series_instances = {
            uid for uid, ds in sources.items() if ds.SeriesInstanceUID == ref_series.SeriesInstanceUID
        }
        referenced = {str(r.ReferencedSOPInstanceUID) for r in ref_series.ReferencedInstanceSequence}
        assert referenced == series_instances
        assert seg_ds.StudyInstanceUID == sources[next(iter(referenced))].StudyInstanceUID
        # Geometry: each frame lies exactly on its source instance (position, orientation, spacing).
        for frame in seg_ds.PerFrameFunctionalGroupsSequence:
            src_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            src = sources[str(src_uid)]
            position = frame.PlanePositionSequence[0].ImagePositionPatient
            np.testing.assert_allclose(
                [float(v) for v in position], [float(v) for v in src.ImagePositionPatient]
            )
        shared = seg_ds.SharedFunctionalGroupsSequence[0]
        any_src = sources[next(iter(referenced))]
        np.testing.assert_allclose(
            [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
            [float(v) for v in any_src.ImageOrientationPatient],
        )
        np.testing.assert_allclose(
            [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
            [float(v) for v in any_src.PixelSpacing],
        )
        # The pushed SEG holds the mask predict wrote (voxel count per label).
        mask = np.asarray(nib.load(out / row["case_id"] / "seg.nii.gz").dataobj)
        for number in seg.segment_numbers:
            label_voxels = int((mask == number).sum())
            seg_voxels = int(
                sum(
                    (seg_ds.pixel_array[i] > 0).sum()
                    for i, f in enumerate(seg_ds.PerFrameFunctionalGroupsSequence)
                    if f.SegmentIdentificationSequence[0].ReferencedSegmentNumber == number
                )
            )
            assert seg_voxels == label_voxels

    # A rerun pulls nothing new and pushes nothing twice.
    again = _predict(pacs_setup, orthanc.dicomweb_url, out, "--push", orthanc.dicomweb_url)
    assert again.exit_code == 0, again.output
    assert f"0 instances fetched, {len(files)} already spooled" in again.output
    assert "(0 objects sent now)" in again.output
    assert len(orthanc.instances(modality="SEG")) == n_cases
    assert {r["push_status"] for r in _rows(out)} == {"pushed"}


@pytest.mark.slow
def test_push_to_a_down_or_refusing_pacs_is_push_failed_and_a_rerun_pushes(
    pacs_setup, orthanc, pacs_env, tmp_path, monkeypatch
):
    orthanc.upload(demo_image_files(pacs_setup))
    out = tmp_path / "out"
    down = f"dicomweb+http://127.0.0.1:{free_port()}/dicom-web"

    result = _predict(pacs_setup, orthanc.dicomweb_url, out, "--push", down)

    assert result.exit_code == 1, result.output
    rows = _rows(out)
    assert {r["push_status"] for r in rows} == {"push_failed"}
    assert {r["push_reason"] for r in rows} == {"PUSH_UNREACHABLE"}
    assert all((out / r["case_id"] / "seg.dcm").is_file() for r in rows)  # masks stay written
    assert orthanc.instances(modality="SEG") == []

    monkeypatch.setenv("UNET_PUSH_USERNAME", USER)
    monkeypatch.setenv("UNET_PUSH_PASSWORD", "wrong-password")
    refused = _predict(pacs_setup, orthanc.dicomweb_url, out, "--push", orthanc.dicomweb_url)
    assert refused.exit_code == 1, refused.output
    assert {r["push_reason"] for r in _rows(out)} == {"PUSH_REFUSED"}
    assert "wrong-password" not in refused.output

    monkeypatch.delenv("UNET_PUSH_USERNAME")
    monkeypatch.delenv("UNET_PUSH_PASSWORD")  # falls back to UNET_PACS_*: the right ones
    retried = _predict(pacs_setup, orthanc.dicomweb_url, out, "--push", orthanc.dicomweb_url)
    assert retried.exit_code == 0, retried.output
    assert {r["push_status"] for r in _rows(out)} == {"pushed"}
    assert len(orthanc.instances(modality="SEG")) == len(rows)


def test_a_series_the_pacs_cannot_fully_deliver_is_quarantined_and_pulled_once_it_can(
    pacs_setup, orthanc, pacs_env, tmp_path
):
    files = demo_image_files(pacs_setup)
    orthanc.upload(files)
    # One instance from the middle of a series: Orthanc's DICOMweb plugin reads a series' first
    # instance to answer a series search, so losing that one fails the whole search instead.
    listed = orthanc.instances()
    series = [i for i in listed if i["series"] == listed[0]["series"]]
    stored = orthanc.storage_file(series[len(series) // 2]["id"])
    kept = tmp_path / "kept.dcm"
    shutil.move(stored, kept)  # the PACS lists the instance but cannot deliver it
    out = tmp_path / "out"

    result = _predict(pacs_setup, orthanc.dicomweb_url, out)

    n_cases = len(pacs_setup.demo.cases)
    assert result.exit_code == 1, result.output
    assert "PACS_INCOMPLETE_SERIES" in result.output
    report = json.loads((out / "pull_report.json").read_text())
    counts = report["counts"]
    assert counts["series_incomplete"] == 1 and counts["series_complete"] == n_cases - 1
    assert counts["instances_listed"] == len(files)
    assert counts["instances_listed"] == counts["instances_fetched"] + counts["instances_missing"]
    (record,) = report["quarantine"]
    assert record["reason"] == "PACS_INCOMPLETE_SERIES"
    assert record["listed"] == len(series) and record["received"] < record["listed"]
    assert len(_rows(out)) == n_cases - 1  # the incomplete series never reaches predict

    shutil.move(kept, stored)  # the PACS recovers
    again = _predict(pacs_setup, orthanc.dicomweb_url, out)
    assert again.exit_code == 0, again.output
    counts = json.loads((out / "pull_report.json").read_text())["counts"]
    assert counts["series_complete"] == n_cases and counts["instances_missing"] == 0
    assert counts["instances_reused"] == len(files) - len(series) + record["received"]
    assert {r["status"] for r in _rows(out)} == {"ok"} and len(_rows(out)) == n_cases


@pytest.mark.slow
@pytest.mark.parametrize(
    ("url_kind", "env_password", "reason"),
    [("down", PASSWORD, "PACS_UNREACHABLE"), ("up", "wrong-password", "PACS_REFUSED")],
)
def test_a_down_or_refusing_source_exits_2_with_the_reason(
    pacs_setup, orthanc, tmp_path, monkeypatch, url_kind, env_password, reason
):
    monkeypatch.setenv("UNET_PACS_USERNAME", USER)
    monkeypatch.setenv("UNET_PACS_PASSWORD", env_password)
    url = orthanc.dicomweb_url if url_kind == "up" else f"dicomweb+http://127.0.0.1:{free_port()}/dicom-web"
    result = _predict(pacs_setup, url + "?Modality=CT", tmp_path / "out")
    assert result.exit_code == 2
    assert reason in result.output
    assert env_password not in result.output


def test_credentials_in_the_url_are_refused(pacs_setup, tmp_path):
    result = _predict(pacs_setup, "dicomweb+http://user:secret@127.0.0.1:1/dicom-web", tmp_path / "out")
    assert result.exit_code == 2
    assert "credentials in a PACS URL are refused" in result.output
    assert "secret" not in result.output.replace("credentials", "")


def test_ingest_from_dicomweb_stages_every_series_like_a_folder(pacs_setup, orthanc, pacs_env, tmp_path):
    files = demo_image_files(pacs_setup)
    orthanc.upload(files)
    staging = tmp_path / "staging"
    result = runner.invoke(
        app,
        [
            "ingest",
            orthanc.dicomweb_url,
            "--out",
            str(staging),
            "--secret-file",
            str(pacs_setup.secret),
            "--workers",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    ingest_report = json.loads((staging / "ingest_report.json").read_text())
    assert ingest_report["cases"] == len(pacs_setup.demo.cases)
    assert ingest_report["discovered"] == len(files) == ingest_report["accepted"]
    for image in (staging / "images").glob("*.nii.gz"):
        assert "series_" not in image.name  # case IDs, not spool keys


@pytest.mark.parametrize(
    "orthanc",
    [{"pipeline": ["UNET_PIPELINE", "127.0.0.1", 104]}],
    indirect=True,
)
def test_push_over_dimse_c_store_and_an_unknown_ae_title_is_refused(
    pacs_setup, orthanc, pacs_env, tmp_path, monkeypatch
):
    orthanc.upload(demo_image_files(pacs_setup))
    out = tmp_path / "out"
    monkeypatch.setenv("UNET_PACS_AET", "NOT_ALLOWED")
    refused = _predict(pacs_setup, orthanc.dicomweb_url, out, "--push", orthanc.dimse_url)
    assert refused.exit_code == 1, refused.output
    assert {r["push_reason"] for r in _rows(out)} == {"PUSH_REFUSED"}

    monkeypatch.setenv("UNET_PACS_AET", "UNET_PIPELINE")
    pushed = _predict(pacs_setup, orthanc.dicomweb_url, out, "--push", orthanc.dimse_url)
    assert pushed.exit_code == 0, pushed.output
    rows = _rows(out)
    assert {r["push_status"] for r in rows} == {"pushed"}
    segs = _orthanc_segs(orthanc)
    assert sorted(str(s.SOPInstanceUID) for s in segs) == sorted(r["pushed_sop_instance_uids"] for r in rows)


def test_no_credentials_or_identifiers_in_logs_or_tables(pacs_setup, orthanc, pacs_env, tmp_path, caplog):
    orthanc.upload(demo_image_files(pacs_setup))
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        result = _predict(
            pacs_setup, orthanc.dicomweb_url + "?Modality=CT", out, "--push", orthanc.dicomweb_url
        )
    assert result.exit_code == 0, result.output
    text = caplog.text + result.output + (out / "pull_report.json").read_text()
    assert PASSWORD not in text
    for case in pacs_setup.demo.cases:
        for identifier in (case.patient_name, case.patient_id, case.study_uid, case.series_uid):
            assert identifier not in text
    for path in (out / ".spool").rglob("*"):
        assert not any(c.series_uid in str(path) or c.study_uid in str(path) for c in pacs_setup.demo.cases)


def test_push_sr_sends_one_tid1500_report_per_case_with_the_volumes(pacs_setup, orthanc, pacs_env, tmp_path):
    orthanc.upload(demo_image_files(pacs_setup))
    out = tmp_path / "out"
    args = ["--push", orthanc.dicomweb_url, "--push-sr"]
    result = _predict(pacs_setup, orthanc.dicomweb_url + "?Modality=CT", out, *args)

    assert result.exit_code == 0, result.output
    rows = _rows(out)
    segs = {str(s.SOPInstanceUID): s for s in _orthanc_segs(orthanc)}
    srs = {
        str(ds.SOPInstanceUID): ds
        for ds in (
            pydicom.dcmread(io.BytesIO(orthanc.file(i["id"]))) for i in orthanc.instances(modality="SR")
        )
    }
    assert len(srs) == len(rows) == len(segs)
    names = {v: n for v, n in pacs_setup.plan.label_names.items() if v != 0}
    for row in rows:
        pushed = set(row["pushed_sop_instance_uids"].split(";"))
        ((seg_uid,), (sr_uid,)) = (pushed & set(segs), pushed & set(srs))
        report = hd.sr.srread(io.BytesIO(orthanc.file(_orthanc_id(orthanc, sr_uid))))
        groups = report.content.get_volumetric_roi_measurement_groups()
        assert len(groups) == len(names)
        for group in groups:
            segment = group.referenced_segment
            assert segment.referenced_sop_instance_uid == seg_uid
            (number,) = segment.referenced_segment_numbers
            (volume,) = group.get_measurements()
            assert (volume.name.meaning, volume.unit.value) == ("Volume", "mL")
            assert volume.value == pytest.approx(float(row[f"{names[number]}_ml"]))
            assert (
                segment.source_series_for_segmentation.value
                == segs[seg_uid].ReferencedSeriesSequence[0].SeriesInstanceUID
            )

    again = _predict(pacs_setup, orthanc.dicomweb_url + "?Modality=CT", out, *args)
    assert again.exit_code == 0 and "(0 objects sent now)" in again.output, again.output
    assert len(orthanc.instances(modality="SR")) == len(rows)


def _orthanc_id(orthanc, sop_uid: str) -> str:
    """Orthanc's ID of the instance with this SOP Instance UID."""
    r = requests.post(f"{orthanc.base}/tools/lookup", data=sop_uid, auth=(USER, PASSWORD), timeout=30)
    r.raise_for_status()
    (found,) = [x for x in r.json() if x["Type"] == "Instance"]
    return found["ID"]
