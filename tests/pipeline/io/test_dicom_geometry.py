"""World coordinates of every voxel agree with dcm2niix (the reference converter), values identical."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.synthetic.dicom import AXIAL, CORONAL, SAGITTAL, SeriesSpec, write_dicom_series
from tests.pipeline.io.dicom_helpers import scan, stored_volume

DCM2NIIX = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")


def oblique() -> tuple[float, ...]:
    """Row and column cosines rotated about two axes (20 and 30 degrees): truly oblique."""
    a, b = math.radians(20), math.radians(30)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    m = rx @ rz
    return (*m[:, 0], *m[:, 1])


CASES = {
    "axial": SeriesSpec(orientation=AXIAL, pixel_spacing=(0.8, 0.6)),
    "coronal": SeriesSpec(orientation=CORONAL, slice_spacing=3.0),
    "sagittal": SeriesSpec(orientation=SAGITTAL, pixel_spacing=(0.7, 0.9), origin=(30.0, -80.0, 60.0)),
    "oblique": SeriesSpec(orientation=oblique(), slice_spacing=1.7, origin=(-12.5, 40.25, 7.0)),
    "feet_first": SeriesSpec(patient_position="FFS", slice_spacing=-2.0, rescale_intercept=-1024),
    "mr_unsigned": SeriesSpec(modality="MR", signed=False, orientation=CORONAL),
}


def world(img: nib.Nifti1Image) -> np.ndarray:
    """RAS mm of every voxel centre, (I, J, K, 3)."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in img.shape[:3]], indexing="ij"), axis=-1)
    return grid @ img.affine[:3, :3].T + img.affine[:3, 3]


@pytest.mark.parametrize("name", list(CASES))
def test_world_coordinates_and_values_match_dcm2niix(tmp_path, name):
    spec = CASES[name]
    lo = 0 if not spec.signed else -1000
    vol = stored_volume(6, rows=33, cols=37, lo=lo, hi=3000, seed=11)
    source = tmp_path / "source"
    write_dicom_series(vol, source, spec)
    (group,), rejected = scan(source)
    assert rejected == []
    from pipeline.io.dicom import load_series

    ours = nib.as_closest_canonical(load_series(group).to_nifti())

    out = tmp_path / "dcm2niix"
    out.mkdir()
    subprocess.run(
        [DCM2NIIX, "-z", "y", "-o", str(out), "-f", "%s_%d", str(source)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    (reference_file,) = out.glob("*.nii.gz")
    reference = nib.as_closest_canonical(nib.load(reference_file))

    assert ours.shape == reference.shape
    assert np.abs(world(ours) - world(reference)).max() < 1e-3
    # dcm2niix keeps integer rescale in scl_slope/scl_inter (or applies it): compare modality values.
    np.testing.assert_array_equal(np.asanyarray(ours.dataobj), reference.get_fdata())
    np.testing.assert_allclose(ours.get_qform(), ours.get_sform(), atol=1e-5)  # qform is float32 quaternion
