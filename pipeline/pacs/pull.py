"""A PACS SOURCE to a folder: search, retrieve into the spool, then the ordinary folder ingest rules.

`resolve_source` is what `ingest` and `predict` call first: a folder stays a folder; a PACS URL
is pulled into OUT/.spool/ (see pipeline.pacs.spool) and the folder of its complete series is
returned, so everything after it (planning, series assembly, reasons, quarantine) is the folder
code path unchanged. The pull's own accounting (series listed, incomplete ones with their
reason) is OUT/pull_report.json.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.pacs.common import Credentials
from pipeline.pacs.spool import PullReport, SeriesPull, SeriesStatus, Spool
from pipeline.pacs.url import is_pacs_url, parse_pacs_url, resolve_query

log = logging.getLogger(__name__)

PARALLEL_SERIES = 4  # series retrieved at once: enough to hide latency, gentle on a clinical PACS


def pull(
    source: str,
    out: str | Path,
    *,
    secret: bytes,
    credentials: Credentials | None = None,
    timezone: str | None = None,
    include_derived: bool = False,
    workers: int = PARALLEL_SERIES,
) -> PullReport:
    """Pull the series matching a PACS URL's query into OUT/.spool/; writes OUT/pull_report.json.

    `include_derived`: keep SEG/SR/PR... series (ingest wants SEGs as labels; predict does not).
    Raises PacsError when the search itself fails (PACS down, credentials refused) and ValueError
    for a bad URL or query; a series that cannot be fully retrieved is reported, not raised.
    """
    url = parse_pacs_url(source)
    out = Path(out).resolve()
    query = resolve_query(url.query, timezone=timezone)
    creds = credentials if credentials is not None else Credentials.from_env()
    spool = Spool(out, secret)
    t0 = time.perf_counter()
    if url.protocol == "dicomweb":
        from pipeline.pacs import dicomweb as protocol
    else:
        from pipeline.pacs import dimse as protocol  # type: ignore[no-redef]
    log.info("PACS search on %s (%s credentials)", url.describe(), creds.kind)
    refs = protocol.search_series(url, query, creds)
    search_s = time.perf_counter() - t0
    wanted = [r for r in refs if include_derived or r.modality.upper() not in protocol.DERIVED_MODALITIES]
    skipped = [
        SeriesPull(
            key=spool.series_key(r.study_uid, r.series_uid), modality=r.modality, status=SeriesStatus.SKIPPED
        )
        for r in refs
        if r not in wanted
    ]
    spool.ready_folder()
    with (
        protocol.receiving(),
        ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="pacs-pull") as pool,
    ):
        pulled = list(pool.map(lambda r: protocol.pull_series(url, r, spool, creds), wanted))
    report = PullReport(
        source=url.describe(),
        folder=str(spool.complete_root),
        series=pulled + skipped,
        study_date=query.get("StudyDate", ""),
        search_seconds=search_s,
        seconds=time.perf_counter() - t0,
    )
    report.write(out)
    counts = report.to_json()["counts"]
    log.info(
        "PACS pull: %d series found, %d complete, %d incomplete, %d skipped; %d instances fetched, "
        "%d reused, %.1f MB in %.1f s",
        counts["series_found"],
        counts["series_complete"],
        counts["series_incomplete"],
        counts["series_skipped"],
        counts["instances_fetched"],
        counts["instances_reused"],
        report.bytes / 1e6,
        report.seconds,
    )
    for record in report.quarantine():
        log.warning("series %s not complete: %s: %s", record["path"], record["reason"], record["message"])
    return report


def resolve_source(
    source: str | Path,
    out: str | Path,
    *,
    secret_file: str | Path | None = None,
    credentials: Credentials | None = None,
    timezone: str | None = None,
    include_derived: bool = False,
) -> tuple[Path, PullReport | None]:
    """(the folder to read, the pull report): a folder is returned as is; a PACS URL is pulled."""
    if not is_pacs_url(str(source)):
        return Path(source), None
    from pipeline.io.batchdir import resolve_secret

    secret = resolve_secret(secret_file)
    report = pull(
        str(source),
        out,
        secret=secret,
        credentials=credentials,
        timezone=timezone,
        include_derived=include_derived,
    )
    return Path(report.folder), report
