"""The spool against Orthanc: an interrupted pull resumes, a query filters, derived series are skipped."""

from __future__ import annotations

import json
import os

from pipeline.pacs.pull import pull
from pipeline.pacs.spool import Spool
from tests.pipeline.pacs.conftest import demo_image_files

SECRET = b"k" * 32


def test_an_interrupted_pull_fetches_only_missing_or_broken_instances(
    pacs_setup, orthanc, pacs_env, tmp_path
):
    files = demo_image_files(pacs_setup)
    orthanc.upload(files)
    out = tmp_path / "out"
    first = pull(orthanc.dicomweb_url, out, secret=SECRET)
    assert first.count("complete") == len(pacs_setup.demo.cases)

    # Simulate a pull killed mid-series: the series back in partial/, three instances never
    # written, one cut short (not possible through the atomic writer, but a disk can lose it),
    # and a temporary file left by the killed writer.
    spool = Spool(out, SECRET)
    key = first.series[0].key
    os.replace(spool.complete_root / key, spool.partial_root / key)
    instances = sorted((spool.partial_root / key).glob("*.dcm"))
    for f in instances[:3]:
        f.unlink()
    instances[3].write_bytes(instances[3].read_bytes()[:200])
    (spool.partial_root / key / ".x.dcm.tmp.dcm").write_bytes(b"partial")

    second = pull(orthanc.dicomweb_url, out, secret=SECRET)

    redone = next(s for s in second.series if s.key == key)
    assert (redone.status, redone.fetched, redone.reused) == ("complete", 4, redone.listed - 4)
    assert sum(s.fetched for s in second.series) == 4  # the other series cost no retrieval
    assert sorted(p.name for p in (spool.complete_root / key).iterdir()) == sorted(p.name for p in instances)
    assert not (spool.partial_root / key).exists()
    assert len(list(spool.complete_root.rglob("*.dcm"))) == len(files)
    report = json.loads((out / "pull_report.json").read_text())
    assert report["counts"]["instances_fetched"] == 4


def test_query_filters_and_seg_series_are_skipped_when_predicting(pacs_setup, orthanc, pacs_env, tmp_path):
    demo = pacs_setup.demo
    orthanc.upload(demo_image_files(pacs_setup))
    orthanc.upload([demo.dicom_root / c.seg for c in demo.cases])  # the annotations too
    n_ct = sum(c.modality == "CT" for c in demo.cases)

    ct = pull(orthanc.dicomweb_url + "?Modality=CT", tmp_path / "ct", secret=SECRET)
    assert ct.count("complete") == n_ct and len(ct.series) == n_ct

    for_predict = pull(orthanc.dicomweb_url, tmp_path / "predict", secret=SECRET)
    assert for_predict.count("complete") == len(demo.cases)
    assert for_predict.count("skipped") == len(demo.cases)  # the SEGs
    assert {s.modality for s in for_predict.series if s.status == "skipped"} == {"SEG"}

    for_ingest = pull(orthanc.dicomweb_url, tmp_path / "ingest", secret=SECRET, include_derived=True)
    assert for_ingest.count("complete") == 2 * len(demo.cases)
