"""Batch prediction end to end on the generated demo data, with an untrained tiny model.

One predict run over the demo's DICOM tree (every orientation, broken series beside good ones,
through the CLI) is shared by most tests; reruns, a changed model and a kill mid-batch run on a
small NIfTI folder to stay fast.
"""

from __future__ import annotations

import concurrent.futures
import csv
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.inference.batch import BatchSettings, finalize_batch, predict, predict_case, prepare_batch
from pipeline.inference.model import ModelLoadError
from pipeline.inference.streams import stream_layout
from tests.pipeline.inference.predict_fixture import PredictSetup, make_predict_setup, save_untrained_model

REPO = Path(__file__).resolve().parents[3]
DCM2NIIX = Path(sys.executable).parent / "dcm2niix"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> PredictSetup:
    return make_predict_setup(tmp_path_factory.mktemp("predict"))


@pytest.fixture(scope="module")
def dicom_run(setup):
    """The CLI run over the demo DICOM tree; returns (exit code, stdout, OUT, every log line)."""
    out = setup.root / "out_dicom"
    handler = _Records()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        result = CliRunner().invoke(
            app,
            [
                "predict",
                str(setup.demo.dicom_root),
                "--model",
                str(setup.model_dir),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--secret-file",
                str(setup.secret),
                "--verbose",
            ],
        )
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    return result.exit_code, result.output, out, handler.lines


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _referenced_series(seg_path: Path) -> str:
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    return str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)


def _ok_cases(setup: PredictSetup, out: Path):
    """(demo case, OUT/<case_id>) for every ok DICOM case, matched by the SEG's referenced series."""
    by_series = {c.series_uid: c for c in setup.demo.cases}
    pairs = []
    for row in _rows(out):
        if row["status"] == "ok":
            series = _referenced_series(out / row["case_id"] / "seg.dcm")
            if series in by_series:
                pairs.append((by_series[series], out / row["case_id"]))
    return pairs


def test_batch_with_quarantined_series_exits_1_and_lists_every_case(setup, dicom_run):
    code, output, out, _ = dicom_run
    assert code == 1, output
    rows = _rows(out)
    statuses = {r["status"] for r in rows}
    assert statuses == {"ok", "quarantined"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(setup.demo.cases) + 1  # the demo cases plus the valid "hostile" series
    quarantined = {r["reason"] for r in rows if r["status"] == "quarantined"}
    expected = {v for v in setup.demo.dicom_quarantine.values() if v != "NOT_DICOM"}
    assert quarantined == expected
    for row in ok:
        case_dir = out / row["case_id"]
        assert {p.name for p in case_dir.iterdir()} == {"seg.nii.gz", "seg.dcm", "qc.png", "done.json"}
    assert "quarantined" in output and "report" in output
    lines = (out / "quarantine.jsonl").read_text().splitlines()
    assert {json.loads(x)["reason"] for x in lines} >= expected


def test_results_csv_columns_exactly_as_the_issue_lists(setup, dicom_run):
    _, _, out, _ = dicom_run
    with open(out / "results.csv", newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh))
    names = [setup.plan.label_names[v] for v in sorted(setup.plan.label_names) if v != 0]
    per_label = [c for n in names for c in (f"{n}_ml", f"{n}_voxels")]
    assert header == [
        "case_id",
        "source",
        "status",
        "reason",
        "message",
        "model_name",
        "model_version",
        *per_label,
        "seconds",
        "push_status",  # blank unless the batch was pushed (pipeline.pacs)
        "push_reason",
        "pushed_sop_instance_uids",
    ]
    for row in _rows(out):
        if row["status"] == "ok":
            mask = np.asarray(nib.load(out / row["case_id"] / "seg.nii.gz").dataobj)
            for value, name in setup.plan.label_names.items():
                if value:
                    assert int(row[f"{name}_voxels"]) == int((mask == value).sum())


