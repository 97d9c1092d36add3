"""What hospitals really send: every entry accounted for, nothing blocks, one bad entry never
stops the others (tests/pipeline/ingest/situations.py builds each situation)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import IGNORED_REASONS, Reason
from pipeline.ingest import ingest
from pipeline.io.manifest import read_manifest
from tests.pipeline.ingest import situations

REPO = Path(__file__).resolve().parents[3]
CLI = "from pipeline.cli import app; app()"


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command in its own process: a FIFO that were opened would hang it, not the suite."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", CLI, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def quarantine_lines(staging: Path) -> list[dict]:
    raw = (staging / "quarantine.jsonl").read_bytes()
    text = raw.decode("utf-8")  # strict: fails on anything that is not UTF-8
    assert "\\ud" not in text, "a lone surrogate escaped into the JSON"
    return [json.loads(line) for line in text.splitlines()]


def check_against(expected: situations.Expected, staging: Path, report) -> None:
    files, notes = {}, {}
    for rec in quarantine_lines(staging):
        if rec.get("files") == []:
            notes.setdefault(rec["path"], set()).add(rec["reason"])
        for rel in rec.get("files") or ([] if rec.get("files") == [] else [rec["path"]]):
            files[rel] = rec["reason"]
    assert files == expected.reasons
    assert notes == expected.notes
    assert report.cases == expected.cases
    assert report.balanced
    saved = json.loads((staging / "ingest_report.json").read_text(encoding="utf-8"))
    assert saved["accepted"] + saved["quarantined"] + saved["ignored"] == saved["discovered"]


@pytest.fixture
def tree(tmp_path):
    """(source with one good NIfTI case, outside folder, scratch folder)."""
    source, outside, work = tmp_path / "source", tmp_path / "outside", tmp_path / "work"
    for folder in (source, outside, work):
        folder.mkdir()
    return source, outside, work


@pytest.mark.parametrize(
    "build",
    [
        lambda src, out, work: situations.links(src, out),
        lambda src, out, work: situations.non_utf8_names(src),
        lambda src, out, work: situations.no_orientation(src),
        lambda src, out, work: situations.analyze_pair(src),
        lambda src, out, work: situations.raw_dumps(src),
        lambda src, out, work: situations.dicomdir_with_missing_files(src, work),
        lambda src, out, work: situations.msd_dataset(src, out),
    ],
    ids=["links", "non_utf8_names", "no_orientation", "analyze_pair", "raw_dumps", "dicomdir", "msd"],
)
def test_each_situation_is_listed_and_the_good_case_beside_it_staged(tree, build, tmp_path):
    source, outside, work = tree
    expected = situations.good_nifti(source).update(build(source, outside, work))
    report = ingest(source, tmp_path / "staging", secret_file=tmp_path / "secret", workers=1)
    check_against(expected, tmp_path / "staging", report)
    reasons = {*expected.reasons.values(), *(r for rs in expected.notes.values() for r in rs)}
    # the CLI exits 1 when something is quarantined; ignored non-inputs (NOT_DICOM, ...) are clean
    assert report.clean == all(Reason(r) in IGNORED_REASONS for r in reasons)


def test_fifo_socket_and_device_are_listed_never_opened(tree, tmp_path):
    source, _, _ = tree
    expected = situations.good_nifti(source).update(situations.special_files(source))
    result = run_cli(
        "ingest", str(source), "--out", str(tmp_path / "s"), "--secret-file", str(tmp_path / "k")
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "NOT_REGULAR_FILE" in result.stdout
    saved = json.loads((tmp_path / "s" / "ingest_report.json").read_text())
    assert saved["balanced"] and saved["cases"] == 1
    assert {r["path"] for r in quarantine_lines(tmp_path / "s")} == set(expected.reasons)


def test_non_utf8_names_are_staged_and_shown_escaped(tree, tmp_path):
    source, _, _ = tree
    situations.non_utf8_names(source)
    report = ingest(source, tmp_path / "staging", secret_file=tmp_path / "secret", workers=1)
    assert report.cases == 1
    manifest = (tmp_path / "staging" / "manifest.jsonl").read_bytes().decode("utf-8")
    assert json.loads(manifest)["source"]["files"] == ["caf\\xe9/scan\\xff.nii.gz"]
    # a rerun recognises the case by the name's bytes
    again = ingest(source, tmp_path / "staging", secret_file=tmp_path / "secret", workers=1)
    assert (again.cases_skipped, again.cases_converted) == (1, 0)


def test_no_orientation_is_staged_only_when_the_config_opts_in(tree, tmp_path):
    source, _, _ = tree
    situations.no_orientation(source)
    refused = run_cli(
        "ingest", str(source), "--out", str(tmp_path / "a"), "--secret-file", str(tmp_path / "k")
    )
    assert refused.returncode == 2 and "NO_ORIENTATION" in refused.stdout
    config = tmp_path / "config.yaml"
    config.write_text("ingest:\n  allow_no_orientation: true\n")
    args = ["--secret-file", str(tmp_path / "k"), "--config", str(config)]
    staged = run_cli("ingest", str(source), "--out", str(tmp_path / "b"), *args)
    assert staged.returncode == 0, staged.stdout + staged.stderr
    (record,) = read_manifest(tmp_path / "b")
    assert record["orientation"] == "unknown"
    header = nib.load(tmp_path / "b" / record["image"]).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (0, 0)


def test_cli_exit_codes_clean_quarantined_nothing(tree, tmp_path):
    source, _, _ = tree
    situations.good_nifti(source)
    (source / "README.txt").write_text("delivery notes")  # ignored, not quarantined
    args = ["--secret-file", str(tmp_path / "k")]
    assert run_cli("ingest", str(source), "--out", str(tmp_path / "a"), *args).returncode == 0
    situations.analyze_pair(source)
    assert run_cli("ingest", str(source), "--out", str(tmp_path / "b"), *args).returncode == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("nothing here")
    assert run_cli("ingest", str(empty), "--out", str(tmp_path / "c"), *args).returncode == 2


def test_every_situation_at_once_stages_all_good_cases_and_exits_1(tmp_path):
    source, outside, work = tmp_path / "source", tmp_path / "outside", tmp_path / "work"
    for folder in (source, outside, work):
        folder.mkdir()
    expected = situations.everything(source, outside, work)
    before = {p: p.lstat().st_mtime_ns for p in source.rglob("*")}
    staging = tmp_path / "staging"
    result = run_cli("ingest", str(source), "--out", str(staging), "--secret-file", str(tmp_path / "k"))
    assert result.returncode == 1, result.stdout + result.stderr
    saved = json.loads((staging / "ingest_report.json").read_text(encoding="utf-8"))
    assert saved["balanced"] and saved["cases"] == expected.cases
    assert saved["accepted"] + saved["quarantined"] + saved["ignored"] == saved["discovered"]

    class Saved:  # the report as check_against reads it
        cases, balanced = saved["cases"], saved["balanced"]

    check_against(expected, staging, Saved)
    records = read_manifest(staging)
    assert len(records) == expected.cases
    assert all((staging / r["image"]).is_file() for r in records)
    assert {p: p.lstat().st_mtime_ns for p in source.rglob("*")} == before  # inputs untouched


@pytest.mark.parametrize("first", [[8, 0x16], [8, 0], [2, 0x10], [8, 0x08], [0x0800, 0x1600]])
@pytest.mark.parametrize("dtype", ["<u2", "<i2", ">u2"])
def test_raw_dumps_are_not_dicom_while_files_without_preamble_are(tmp_path, first, dtype):
    import pydicom
    from pydicom.data import get_testdata_file

    from pipeline.io.dicom import read_header

    data = np.random.default_rng(sum(first)).integers(0, 3000, 8192).astype(dtype)
    data[:2] = first
    (tmp_path / "dump.raw").write_bytes(data.tobytes())
    with pytest.raises(Exception) as info:
        read_header(tmp_path / "dump.raw", tmp_path, 2**28)
    assert info.value.reason == Reason.NOT_DICOM, info.value
    # An old file of the same look (no preamble, no file meta, implicit VR) is still DICOM.
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.preamble = None
    ds.save_as(tmp_path / "old.dcm", implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert (tmp_path / "old.dcm").read_bytes()[:2] == b"\x08\x00"
    assert read_header(tmp_path / "old.dcm", tmp_path, 2**28).rows == 128


def test_a_case_whose_label_is_refused_leaves_no_image(tree, tmp_path):
    source, _, _ = tree
    situations.nifti(source / "n/ct.nii.gz", situations.volume(1))
    bad = situations.label()
    bad[0, 0, 0] = 7  # fine as a value, but on another grid:
    situations.nifti(source / "n/ct_seg.nii.gz", bad[:, :, :5])
    report = ingest(source, tmp_path / "staging", secret_file=tmp_path / "k", workers=1)
    assert report.cases == 0 and report.by_reason == {"LABEL_GEOMETRY_MISMATCH": 1}
