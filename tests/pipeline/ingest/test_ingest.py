"""Ingest end to end on the generated demo dataset: what is staged, quarantined and never touched;
reruns, a kill mid-batch, and what hospitals send as DICOM."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import Reason, Status
from pipeline.ingest import (
    case_id_for,
    convert_case,
    finalize_ingest,
    ingest,
    prepare_ingest,
    record_case_failure,
)
from pipeline.io.batchdir import BatchDir, load_or_create_secret
from pipeline.io.manifest import read_manifest
from pipeline.synthetic.dataset import make_demo_dataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", n_cases=6, seed=3, size=40)


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def quarantine(staging: Path) -> dict[str, str]:
    """Every quarantined or ignored file -> reason, expanding series-level lines to their files."""
    out = {}
    for line in (staging / "quarantine.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for rel in rec.get("files") or [rec["path"]]:
            out[rel] = rec["reason"]
    return out


def world_canonical(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    canon = nib.as_closest_canonical(img)
    return np.asanyarray(canon.dataobj), canon.affine


@pytest.fixture(scope="module")
def staged(demo, tmp_path_factory):
    staging = tmp_path_factory.mktemp("staging") / "dicom"
    secret = tmp_path_factory.mktemp("secret") / "site-secret"
    before = tree_hashes(demo.dicom_root)
    report = ingest(demo.dicom_root, staging, secret_file=secret, workers=2)
    return staging, secret, report, before


def test_every_file_accounted_for(staged):
    staging, _, report, _ = staged
    assert report.balanced
    saved = json.loads((staging / "ingest_report.json").read_text())
    assert saved["accepted"] + saved["quarantined"] + saved["ignored"] == saved["discovered"]
    assert saved["discovered"] == report.discovered > 0


def test_quarantine_matches_expected_reasons(demo, staged):
    staging, *_ = staged
    assert quarantine(staging) == demo.dicom_quarantine


def test_each_series_becomes_a_labelled_case_matching_the_reference(demo, staged):
    staging, _, report, _ = staged
    records = {r["case_id"]: r for r in read_manifest(staging)}
    # every demo case, plus the valid series with hostile tags (accepted, unlabelled)
    assert report.cases == len(demo.cases) + 1
    by_first_file = {r["source"]["files"][0]: r for r in records.values()}
    for case in demo.cases:
        record = next(r for f, r in by_first_file.items() if f in case.dicom_files)
        assert set(record["source"]["files"]) == set(case.dicom_files) | {
            f"annotations/{Path(case.seg).name}"
        }
        image = nib.load(staging / record["image"])
        label = nib.load(staging / record["label"])
        # qform == sform up to the float32 quaternion encoding of oblique rotations
        np.testing.assert_allclose(image.get_qform(), image.get_sform(), atol=1e-4)
        assert image.header["qform_code"] == image.header["sform_code"] == 1
        # The MSD copy was written from the same voxels and geometry the DICOM series encodes.
        ref_img, ref_aff = world_canonical(nib.load(demo.msd_root / case.msd_image))
        got_img, got_aff = world_canonical(image)
        np.testing.assert_allclose(got_aff, ref_aff, atol=1e-3)
        np.testing.assert_array_equal(got_img, ref_img)
        got_lab, _ = world_canonical(label)
        counts = {v: int((got_lab == v).sum()) for v in (1, 2)}
        assert counts == {int(k): v for k, v in case.label_voxels.items()}
        if case.msd_label:  # held-out cases have no label in the MSD copy
            ref_lab, _ = world_canonical(nib.load(demo.msd_root / case.msd_label))
            np.testing.assert_array_equal(got_lab, ref_lab)
        assert record["modality"] == case.modality
    dataset = json.loads((staging / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "organ": 1, "lesion": 2}


def test_case_ids_are_keyed_pseudonyms_and_outputs_hold_no_patient_data(demo, staged):
    staging, secret_path, _, _ = staged
    secret = load_or_create_secret(secret_path)
    assert case_id_for("x", secret) != case_id_for("x", b"another secret of 32 bytes......")
    identifiers = set()
    for case in demo.cases:
        identifiers |= {case.patient_name, case.patient_id, case.series_uid, case.study_uid}
    identifiers.add("../../x")
    for path in staging.rglob("*"):
        if path.is_file():
            assert path.name.startswith(
                ("case_", "manifest", "quarantine", "ingest_report", "dataset", "batch", "prepare")
            )
            if path.suffix in {".json", ".jsonl"}:
                text = path.read_text()
                leaked = [i for i in identifiers if i in text]
                assert not leaked, f"{path.name} holds {leaked}"


def test_inputs_are_never_modified(demo, staged):
    *_, before = staged
    assert tree_hashes(demo.dicom_root) == before


def test_rerun_skips_unchanged_and_redoes_changed(demo, staged, tmp_path):
    staging, secret, first, _ = staged
    again = ingest(demo.dicom_root, staging, secret_file=secret, workers=1)
    assert (again.cases_converted, again.cases_skipped) == (0, first.cases)
    # Change one case's input: copy the source, alter one slice's pixel bytes.
    copy = tmp_path / "source"
    subprocess.run(["cp", "-r", str(demo.dicom_root), str(copy)], check=True)
    case = demo.cases[0]
    target = copy / case.dicom_files[3]
    data = bytearray(target.read_bytes())
    data[-2] ^= 0x01
    target.write_bytes(bytes(data))
    staging2 = tmp_path / "staging"
    subprocess.run(["cp", "-r", str(staging), str(staging2)], check=True)
    changed = ingest(copy, staging2, secret_file=secret, workers=1)
    assert (changed.cases_converted, changed.cases_skipped) == (1, first.cases - 1)


def test_msd_dataset_is_staged_with_its_labels(demo, tmp_path):
    report = ingest(demo.msd_root, tmp_path / "msd", secret_file=tmp_path / "s")
    assert report.balanced and report.quarantined == 0
    assert report.cases == len(demo.cases)
    records = read_manifest(tmp_path / "msd")
    assert sum(r["label"] is not None for r in records) == sum(c.split == "train" for c in demo.cases)
    assert json.loads((tmp_path / "msd" / "dataset.json").read_text())["labels"]["lesion"] == 2


def test_broken_nifti_files_are_quarantined(demo, tmp_path):
    report = ingest(demo.broken_nifti_root, tmp_path / "broken", secret_file=tmp_path / "s")
    got = quarantine(tmp_path / "broken")
    for rel, reason in demo.nifti_quarantine.items():
        assert got[rel] == reason
    assert report.cases == 0 and report.balanced


REPO = Path(__file__).resolve().parents[3]

# Killed at a known point, not after a timer: the third case has written its image, not yet its
# record (the case's done record), when the process dies.
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pipeline.ingest import convert
    from pipeline.ingest import ingest

    images = []
    real = convert.save_nifti

    def dying_save(volume, path, *args, **kwargs):
        real(volume, path, *args, **kwargs)
        if path.parent.name == "images":
            images.append(path)
            if len(images) == 3:
                os.kill(os.getpid(), signal.SIGKILL)

    convert.save_nifti = dying_save
    ingest(sys.argv[1], sys.argv[2], secret_file=sys.argv[3], workers=1)
    """
)


