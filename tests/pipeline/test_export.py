"""The output writers on their own: masks and the results table (QC: test_qc.py, report: test_report.py)."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from pipeline import export
from pipeline.inference import CaseResult

NAMES = {0: "background", 1: "organ", 2: "lesion"}


@pytest.mark.parametrize("shape", [(33, 37, 5), (16, 16, 1)])
def test_mask_nifti_keeps_shape_affine_and_uint8(tmp_path, shape):
    affine = np.array([[0, 0, 2.5, -10], [-0.9, 0, 0, 20], [0, 1.1, 0, 5], [0, 0, 0, 1]], float)
    mask = np.random.default_rng(0).integers(0, 3, shape).astype(np.uint8)
    path = export.write_mask_nifti(tmp_path / "seg.nii.gz", mask, affine)
    img = nib.load(path)
    assert img.get_data_dtype() == np.uint8 and img.shape == shape
    np.testing.assert_allclose(img.get_sform(), affine, atol=1e-5)
    np.testing.assert_allclose(img.get_qform(), affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(img.dataobj), mask)
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]  # no temporary left behind


def _result(case_id: str, organ_ml: float, status: str = "ok") -> CaseResult:
    return CaseResult(
        case_id,
        f"src/{case_id}",
        status,
        "" if status == "ok" else "TRUNCATED",
        {"organ": organ_ml, "lesion": 1.0},
        {"organ": int(organ_ml * 1000), "lesion": 1000},
        1.5,
    )


def test_results_csv(tmp_path):
    results = [_result(f"c{i}", v) for i, v in enumerate([100, 102, 98, 101, 99, 400])]
    results.append(_result("", 0, status="quarantined"))
    export.write_results_csv(tmp_path / "results.csv", results, ["organ", "lesion"], "unet", "3")
    with open(tmp_path / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == export.result_columns(["organ", "lesion"])
    assert rows[0]["model_version"] == "3" and rows[-1]["organ_ml"] == ""
