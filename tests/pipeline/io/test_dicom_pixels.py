"""Pixel values: every transfer syntax decodes to the same voxels; rescale, sign, MONOCHROME1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from pipeline.errors import InputRejected, Reason
from pipeline.io.dicom import assemble_series, decode_stored, load_series, read_header
from pipeline.synthetic.dicom import SeriesSpec, write_dicom_series
from tests.pipeline.io.dicom_helpers import MAX_PIXELS, retag, scan, stored_volume

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent


def load(root):
    (group,), rejected = scan(root)
    assert rejected == [], [str(r) for r in rejected]
    return load_series(group)


def resave(paths, transfer_syntax):
    """Re-encode written files as implicit VR LE or explicit VR big endian (the writer has neither)."""
    for path in paths:
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array  # decoded under the original (little endian) syntax
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        if transfer_syntax == ExplicitVRBigEndian:
            # dcmwrite writes the Pixel Data bytes as given: 16-bit words must be swapped here.
            ds.PixelData = stored.astype(stored.dtype.newbyteorder(">")).tobytes()
        pydicom.dcmwrite(
            path,
            ds,
            implicit_vr=transfer_syntax == ImplicitVRLittleEndian,
            little_endian=transfer_syntax != ExplicitVRBigEndian,
            force_encoding=True,
        )


SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGLSLossless,
    JPEG2000Lossless,
]


@pytest.mark.parametrize("signed", [True, False], ids=["int16", "uint16"])
@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda uid: uid.name)
def test_every_transfer_syntax_decodes_to_identical_voxels(root, syntax, signed):
    lo, hi = (-32768, 32767) if signed else (0, 65535)
    vol = stored_volume(4, lo=lo, hi=hi, seed=7)
    vol[0, 0, 0], vol[0, 0, 1] = lo, hi  # the extremes, present whatever the random draw
    direct = syntax in (
        ExplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        RLELossless,
        JPEGLSLossless,
        JPEG2000Lossless,
    )
    spec = SeriesSpec(signed=signed, transfer_syntax=syntax if direct else ExplicitVRLittleEndian)
    paths = write_dicom_series(vol, root, spec)
    if not direct:
        resave(paths, syntax)
    assert pydicom.dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    volume = load(root)
    np.testing.assert_array_equal(volume.data.transpose(2, 1, 0), vol)
    assert volume.data.dtype == (np.int16 if signed else np.int32)


MR_SMALL = [
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_padded.dcm",
]
# (file, reference, largest allowed difference): lossless syntaxes must be exact.
SHIPPED = [(name, "MR_small.dcm", 0) for name in MR_SMALL] + [
    ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", 0),  # JPEG lossless (process 14)
    ("SC_rgb_gdcm_KY.dcm", "SC_rgb_rle.dcm", 0),  # JPEG 2000
    ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", 6),  # JPEG baseline (lossy)
    ("SC_rgb_dcmtk_+eb+cr.dcm", "SC_rgb_rle.dcm", 2),  # JPEG baseline (lossy)
    ("SC_rgb_jls_lossy_line.dcm", "SC_rgb_rle.dcm", 2),  # JPEG-LS near-lossless
    ("SC_rgb_small_odd_big_endian.dcm", "SC_rgb_small_odd.dcm", 0),
    ("SC_rgb_small_odd_jpeg.dcm", "SC_rgb_small_odd.dcm", 4),
    ("rtdose_rle.dcm", "rtdose.dcm", 0),
    ("rtdose_expb.dcm", "rtdose.dcm", 0),
    ("liver_expb_1frame.dcm", "liver_1frame.dcm", 0),
]


@pytest.mark.filterwarnings("ignore:The pixel data is .* excess padding:UserWarning")  # MR_small_padded
@pytest.mark.parametrize("name, reference, tolerance", SHIPPED)
def test_pydicom_shipped_encodings_of_one_image_agree(name, reference, tolerance):
    ours = decode_stored(TEST_FILES / name, name).astype(np.int64)
    ref = decode_stored(TEST_FILES / reference, reference).astype(np.int64)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= tolerance


def test_rle_two_frames_decode_frame_by_frame():
    two = decode_stored(TEST_FILES / "SC_rgb_rle_2frame.dcm", "x")
    one = decode_stored(TEST_FILES / "SC_rgb_rle.dcm", "x")
    assert two.shape == (2, 100, 100, 3)
    np.testing.assert_array_equal(two[0], one[0])


def test_missing_decoder_names_the_syntax_and_package(root, monkeypatch):
    paths = write_dicom_series(stored_volume(3), root, SeriesSpec(transfer_syntax=JPEG2000Lossless))
    (group,), _ = assemble_series([read_header(p, root, MAX_PIXELS) for p in paths])
    decoder = pydicom.pixels.get_decoder(JPEG2000Lossless)
    monkeypatch.setattr(type(decoder), "is_available", property(lambda self: False))
    with pytest.raises(InputRejected) as info:
        load_series(group)
    r = info.value
    assert r.reason is Reason.MISSING_DECODER
    assert "JPEG 2000 Image Compression (Lossless Only)" in r.message and "pylibjpeg-openjpeg" in r.message
    assert r.details["package"] == "pylibjpeg-openjpeg"


def test_syntax_without_any_decoder(root):
    paths = write_dicom_series(stored_volume(3), root, SeriesSpec())
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
        ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
        ds.save_as(path)
    (group,), _ = assemble_series([read_header(p, root, MAX_PIXELS) for p in paths])
    with pytest.raises(InputRejected) as info:
        load_series(group)
    assert info.value.reason is Reason.MISSING_DECODER and "MPEG2" in info.value.message


@pytest.mark.parametrize("signed", [False, True])
def test_monochrome1_is_inverted(root, signed):
    lo, hi = (-2048, 2047) if signed else (0, 4095)
    vol = stored_volume(3, lo=lo, hi=hi)
    paths = write_dicom_series(vol, root, SeriesSpec(photometric="MONOCHROME1", signed=signed))
    retag(paths, BitsStored=12, HighBit=11)
    volume = load(root)
    expected = -1 - vol if signed else 4095 - vol
    np.testing.assert_array_equal(volume.data.transpose(2, 1, 0), expected)
    assert volume.meta["photometric"] == "MONOCHROME1 (inverted)"


def test_per_slice_integer_rescale(root):
    vol = stored_volume(4, lo=0, hi=3000)
    paths = write_dicom_series(vol, root, SeriesSpec(signed=False))
    slopes, intercepts = [1, 2, 1, 3], [-1024, 0, -2000, 5]
    for path, slope, intercept in zip(paths, slopes, intercepts, strict=True):
        retag([path], RescaleSlope=slope, RescaleIntercept=intercept)
    volume = load(root)
    expected = vol * np.array(slopes)[:, None, None] + np.array(intercepts)[:, None, None]
    assert volume.data.dtype == np.int16 and volume.meta["rescale"] == "integer"
    np.testing.assert_array_equal(volume.data.transpose(2, 1, 0), expected)


def test_fractional_rescale_gives_float32(root):
    vol = stored_volume(3, lo=0, hi=4000)
    paths = write_dicom_series(vol, root, SeriesSpec(signed=False))
    retag(paths[1:2], RescaleSlope=0.5, RescaleIntercept=-0.25)
    volume = load(root)
    assert volume.data.dtype == np.float32 and volume.meta["rescale"] == "fractional"
    expected = vol.astype(np.float64)
    expected[1] = expected[1] * 0.5 - 0.25
    np.testing.assert_array_equal(volume.data.transpose(2, 1, 0), expected.astype(np.float32))


@pytest.mark.parametrize(
    "signed, extremes, intercept, dtype",
    [
        (True, (-32768, 32767), 0, np.int16),
        (False, (0, 65535), 0, np.int32),
        (True, (-32768, 32767), -1024, np.int32),  # -33792 no longer fits int16
        (False, (0, 32767 + 1024), -1024, np.int16),
    ],
)
def test_signed_and_unsigned_extremes_are_exact(root, signed, extremes, intercept, dtype):
    vol = stored_volume(3, lo=extremes[0], hi=extremes[1])
    vol[1, 2, 3], vol[2, 3, 4] = extremes
    write_dicom_series(vol, root, SeriesSpec(signed=signed, rescale_intercept=intercept))
    volume = load(root)
    assert volume.data.dtype == dtype
    np.testing.assert_array_equal(volume.data.transpose(2, 1, 0), vol + intercept)
    assert volume.data.min() == extremes[0] + intercept and volume.data.max() == extremes[1] + intercept


def test_enhanced_multiframe_matches_the_single_frame_series(root, tmp_path):
    import highdicom

    vol = stored_volume(5, seed=5)
    paths = write_dicom_series(vol, tmp_path / "single", SeriesSpec(rescale_intercept=-1024))
    single = load(tmp_path / "single")
    legacy = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths],
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=2,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    legacy.save_as(root / "enhanced.dcm")
    (header,) = [read_header(root / "enhanced.dcm", root, MAX_PIXELS)]
    assert header.is_multiframe and len(header.frames) == 5
    (group,), rejected = assemble_series([header])
    assert rejected == [] and group.files == ["enhanced.dcm"]
    volume = load_series(group)
    np.testing.assert_array_equal(volume.data, single.data)
    np.testing.assert_allclose(volume.affine, single.affine, atol=1e-6)


def test_enhanced_multiframe_without_per_frame_geometry_is_rejected(root, tmp_path):
    import highdicom

    paths = write_dicom_series(stored_volume(4), tmp_path / "single", SeriesSpec())
    legacy = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths],
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=2,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    del legacy.PerFrameFunctionalGroupsSequence
    legacy.save_as(root / "enhanced.dcm")
    (r,) = scan(root)[1]
    assert r.reason is Reason.MISSING_GEOMETRY and r.path == "enhanced.dcm"