def test_killed_midway_rerun_finishes_only_the_rest(demo, tmp_path):
    staging, secret = tmp_path / "staging", tmp_path / "secret"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(demo.dicom_root), str(staging), str(secret)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    records = sorted(p.stem for p in (staging / ".records").glob("*.json") if not p.name.startswith("."))
    images = sorted(p.name.removesuffix(".nii.gz") for p in (staging / "images").glob("case_*.nii.gz"))
    assert len(records) == 2 and len(images) == 3  # the third case: its image, no record
    assert not (staging / "manifest.jsonl").exists()
    report = ingest(demo.dicom_root, staging, secret_file=secret, workers=1)
    assert report.cases_skipped == 2
    assert report.cases_converted == report.cases - 2
    assert not [p for p in staging.rglob("*") if ".tmp" in p.name], "temporary files left behind"


def test_a_case_converts_under_its_lock_and_a_second_call_finds_it_done(tmp_path):
    src = _small_series(tmp_path)
    staging, secret = tmp_path / "staging", tmp_path / "secret"
    (case_id,) = prepare_ingest(src, staging, secret_file=secret).todo
    results = []
    with BatchDir(staging.resolve()).case_lock(case_id):  # another worker holds the case
        worker = threading.Thread(
            target=lambda: results.append(convert_case(src, staging, case_id, secret_file=secret))
        )
        worker.start()
        worker.join(1.0)
        assert worker.is_alive() and not (staging / "images" / f"{case_id}.nii.gz").exists()
    worker.join(120)
    assert results[0]["status"] == Status.CONVERTED
    again = convert_case(src, staging, case_id, secret_file=secret)  # the same case submitted twice
    assert again == {"case_id": case_id, "status": Status.UNCHANGED, "reason": None, "message": None}


