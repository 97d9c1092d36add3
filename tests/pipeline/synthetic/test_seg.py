import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGLSLossless

from pipeline.synthetic.dicom import SeriesSpec, write_dicom_series
from pipeline.synthetic.phantom import make_phantom
from pipeline.synthetic.seg import write_seg

NAMES = {1: "organ", 2: "lesion"}


@pytest.fixture
def series(tmp_path):
    image, label = make_phantom((9, 33, 37), (3.0, 1.2, 1.2), seed=4, modality="CT")
    spec = SeriesSpec(transfer_syntax=JPEGLSLossless, seed=4)
    paths = write_dicom_series(np.round(image).astype(np.int16), tmp_path / "series", spec)
    return label, paths


def test_seg_reads_back_as_the_label_per_source_instance(series, tmp_path):
    label, paths = series
    out = write_seg(label, paths, tmp_path / "ann" / "case.seg.dcm", NAMES, seed=1)
    seg = hd.seg.segread(out)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    uids = [s.SOPInstanceUID for s in sources]
    array = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    assert np.array_equal(array, label)
    assert seg.SegmentationType == "BINARY"
    assert [(d.SegmentNumber, d.SegmentLabel, d.SegmentAlgorithmType) for d in seg.SegmentSequence] == [
        (1, "organ", "MANUAL"),
        (2, "lesion", "MANUAL"),
    ]
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Lesion"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert seg.PatientName == sources[0].PatientName
    assert not list(out.parent.glob(".*tmp*"))  # the atomic write left no temporary file


def test_seg_is_byte_identical_for_a_seed(series, tmp_path):
    label, paths = series
    a = write_seg(label, paths, tmp_path / "a.dcm", NAMES, seed=1).read_bytes()
    b = write_seg(label, paths, tmp_path / "b.dcm", NAMES, seed=1).read_bytes()
    c = write_seg(label, paths, tmp_path / "c.dcm", NAMES, seed=2).read_bytes()
    assert a == b
    assert a != c


def test_seg_refuses_unnamed_labels(series, tmp_path):
    label, paths = series
    with pytest.raises(ValueError, match=r"must name every label 1\.\.2"):
        write_seg(label, paths, tmp_path / "x.dcm", {1: "organ"}, seed=0)
    with pytest.raises(ValueError, match="no segment codes for label names"):
        write_seg(label, paths, tmp_path / "x.dcm", {1: "organ", 2: "kidney-ish"}, seed=0)
    with pytest.raises(ValueError, match="8 source files given for 9 label slices"):
        write_seg(label, paths[:-1], tmp_path / "x.dcm", NAMES, seed=0)
