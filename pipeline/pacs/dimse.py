"""DIMSE through pynetdicom: C-STORE SCU (push), and C-FIND + C-MOVE (a source for sites without
DICOMweb, the move destination being a storage SCP this process runs for the pull).

DIMSE carries no credentials: the peer admits us by our AE title (UNET_PACS_AET, default
UNET_PIPELINE) and host, so that title must be in the PACS's allow-list, and for C-MOVE the PACS
must know our title's host and port (the `move_port`, default DEFAULT_MOVE_PORT).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import ClassVar

from pipeline.errors import Reason
from pipeline.pacs.common import Credentials, PacsError, our_aet
from pipeline.pacs.spool import SeriesPull, SeriesRef, SeriesStatus, Spool, incomplete
from pipeline.pacs.url import PacsUrl

log = logging.getLogger(__name__)

# pynetdicom logs every association and, at DEBUG, whole datasets (patient names, UIDs).
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

TIMEOUT_S = 30.0  # association, DIMSE and network timeouts
ENV_MOVE_PORT = "UNET_PACS_MOVE_PORT"  # where our storage SCP listens during a C-MOVE pull
ENV_MOVE_BIND = "UNET_PACS_MOVE_BIND"  # its bind address (default: every interface)
DEFAULT_MOVE_PORT = 11113
DERIVED_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "DOC", "REG", "OT"})
_OK_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}  # success, and warnings that still store


def _ae(aet: str | None = None):
    from pynetdicom import AE

    ae = AE(ae_title=aet or our_aet())
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    ae.connection_timeout = TIMEOUT_S  # a loaded PACS host can take seconds to accept
    return ae


ASSOCIATE_ATTEMPTS = 3  # a refused connection or an abort is retried; a rejection is an answer
ASSOCIATE_BACKOFF_S = 1.0


def _associate(ae, url: PacsUrl, *, push: bool):
    for attempt in range(ASSOCIATE_ATTEMPTS):
        if attempt:
            time.sleep(ASSOCIATE_BACKOFF_S * attempt)
        assoc = ae.associate(url.host, url.port, ae_title=url.aet)
        if assoc.is_established or assoc.is_rejected:
            break
    if assoc.is_established:
        return assoc
    where = f"{url.aet}@{url.host}:{url.port}"
    if assoc.is_rejected:
        return PacsError(
            Reason.PUSH_REFUSED if push else Reason.PACS_REFUSED,
            f"{where} rejected the association: is our AE title {ae.ae_title!r} (UNET_PACS_AET) and "
            f"this host in its allow-list, and is {url.aet!r} its AE title?",
        )
    return PacsError(
        Reason.PUSH_UNREACHABLE if push else Reason.PACS_UNREACHABLE,
        f"no DICOM association with {where} (connection refused, aborted or timed out): is the PACS up?",
    )


def store(url: PacsUrl, datasets: Sequence, credentials: Credentials | None = None) -> list[str]:
    """C-STORE each dataset over one association; returns the SOP Instance UIDs stored.

    PacsError with PUSH_UNREACHABLE / PUSH_REFUSED when the association fails or a store is
    refused (`credentials` is unused: DIMSE admits by AE title).
    """
    del credentials
    ae = _ae()
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = _associate(ae, url, push=True)
    if isinstance(assoc, PacsError):
        raise assoc
    stored = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(getattr(status, "Status", -1)) if status else -1
            if code not in _OK_STATUSES:
                what = f"status 0x{code:04X}" if code >= 0 else "no answer"
                raise PacsError(
                    Reason.PUSH_REFUSED, f"{url.aet}@{url.host}:{url.port} refused the C-STORE ({what})"
                )
            stored.append(str(ds.SOPInstanceUID))
    finally:
        assoc.release()
    return stored


# ------------------------------------------------------------------------------------------
# C-FIND + C-MOVE source


def _find(url: PacsUrl, identifier, model) -> list:
    ae = _ae()
    ae.add_requested_context(model)
    assoc = _associate(ae, url, push=False)
    if isinstance(assoc, PacsError):
        raise assoc
    answers = []
    try:
        for status, ds in assoc.send_c_find(identifier, model):
            code = int(getattr(status, "Status", -1)) if status else -1
            if code in (0xFF00, 0xFF01) and ds is not None:
                answers.append(ds)
            elif code not in (0x0000, 0xFF00, 0xFF01):
                raise PacsError(
                    Reason.PACS_REFUSED, f"{url.aet}@{url.host}:{url.port} refused the C-FIND (0x{code:04X})"
                )
    finally:
        assoc.release()
    return answers


def search_series(url: PacsUrl, query: dict[str, str], credentials: Credentials | None = None) -> list:
    """C-FIND at SERIES level (study root) with the query's keys as matching keys."""
    from pydicom import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    del credentials
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "NumberOfSeriesRelatedInstances"):
        setattr(identifier, keyword, "")
    for keyword, value in query.items():
        setattr(identifier, keyword, value)
    refs = []
    for ds in _find(url, identifier, FIND):
        n = getattr(ds, "NumberOfSeriesRelatedInstances", None)
        refs.append(
            SeriesRef(
                study_uid=str(getattr(ds, "StudyInstanceUID", "")),
                series_uid=str(getattr(ds, "SeriesInstanceUID", "")),
                modality=str(getattr(ds, "Modality", "")),
                n_instances=int(n) if n not in (None, "") else None,
            )
        )
    return [r for r in refs if r.study_uid and r.series_uid]