def test_a_timed_out_case_is_recorded_with_its_reason(tmp_path):
    src = _small_series(tmp_path)
    staging, secret = tmp_path / "staging", tmp_path / "secret"
    (case_id,) = prepare_ingest(src, staging, secret_file=secret).todo
    result = record_case_failure(src, staging, case_id, Reason.TIMEOUT, "ran past 5 s and was stopped")
    assert result == {
        "case_id": case_id,
        "status": Status.FAILED,
        "reason": Reason.TIMEOUT,
        "message": "ran past 5 s and was stopped",
    }
    report = finalize_ingest(src, staging)
    assert report.cases == 0 and report.balanced and report.by_reason == {"TIMEOUT": 1}
    assert report.quarantined == report.discovered == 6  # every file of the case, with its reason
    lines = [json.loads(x) for x in (staging / "quarantine.jsonl").read_text().splitlines()]
    assert {(x["reason"], x["message"]) for x in lines} == {("TIMEOUT", "ran past 5 s and was stopped")}


def test_cli_ingest_prints_the_accounting(demo, tmp_path):
    result = CliRunner().invoke(
        app,
        ["ingest", str(demo.msd_root), "--out", str(tmp_path / "s"), "--secret-file", str(tmp_path / "k")],
    )
    assert result.exit_code == 0, result.output
    assert f"{len(demo.cases)} cases staged" in result.output
    assert "discovered =" in result.output


