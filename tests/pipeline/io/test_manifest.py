"""The one manifest reader: records as written, or resolved for training and inference."""

from __future__ import annotations

import json

import pytest

from pipeline.io.manifest import read_manifest

ROWS = [
    {"case_id": "case_a", "image": "images/case_a.nii.gz", "label": "labels/case_a.nii.gz", "modality": "CT"},
    {"case_id": "case_b", "image": "images/case_b.nii.gz", "label": None, "modality": "unknown"},
]


def _write(folder, lines):
    folder.mkdir(exist_ok=True)
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_records_as_written_and_resolved(tmp_path):
    staging = _write(tmp_path / "s", [json.dumps(r) for r in ROWS] + [""])
    assert read_manifest(staging) == ROWS
    resolved = read_manifest(staging, resolve=True)
    assert resolved[0]["image"] == str(staging / "images/case_a.nii.gz")
    assert resolved[0]["label"] == str(staging / "labels/case_a.nii.gz")
    assert resolved[1]["label"] is None and resolved[1]["modality"] == "UNKNOWN"


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", r"manifest.jsonl:2 is not valid JSON"),
        ('{"image": "x"}', r"manifest.jsonl:2 lacks case_id"),
    ],
)
def test_a_bad_line_is_named(tmp_path, line, match):
    staging = _write(tmp_path / "s", [json.dumps(ROWS[0]), line])
    with pytest.raises(ValueError, match=match):
        read_manifest(staging)


def test_a_folder_without_manifest_says_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="staging folder made by `unet-pipeline ingest`"):
        read_manifest(tmp_path)