def _list_instances(url: PacsUrl, ref) -> list[str]:
    from pydicom import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = ref.study_uid
    identifier.SeriesInstanceUID = ref.series_uid
    identifier.SOPInstanceUID = ""
    return sorted({str(ds.SOPInstanceUID) for ds in _find(url, identifier, FIND) if "SOPInstanceUID" in ds})


class _MoveReceiver:
    """A storage SCP for one pull: C-MOVE sub-operations land in the right series' partial folder."""

    _lock = threading.Lock()
    _server = None
    _folders: ClassVar[dict[str, tuple]] = {}  # series UID -> (spool, folder, SeriesPull)

    @classmethod
    def start(cls, port: int):
        from pynetdicom import AllStoragePresentationContexts, evt

        with cls._lock:
            if cls._server is None:
                ae = _ae()
                ae.supported_contexts = AllStoragePresentationContexts
                cls._server = ae.start_server(
                    (os.environ.get(ENV_MOVE_BIND, ""), port),
                    block=False,
                    evt_handlers=[(evt.EVT_C_STORE, cls._on_store)],
                )
        return cls._server

    @classmethod
    def stop(cls) -> None:
        with cls._lock:
            if cls._server is not None:
                cls._server.shutdown()
                cls._server = None

    @classmethod
    def _on_store(cls, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        target = cls._folders.get(str(getattr(ds, "SeriesInstanceUID", "")))
        if target is None:
            return 0xA801  # not a series this pull asked for: refused (move destination unknown)
        spool, folder, result = target
        result.bytes += spool.write_instance(folder, ds)
        result.fetched += 1
        return 0x0000


@contextlib.contextmanager
def receiving() -> Iterator[None]:
    """Run our storage SCP (the C-MOVE destination) for the duration of a pull."""
    _MoveReceiver.start(int(os.environ.get(ENV_MOVE_PORT, DEFAULT_MOVE_PORT)))
    try:
        yield
    finally:
        _MoveReceiver.stop()


def pull_series(url: PacsUrl, ref, spool: Spool, credentials: Credentials | None = None) -> SeriesPull:
    """C-MOVE one series to our storage SCP into the spool; resumable like the DICOMweb pull
    (only a series with missing instances is moved again: C-MOVE moves whole series)."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

    t0 = time.perf_counter()
    key = spool.series_key(ref.study_uid, ref.series_uid)
    result = SeriesPull(key=key, modality=ref.modality)
    if ref.n_instances and spool.complete_count(key) == ref.n_instances:
        result.status, result.listed, result.reused = SeriesStatus.COMPLETE, ref.n_instances, ref.n_instances
        return result
    try:
        sops = _list_instances(url, ref)
        result.listed = len(sops)
        folder = spool.open_partial(key)
        missing = {s for s in sops if not spool.intact(folder, s)}
        result.reused = len(sops) - len(missing)
        if missing:
            _MoveReceiver._folders[ref.series_uid] = (spool, folder, result)
            try:
                _move(url, ref, MOVE)
            finally:
                _MoveReceiver._folders.pop(ref.series_uid, None)
            missing = {s for s in missing if not spool.intact(folder, s)}
    except PacsError as err:
        result.reason = err.reason.value
        result.seconds = round(time.perf_counter() - t0, 3)
        return incomplete(result, result.listed - result.reused - result.fetched, err.message)
    result.seconds = round(time.perf_counter() - t0, 3)
    if missing or not sops:
        return incomplete(result, len(missing), "" if sops else "the PACS lists no instance")
    spool.finish(key)
    result.status = SeriesStatus.COMPLETE
    return result


def _move(url: PacsUrl, ref, model) -> None:
    from pydicom import Dataset

    ae = _ae()
    ae.add_requested_context(model)
    assoc = _associate(ae, url, push=False)
    if isinstance(assoc, PacsError):
        raise assoc
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = ref.study_uid
    identifier.SeriesInstanceUID = ref.series_uid
    try:
        for status, _ in assoc.send_c_move(identifier, our_aet(), model):
            code = int(getattr(status, "Status", -1)) if status else -1
            if code in (0xA801, 0xA701, 0xA702, 0xA900, 0xC000) or code < 0:
                raise PacsError(
                    Reason.PACS_REFUSED,
                    f"{url.aet}@{url.host}:{url.port} refused the C-MOVE (0x{code:04X}): does it know our "
                    f"AE title {our_aet()!r} with this host and port {ENV_MOVE_PORT}?",
                )
    finally:
        assoc.release()