def test_cli_ingest_nothing_staged_exits_2(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text("not an image")
    result = CliRunner().invoke(app, ["ingest", str(src), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "NOT_DICOM" in result.output


def _small_series(root: Path) -> Path:
    from pipeline.synthetic.dicom import SeriesSpec, write_dicom_series

    vol = (np.arange(6 * 32 * 32).reshape(6, 32, 32) % 400).astype(np.int16)
    write_dicom_series(vol, root / "series", SeriesSpec(modality="CT", slice_spacing=2.0, seed=3))
    return root / "series"


def _count_header_reads(monkeypatch) -> list:
    """Every header read by the finder or by rebuilding a job, appended to the list returned."""
    from pipeline.ingest import finder, jobs

    reads = []
    real = finder.read_header
    counting = lambda *a, **k: reads.append(a[0]) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(finder, "read_header", counting)
    monkeypatch.setattr(jobs, "read_header", counting)
    return reads


def test_one_header_pass_when_finding_and_converting_in_one_process(tmp_path, monkeypatch):
    src = _small_series(tmp_path)
    n_files = sum(1 for p in src.rglob("*") if p.is_file())
    reads = _count_header_reads(monkeypatch)
    report = ingest(src, tmp_path / "staging", secret_file=tmp_path / "secret", workers=1)
    assert report.cases_converted == 1
    assert len(reads) == n_files  # the converter used the headers read when finding the case


def test_a_file_changed_after_finding_is_read_again(tmp_path, monkeypatch):
    src = _small_series(tmp_path)
    staging, secret = tmp_path / "staging", tmp_path / "secret"
    jobs = prepare_ingest(src, staging, secret_file=secret, keep_jobs=True)
    changed = next(p for p in sorted(src.rglob("*")) if p.is_file())
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))  # same bytes, new mtime
    reads = _count_header_reads(monkeypatch)
    result = convert_case(src, staging, jobs.todo[0], secret_file=secret)
    assert result["status"] == Status.CONVERTED
    assert len(reads) == sum(1 for p in src.rglob("*") if p.is_file())  # re-assembled from the files


# ------------------------------------------------------------------------------------------
# What hospitals send: copies, damaged copies, partial series, files without file meta


def _series(root: Path, name: str, seed: int, n: int = 8) -> tuple[np.ndarray, list[Path]]:
    """n axial slices 2.5 mm apart; paths in slice order."""
    from pipeline.synthetic.dicom import SeriesSpec, write_dicom_series

    vol = np.random.default_rng(seed).integers(-1000, 2000, (n, 24, 28)).astype(np.int16)
    spec = SeriesSpec(origin=(-100.0, -120.0, -50.0), slice_spacing=2.5, seed=seed)
    return vol, write_dicom_series(vol, root / name, spec)


def _staged_image(staging: Path, record: dict) -> np.ndarray:
    """The staged image as (slices, rows, columns), to compare with the values written."""
    return np.asanyarray(nib.load(staging / record["image"]).dataobj).transpose(2, 1, 0)


def test_resent_and_truncated_copies_do_not_cost_the_series(tmp_path):
    import shutil

    src = tmp_path / "src"
    vol, paths = _series(src, "study/series", seed=21)
    shutil.copytree(src / "study/series", src / "resend")  # the PACS sent it again, byte for byte
    (src / "transfer").mkdir()
    data = paths[2].read_bytes()
    (src / "transfer/part.dcm").write_bytes(data[: len(data) - 300])  # a copy cut short
    staging = tmp_path / "staging"
    report = ingest(src, staging, secret_file=tmp_path / "secret", workers=1)
    assert report.balanced and report.cases == 1
    assert report.by_reason == {"DUPLICATE_INSTANCE": 8, "TRUNCATED": 1}
    assert (report.accepted, report.quarantined, report.ignored) == (8, 1, 8)
    reasons = quarantine(staging)
    assert reasons["transfer/part.dcm"] == "TRUNCATED"
    (record,) = read_manifest(staging)
    assert len(record["source"]["files"]) == 8 and record["partial"] is None
    np.testing.assert_array_equal(_staged_image(staging, record), vol)


def test_partial_series_is_refused_by_default(tmp_path):
    src = tmp_path / "src"
    _series(src, "good", seed=22)
    _, paths = _series(src, "short", seed=23)
    for path in paths[-2:]:  # the top 5 mm lack ImagePositionPatient
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
    staging = tmp_path / "staging"
    result = CliRunner().invoke(
        app, ["ingest", str(src), "--out", str(staging), "--secret-file", str(tmp_path / "secret")]
    )
    # cases staged: not 2 (whether quarantined inputs give 1 is the CLI's exit contract)
    assert result.exit_code in (0, 1), result.output
    assert "SERIES_INCOMPLETE" in result.output
    report = json.loads((staging / "ingest_report.json").read_text())
    assert report["cases"] == 1 and report["balanced"] and report["partial"] == {}
    assert report["by_reason"] == {"MISSING_GEOMETRY": 1, "SERIES_INCOMPLETE": 1}
    reasons = quarantine(staging)
    assert {reasons[f"short/{p.name}"] for p in paths[:-2]} == {"SERIES_INCOMPLETE"}
    assert {reasons[f"short/{p.name}"] for p in paths[-2:]} == {"MISSING_GEOMETRY"}
    line = next(
        json.loads(x) for x in (staging / "quarantine.jsonl").read_text().splitlines() if "INCOMPLETE" in x
    )
    assert "2 of 8 files" in line["message"] and line["missing_mm"] == [-35.0, -32.5]


@pytest.mark.parametrize("how", ["flag", "config", "flow_steps"])
def test_partial_series_accepted_is_marked_partial(tmp_path, how):
    from pipeline.ingest import IngestLimits

    src = tmp_path / "src"
    vol, paths = _series(src, "short", seed=24)
    for path in paths[:3]:  # the bottom three files were cut short in transfer
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 100])
    staging, secret = tmp_path / "staging", tmp_path / "secret"
    if how == "flow_steps":  # prepare, convert elsewhere (headers read again), finalize
        limits = IngestLimits(accept_partial_series=True)
        jobs = prepare_ingest(src, staging, secret_file=secret, limits=limits)
        for case_id in jobs.todo:
            result = convert_case(src, staging, case_id, secret_file=secret)
            assert result["status"] == Status.CONVERTED
        finalize_ingest(src, staging)
    else:
        args = ["ingest", str(src), "--out", str(staging), "--secret-file", str(secret)]
        if how == "flag":
            args.append("--accept-partial-series")
        else:
            config = tmp_path / "config.yaml"
            config.write_text("data:\n  accept_partial_series: true\n")
            args += ["--config", str(config)]
        result = CliRunner().invoke(app, args)
        # cases staged: not 2 (whether quarantined inputs give 1 is the CLI's exit contract)
        assert result.exit_code in (0, 1), result.output
        assert "partial: 1 case(s)" in result.output
    (record,) = read_manifest(staging)
    assert record["partial"]["n_missing_files"] == 3
    assert record["partial"]["missing_mm"] == [-50.0, -45.0]
    assert "before the first slice" in record["partial"]["message"]
    np.testing.assert_array_equal(_staged_image(staging, record), vol[3:])
    report = json.loads((staging / "ingest_report.json").read_text())
    assert list(report["partial"]) == [record["case_id"]] and report["balanced"]
    assert report["partial"][record["case_id"]]["missing_mm"] == [-50.0, -45.0]
    assert report["by_reason"] == {"TRUNCATED": 3}


