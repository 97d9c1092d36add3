"""DICOMweb through dicomweb-client: QIDO-RS search, WADO-RS retrieval into the spool, STOW-RS store.

Errors become PacsError with a reason code and a message naming the host, the HTTP status and
what to check; never the request URL (its query may hold an accession number) nor credentials.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence

import requests

from pipeline.errors import Reason
from pipeline.pacs.common import Credentials, PacsError
from pipeline.pacs.spool import SeriesPull, SeriesRef, SeriesStatus, Spool, incomplete
from pipeline.pacs.url import PacsUrl

log = logging.getLogger(__name__)

TIMEOUT_S = (10.0, 300.0)  # (connect, read): a PACS may take minutes to start a large series

# Tags (DICOM JSON keys) read from QIDO-RS answers.
_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"
_MODALITY, _N_INSTANCES = "00080060", "00201209"

# Ask for the stored transfer syntax ("*"): no transcoding on the PACS (slow, and lossy for some
# syntaxes); our readers decode JPEG, JPEG 2000 and RLE themselves.
AS_STORED = (("application/dicom", "*"),)

# Series that are not images to segment: left out of a predict pull (kept for ingest, where a
# SEG is the label of the series it references).
DERIVED_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "DOC", "REG", "OT"})


def make_session(credentials: Credentials | None) -> requests.Session:
    """A requests session with the credentials and TLS verification (on unless turned off)."""
    creds = credentials or Credentials()
    session = requests.Session()
    session.verify = creds.ca_bundle or creds.verify_tls
    if creds.token:
        session.headers["Authorization"] = f"Bearer {creds.token}"
    elif creds.username:
        session.auth = (creds.username, creds.password or "")
    return session


def make_client(url: PacsUrl, credentials: Credentials | None):
    from dicomweb_client.api import DICOMwebClient

    # dicomweb-client (INFO, DEBUG) and urllib3 (DEBUG) log request URLs, whose paths hold
    # study and series UIDs and whose queries may hold an accession number: keep them out.
    for name in ("dicomweb_client", "urllib3.connectionpool"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return DICOMwebClient(url.http_url, session=make_session(credentials), timeout=TIMEOUT_S)


def classify(exc: Exception, url: PacsUrl, *, push: bool = False) -> PacsError:
    """A requests/dicomweb-client exception as a PacsError (pull or push reasons)."""
    unreachable = Reason.PUSH_UNREACHABLE if push else Reason.PACS_UNREACHABLE
    refused = Reason.PUSH_REFUSED if push else Reason.PACS_REFUSED
    where = f"{url.host}:{url.port}"
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        if code in (401, 403):
            return PacsError(
                refused,
                f"{where} refused the credentials (HTTP {code}): check UNET_PACS_USERNAME/"
                f"UNET_PACS_PASSWORD or UNET_PACS_TOKEN (UNET_PUSH_* for a push destination)",
            )
        return PacsError(refused, f"{where} answered HTTP {code} {exc.response.reason or ''}".rstrip())
    if isinstance(exc, requests.exceptions.SSLError):
        return PacsError(
            unreachable,
            f"TLS verification of {where} failed: give the PACS's CA certificate with "
            f"UNET_PACS_CA_BUNDLE (or --ca-bundle)",
        )
    if isinstance(exc, requests.RequestException):
        return PacsError(unreachable, f"no answer from {where} ({type(exc).__name__}): is the PACS up?")
    return PacsError(refused, f"{where}: {type(exc).__name__} while talking DICOMweb")


def _value(item: dict, tag: str, default=None):
    values = item.get(tag, {}).get("Value")
    return values[0] if values else default


def search_series(url: PacsUrl, query: dict[str, str], credentials: Credentials | None) -> list[SeriesRef]:
    """QIDO-RS: every series matching `query` (all pages), in the PACS's order."""
    client = make_client(url, credentials)
    try:
        found = client.search_for_series(
            search_filters=dict(query),
            fields=["StudyInstanceUID", "Modality", "NumberOfSeriesRelatedInstances"],
            get_remaining=True,
        )
    except (requests.RequestException, ValueError) as exc:
        raise classify(exc, url) from None
    refs = []
    for item in found:
        n = _value(item, _N_INSTANCES)
        refs.append(
            SeriesRef(
                study_uid=str(_value(item, _STUDY_UID, "")),
                series_uid=str(_value(item, _SERIES_UID, "")),
                modality=str(_value(item, _MODALITY, "")),
                n_instances=int(n) if n is not None else None,
            )
        )
    return [r for r in refs if r.study_uid and r.series_uid]


@contextlib.contextmanager
def receiving() -> Iterator[None]:
    """Nothing to run for a DICOMweb pull (DIMSE runs its C-MOVE destination here)."""
    yield


