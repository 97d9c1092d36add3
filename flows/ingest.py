"""ingest_flow: a source folder into a staging dataset, one task per case."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from flows.common import case_runner, check_task_runner, content_key, path_key
from flows.pull import is_pacs_url, pull_task
from flows.workers import CaseTimeout, run_isolated
from pipeline.errors import Reason
from pipeline.ingest import (
    CONVERTER_VERSION,
    ConversionQueue,
    IngestJobs,
    IngestLimits,
    convert_case,
    finalize_ingest,
    ingest_limits,
    prepare_ingest,
    record_case_failure,
)


@task(name="prepare-ingest", retries=2, retry_delay_seconds=[5, 30], tags=["io"], cache_policy=NO_CACHE)
def prepare_task(source: str, staging: str, secret_file: str | None, limits: IngestLimits) -> IngestJobs:
    """Header pass and validation (I/O: retried when a share hiccups)."""
    return prepare_ingest(source, staging, secret_file=secret_file, limits=limits)


def _convert_key(context, parameters) -> str:
    """Content key: the case's input bytes, the converter version, the staging folder."""
    jobs: IngestJobs = parameters["jobs"]
    staging = parameters["staging"]
    return content_key(
        "ingest",
        parameters["case_id"],
        jobs.input_hash(staging, parameters["case_id"]),
        CONVERTER_VERSION,
        path_key(staging),
    )


@task(
    name="convert-case",
    task_run_name="convert-{case_id}",
    retries=2,
    retry_delay_seconds=[5, 30],
    tags=["io"],
    cache_key_fn=_convert_key,
    persist_result=True,
    result_serializer="json",
)
def convert_task(
    source: str, staging: str, case_id: str, jobs: IngestJobs, secret_file: str | None, timeout_s: float
) -> dict:
    """Convert one case (a DICOM series or a NIfTI case); bad input is quarantined, not raised.

    Runs in a child process that is killed at `timeout_s`, so a decoder hung on a hostile file
    really stops; the case is then recorded failed (TIMEOUT) and the batch goes on.
    """
    try:
        return run_isolated(
            convert_case, source, staging, case_id, secret_file=secret_file, timeout_s=timeout_s
        )
    except CaseTimeout as exc:
        return record_case_failure(source, staging, case_id, Reason.TIMEOUT, str(exc))


@task(name="finalize-ingest", retries=2, retry_delay_seconds=[5, 30], tags=["io"], cache_policy=NO_CACHE)
def finalize_task(source: str, staging: str) -> dict:
    report = finalize_ingest(source, staging)
    return {**report.__dict__, "balanced": report.balanced}


@flow(name="ingest", log_prints=False, validate_parameters=True)
def ingest_flow(
    source: str,
    staging: str,
    secret_file: str | None = None,
    case_timeout_s: float = 1800.0,
    accept_partial_series: bool | None = None,
    credentials_block: str | None = None,
    config: str | None = None,
    task_runner: str = "threads",
) -> dict:
    """Validate and convert SOURCE into the STAGING dataset; quarantined inputs are listed, not fatal.

    config: a YAML configuration read as `unet-pipeline ingest --config` reads it (its `ingest`
    section: memory budget, allow_no_orientation; `data.accept_partial_series`).
    accept_partial_series: stage DICOM series that lost files, marked partial (see IngestLimits);
    None: as the config says.
    SOURCE may be a PACS URL (pulled into STAGING/.spool/ first; flows/pull.py).
    `task_runner`: "threads", "dask" (a local cluster) or a Dask scheduler's address
    (tcp://HOST:8786); Dask workers must see SOURCE and STAGING at the same paths.
    """
    logger = get_run_logger()
    check_task_runner(task_runner)
    overrides = {} if accept_partial_series is None else {"accept_partial_series": accept_partial_series}
    limits = ingest_limits(config, **overrides)
    if is_pacs_url(source):
        source = pull_task(source, staging, secret_file, None, credentials_block, include_derived=True)[
            "folder"
        ]
    jobs = prepare_task(source, staging, secret_file, limits)
    todo = set(jobs.todo)
    running, done = {}, {}
    with case_runner(task_runner, device="cpu") as runner:
        # Conversions start only while their planned memory fits the budget (and a slot is free).
        queue = ConversionQueue(staging, jobs.cases, limits, runner.slots, todo=todo)
        while queue.busy:
            for case_id in queue.ready():
                # Cases whose outputs are missing or stale always run; the others may come from cache.
                future = runner.submit(
                    convert_task.with_options(refresh_cache=case_id in todo),
                    source=source,
                    staging=staging,
                    case_id=case_id,
                    jobs=jobs,
                    secret_file=secret_file,
                    timeout_s=case_timeout_s,
                )
                running[future] = case_id
            finished = next(as_completed(list(running)))
            case_id = running.pop(finished)
            queue.finished(case_id)
            done[case_id] = finished.result()
    results = [done[case_id] for case_id in jobs.cases]
    report = finalize_task(source, staging)
    create_table_artifact(
        key="ingest-cases",
        table=[{"case": r["case_id"], "status": r["status"], "reason": r["reason"] or ""} for r in results],
        description="Cases of the last ingest (pseudonymous IDs).",
    )
    reasons = "\n".join(f"| {k} | {v} |" for k, v in report["by_reason"].items()) or "| none | 0 |"
    create_markdown_artifact(
        key="ingest-summary",
        markdown=(
            f"# Ingest\n\n{report['cases']} cases staged ({report['cases_converted']} converted, "
            f"{report['cases_skipped']} unchanged; {len(report['partial'])} partial, from series that "
            f"lost files).\n\nFiles: {report['discovered']} discovered = "
            f"{report['accepted']} accepted + {report['quarantined']} quarantined + {report['ignored']} "
            f"ignored.\n\n| reason | count |\n|---|---|\n{reasons}\n"
        ),
    )
    logger.info("ingest: %d cases staged, %d files quarantined", report["cases"], report["quarantined"])
    return report
