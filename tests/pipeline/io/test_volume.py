"""save_nifti: exact voxels and geometry, deterministic bytes, on both gzip paths."""

from __future__ import annotations

import gzip
import hashlib

import nibabel as nib
import numpy as np
import pytest

from pipeline.io import volume as volume_module
from pipeline.io.volume import THREADED_GZIP_BYTES, Volume, save_nifti

_C, _S = np.cos(0.2), np.sin(0.2)  # an oblique grid: rotated about y, 0.7 x 0.7 x 2.5 mm
AFFINE = np.array(
    [[-0.7 * _C, 0, 2.5 * _S, 120.0], [0, 0.7, 0, -80.0], [0.7 * _S, 0, 2.5 * _C, 33.0], [0, 0, 0, 1]]
)


def _volume(nbytes: int) -> Volume:
    side = 128
    depth = max(1, nbytes // (side * side * 2))
    rng = np.random.default_rng(0)
    data = (rng.normal(0, 50, (side, side, depth)) + 200).astype(np.int16)
    return Volume(data, AFFINE, modality="CT")


@pytest.mark.parametrize("nbytes", [1 << 20, THREADED_GZIP_BYTES + (1 << 20)], ids=["single", "threaded"])
def test_written_volume_reads_back_exactly_with_qform_equal_to_sform(tmp_path, nbytes):
    vol = _volume(nbytes)
    path = save_nifti(vol, tmp_path / "case.nii.gz")
    gzip.decompress(path.read_bytes())  # a standard gzip stream
    img = nib.load(path)
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol.data)
    np.testing.assert_allclose(img.get_qform(), AFFINE, atol=1e-5)
    np.testing.assert_allclose(img.get_sform(), AFFINE, atol=1e-5)
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def test_threaded_output_does_not_depend_on_the_thread_count(tmp_path, monkeypatch):
    vol = _volume(THREADED_GZIP_BYTES + (3 << 20))
    digests = set()
    for threads in (1, 2, 4):
        monkeypatch.setattr(volume_module, "_gzip_threads", lambda n=threads: n)
        path = save_nifti(vol, tmp_path / f"t{threads}.nii.gz")
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1


def test_forward_only_stream_refuses_a_real_seek():
    import io

    stream = volume_module._ForwardOnly(io.BytesIO())
    stream.write(b"abc")
    assert stream.seek(3) == 3 and stream.tell() == 3
    with pytest.raises(io.UnsupportedOperation, match="cannot seek to 0"):
        stream.seek(0)