def pull_series(url: PacsUrl, ref: SeriesRef, spool: Spool, credentials: Credentials | None) -> SeriesPull:
    """Retrieve one series into the spool with WADO-RS; resumable (see pipeline.pacs.spool).

    A series whose complete folder already holds as many instances as the PACS lists costs no
    retrieval. Otherwise the instances are listed (QIDO-RS), the intact ones kept, and the rest
    fetched: the whole series in one streamed multipart response when nothing is spooled yet,
    instance by instance otherwise (and after a stream broke off). A PACS that cannot list the
    instances (some answer 500 when a stored file is lost) is asked for the whole series and
    held to the count its series search gave. Never raises for the series: a PACS that stops
    answering or does not deliver every instance gives an incomplete series with the reason.
    """
    t0 = time.perf_counter()
    key = spool.series_key(ref.study_uid, ref.series_uid)
    result = SeriesPull(key=key, modality=ref.modality)
    if ref.n_instances and spool.complete_count(key) == ref.n_instances:
        result.status, result.listed, result.reused = SeriesStatus.COMPLETE, ref.n_instances, ref.n_instances
        return result
    client = make_client(url, credentials)
    folder = spool.open_partial(key)
    why = ""
    try:
        try:
            listed = client.search_for_instances(
                ref.study_uid, ref.series_uid, fields=["SOPInstanceUID"], get_remaining=True
            )
            sops: list[str] | None = sorted({str(_value(i, _SOP_UID)) for i in listed if _value(i, _SOP_UID)})
        except requests.HTTPError as exc:
            if exc.response is not None and exc.response.status_code in (401, 403):
                raise
            sops, why = None, f"it could not list them: {classify(exc, url).message}"
        if sops is None:  # whole series, counted against the series search
            result.listed = ref.n_instances or 0
            result.reused = sum(1 for _ in folder.glob("*.dcm"))
            _stream_series(client, ref, folder, spool, None, result)
            missing_n = result.listed - result.reused - result.fetched
        else:
            result.listed = len(sops)
            missing = {s for s in sops if not spool.intact(folder, s)}
            result.reused = len(sops) - len(missing)
            if missing and len(missing) == len(sops):
                _stream_series(client, ref, folder, spool, missing, result)
            for sop in sorted(missing):
                try:
                    dataset = client.retrieve_instance(
                        ref.study_uid, ref.series_uid, sop, media_types=AS_STORED
                    )
                except requests.HTTPError as exc:
                    why = f"{classify(exc, url).message} for an instance"
                    continue  # this instance is not delivered: counted below
                result.bytes += spool.write_instance(folder, dataset)
                result.fetched += 1
                missing.discard(sop)
            missing_n = len(missing)
    except (requests.RequestException, ValueError) as exc:
        err = classify(exc, url)
        result.reason = err.reason.value  # unreachable mid-pull, or credentials refused
        result.seconds = round(time.perf_counter() - t0, 3)
        return incomplete(result, result.listed - result.reused - result.fetched, err.message)
    result.seconds = round(time.perf_counter() - t0, 3)
    if missing_n > 0 or result.listed == 0:
        return incomplete(result, max(missing_n, 0), why or ("" if result.listed else "the PACS lists none"))
    spool.finish(key)
    result.status = SeriesStatus.COMPLETE
    return result


def _stream_series(
    client, ref: SeriesRef, folder, spool: Spool, missing: set[str] | None, result: SeriesPull
) -> None:
    """Fetch a whole series as one streamed multipart response, one instance in memory at a time.

    `missing`: the SOP Instance UIDs to keep (None: every instance not spooled yet). A stream
    that breaks off (or an error status) leaves the rest to the per-instance requests.
    """
    try:
        for dataset in client.iter_series(ref.study_uid, ref.series_uid, media_types=AS_STORED):
            sop = str(getattr(dataset, "SOPInstanceUID", ""))
            wanted = sop in missing if missing is not None else not spool.intact(folder, sop)
            if wanted:
                result.bytes += spool.write_instance(folder, dataset)
                result.fetched += 1
                if missing is not None:
                    missing.discard(sop)
    except (requests.RequestException, ValueError, EOFError) as exc:
        log.info(
            "series %s: streamed retrieval stopped (%s); fetching instance by instance",
            result.key,
            type(exc).__name__,
        )


def store(url: PacsUrl, datasets: Sequence, credentials: Credentials | None) -> list[str]:
    """STOW-RS: store the datasets; returns their SOP Instance UIDs. PacsError with a PUSH_* reason
    when the server is unreachable, refuses the request, or lists any instance as failed."""
    client = make_client(url, credentials)
    try:
        answer = client.store_instances(list(datasets))
    except (requests.RequestException, ValueError) as exc:
        raise classify(exc, url, push=True) from None
    failed = getattr(answer, "FailedSOPSequence", None) or []
    if failed:
        reasons = sorted({f"0x{int(getattr(item, 'FailureReason', 0)):04X}" for item in failed})
        raise PacsError(
            Reason.PUSH_REFUSED,
            f"{url.host}:{url.port} refused {len(failed)} of {len(datasets)} instances "
            f"(failure reasons {', '.join(reasons)})",
        )
    return [str(ds.SOPInstanceUID) for ds in datasets]
