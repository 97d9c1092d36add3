"""PACS URLs, relative dates in the site's time zone, and credentials from the environment."""

from __future__ import annotations

import datetime as dt

import pytest

from pipeline.pacs.common import Credentials
from pipeline.pacs.url import is_pacs_url, parse_pacs_url, resolve_query


@pytest.mark.parametrize(
    ("text", "protocol", "host", "port", "http_url", "aet"),
    [
        ("dicomweb+http://pacs:8042/dicom-web", "dicomweb", "pacs", 8042, "http://pacs:8042/dicom-web", ""),
        (
            "dicomweb+https://pacs.example/dicom-web/",
            "dicomweb",
            "pacs.example",
            443,
            "https://pacs.example:443/dicom-web",
            "",
        ),
        ("dimse://ORTHANC@10.0.0.5:4242", "dimse", "10.0.0.5", 4242, "", "ORTHANC"),
    ],
)
def test_parse(text, protocol, host, port, http_url, aet):
    url = parse_pacs_url(text)
    assert (url.protocol, url.host, url.port, url.http_url, url.aet) == (protocol, host, port, http_url, aet)
    assert is_pacs_url(text)


def test_query_keys_are_dicom_keywords_and_describe_hides_values():
    url = parse_pacs_url("dicomweb+http://pacs:8042/dicom-web?AccessionNumber=A123&Modality=CT")
    assert url.query == {"AccessionNumber": "A123", "Modality": "CT"}
    assert "A123" not in url.describe() and "AccessionNumber" in url.describe()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dicomweb+http://user:pw@pacs:8042/dicom-web", "credentials in a PACS URL are refused"),
        ("dicomweb+http://user@pacs:8042/dicom-web", "credentials in a PACS URL are refused"),
        ("dimse://AET:pw@pacs:104", "credentials in a PACS URL are refused"),
        ("dimse://pacs:104", "AE title"),
        ("dimse://ORTHANC@pacs", "AE title"),
        ("dicomweb+http://pacs/dicom-web?PatientsName=X", "not a DICOM attribute keyword"),
        ("dicomweb+http://pacs/dicom-web?Modality=CT&Modality=MR", "given twice"),
        ("http://pacs/dicom-web", "not a PACS URL"),
    ],
)
def test_bad_urls_are_refused_with_a_clear_message(text, message):
    with pytest.raises(ValueError, match=message):
        parse_pacs_url(text)


def test_folders_are_not_urls(tmp_path):
    assert not is_pacs_url(tmp_path)
    assert not is_pacs_url("incoming/dicomweb+http")


# 2026-03-01 23:30 UTC is already 2026-03-02 00:30 in Berlin: "yesterday" there is 03-01.
NOW = dt.datetime(2026, 3, 1, 23, 30, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("value", "tz", "expected"),
    [
        ("yesterday", "Europe/Berlin", "20260301"),
        ("yesterday", "UTC", "20260228"),
        ("today", "Europe/Berlin", "20260302"),
        ("-7d..today", "Europe/Berlin", "20260223-20260302"),
        ("-1d..yesterday", "America/New_York", "20260228-20260228"),
        ("20260101-20260131", "UTC", "20260101-20260131"),
        ("20260101-", "UTC", "20260101-"),
        ("-20260131", "UTC", "-20260131"),
        ("20260115", "UTC", "20260115"),
    ],
)
def test_relative_dates_resolve_in_the_site_time_zone(value, tz, expected):
    resolved = resolve_query({"StudyDate": value, "Modality": "CT"}, timezone=tz, now=NOW)
    assert resolved == {"StudyDate": expected, "Modality": "CT"}


def test_site_time_zone_from_the_environment(monkeypatch):
    monkeypatch.setenv("UNET_SITE_TIMEZONE", "Europe/Berlin")
    assert resolve_query({"StudyDate": "yesterday"}, now=NOW) == {"StudyDate": "20260301"}


@pytest.mark.parametrize("value", ["last week", "2026-01-01", "-7x", "2026010-"])
def test_bad_dates_are_refused(value):
    with pytest.raises(ValueError, match="StudyDate"):
        resolve_query({"StudyDate": value}, timezone="UTC", now=NOW)


def test_unknown_time_zone_is_refused():
    with pytest.raises(ValueError, match="IANA"):
        resolve_query({"StudyDate": "today"}, timezone="Mars/Olympus", now=NOW)


def test_credentials_from_environment_with_push_fallback_and_hidden_repr(monkeypatch):
    for n in ("USERNAME", "PASSWORD", "TOKEN", "CA_BUNDLE"):
        monkeypatch.delenv(f"UNET_PACS_{n}", raising=False)
        monkeypatch.delenv(f"UNET_PUSH_{n}", raising=False)
    monkeypatch.setenv("UNET_PACS_USERNAME", "reader")
    monkeypatch.setenv("UNET_PACS_PASSWORD", "s3cret")
    monkeypatch.setenv("UNET_PUSH_TOKEN", "tok3n")
    pull = Credentials.from_env()
    push = Credentials.from_env("UNET_PUSH", fallback="UNET_PACS")
    assert (pull.kind, push.kind) == ("basic", "bearer")
    assert "s3cret" not in repr(pull) and "tok3n" not in repr(push)
    monkeypatch.delenv("UNET_PACS_PASSWORD")
    with pytest.raises(ValueError, match="UNET_PACS_PASSWORD"):
        Credentials.from_env()
