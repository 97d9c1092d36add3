"""Association set-up against a real pynetdicom peer: a connection refused (the PACS restarting,
its accept queue full) is retried; a rejection is the peer's answer and is not."""

from __future__ import annotations

import threading

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from pipeline.errors import Reason
from pipeline.pacs import dimse
from pipeline.pacs.common import PacsError
from pipeline.pacs.url import parse_pacs_url
from tests.pipeline.pacs.orthanc import free_port


def _peer(port: int, *, allowed: list[str] | None = None):
    ae = AE(ae_title="PEER")
    ae.add_supported_context(Verification)
    if allowed is not None:
        ae.require_calling_aet = allowed
    opened: list[int] = []
    handlers = [(evt.EVT_CONN_OPEN, lambda event: opened.append(1))]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    return server, opened


def _client():
    ae = dimse._ae("UNET_PIPELINE")
    ae.add_requested_context(Verification)
    return ae


def test_a_refused_connection_is_retried_until_the_peer_is_up(monkeypatch):
    monkeypatch.setattr(dimse, "ASSOCIATE_BACKOFF_S", 0.5)
    port = free_port()
    url = parse_pacs_url(f"dimse://PEER@127.0.0.1:{port}")
    started = {}
    timer = threading.Timer(0.2, lambda: started.update(server=_peer(port)[0]))
    timer.start()
    try:
        assoc = dimse._associate(_client(), url, push=True)
        assert not isinstance(assoc, PacsError), assoc
        assoc.release()
    finally:
        timer.join()
        started["server"].shutdown()


def test_a_rejection_is_answered_at_once_and_a_dead_port_after_the_retries(monkeypatch):
    monkeypatch.setattr(dimse, "ASSOCIATE_BACKOFF_S", 0.05)
    port = free_port()
    server, opened = _peer(port, allowed=["SOMEONE_ELSE"])
    try:
        refused = dimse._associate(_client(), parse_pacs_url(f"dimse://PEER@127.0.0.1:{port}"), push=True)
    finally:
        server.shutdown()
    assert isinstance(refused, PacsError) and refused.reason == Reason.PUSH_REFUSED
    assert len(opened) == 1

    dead = dimse._associate(_client(), parse_pacs_url(f"dimse://PEER@127.0.0.1:{free_port()}"), push=False)
    assert isinstance(dead, PacsError) and dead.reason == Reason.PACS_UNREACHABLE