@pytest.mark.parametrize("implicit_vr", [False, True], ids=["explicit", "implicit"])
def test_files_without_file_meta_are_staged_with_their_values(tmp_path, implicit_vr):
    from pipeline.synthetic.dicom import SeriesSpec, write_bare_data_sets, write_dicom_series

    src = tmp_path / "src"
    vol = np.random.default_rng(25).integers(-2048, 2048, (6, 24, 28)).astype(np.int16)
    paths = write_dicom_series(vol, src / "old", SeriesSpec(bits_stored=12, rescale_intercept=-1024))
    write_bare_data_sets(paths, implicit_vr=implicit_vr)
    _series(src, "new", seed=26)
    staging = tmp_path / "staging"
    report = ingest(src, staging, secret_file=tmp_path / "secret", workers=2)
    assert report.cases == 2 and report.quarantined == 0 and report.balanced
    old = next(r for r in read_manifest(staging) if r["source"]["files"][0].startswith("old/"))
    np.testing.assert_array_equal(_staged_image(staging, old), vol - 1024)


def test_old_file_pydicom_cannot_decode_is_a_reason_not_a_crash(tmp_path):
    from pipeline.synthetic.dicom import SeriesSpec, write_bare_data_sets, write_dicom_series

    src = tmp_path / "src"
    vol = np.random.default_rng(27).integers(0, 4096, (4, 24, 28)).astype(np.int16)
    paths = write_dicom_series(vol, src / "packed", SeriesSpec(signed=False, bits_stored=12))
    write_bare_data_sets(paths, implicit_vr=True)
    for path in paths:  # 12 bits allocated: pixels packed two in three bytes (ACR-NEMA era)
        ds = pydicom.dcmread(path, force=True)
        ds.BitsAllocated = 12
        ds.PixelData = bytes(24 * 28 * 12 // 8)
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    _series(src, "good", seed=28)
    staging = tmp_path / "staging"
    report = ingest(src, staging, secret_file=tmp_path / "secret", workers=1)
    assert report.cases == 1 and report.balanced
    assert report.by_reason == {"UNREADABLE": 1}
    assert {quarantine(staging)[f"packed/{p.name}"] for p in paths} == {"UNREADABLE"}


def test_every_dicom_situation_at_once(tmp_path):
    """Re-send, cut copy, partial series, bare data sets and an undecodable file in one tree."""
    import shutil

    from pipeline.synthetic.dicom import SeriesSpec, write_bare_data_sets, write_dicom_series

    src = tmp_path / "src"
    good, good_paths = _series(src, "a/good", seed=31)
    shutil.copytree(src / "a/good", src / "b/resend")
    data = good_paths[4].read_bytes()
    (src / "c").mkdir()
    (src / "c/cut.dcm").write_bytes(data[: len(data) - 500])
    _, short = _series(src, "a/short", seed=32)
    for path in short[-2:]:
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
    old = np.random.default_rng(33).integers(-2048, 2048, (5, 24, 28)).astype(np.int16)
    bare = write_dicom_series(old, src / "a/old", SeriesSpec(bits_stored=12, seed=33))
    write_bare_data_sets(bare, implicit_vr=False)
    packed = write_dicom_series(old, src / "a/packed", SeriesSpec(bits_stored=12, seed=34))
    write_bare_data_sets(packed, implicit_vr=True)
    for path in packed:
        ds = pydicom.dcmread(path, force=True)
        ds.BitsAllocated, ds.PixelData = 12, bytes(24 * 28 * 12 // 8)
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    staging = tmp_path / "staging"
    report = ingest(src, staging, secret_file=tmp_path / "secret", workers=2)
    assert report.balanced and report.cases == 2
    assert report.by_reason == {
        "DUPLICATE_INSTANCE": 8,
        "MISSING_GEOMETRY": 1,
        "SERIES_INCOMPLETE": 1,
        "TRUNCATED": 1,
        "UNREADABLE": 1,
    }
    assert (report.accepted, report.ignored, report.quarantined) == (8 + 5, 8, 1 + 8 + 5)
    staged = {r["source"]["files"][0].split("/")[1]: r for r in read_manifest(staging)}
    assert set(staged) == {"good", "old"}
    np.testing.assert_array_equal(_staged_image(staging, staged["good"]), good)
    np.testing.assert_array_equal(_staged_image(staging, staged["old"]), old)


def test_conversion_workers_start_with_the_terminal_rules(tmp_path, monkeypatch):
    """The pool's workers run `worker_logging` with this process's rules (pipeline.logs): a
    library's warning in a worker stays off a quiet terminal, as in the CLI's own process."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.ingest import batch
    from pipeline.logs import logging_state, worker_logging

    made = []

    class Recorded(ThreadPoolExecutor):  # threads: the initializer is recorded, not run here
        def __init__(self, max_workers, **kwargs):
            made.append(kwargs)
            super().__init__(max_workers)

    monkeypatch.setattr(batch, "ProcessPoolExecutor", Recorded)
    src = tmp_path / "src"
    _series(src, "a", seed=41)
    _series(src, "b", seed=42)
    report = ingest(src, tmp_path / "staging", secret_file=tmp_path / "secret", workers=2)
    assert report.cases == 2
    (kwargs,) = made
    assert kwargs["initializer"] is worker_logging and kwargs["initargs"] == (logging_state(),)