def _dcm2niix(files: list[Path], work: Path) -> nib.Nifti1Image:
    src, dst = work / "src", work / "dst"
    src.mkdir(parents=True)
    dst.mkdir()
    for i, f in enumerate(files):
        shutil.copy(f, src / f"{i:04d}.dcm")
    subprocess.run(
        [str(DCM2NIIX), "-z", "y", "-o", str(dst), "-f", "%s_%d", str(src)], check=True, capture_output=True
    )
    made = [p for p in dst.glob("*.nii.gz") if "_Eq" not in p.name]
    assert len(made) == 1, made
    return nib.load(made[0])


def test_masks_have_the_dcm2niix_geometry_for_every_orientation(setup, dicom_run, tmp_path):
    _, _, out, _ = dicom_run
    pairs = _ok_cases(setup, out)
    assert {c.orientation for c, _ in pairs} == {"axial", "sagittal", "coronal", "oblique", "feet_first"}
    for case, case_dir in pairs:
        mask = nib.load(case_dir / "seg.nii.gz")
        assert mask.get_data_dtype() == np.uint8
        assert np.allclose(mask.get_qform(), mask.get_sform(), atol=1e-4)
        files = [setup.demo.dicom_root / f for f in case.dicom_files]
        ref = _dcm2niix(files, tmp_path / case.name)
        a, b = nib.as_closest_canonical(mask), nib.as_closest_canonical(ref)
        assert a.shape == b.shape[:3], case.orientation
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-3, err_msg=case.orientation)


def test_dicom_seg_reads_back_as_the_nifti_mask_in_the_same_place(setup, dicom_run):
    _, _, out, _ = dicom_run
    for case, case_dir in _ok_cases(setup, out):
        nii = nib.load(case_dir / "seg.nii.gz")
        mask = np.asarray(nii.dataobj)
        seg = hd.seg.segread(case_dir / "seg.dcm")
        assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("model", "local")
        labels = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
        assert labels == {v: n for v, n in setup.plan.label_names.items() if v}
        inverse = np.linalg.inv(nii.affine)
        for rel in case.dicom_files:
            ds = pydicom.dcmread(setup.demo.dicom_root / rel, stop_before_pixels=True)
            # Where is this instance in the mask? Its first pixel's position, LPS -> RAS -> voxel.
            lps = np.array([float(v) for v in ds.ImagePositionPatient])
            ijk = inverse @ np.array([-lps[0], -lps[1], lps[2], 1.0])
            assert np.allclose(ijk[:2], 0, atol=1e-3)
            k = round(float(ijk[2]))
            pixels = seg.get_pixels_by_source_instance(
                [str(ds.SOPInstanceUID)],
                combine_segments=True,
                relabel=False,
                assert_missing_frames_are_empty=True,
            )[0]
            np.testing.assert_array_equal(pixels, mask[:, :, k].T, err_msg=f"{case.orientation} {rel}")


def _identifiers(root: Path) -> set[str]:
    found = set()
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - strays and broken files are not DICOM
            continue
        for key in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            value = str(ds.get(key, "") or "")
            if len(value) >= 6:
                found.add(value)
    return found


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_no_patient_identifiers_in_tables_report_manifest_or_logs(setup, dicom_run):
    _, output, out, log_lines = dicom_run
    identifiers = _identifiers(setup.demo.dicom_root)
    assert any(i.startswith("DEMO^") for i in identifiers)
    texts = {
        "results.csv": (out / "results.csv").read_text(),
        "report.html": (out / "report.html").read_text(),
        "run_manifest.json": (out / "run_manifest.json").read_text(),
        "logs": "\n".join(log_lines),
        "stdout": output,
    }
    assert log_lines  # --verbose logged the cases
    for where, text in texts.items():
        leaked = [i for i in identifiers if i in text]
        assert not leaked, f"{where} contains {leaked[:3]}"


def test_report_is_self_contained_and_lists_every_case(dicom_run):
    _, _, out, _ = dicom_run
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script src" not in page  # the sort script is inline
    rows = _rows(out)
    for row in rows:
        if row["case_id"]:
            assert row["case_id"] in page
        assert row["source"] in page
    assert page.count("data:image/png;base64,") == sum(r["status"] == "ok" for r in rows)
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["model"]["sha256"] and manifest["plan"] and manifest["config"]
    assert manifest["started"] <= manifest["finished"]
    assert set(manifest["inputs"]) == {r["case_id"] for r in rows if r["status"] == "ok"}


