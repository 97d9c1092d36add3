"""The PACS pull as a task, and PACS credentials for tasks (environment or a Prefect Secret block).

Shared by pacs_batch_flow, ingest_flow and batch_inference_flow: a SOURCE that is a PACS URL is
pulled into OUT/.spool/ first, and the flow goes on with the folder of complete series.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.pacs.common import PULL_PREFIX, PUSH_PREFIX, Credentials
from pipeline.pacs.pull import resolve_source
from pipeline.pacs.url import is_pacs_url

__all__ = ["credentials", "is_pacs_url", "pull_task"]


def credentials(block: str | None, *, push: bool) -> Credentials:
    """From the named Secret block, else the environment (push falls back to the pull variables)."""
    if not block:
        return Credentials.from_env(PUSH_PREFIX, fallback=PULL_PREFIX) if push else Credentials.from_env()
    from prefect.blocks.system import Secret

    value: Any = Secret.load(block).get()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(
                f"Secret block {block!r} is not JSON: store {{'username', 'password'}} or {{'token'}}"
            ) from None
    if not isinstance(value, dict):
        raise ValueError(f"Secret block {block!r} must hold a JSON object with username/password or token")
    return Credentials.from_mapping(value)


@task(name="pacs-pull", retries=2, retry_delay_seconds=[30, 120], tags=["io", "pacs"], cache_policy=NO_CACHE)
def pull_task(
    source: str,
    out: str,
    secret_file: str | None,
    site_timezone: str | None,
    credentials_block: str | None,
    include_derived: bool = False,
) -> dict:
    """Search and retrieve into OUT/.spool/; the pull report without identifiers (and the folder).

    `include_derived`: keep SEG/SR series too (ingest: SEGs are labels; predict: left out).
    """
    folder, report = resolve_source(
        source,
        out,
        secret_file=secret_file,
        credentials=credentials(credentials_block, push=False),
        timezone=site_timezone,
        include_derived=include_derived,
    )
    data = report.to_json() if report else {"folder": str(folder), "counts": {}, "seconds": 0.0}
    data.pop("series", None)  # per-series detail stays in OUT/pull_report.json
    return data
