"""PACS URLs (a SOURCE to pull from, a destination to push to) and their query's relative dates.

    dicomweb+http://HOST:PORT/PATH?KEY=VALUE&...    DICOMweb (QIDO-RS search, WADO-RS, STOW-RS)
    dicomweb+https://HOST:PORT/PATH?KEY=VALUE&...   the same over TLS (verified by default)
    dimse://AET@HOST:PORT?KEY=VALUE&...             DIMSE peer AE title (C-FIND/C-MOVE, C-STORE)

Query keys are DICOM attribute keywords (StudyDate, Modality, SeriesDescription,
AccessionNumber, StudyInstanceUID, ...) used as search filters. Date attributes (VR DA) accept,
besides DICOM dates and ranges (20260131, 20260101-20260131), relative dates resolved when the
run starts in the site's time zone: `today`, `yesterday`, `-7d`, and ranges `-7d..today`.
Credentials in a URL are refused: they would end up in logs, flow parameters and shell history.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DICOMWEB_SCHEMES = ("dicomweb+http", "dicomweb+https")
DIMSE_SCHEME = "dimse"
ENV_SITE_TIMEZONE = "UNET_SITE_TIMEZONE"  # IANA name (Europe/Berlin); default: the machine's zone

_RELATIVE = re.compile(r"^(today|yesterday|-(\d{1,4})d)$")
_DICOM_DATE = re.compile(r"^\d{8}$")


def is_pacs_url(text: str | os.PathLike) -> bool:
    """True when `text` is a PACS URL (and not a folder path)."""
    scheme = str(text).split("://", 1)[0].lower() if "://" in str(text) else ""
    return scheme in (*DICOMWEB_SCHEMES, DIMSE_SCHEME)


@dataclass(frozen=True)
class PacsUrl:
    """A parsed PACS URL. `describe()` is what logs, reports and artifacts may show."""

    protocol: str  # "dicomweb" or "dimse"
    host: str
    port: int
    http_url: str = ""  # dicomweb: http(s)://HOST:PORT/PATH (no query)
    aet: str = ""  # dimse: the peer's AE title
    query: dict[str, str] = field(default_factory=dict)  # DICOM keyword -> filter, unresolved

    def describe(self) -> str:
        """Protocol, host, port and path (AE title for DIMSE) and the query's keys, never its values:
        a query may hold an accession number or a patient ID."""
        where = (
            self.http_url if self.protocol == "dicomweb" else f"dimse://{self.aet}@{self.host}:{self.port}"
        )
        keys = f" (query keys: {', '.join(sorted(self.query))})" if self.query else ""
        return where + keys


def parse_pacs_url(text: str) -> PacsUrl:
    """Parse a PACS URL; ValueError with the accepted forms when it is not one or is unsafe."""
    text = str(text).strip()
    if not is_pacs_url(text):
        raise ValueError(
            f"not a PACS URL: expected dicomweb+http://HOST:PORT/PATH?..., dicomweb+https://... or "
            f"dimse://AET@HOST:PORT?..., got scheme {text.split('://', 1)[0]!r}"
        )
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if parts.password is not None or (scheme != DIMSE_SCHEME and parts.username is not None):
        raise ValueError(
            "credentials in a PACS URL are refused (they would end up in logs and flow parameters): "
            "remove the 'user:password@' part and set UNET_PACS_USERNAME and UNET_PACS_PASSWORD (or "
            "UNET_PACS_TOKEN), or name a Prefect Secret block in the flow"
        )
    host = parts.hostname
    if not host:
        raise ValueError(f"PACS URL without a host: expected {scheme}://HOST:PORT...")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"PACS URL port is not a number between 0 and 65535 ({host})") from exc
    query = _parse_query(parts.query)
    if scheme == DIMSE_SCHEME:
        aet = parts.username or ""
        if not 0 < len(aet) <= 16 or port is None:
            raise ValueError(
                f"a DIMSE URL needs the peer's AE title (1-16 characters) and port: dimse://AET@{host}:PORT"
            )
        if parts.path not in ("", "/"):
            raise ValueError(f"a DIMSE URL has no path: dimse://{aet}@{host}:{port}?KEY=VALUE")
        return PacsUrl("dimse", host, port, aet=aet, query=query)
    http = "https" if scheme == "dicomweb+https" else "http"
    port = port or (443 if http == "https" else 80)
    netloc = f"[{host}]" if ":" in host else host
    path = parts.path.rstrip("/")
    return PacsUrl("dicomweb", host, port, http_url=f"{http}://{netloc}:{port}{path}", query=query)


def _parse_query(query: str) -> dict[str, str]:
    from pydicom.datadict import tag_for_keyword

    pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False)
    out: dict[str, str] = {}
    for key, value in pairs:
        if tag_for_keyword(key) is None:
            raise ValueError(
                f"PACS query key {key!r} is not a DICOM attribute keyword; use keywords such as "
                f"StudyDate, Modality, SeriesDescription, AccessionNumber, StudyInstanceUID"
            )
        if key in out:
            raise ValueError(f"PACS query key {key!r} is given twice; give a range or one value")
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------
# Relative dates


def site_timezone(name: str | None = None) -> dt.tzinfo:
    """The site's time zone: `name`, else $UNET_SITE_TIMEZONE, else the machine's local zone."""
    name = name or os.environ.get(ENV_SITE_TIMEZONE)
    if not name:
        return dt.datetime.now().astimezone().tzinfo or dt.UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}: give an IANA name such as Europe/Berlin") from exc


def _date_vr(keyword: str) -> bool:
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword)
    return tag is not None and dictionary_VR(tag) == "DA"


def _one_date(token: str, today: dt.date, key: str) -> str:
    if token == "" or _DICOM_DATE.match(token):
        return token
    m = _RELATIVE.match(token)
    if not m:
        raise ValueError(
            f"PACS query {key}={token!r}: expected YYYYMMDD, today, yesterday or -Nd (N days ago)"
        )
    if m.group(1) == "today":
        return today.strftime("%Y%m%d")
    days = 1 if m.group(1) == "yesterday" else int(m.group(2))
    return (today - dt.timedelta(days=days)).strftime("%Y%m%d")


def resolve_query(
    query: dict[str, str], *, timezone: str | None = None, now: dt.datetime | None = None
) -> dict[str, str]:
    """The query with relative dates in date attributes resolved to DICOM dates or ranges.

    `A..B` (either side relative or absolute) becomes the DICOM range `A-B`; `now` (default: the
    current time) is taken in the site's time zone, so "yesterday" at 00:30 in Berlin is the
    Berlin yesterday whatever the server's clock zone.
    """
    tz = site_timezone(timezone)
    current = (now or dt.datetime.now(dt.UTC)).astimezone(tz)
    today = current.date()
    out = {}
    for key, value in query.items():
        if not _date_vr(key):
            out[key] = value
            continue
        v = value.strip()
        if ".." in v:
            lo, hi = v.split("..", 1)
            out[key] = f"{_one_date(lo, today, key)}-{_one_date(hi, today, key)}"
        elif "-" in v and not _RELATIVE.match(v):  # a DICOM range, open at either end
            lo, _, hi = v.partition("-")
            if not all(x == "" or _DICOM_DATE.match(x) for x in (lo, hi)):
                raise ValueError(f"PACS query {key}={v!r}: a DICOM range is YYYYMMDD-YYYYMMDD")
            out[key] = v
        else:
            out[key] = _one_date(v, today, key)
    return out
