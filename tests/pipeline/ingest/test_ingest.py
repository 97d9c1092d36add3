"""Ingest end to end on the generated demo dataset: what is staged, quarantined and never touched."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import IGNORED_REASONS, Reason
from pipeline.ingest import case_id_for, ingest
from pipeline.io.batchdir import load_or_create_secret
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
                ("case_", "manifest", "quarantine", "ingest_report", "dataset", "plan")
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


def test_killed_midway_rerun_finishes_only_the_rest(demo, tmp_path):
    staging, secret = tmp_path / "staging", tmp_path / "secret"
    script = (
        "import sys; from pipeline.ingest import ingest; "
        "ingest(sys.argv[1], sys.argv[2], secret_file=sys.argv[3], workers=1)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(demo.dicom_root), str(staging), str(secret)])
    records = staging / ".records"

    def finished() -> int:  # records in place (a temporary ".<name>.<random>.tmp.json" is not one)
        return sum(1 for p in records.glob("*.json") if not p.name.startswith("."))

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and finished() < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = finished()
    assert 2 <= done_before < len(demo.cases) + 1, "the kill should land mid-batch"
    assert not list(staging.rglob("*.tmp*")) or all(p.name.startswith(".") for p in staging.rglob("*.tmp*"))
    report = ingest(demo.dicom_root, staging, secret_file=secret, workers=1)
    assert report.cases_skipped == done_before
    assert report.cases_converted == report.cases - done_before
    assert not [p for p in staging.rglob("*") if ".tmp" in p.name], "temporary files left behind"


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


def test_one_header_pass_when_planning_and_converting_in_one_process(tmp_path, monkeypatch):
    from pipeline import ingest as ingest_module

    src = _small_series(tmp_path)
    n_files = sum(1 for p in src.rglob("*") if p.is_file())
    reads = []
    real = ingest_module.read_header
    monkeypatch.setattr(ingest_module, "read_header", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    report = ingest(src, tmp_path / "staging", secret_file=tmp_path / "secret", workers=1)
    assert report.cases_converted == 1
    assert len(reads) == n_files  # the converter used the planned headers


def test_a_file_changed_after_planning_is_read_again(tmp_path, monkeypatch):
    from pipeline import ingest as ingest_module

    src = _small_series(tmp_path)
    staging, secret = tmp_path / "staging", tmp_path / "secret"
    plan = ingest_module.plan_ingest(src, staging, secret_file=secret, keep_jobs=True)
    changed = next(p for p in sorted(src.rglob("*")) if p.is_file())
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))  # same bytes, new mtime
    reads = []
    real = ingest_module.read_header
    monkeypatch.setattr(ingest_module, "read_header", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    result = ingest_module.convert_case(src, staging, plan.todo[0], secret_file=secret)
    assert result["status"] == "converted"
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
    from pipeline import ingest as ingest_module
    from pipeline.ingest import IngestLimits

    src = tmp_path / "src"
    vol, paths = _series(src, "short", seed=24)
    for path in paths[:3]:  # the bottom three files were cut short in transfer
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 100])
    staging, secret = tmp_path / "staging", tmp_path / "secret"
    if how == "flow_steps":  # plan, convert elsewhere (headers read again), finalize
        limits = IngestLimits(accept_partial_series=True)
        plan = ingest_module.plan_ingest(src, staging, secret_file=secret, limits=limits)
        for case_id in plan.todo:
            result = ingest_module.convert_case(src, staging, case_id, secret_file=secret)
            assert result["status"] == "converted"
        ingest_module.finalize_ingest(src, staging)
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


# What hospitals really send: every entry accounted for, nothing blocks, one bad entry never
# stops the others (tests/pipeline/ingest/situations.py builds each situation).

from tests.pipeline.ingest import situations  # noqa: E402

CLI = "from pipeline.cli import app; app()"


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command in its own process: a FIFO that were opened would hang it, not the suite."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
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


# ------------------------------------------------------------------------------------------
# Memory: an ingest at the voxel limit stays within PEAK_FACTOR x its volume + a fixed overhead


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (psutil, else /proc)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is in the lock; /proc keeps the test honest
        psutil = None
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
        except psutil.Error:
            return 0
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total


def _ingest_peak(source: Path, staging: Path, config: Path, secret: Path) -> int:
    """Peak resident bytes of `unet-pipeline ingest` (the whole process tree), asserting exit 0."""
    # The process's own high-water mark (VmHWM) catches a spike between samples. Not ru_maxrss:
    # after fork + exec Linux reports the parent's (pytest's) peak there.
    code = (
        "import sys\nfrom pipeline.cli import app\ntry:\n    app()\nfinally:\n"
        "    hwm = [x for x in open('/proc/self/status') if x.startswith('VmHWM')][0].split()[1]\n"
        "    print('maxrss', int(hwm) * 1024, file=sys.stderr)\n"
    )
    args = ["ingest", str(source), "--out", str(staging), "--secret-file", str(secret)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args, "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.005)
    out, err = proc.communicate()
    assert proc.returncode == 0, out + err
    return max(peak, int(err.split("maxrss")[-1].split()[0]))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc (Linux)")
def test_peak_memory_of_an_ingest_at_the_voxel_limit(tmp_path):
    """A float32 volume exactly at the limit the budget sets, with its label: the whole process
    tree's peak resident memory stays within PEAK_FACTOR x the volume + FIXED_OVERHEAD_BYTES."""
    from pipeline.ingest import FIXED_OVERHEAD_BYTES, PEAK_FACTOR

    voxels = 2**26  # 256 MiB of float32: the budget below makes this exactly the voxel limit
    shape = (512, 256, voxels // (512 * 256))
    source = tmp_path / "source"
    z = np.arange(shape[2], dtype=np.float32)
    ramp = np.sin(np.arange(shape[0], dtype=np.float32))[:, None, None] * 100 + z
    situations.nifti(source / "big.nii", np.broadcast_to(ramp, shape).astype(np.float32))
    lab = np.zeros(shape, np.uint8)
    lab[100:200, 50:150, 10:50] = 1
    situations.nifti(source / "big_seg.nii.gz", lab)
    del ramp, lab
    volume_bytes = voxels * 4
    budget = FIXED_OVERHEAD_BYTES + int(PEAK_FACTOR * 4) * voxels
    config = tmp_path / "config.yaml"
    config.write_text(f"ingest:\n  memory_budget_gb: {budget / 2**30!r}\n")
    staging = tmp_path / "staging"
    peak = _ingest_peak(source, staging, config, tmp_path / "k")
    limits = json.loads((staging / ".plan" / "plan.json").read_text())["limits"]
    assert limits["max_voxels"] == voxels  # the default limit follows from the budget
    (record,) = read_manifest(staging)
    assert record["dtype"] == "float32" and record["labels_present"] == [0, 1]
    bound = PEAK_FACTOR * volume_bytes + FIXED_OVERHEAD_BYTES
    ratio = (peak - FIXED_OVERHEAD_BYTES) / volume_bytes
    assert peak <= bound, f"peak {peak / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB ({ratio:.2f}x + overhead)"


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc (Linux)")
def test_peak_memory_of_a_dicom_series_at_the_voxel_limit(tmp_path):
    """A CT series (12-bit stored, intercept -1024: an int16 volume) exactly at the voxel limit the
    budget sets: the process tree's peak stays within PEAK_FACTOR x the volume + the fixed
    overhead, and what the conversion adds to an ingest of a tiny series stays within
    PEAK_FACTOR x the volume (decoding into one output array; it was 2x: every slice kept)."""
    from pipeline.ingest import FIXED_OVERHEAD_BYTES, PEAK_FACTOR
    from pipeline.synthetic.dicom import SeriesSpec, write_dicom_series

    rows, cols, n = 512, 512, 256
    voxels = rows * cols * n  # 2**26: 128 MiB as int16
    spec = SeriesSpec(signed=False, bits_stored=12, rescale_intercept=-1024.0, slice_spacing=1.0, seed=5)
    stored = (np.arange(n, dtype=np.uint16)[:, None, None] * 13 + np.arange(cols, dtype=np.uint16)) % 4096
    write_dicom_series(np.broadcast_to(stored, (n, rows, cols)), tmp_path / "big" / "series", spec)
    write_dicom_series(stored[:4, :16, :16], tmp_path / "tiny" / "series", spec)
    volume_bytes = 2 * voxels
    config = tmp_path / "config.yaml"
    budget = FIXED_OVERHEAD_BYTES + int(PEAK_FACTOR * 4) * voxels  # makes `voxels` the limit
    config.write_text(f"ingest:\n  memory_budget_gb: {budget / 2**30!r}\n")
    base = _ingest_peak(tmp_path / "tiny", tmp_path / "staging_tiny", config, tmp_path / "k")
    peak = _ingest_peak(tmp_path / "big", tmp_path / "staging", config, tmp_path / "k")
    staging = tmp_path / "staging"
    assert json.loads((staging / ".plan" / "plan.json").read_text())["limits"]["max_voxels"] == voxels
    (record,) = read_manifest(staging)
    assert record["dtype"] == "int16" and record["shape"] == [cols, rows, n]
    staged = nib.load(staging / record["image"])
    expected = np.broadcast_to(stored.astype(np.int16) - 1024, (n, rows, cols))
    np.testing.assert_array_equal(np.asarray(staged.dataobj[:, :, ::85]).transpose(2, 1, 0), expected[::85])
    bound = PEAK_FACTOR * volume_bytes + FIXED_OVERHEAD_BYTES
    assert peak <= bound, f"peak {peak / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"
    ratio = (peak - base) / volume_bytes
    assert ratio <= PEAK_FACTOR, (
        f"peak {peak / 2**20:.0f} MiB, tiny series {base / 2**20:.0f} MiB: {ratio:.2f}x"
    )


def test_limits_follow_from_the_budget():
    from pipeline.ingest import FIXED_OVERHEAD_BYTES, IngestLimits

    small = IngestLimits.for_budget(FIXED_OVERHEAD_BYTES + 6 * 2**24)
    assert (small.max_voxels, small.max_bytes, small.memory_budget) == (
        2**24,
        8 * 2**24,
        FIXED_OVERHEAD_BYTES + 6 * 2**24,
    )
    assert IngestLimits.for_budget(256 * 2**30).max_voxels == 2**30  # never above the historical cap
    with pytest.raises(ValueError, match="memory budget"):
        IngestLimits.for_budget(FIXED_OVERHEAD_BYTES)


def test_parallel_conversions_fit_the_budget():
    from pipeline.ingest import _admit

    peaks = {"a": 6, "b": 5, "c": 3, "d": 20}
    pending = ["a", "b", "c", "d"]
    assert _admit(pending, peaks, {}, workers=4, budget=10) == ["a", "c"]  # 6 + 3 <= 10; b waits
    assert pending == ["b", "d"]
    assert _admit(pending, peaks, {"running a": 6}, workers=4, budget=10) == []  # b (5) would exceed
    assert _admit(pending, peaks, {}, workers=4, budget=10) == ["b"]
    assert _admit(pending, peaks, {}, workers=4, budget=10) == ["d"]  # larger than the budget: alone
    assert _admit(["a", "b", "c"], peaks, {}, workers=2, budget=None) == ["a", "b"]  # workers bound it


def test_the_conversion_queue_admits_by_planned_memory(tmp_path):
    """The queue `ingest` and the ingest flow share: planned peaks from the plan's jobs."""
    from pipeline.ingest import FIXED_OVERHEAD_BYTES, ConversionQueue, IngestLimits, planned_peak_bytes

    jobs = tmp_path / ".plan" / "jobs"
    jobs.mkdir(parents=True)
    sizes = {"big": 600 * 2**20, "small1": 100 * 2**20, "small2": 100 * 2**20, "old": 900 * 2**20}
    for case_id, size in sizes.items():
        (jobs / f"{case_id}.json").write_text(json.dumps({"volume_bytes": size}))
    peak = {c: planned_peak_bytes(v) for c, v in sizes.items()}
    limits = IngestLimits(memory_budget=peak["big"] + peak["small1"])
    queue = ConversionQueue(tmp_path, list(sizes), limits, slots=4, todo=["big", "small1", "small2"])
    assert queue.peaks["old"] == 0  # unchanged since the last run: no conversion to plan for
    assert queue.slots == 3 and queue.busy  # the budget holds three of the smallest case
    assert queue.ready() == ["big", "small1", "old"]  # small2 would exceed the budget
    assert queue.ready() == []
    queue.finished("small1")
    assert queue.ready() == ["small2"]
    for case_id in ("big", "old", "small2"):
        queue.finished(case_id)
    assert not queue.busy
    # Slots: no more than the budget holds of the smallest case, never fewer than one.
    tight = IngestLimits(memory_budget=FIXED_OVERHEAD_BYTES)
    assert ConversionQueue(tmp_path, ["small1", "small2"], tight, slots=4).slots == 1
    assert ConversionQueue(tmp_path, ["small1"], IngestLimits(), slots=3).slots == 3  # no budget


def test_ingest_limits_read_the_config_as_the_cli_does(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.ingest import FIXED_OVERHEAD_BYTES, ingest_limits

    config = tmp_path / "config.yaml"
    budget = (FIXED_OVERHEAD_BYTES + 6 * 2**24) / 2**30
    config.write_text(
        f"ingest:\n  memory_budget_gb: {budget!r}\n  allow_no_orientation: true\n"
        "data:\n  accept_partial_series: true\n"
    )
    limits = ingest_limits(config)
    assert (limits.max_voxels, limits.memory_budget) == (2**24, FIXED_OVERHEAD_BYTES + 6 * 2**24)
    assert limits.allow_no_orientation and limits.accept_partial_series
    assert not ingest_limits(config, accept_partial_series=False).accept_partial_series  # overrides win
    default = ingest_limits(None)
    assert not (default.allow_no_orientation or default.accept_partial_series)
    assert default.memory_budget is not None  # 75 % of this machine's memory
    config.write_text("ingest:\n  memory_budgt_gb: 4\n")
    with pytest.raises(ConfigError, match="memory_budgt_gb"):
        ingest_limits(config)


def test_ingest_under_a_tight_budget_converts_everything(tmp_path):
    from pipeline.ingest import FIXED_OVERHEAD_BYTES, IngestLimits

    source = tmp_path / "source"
    for i in range(3):
        situations.good_nifti(source, f"n/ct_{i}.nii.gz")
    limits = IngestLimits.for_budget(FIXED_OVERHEAD_BYTES + 6 * 2**20 + 1)  # one case at a time
    report = ingest(source, tmp_path / "staging", secret_file=tmp_path / "k", workers=2, limits=limits)
    assert report.cases == 3 and report.clean


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
    assert not list((tmp_path / "staging").glob("images/*"))
