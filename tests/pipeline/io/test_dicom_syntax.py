"""Data sets without preamble or file meta: the encoding is read from the bytes, never assumed.

Each series is checked against the values written and, where dcm2niix reads such files (little
endian), voxel for voxel and in world coordinates against dcm2niix.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pipeline.errors import InputRejected, Reason
from pipeline.io.dicom import decode_stored, load_series, read_header
from pipeline.io.dicom_syntax import effective_syntax, sniff_encoding
from pipeline.synthetic.dicom import SeriesSpec, write_bare_data_sets, write_dicom_series
from tests.pipeline.io.dicom_helpers import MAX_PIXELS, scan, stored_volume

DCM2NIIX = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")

ENCODINGS = {
    "implicit_le": (True, True, ImplicitVRLittleEndian),
    "explicit_le": (False, True, ExplicitVRLittleEndian),
    "explicit_be": (False, False, ExplicitVRBigEndian),
}
# (signed, bits stored): 12-bit signed values need pydicom's decoder (sign extension rules).
PIXELS = {"int16": (True, 16), "int12": (True, 12), "uint16": (False, 16), "uint12": (False, 12)}


def mask_high_bits(paths: list[Path], bits: int) -> None:
    """Store signed values as some scanners do: two's complement in `bits`, higher bits zero."""
    for path in paths:
        ds = pydicom.dcmread(path)
        raw = np.frombuffer(ds.PixelData, "<u2") & ((1 << bits) - 1)
        ds.PixelData = raw.astype("<u2").tobytes()
        ds.save_as(path)


def bare_series(
    root: Path, encoding: str, pixels: str, masked: bool = False, **spec
) -> tuple[np.ndarray, list[Path]]:
    implicit, little, _ = ENCODINGS[encoding]
    signed, bits = PIXELS[pixels]
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    vol = stored_volume(5, rows=33, cols=37, lo=lo, hi=hi, seed=5)
    vol[0, 0, :2] = lo, hi  # the extremes, whatever the draw
    paths = write_dicom_series(vol, root, SeriesSpec(signed=signed, bits_stored=bits, **spec))
    if masked:
        mask_high_bits(paths, bits)
    write_bare_data_sets(paths, implicit_vr=implicit, little_endian=little)
    return vol, paths


def dcm2niix(source: Path, out: Path) -> nib.Nifti1Image:
    out.mkdir()
    subprocess.run(
        [DCM2NIIX, "-z", "y", "-o", str(out), "-f", "%s_%d", str(source)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    (reference,) = out.glob("*.nii.gz")
    return nib.as_closest_canonical(nib.load(reference))


@pytest.mark.parametrize("pixels", list(PIXELS))
@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_bare_data_sets_decode_to_the_values_written(root, encoding, pixels):
    vol, paths = bare_series(root, encoding, pixels, rescale_intercept=-1024)
    head = paths[0].read_bytes()[:132]
    assert head[128:132] != b"DICM" and b"\x02\x00\x10\x00" not in head  # no preamble, no meta
    header = read_header(paths[0], root, MAX_PIXELS)
    assert header.transfer_syntax == ENCODINGS[encoding][2]
    assert not header.syntax_declared
    (group,), rejected = scan(root)
    assert rejected == []
    volume = load_series(group)
    np.testing.assert_array_equal(volume.data.transpose(2, 1, 0), vol - 1024)
    assert volume.meta["transfer_syntax_detected"] == len(paths)


@pytest.mark.parametrize("pixels", ["int16", "int12", "int12-masked"])
@pytest.mark.parametrize("encoding", ["implicit_le", "explicit_le"])
def test_bare_data_sets_match_dcm2niix(tmp_path, encoding, pixels):
    source = tmp_path / "source"
    kind, masked = pixels.removesuffix("-masked"), pixels.endswith("-masked")
    vol, _ = bare_series(source, encoding, kind, masked, pixel_spacing=(0.8, 0.6), slice_spacing=1.5)
    (group,), rejected = scan(source)
    assert rejected == []
    ours = nib.as_closest_canonical(load_series(group).to_nifti())
    reference = dcm2niix(source, tmp_path / "dcm2niix")
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours.affine, reference.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asanyarray(ours.dataobj), reference.get_fdata())
    # and both hold exactly the values written (as multisets: the canonical view reorders voxels)
    np.testing.assert_array_equal(np.sort(np.asanyarray(ours.dataobj), axis=None), np.sort(vol, axis=None))


def test_meta_without_transfer_syntax_is_read_from_the_data(root):
    vol = stored_volume(3, seed=2)
    paths = write_dicom_series(vol, root, SeriesSpec())
    for path in paths:  # a preamble and a file meta, but no (0002,0010)
        ds = pydicom.dcmread(path)
        del ds.file_meta.TransferSyntaxUID
        ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=False)
    header = read_header(paths[0], root, MAX_PIXELS)
    assert header.transfer_syntax == ExplicitVRLittleEndian and not header.syntax_declared
    (group,), _ = scan(root)
    np.testing.assert_array_equal(load_series(group).data.transpose(2, 1, 0), vol)


