"""Planned memory per case, from a real prepared batch (NIfTI and DICOM sources)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import nibabel as nib
import pydicom
import pytest

from pipeline.inference.batch import BatchSettings, prepare_batch
from pipeline.inference.footprint import (
    BYTES_PER_VOXEL,
    CASE_OVERHEAD_BYTES,
    planned_case_bytes,
    planned_voxels,
)
from tests.pipeline.inference.predict_fixture import make_predict_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_predict_setup(tmp_path_factory.mktemp("footprint"), n_cases=3, size=32)


def test_planned_case_bytes_from_nifti_headers(setup, tmp_path):
    case = setup.demo.cases[0]
    image = setup.demo.msd_root / case.msd_image
    plan = prepare_batch(
        image, setup.model_dir, tmp_path / "out", BatchSettings(device="cpu", secret_file=setup.secret)
    )
    (case_id,) = plan.case_ids
    voxels = math.prod(nib.load(image).shape)
    assert planned_voxels(tmp_path / "out", case_id) == voxels
    assert planned_case_bytes(tmp_path / "out", case_id) == CASE_OVERHEAD_BYTES + BYTES_PER_VOXEL * voxels
    assert planned_voxels(tmp_path / "out", "case_0000000000000000") == 0  # not planned: no estimate


@pytest.mark.parametrize("content", [b"", b"not a NIfTI header", "cut"])
def test_an_unreadable_image_has_no_estimate_and_no_error(setup, tmp_path, content):
    """The case then fails or is quarantined on its own when it is predicted, with its record."""

    image = setup.demo.msd_root / setup.demo.cases[0].msd_image
    src = tmp_path / "src"
    src.mkdir()
    (src / "case.nii.gz").write_bytes(image.read_bytes())
    out = tmp_path / "out"
    plan = prepare_batch(src, setup.model_dir, out, BatchSettings(device="cpu", secret_file=setup.secret))
    (case_id,) = plan.case_ids
    data = image.read_bytes()[:100] if content == "cut" else content
    (src / "case.nii.gz").write_bytes(data)  # changed after planning
    assert planned_voxels(out, case_id) == 0


def test_planned_voxels_of_dicom_series(setup, tmp_path):

    out = tmp_path / "out"
    plan = prepare_batch(
        setup.demo.dicom_root, setup.model_dir, out, BatchSettings(device="cpu", secret_file=setup.secret)
    )
    assert plan.case_ids
    for case_id in plan.case_ids:
        case = json.loads((out / ".batch" / "cases" / f"{case_id}.json").read_text())
        files = [setup.demo.dicom_root / rel for rel in case["job"]["images"]]
        expected = 0
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            expected += ds.Rows * ds.Columns * int(getattr(ds, "NumberOfFrames", 1) or 1)
        assert planned_voxels(out, case_id) == expected, case_id
    assert os.path.isdir(Path(out))
