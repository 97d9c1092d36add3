"""DIMSE against Orthanc: Orthanc C-STOREs into the listener; C-FIND + C-MOVE pull out of Orthanc.

Orthanc only talks to the AE titles in its DicomModalities (ours, at our listener's port on
loopback), so each test starts its own Orthanc once it knows that port.
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from pipeline.errors import Reason
from pipeline.ingest import ingest
from pipeline.pacs.common import PacsError
from pipeline.pacs.listener import RECEIVING, STUDIES, StudyListener
from pipeline.pacs.pull import pull
from tests.pipeline.pacs.conftest import demo_image_files
from tests.pipeline.pacs.orthanc import ORTHANC_BIN, PASSWORD, SKIP_REASON, USER, free_port, start_orthanc

SECRET = b"s" * 32

pytestmark = pytest.mark.skipif(ORTHANC_BIN is None, reason=SKIP_REASON)


def _orthanc_with_us(tmp_path, request, our_port: int, aet: str = "UNET_PIPELINE"):
    server = start_orthanc(tmp_path / "orthanc", {"pipeline": [aet, "127.0.0.1", our_port]})
    request.addfinalizer(server.stop)
    return server


def _wait(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.2)


def test_listener_files_studies_sent_by_c_store_and_announces_each_once(pacs_setup, tmp_path, request):
    port = free_port()
    orthanc = _orthanc_with_us(tmp_path, request, port)
    orthanc.upload(demo_image_files(pacs_setup))
    done = []
    listener = StudyListener(
        tmp_path / "incoming",
        aet="UNET_PIPELINE",
        port=port,
        secret=SECRET,
        quiet_s=1.5,
        on_complete=done.append,
        allowed_aets=["ORTHANC"],
        bind="127.0.0.1",
    ).start()
    request.addfinalizer(listener.stop)

    for study in orthanc.get("/studies").json():  # Orthanc as the sending modality / PACS
        r = requests.post(
            f"{orthanc.base}/modalities/pipeline/store", json=[study], auth=(USER, PASSWORD), timeout=60
        )
        r.raise_for_status()
    n_studies = len({c.study_uid for c in pacs_setup.demo.cases})
    _wait(lambda: len(done) == n_studies)

    files = demo_image_files(pacs_setup)
    assert listener.received == len(files)
    assert sorted(p.name for p in done) == sorted(p.name for p in (tmp_path / "incoming" / STUDIES).iterdir())
    assert sum(len(list(p.glob("*.dcm"))) for p in done) == len(files)
    assert not any((tmp_path / "incoming" / RECEIVING).glob("study_*/*.dcm"))
    for case in pacs_setup.demo.cases:  # pseudonymous folders: no UID in any path
        assert not any(case.study_uid in str(p) for p in (tmp_path / "incoming").rglob("*"))
    # A complete study is an ordinary ingest source.
    report = ingest(done[0], tmp_path / "staging", secret_file=pacs_setup.secret, workers=1)
    assert report.cases >= 1 and report.quarantined == 0


def test_listener_refuses_a_calling_ae_title_not_allowed(pacs_setup, tmp_path, request):
    port = free_port()
    orthanc = _orthanc_with_us(tmp_path, request, port)
    orthanc.upload(demo_image_files(pacs_setup)[:1])
    listener = StudyListener(
        tmp_path / "incoming",
        aet="UNET_PIPELINE",
        port=port,
        secret=SECRET,
        quiet_s=1.0,
        allowed_aets=["SOMEONE_ELSE"],
        bind="127.0.0.1",
    ).start()
    request.addfinalizer(listener.stop)
    (study,) = orthanc.get("/studies").json()
    r = requests.post(
        f"{orthanc.base}/modalities/pipeline/store", json=[study], auth=(USER, PASSWORD), timeout=60
    )
    assert r.status_code >= 400  # Orthanc reports the refused association
    assert listener.received == 0


def test_c_find_c_move_source_pulls_into_the_spool_like_dicomweb(pacs_setup, tmp_path, request, monkeypatch):
    move_port = free_port()
    monkeypatch.setenv("UNET_PACS_MOVE_PORT", str(move_port))
    monkeypatch.setenv("UNET_PACS_MOVE_BIND", "127.0.0.1")
    monkeypatch.setenv("UNET_PACS_AET", "UNET_PIPELINE")
    orthanc = _orthanc_with_us(tmp_path, request, move_port)
    files = demo_image_files(pacs_setup)
    orthanc.upload(files)
    n_ct = sum(c.modality == "CT" for c in pacs_setup.demo.cases)

    report = pull(f"{orthanc.dimse_url}?Modality=CT", tmp_path / "out", secret=SECRET)

    assert report.count("complete") == n_ct and report.count("incomplete") == 0
    counts = json.loads((tmp_path / "out" / "pull_report.json").read_text())["counts"]
    n_ct_files = sum(len(c.dicom_files) for c in pacs_setup.demo.cases if c.modality == "CT")
    assert counts["instances_fetched"] == n_ct_files == counts["instances_listed"]
    again = pull(f"{orthanc.dimse_url}?Modality=CT", tmp_path / "out", secret=SECRET)
    assert sum(s.fetched for s in again.series) == 0  # complete series cost no move

    monkeypatch.setenv("UNET_PACS_AET", "STRANGER")  # not in Orthanc's allow-list
    with pytest.raises(PacsError) as refused:
        pull(f"{orthanc.dimse_url}?Modality=CT", tmp_path / "out2", secret=SECRET)
    assert refused.value.reason == Reason.PACS_REFUSED and "STRANGER" in refused.value.message