def test_decode_without_the_header_pass_detects_the_syntax(root):
    vol, paths = bare_series(root, "explicit_le", "int12")
    k = int(np.argmin([float(pydicom.dcmread(p, force=True).ImagePositionPatient[2]) for p in paths]))
    np.testing.assert_array_equal(decode_stored(paths[k], paths[k].name)[0], vol[0])


@pytest.mark.parametrize(
    "first, expected",
    [
        (b"\x08\x00\x05\x00CS\x0a\x00", (False, True)),  # (0008,0005) CS, little endian
        (b"\x08\x00\x05\x00\x0a\x00\x00\x00", (True, True)),  # implicit: a 32-bit length follows
        (b"\x00\x08\x00\x05CS\x00\x0a", (False, False)),  # group written high byte first
        (b"\x08\x00\x00\x00UL\x04\x00", (False, True)),  # a group length element first
        (b"\x08\x00\x00\x00\x04\x00\x00\x00", (True, True)),
        (b"\x10\x00\x10\x00PN\x08\x00", (False, True)),  # patient module first (no 0008 group)
        (b"\x08\x00", None),  # too short to tell
    ],
)
def test_sniff_encoding(first, expected):
    assert sniff_encoding(first) == expected


def test_declared_syntax_and_data_disagree_on_vr():
    # pydicom reads such files by the data; so does the pixel offset.
    assert effective_syntax(ExplicitVRLittleEndian, (True, True), "x") == ImplicitVRLittleEndian
    assert effective_syntax(ImplicitVRLittleEndian, (False, True), "x") == ExplicitVRLittleEndian
    assert effective_syntax("1.2.840.10008.1.2.4.90", (True, True), "x") == "1.2.840.10008.1.2.4.90"
    with pytest.raises(InputRejected) as info:
        effective_syntax(None, (True, False), "x")
    assert info.value.reason is Reason.UNREADABLE


@pytest.mark.filterwarnings("ignore:Expected explicit VR, but found implicit VR:UserWarning")
def test_meta_declaring_explicit_vr_over_implicit_data(root):
    vol = stored_volume(3, seed=4)
    paths = write_dicom_series(vol, root, SeriesSpec())
    for path in paths:  # the data set written implicit VR, the meta left saying explicit
        ds = pydicom.dcmread(path)
        ds.save_as(path, implicit_vr=True, little_endian=True, force_encoding=True)
        assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == (
            ExplicitVRLittleEndian
        )
    assert read_header(paths[0], root, MAX_PIXELS).transfer_syntax == ImplicitVRLittleEndian
    (group,), _ = scan(root)
    np.testing.assert_array_equal(load_series(group).data.transpose(2, 1, 0), vol)


@pytest.mark.parametrize("declared", [True, False], ids=["meta-with-syntax", "meta-without-syntax"])
def test_file_meta_without_preamble(root, declared):
    vol = stored_volume(3, seed=6)
    paths = write_dicom_series(vol, root, SeriesSpec())
    for path in paths:  # the 'DICM' preamble dropped, the meta group kept at byte 0
        ds = pydicom.dcmread(path)
        if declared:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            del ds.file_meta.TransferSyntaxUID
        ds.preamble = None
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
        assert path.read_bytes()[:2] == b"\x02\x00"
    header = read_header(paths[0], root, MAX_PIXELS)
    assert header.syntax_declared is declared
    (group,), _ = scan(root)
    np.testing.assert_array_equal(load_series(group).data.transpose(2, 1, 0), vol)