# ------------------------------------------------------------------------------------------
# Reliability on a small NIfTI folder


@pytest.fixture
def nifti_source(setup, tmp_path) -> Path:
    src = tmp_path / "nifti"
    src.mkdir()
    for case in setup.demo.cases[:4]:
        shutil.copy(setup.demo.msd_root / case.msd_image, src / Path(case.msd_image).name)
    return src


def test_tampered_model_is_refused_before_any_case(setup, nifti_source, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(setup.model_dir, bad)
    weights = bytearray((bad / "weights.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (bad / "weights.safetensors").write_bytes(bytes(weights))
    out = tmp_path / "out"
    with pytest.raises(ModelLoadError, match=re.escape(str(bad))):
        predict(nifti_source, bad, out, BatchSettings(device="cpu", secret_file=setup.secret))
    assert not out.exists()
    partial = tmp_path / "partial"
    shutil.copytree(setup.model_dir, partial)
    (partial / "plan.json").unlink()
    result = CliRunner().invoke(
        app, ["predict", str(nifti_source), "--model", str(partial), "--out", str(out), "--device", "cpu"]
    )
    assert result.exit_code == 2
    assert "plan.json" in result.output and "partial" in result.output.replace("\n", "")
    assert not out.exists()


def test_two_prepares_of_one_out_at_once_both_succeed_with_one_plan(setup, nifti_source, tmp_path):
    """Two orchestrators planning the same OUT at the same moment (fresh folders: the model is
    staged by both); a few rounds, since a collision depends on timing."""
    from pipeline.io.model_dir import load_model_dir

    for round_ in range(3):
        out = tmp_path / f"out{round_}"
        start = threading.Barrier(2)

        def plan(_, out=out, start=start):
            start.wait()
            return prepare_batch(
                nifti_source, setup.model_dir, out, BatchSettings(device="cpu", secret_file=setup.secret)
            )

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first, second = pool.map(plan, range(2))
        assert first.case_ids == second.case_ids and len(first.case_ids) == 4
        assert first.model_sha256 == second.model_sha256 == load_model_dir(out / ".batch" / "model").sha256
        batch = json.loads((out / ".batch" / "batch.json").read_text())
        assert batch["cases"] == first.case_ids
        # No temporary model copies left behind beside the staged one.
        assert sorted(p.name for p in (out / ".batch").iterdir()) == ["batch.json", "cases", "locks", "model"]
    assert predict_case(out, first.case_ids[0])["status"] == "ok"
    assert finalize_batch(out).count("ok") == 1


def test_rerun_skips_done_cases_and_a_changed_model_redoes_them(setup, nifti_source, tmp_path):
    out = tmp_path / "out"
    first = predict(
        nifti_source,
        setup.model_dir,
        out,
        BatchSettings(device="cpu", secret_file=setup.secret, write_qc=False),
    )
    assert first.exit_code == 0 and first.processed == 4
    again = predict(
        nifti_source,
        setup.model_dir,
        out,
        BatchSettings(device="cpu", secret_file=setup.secret, write_qc=False),
    )
    assert again.exit_code == 0 and again.processed == 0 and again.skipped == 4
    # One changed input is redone, the others are not.
    changed = sorted(nifti_source.iterdir())[0]
    img = nib.load(changed)
    data = np.asarray(img.dataobj) + 1
    nib.save(nib.Nifti1Image(data.astype(img.get_data_dtype()), img.affine, img.header), changed)
    third = predict(
        nifti_source,
        setup.model_dir,
        out,
        BatchSettings(device="cpu", secret_file=setup.secret, write_qc=False),
    )
    assert third.processed == 1 and third.skipped == 3
    other = save_untrained_model(setup.plan, tmp_path / "model_v2", seed=1)
    fourth = predict(
        nifti_source, other, out, BatchSettings(device="cpu", secret_file=setup.secret, write_qc=False)
    )
    assert fourth.processed == 4 and fourth.skipped == 0
    marker = json.loads((out / fourth.results[0].case_id / "done.json").read_text())
    assert marker["model_sha256"] == json.loads((other / "model.json").read_text())["weights_sha256"]


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pipeline.inference.batch import BatchSettings, predict
    from pipeline.outputs import qc

    calls = []
    real = qc.write_qc_png

    def dying_qc(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the third case has written its mask, not yet its QC or marker
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    qc.write_qc_png = dying_qc
    predict(sys.argv[1], sys.argv[2], sys.argv[3], BatchSettings(device="cpu", secret_file=sys.argv[4]))
    """
)


def test_kill_mid_batch_then_rerun_finishes_only_the_rest(setup, nifti_source, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(nifti_source), str(setup.model_dir), str(out), str(setup.secret)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    done = sorted(p.parent.name for p in out.glob("*/done.json"))
    # Cases 1 and 2 were handed to the writers before case 3; one of them may still have been
    # writing (two writers) when case 3's QC killed the process.
    assert 1 <= len(done) <= 2
    for case_id in done:
        assert {p.name for p in (out / case_id).iterdir()} == {"seg.nii.gz", "qc.png", "done.json"}
    # Nothing partial at a final path: each final file of the killed case is complete.
    for mask in out.glob("*/seg.nii.gz"):
        assert np.asarray(nib.load(mask).dataobj).dtype == np.uint8
    assert not (out / "results.csv").exists()
    rerun = predict(nifti_source, setup.model_dir, out, BatchSettings(device="cpu", secret_file=setup.secret))
    assert rerun.exit_code == 0
    assert rerun.skipped == len(done) and rerun.processed == 4 - len(done)
    assert sorted(r.case_id for r in rerun.results if r.skipped) == done


def test_staging_folder_as_source(setup, tmp_path):
    out = tmp_path / "out"
    summary = predict(
        setup.staging, setup.model_dir, out, BatchSettings(device="cpu", write_qc=False, write_seg=False)
    )
    assert summary.exit_code == 0
    assert summary.processed == len(setup.demo.cases)
    for r in summary.results:
        staged = nib.load(setup.staging / "images" / f"{r.case_id}.nii.gz")
        mask = nib.load(out / r.case_id / "seg.nii.gz")
        assert mask.shape == staged.shape
        np.testing.assert_allclose(mask.affine, staged.affine, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Failure isolation: an exception in any step of one case is that case's record


@pytest.fixture
def dicom_source(setup, tmp_path) -> Path:
    """Three good DICOM series of the demo in a tree of their own."""
    src = tmp_path / "dicom"
    for case in setup.demo.cases[:3]:
        for rel in case.dicom_files:
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(setup.demo.dicom_root / rel, src / rel)
    return src


# (module, function, exception raised, reason code); each replaces the step's function so that
# its second call raises.
STEPS = [
    ("pipeline.inference.worker", "load_image", OSError("disk went away"), "READ_FAILED"),
    ("pipeline.planning.transforms", "preprocess_volume", ValueError("bad spacing"), "PREDICTION_FAILED"),
    ("pipeline.inference.worker", "predict_volume", MemoryError("out of memory"), "PREDICTION_FAILED"),
    ("pipeline.outputs.masks", "write_mask_nifti", PermissionError("read-only share"), "OUTPUT_WRITE_FAILED"),
    (
        "pipeline.outputs.masks",
        "write_dicom_seg",
        AttributeError("'FileDataset' has no 'PatientSex'"),
        "SEG_WRITE_FAILED",
    ),
    ("pipeline.outputs.qc", "write_qc_png", RuntimeError("no font"), "QC_WRITE_FAILED"),
    ("pipeline.inference.worker", "write_done_marker", KeyError("outputs"), "RECORD_WRITE_FAILED"),
]


@pytest.mark.parametrize(("module", "name", "error", "reason"), STEPS, ids=[s[1] for s in STEPS])
def test_a_failure_in_any_step_fails_that_case_only(
    setup, dicom_source, tmp_path, monkeypatch, module, name, error, reason
):
    import importlib

    target = importlib.import_module(module)
    real = getattr(target, name)
    calls = itertools.count(1)  # next() is atomic: writer threads may call at once

    def second_call_fails(*args, **kwargs):
        if next(calls) == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, second_call_fails)
    out = tmp_path / "out"
    summary = predict(
        dicom_source, setup.model_dir, out, BatchSettings(device="cpu", secret_file=setup.secret)
    )
    assert summary.exit_code == 1
    rows = _rows(out)
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(rows) == 3 and len(failed) == 1
    (row,) = failed
    assert row["reason"] == reason
    assert str(error).strip("'\"") in row["message"] and "\n" not in row["message"]
    assert type(error).__name__ in row["message"]
    page = (out / "report.html").read_text()
    assert reason in page and type(error).__name__ in page
    for ok in (r for r in rows if r["status"] == "ok"):
        names = {p.name for p in (out / ok["case_id"]).iterdir()}
        assert names == {"seg.nii.gz", "seg.dcm", "qc.png", "done.json"}
    victim = out / row["case_id"]
    assert not (victim / "done.json").exists() and not (victim / "seg.nii.gz").exists()
    records = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in records if r.get("status") == "failed"] == [reason]

    monkeypatch.setattr(target, name, real)
    again = predict(dicom_source, setup.model_dir, out, BatchSettings(device="cpu", secret_file=setup.secret))
    assert again.exit_code == 0 and again.processed == 1 and again.skipped == 2


def test_cli_exit_code_1_and_a_failed_row_when_one_case_fails(setup, dicom_source, tmp_path, monkeypatch):
    from pipeline.outputs import masks

    real = masks.write_dicom_seg
    calls = itertools.count(1)

    def first_fails(*args, **kwargs):
        if next(calls) == 1:
            raise AttributeError("'FileDataset' object has no attribute 'PatientSex'")
        return real(*args, **kwargs)

    monkeypatch.setattr(masks, "write_dicom_seg", first_fails)
    out = tmp_path / "out"
    args = ["predict", str(dicom_source), "--model", str(setup.model_dir), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--secret-file", str(setup.secret)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "2 ok" in result.output and "1 failed" in result.output
    assert sorted(r["status"] for r in _rows(out)) == ["failed", "ok", "ok"]


# ------------------------------------------------------------------------------------------
# The case key, output hashes and --out


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_out_that_is_a_file_exits_2_with_one_line(setup, nifti_source, tmp_path, where):
    existing = tmp_path / "results.txt"
    existing.write_text("not a folder")
    out = existing if where == "file" else existing / "sub"
    args = ["predict", str(nifti_source), "--model", str(setup.model_dir), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--secret-file", str(setup.secret)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(existing) in lines[0]
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert existing.read_text() == "not a folder"


def test_every_output_option_is_in_the_case_key(setup, nifti_source, tmp_path):
    """QC off then on writes the QC pictures; new limits redo the cases; markers hold the key."""
    from pipeline.ingest import IngestLimits

    out = tmp_path / "out"
    settings = BatchSettings(device="cpu", secret_file=setup.secret)
    first = predict(nifti_source, setup.model_dir, out, replace(settings, write_qc=False))
    assert first.processed == 4 and not list(out.glob("*/qc.png"))
    second = predict(nifti_source, setup.model_dir, out, replace(settings, write_qc=True))
    assert second.processed == 4 and len(list(out.glob("*/qc.png"))) == 4
    plan = prepare_batch(nifti_source, setup.model_dir, out, settings)
    assert plan.todo == []
    for case_id in plan.case_ids:
        marker = json.loads((out / case_id / "done.json").read_text())
        assert marker["case_key"] == plan.case_key(case_id)
        assert set(marker["outputs"]) == {"seg.nii.gz", "qc.png"}
    keys = {plan.case_key(c) for c in plan.case_ids}
    for changed in (
        {"write_qc": False},
        {"write_seg": False},
        {"postprocess_masks": True},
        {"limits": IngestLimits(max_voxels=2**29)},
    ):
        other = prepare_batch(
            nifti_source, setup.model_dir, tmp_path / "plan_only", replace(settings, **changed)
        )
        assert not keys & {other.case_key(c) for c in other.case_ids}, changed
    third = predict(
        nifti_source, setup.model_dir, out, replace(settings, limits=IngestLimits(max_voxels=2**29))
    )
    assert third.processed == 4


def test_rerun_redoes_cases_whose_outputs_are_missing_or_damaged(setup, nifti_source, tmp_path):
    out = tmp_path / "out"
    settings = BatchSettings(device="cpu", secret_file=setup.secret)
    first = predict(nifti_source, setup.model_dir, out, settings)
    assert first.processed == 4
    a, b, c, _ = sorted(r.case_id for r in first.results)
    good = (out / a / "seg.nii.gz").read_bytes()
    (out / a / "seg.nii.gz").write_bytes(good[:-7] + bytes(7))  # damaged in place
    (out / b / "qc.png").unlink()  # missing
    (out / c / "seg.nii.gz").write_bytes((out / b / "seg.nii.gz").read_bytes())  # another case's mask
    again = predict(nifti_source, setup.model_dir, out, settings)
    assert again.exit_code == 0
    assert sorted(r.case_id for r in again.results if not r.skipped) == [a, b, c]
    assert (out / a / "seg.nii.gz").read_bytes() == good and (out / b / "qc.png").is_file()


# ------------------------------------------------------------------------------------------
# Memory


def test_predict_plans_case_sizes_and_a_small_budget_loads_one_case_at_a_time(setup, nifti_source, tmp_path):
    """With a budget below two cases' planned peaks, no case is read while another is in flight."""
    import pipeline.inference.worker as worker
    from pipeline.inference.memory import planned_case_bytes

    plan = prepare_batch(
        nifti_source,
        setup.model_dir,
        tmp_path / "planned",
        BatchSettings(device="cpu", secret_file=setup.secret),
    )
    target = setup.plan.target_spacing
    for case_id in plan.case_ids:
        source = json.loads((tmp_path / "planned" / ".batch" / "cases" / f"{case_id}.json").read_text())[
            "source"
        ]
        img = nib.load(nifti_source / source)
        expected = planned_case_bytes(int(np.prod(img.shape)), img.header.get_zooms(), target_spacing=target)
        assert plan.case_bytes[case_id] == expected > 0

    events: list[str] = []
    real_load, real_predict, real_marker = worker.load_image, worker.predict_volume, worker.write_done_marker

    def recorded(event, real):
        def call(*args, **kwargs):
            result = real(*args, **kwargs)
            events.append(event)
            return result

        return call

    smallest = min(plan.case_bytes.values())
    # Below two cases' peaks, above one case and one case being written: no case is read while
    # another is read or predicted; a case may be read while the one before is being written.
    # At the smallest peak, not even beside a write: each case's marker stands before the next
    # is read.
    for budget, expected in [
        (2 * smallest - 1, ["load", "predict"] * 4),
        (smallest, ["load", "predict", "marker"] * 4),
    ]:
        events.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(worker, "load_image", recorded("load", real_load))
            mp.setattr(worker, "predict_volume", recorded("predict", real_predict))
            mp.setattr(worker, "write_done_marker", recorded("marker", real_marker))
            summary = predict(
                nifti_source,
                setup.model_dir,
                tmp_path / f"out{budget}",
                BatchSettings(device="cpu", secret_file=setup.secret, memory_budget=budget, model_streams=2),
                on_case_done=lambda r: events.append("done"),
            )
        assert summary.exit_code == 0
        assert [e for e in events if e in expected] == expected
        assert events.count("done") == 4


def test_the_memory_budget_is_not_part_of_the_case_key(setup, nifti_source, tmp_path):
    from pipeline.ingest import IngestLimits

    settings = BatchSettings(device="cpu", secret_file=setup.secret)
    first = prepare_batch(nifti_source, setup.model_dir, tmp_path / "a", settings)
    other = prepare_batch(
        nifti_source,
        setup.model_dir,
        tmp_path / "b",
        replace(settings, limits=IngestLimits(memory_budget=2**30)),
    )
    assert [first.case_key(c) for c in first.case_ids] == [other.case_key(c) for c in other.case_ids]


# ------------------------------------------------------------------------------------------
# The pipeline: writers overlap the model


def _locked(lock_file: Path) -> bool:
    import fcntl

    with open(lock_file, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return False


def test_pipelined_outputs_equal_the_serial_ones_and_a_case_is_reported_only_when_done(
    setup, dicom_source, tmp_path, monkeypatch
):
    import pipeline.inference.worker as worker
    from pipeline.outputs import qc

    settings = BatchSettings(device="cpu", secret_file=setup.secret)
    serial = predict(
        dicom_source, setup.model_dir, tmp_path / "serial", replace(settings, writers=0, model_streams=1)
    )

    out = tmp_path / "pipelined"
    real_qc, real_predict = qc.write_qc_png, worker.predict_volume
    held: list[bool] = []
    reported: list[tuple[str, set[str]]] = []
    threads: list[tuple[int, int]] = []
    both_in = threading.Barrier(2, timeout=30)  # broken, failing the case, unless two run at once

    def qc_under_lock(path, *args, **kwargs):  # in a writer thread: the case's lock is still held
        held.append(_locked(out / ".batch" / "locks" / f"{Path(path).parent.name}.lock"))
        return real_qc(path, *args, **kwargs)

    def two_at_once(*args, **kwargs):  # in a model stream: the first two cases meet here
        threads.append((threading.get_ident(), torch.get_num_threads()))
        if len(threads) <= 2:
            both_in.wait()
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(qc, "write_qc_png", qc_under_lock)
    monkeypatch.setattr(worker, "predict_volume", two_at_once)
    caller_threads = torch.get_num_threads()
    pipelined = predict(
        dicom_source,
        setup.model_dir,
        out,
        replace(settings, writers=2, model_streams=2),
        on_case_done=lambda r: reported.append((r.case_id, {p.name for p in (out / r.case_id).iterdir()})),
    )
    assert serial.exit_code == pipelined.exit_code == 0
    assert held == [True] * 3
    # two streams sharing the caller's intra-op threads, neither of them the caller's thread
    per_thread = dict(threads)
    assert len(per_thread) == 2 and threading.get_ident() not in per_thread
    assert sorted(per_thread.values()) == sorted(stream_layout(2, torch.device("cpu"), caller_threads))
    assert torch.get_num_threads() == caller_threads
    assert sorted(c for c, _ in reported) == sorted(r.case_id for r in serial.results)
    assert all(names == {"seg.nii.gz", "seg.dcm", "qc.png", "done.json"} for _, names in reported)
    for r in serial.results:
        a, b = tmp_path / "serial" / r.case_id, out / r.case_id
        assert (a / "seg.nii.gz").read_bytes() == (b / "seg.nii.gz").read_bytes()
        assert (a / "qc.png").read_bytes() == (b / "qc.png").read_bytes()
        seg_a, seg_b = pydicom.dcmread(a / "seg.dcm"), pydicom.dcmread(b / "seg.dcm")
        assert seg_a.PixelData == seg_b.PixelData  # UIDs differ by design, the content does not
        assert [s.SegmentLabel for s in seg_a.SegmentSequence] == [
            s.SegmentLabel for s in seg_b.SegmentSequence
        ]
        done_a = json.loads((a / "done.json").read_text())
        done_b = json.loads((b / "done.json").read_text())
        assert done_a["case_key"] == done_b["case_key"]
        for name in ("seg.nii.gz", "qc.png"):
            assert done_a["outputs"][name] == done_b["outputs"][name]
        assert done_a["result"]["volumes_ml"] == done_b["result"]["volumes_ml"]


@pytest.mark.parametrize("streams", [1, 2])
def test_an_interrupt_mid_batch_releases_every_case_and_a_rerun_finishes_the_rest(
    setup, tmp_path, monkeypatch, streams
):
    import pipeline.inference.worker as worker
    from pipeline.outputs import qc

    source = tmp_path / "nifti"
    source.mkdir()
    for case in setup.demo.cases:
        shutil.copy(setup.demo.msd_root / case.msd_image, source / Path(case.msd_image).name)
    n_cases = len(setup.demo.cases)
    out = tmp_path / "out"
    settings = BatchSettings(device="cpu", secret_file=setup.secret, model_streams=streams, writers=2)
    reported: list[str] = []
    interrupted = threading.Event()
    calls, busy, streams_busy = [0], [0], threading.Event()
    guard = threading.Lock()
    real_predict, real_qc = worker.predict_volume, qc.write_qc_png

    def held_back(*args, **kwargs):  # past the first two cases, the model waits for the Ctrl-C
        with guard:
            calls[0] += 1
            if calls[0] > 2:
                busy[0] += 1
                if busy[0] == streams:
                    streams_busy.set()
        if calls[0] > 2:
            assert interrupted.wait(timeout=60)
        return real_predict(*args, **kwargs)

    def written_once_the_streams_are_busy(*args, **kwargs):
        # The Ctrl-C (as the first case is reported) then finds predict waiting for a free
        # stream with the next case locked: that case must be released, never started.
        assert streams_busy.wait(timeout=60)
        time.sleep(0.3)  # predict reaches its wait in `submit`
        return real_qc(*args, **kwargs)

    def ctrl_c(result) -> None:  # Ctrl-C arrives as the first case is reported
        reported.append(result.case_id)
        interrupted.set()
        raise KeyboardInterrupt

    monkeypatch.setattr(worker, "predict_volume", held_back)
    monkeypatch.setattr(qc, "write_qc_png", written_once_the_streams_are_busy)
    # The traceback kept (as a notebook or a task state keeps it) must hold no case's lock.
    with pytest.raises(KeyboardInterrupt) as kept:
        predict(source, setup.model_dir, out, settings, on_case_done=ctrl_c)
    monkeypatch.undo()
    done = sorted(p.parent.name for p in out.glob("*/done.json"))
    # The two written and those in the streams finish (a case is never cut); the next never starts.
    assert reported[0] in done and len(done) == 2 + streams < n_cases
    assert calls[0] == 2 + streams
    for case_dir in out.glob("case_*"):  # nothing partial: a case is whole or has no outputs
        names = {p.name for p in case_dir.iterdir()}
        assert names in ({"seg.nii.gz", "qc.png", "done.json"}, set()), names  # NIfTI: no SEG
    locks = sorted((out / ".batch" / "locks").glob("case_*.lock"))
    assert locks and not any(_locked(lock) for lock in locks)  # none left locked in this process
    del kept
    rerun = predict(source, setup.model_dir, out, settings)
    assert rerun.exit_code == 0
    assert sorted(r.case_id for r in rerun.results if r.skipped) == done
    assert rerun.processed == n_cases - len(done)


def test_predict_reads_each_header_once_and_rereads_a_series_changed_since_planning(
    setup, dicom_source, tmp_path, monkeypatch
):
    from pipeline.ingest import jobs
    from pipeline.io.batchdir import BatchDir

    reread: list[str] = []
    real = jobs.read_header

    def counted(path, *args, **kwargs):  # a worker rebuilding a case's series from its files
        reread.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(jobs, "read_header", counted)
    settings = BatchSettings(device="cpu", secret_file=setup.secret)
    summary = predict(dicom_source, setup.model_dir, tmp_path / "once", settings)
    assert summary.exit_code == 0 and summary.processed == 3
    assert reread == []  # the workers took the series the plan had read

    # The steps one by one in this process: a file touched after planning sends its case back
    # to the files; the other cases keep the series read by the plan.
    out = tmp_path / "steps"
    plan = prepare_batch(dicom_source, setup.model_dir, out, settings, keep_jobs=True)
    touched = plan.todo[1]
    images = BatchDir(out.resolve()).read_case(touched)["job"]["images"]
    stat = (dicom_source / images[0]).stat()
    os.utime(dicom_source / images[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert [predict_case(out, c)["status"] for c in plan.todo] == ["ok"] * 3
    assert sorted(reread) == sorted(Path(rel).name for rel in images)
