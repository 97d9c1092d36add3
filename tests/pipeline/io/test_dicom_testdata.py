"""pydicom's shipped real files (data/test_files, dicomdirtests included): each file's outcome.

The whole folder is scanned as the orchestrator would scan a hospital folder; every file ends up
in an accepted series, a rejection with its reason, or ignored (NOT_DICOM, DICOMDIR).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from pipeline.errors import InputRejected
from pipeline.io.dicom import assemble_series, load_series, read_header

ROOT = Path(get_testdata_file("CT_small.dcm")).parent
SERIES = "SERIES"  # accepted into a volume

EXPECTED = {
    # one-slice CT/MR files: not volumes
    "693_J2KI.dcm": "TOO_FEW_SLICES",
    "CT_small.dcm": "TOO_FEW_SLICES",
    "J2K_pixelrep_mismatch.dcm": "TOO_FEW_SLICES",
    "examples_overlay.dcm": "TOO_FEW_SLICES",
    # the same MR instance (one SOPInstanceUID) in eight encodings: one copy is used (a lone
    # slice), the other seven are copies of it; the truncated copy is listed as truncated
    "MR_small.dcm": "TOO_FEW_SLICES",
    **{
        f"MR_small{s}.dcm": "DUPLICATE_INSTANCE"
        for s in (
            "_RLE",
            "_bigendian",
            "_expb",
            "_implicit",
            "_jp2klossless",
            "_jpeg_ls_lossless",
            "_padded",
        )
    },
    "MR_truncated.dcm": "TRUNCATED",
    # colour, secondary capture, ultrasound, RT, SR, waveform, CR: not volume images
    **{
        name: "UNSUPPORTED_SOP_CLASS"
        for name in (
            "ExplVR_BigEnd.dcm",
            "ExplVR_BigEndNoMeta.dcm",
            "ExplVR_LitEndNoMeta.dcm",
            "GDCMJ2K_TextGBR.dcm",
            "JPEG-lossy.dcm",
            "JPEG2000-embedded-sequence-delimiter.dcm",
            "JPEG2000.dcm",
            "JPEGLSNearLossless_08.dcm",
            "JPEGLSNearLossless_16.dcm",
            "JPGExtended.dcm",
            "SC_jpeg_no_color_transform.dcm",
            "SC_jpeg_no_color_transform_2.dcm",
            "SC_rgb_dcmtk_+eb+cr.dcm",
            "SC_rgb_dcmtk_+eb+cy+n1.dcm",
            "SC_rgb_dcmtk_+eb+cy+n2.dcm",
            "SC_rgb_dcmtk_+eb+cy+np.dcm",
            "SC_rgb_dcmtk_+eb+cy+s2.dcm",
            "SC_rgb_dcmtk_+eb+cy+s4.dcm",
            "SC_rgb_gdcm_KY.dcm",
            "SC_rgb_jls_lossy_line.dcm",
            "SC_rgb_jls_lossy_sample.dcm",
            "SC_rgb_jpeg.dcm",
            "SC_rgb_jpeg_app14_dcmd.dcm",
            "SC_rgb_jpeg_dcmd.dcm",
            "SC_rgb_jpeg_dcmtk.dcm",
            "SC_rgb_jpeg_gdcm.dcm",
            "SC_rgb_jpeg_lossy_gdcm.dcm",
            "SC_rgb_rle.dcm",
            "SC_rgb_rle_16bit.dcm",
            "SC_rgb_rle_16bit_2frame.dcm",
            "SC_rgb_rle_2frame.dcm",
            "SC_rgb_rle_32bit.dcm",
            "SC_rgb_rle_32bit_2frame.dcm",
            "SC_rgb_small_odd.dcm",
            "SC_rgb_small_odd_big_endian.dcm",
            "SC_rgb_small_odd_jpeg.dcm",
            "SC_ybr_full_422_uncompressed.dcm",
            "badVR.dcm",
            "empty_charset_LEI.dcm",
            "examples_jpeg2k.dcm",
            "examples_palette.dcm",
            "examples_rgb_color.dcm",
            "examples_ybr_color.dcm",
            "image_dfl.dcm",
            "meta_missing_tsyntax.dcm",
            "nested_priv_SQ.dcm",
            "no_meta_group_length.dcm",
            "reportsi.dcm",
            "reportsi_with_empty_number_tags.dcm",
            "rtdose.dcm",
            "rtdose_1frame.dcm",
            "rtdose_expb.dcm",
            "rtdose_expb_1frame.dcm",
            "rtdose_rle.dcm",
            "rtdose_rle_1frame.dcm",
            "rtplan.dcm",
            "rtplan_truncated.dcm",
            "rtstruct.dcm",
            "test-SR.dcm",
            "waveform_ecg.dcm",
            "dicomdirtests/77654033/CR1/6154",
            "dicomdirtests/77654033/CR2/6247",
            "dicomdirtests/77654033/CR3/6278",
        )
    },
    # DICOM SEG: a label, routed to pipeline.io.seg by the orchestrator; the big endian file is
    # another copy of the same SEG instance
    "liver_1frame.dcm": "UNSUPPORTED_SOP_CLASS",
    "liver_expb_1frame.dcm": "DUPLICATE_INSTANCE",
    # data sets without study/series UIDs
    "UN_sequence.dcm": "UNREADABLE",
    "priv_SQ.dcm": "UNREADABLE",
    # not DICOM at all (no_meta.dcm starts with a stray byte before its first element)
    **{
        name: "NOT_DICOM"
        for name in (
            "README.txt",
            "crayons.icc",
            "no_meta.dcm",
            "rtplan.dump",
            "rtstruct.dump",
            "test1.json",
            "test_PN.json",
            "zipMR.gz",
            "dicomdirtests/README.txt",
            "dicomdirtests/TINY_ALPHA/README",
        )
    },
    **{
        f"dicomdirtests/{name}": "DICOMDIR"
        for name in (
            "DICOMDIR",
            "DICOMDIR-bigEnd",
            "DICOMDIR-empty.dcm",
            "DICOMDIR-implicit",
            "DICOMDIR-nooffset",
            "DICOMDIR-nopatient",
            "DICOMDIR-reordered",
            "TINY_ALPHA/DICOMDIR",
        )
    },
    # a CT series: 2 slices 202.5 mm apart from the other 2
    **{f"dicomdirtests/77654033/CT2/{n}": "NON_UNIFORM_SPACING" for n in (17106, 17136, 17166, 17196)},
    **{f"dicomdirtests/98892001/CT2N/{n}": "LOCALIZER" for n in (6293, 6924)},
    **{f"dicomdirtests/98892001/CT5N/{n}": SERIES for n in (2062, 2392, 2693, 3023, 3353)},
    # MR localizer-like single slices in three planes, and rotated projection images: one slice each
    **{f"dicomdirtests/98892003/MR1/{n}": "TOO_FEW_SLICES" for n in (15820, 4919, 5641)},
    **{
        f"dicomdirtests/98892003/MR2/{n}": "TOO_FEW_SLICES"
        for n in (15970, 4950, 4981, 5011, 6273, 6605, 6935)
    },
    **{
        f"dicomdirtests/98892003/MR700/{n}": "TOO_FEW_SLICES"
        for n in (4467, 4528, 4558, 4588, 4618, 4648, 4678)
    },
    # a tiny file-set whose instances carry no image (no Rows, Columns or Pixel Data)
    **{
        p.relative_to(ROOT).as_posix(): "UNREADABLE"
        for p in (ROOT / "dicomdirtests/TINY_ALPHA/PT000000").rglob("IM*")
    },
}


@pytest.fixture(scope="module")
def outcomes() -> dict[str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom notes the oddities these files carry
        return _classify()


def _classify() -> dict[str, str]:
    found: dict[str, str] = {}
    headers = []
    for path in sorted(p for p in ROOT.rglob("*") if p.is_file()):
        try:
            headers.append(read_header(path, ROOT, 10_000_000))
        except InputRejected as exc:
            found[exc.path] = exc.reason.value
    groups, rejected = assemble_series(headers)
    for r in rejected:
        for rel in r.details.get("files") or [r.path]:
            found[rel] = r.reason.value
    for g in groups:
        for rel in g.files:
            found[rel] = SERIES
    return found


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom notes the oddities these files carry
def test_every_shipped_file_is_classified(outcomes):
    assert sorted(outcomes) == sorted(EXPECTED)


@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_shipped_file_outcome(outcomes, rel):
    assert outcomes[rel] == EXPECTED[rel]


def test_the_accepted_shipped_series_loads():
    headers = [
        read_header(p, ROOT, 10_000_000) for p in sorted((ROOT / "dicomdirtests/98892001/CT5N").iterdir())
    ]
    (group,), rejected = assemble_series(headers)
    assert rejected == []
    volume = load_series(group)
    assert volume.shape == (16, 16, 5) and volume.modality == "CT"
    assert np.isfinite(volume.affine).all() and volume.spacing[2] > 0
