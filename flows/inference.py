"""batch_inference_flow: a registered model over a source folder, one task per case.

prepare (model check, case plan; retried: registry and share I/O) -> predict-case per case (GPU,
no retries: deterministic compute; a killed child process at the per-case timeout; cached on
input bytes, model weights, options and output folder) -> finalize (tables, report; retried)
-> track (one MLflow run for the batch; not retried: an outage leaves a note in
run_manifest.json and in the summary, never a failed flow).
The flow's final state is Failed when any case failed, with the summary as its data.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.states import Completed, Failed

from flows.common import case_runner, check_task_runner, content_key, path_key
from flows.pull import is_pacs_url, pull_task
from flows.workers import CaseTimeout, run_isolated
from pipeline.inference.batch import (
    BatchPlan,
    BatchSettings,
    finalize_batch,
    predict_case,
    prepare_batch,
    record_timeout,
)
from pipeline.io.batchdir import case_key
from pipeline.outputs.summary import batch_summary, summary_line, summary_markdown, table_rows
from pipeline.tracking.batch import TRACKING_EXPERIMENT, track_batch


@task(
    name="prepare-batch",
    retries=2,
    retry_delay_seconds=[5, 30],
    tags=["io", "tracking"],
    cache_policy=NO_CACHE,
)
def prepare_task(source: str, out: str, model_uri: str, settings: BatchSettings) -> BatchPlan:
    """Verify the model once, stage it under OUT/.batch/ and plan the cases (registry and share I/O)."""
    return prepare_batch(source, model_uri, out, settings)


def _case_key(context, parameters) -> str:
    """The case key of its done-marker (`pipeline.io.batchdir.case_key`: input bytes, model, every
    option that changes the outputs) and the output folder."""
    plan: BatchPlan = parameters["plan"]
    case_id = parameters["case_id"]
    key = case_key(plan.inputs_sha256[case_id], plan.settings)
    return content_key("predict", case_id, key, path_key(parameters["out"]))


def _predict_one(out: str, case_id: str, timeout_s: float) -> dict:
    """predict_case in a worker process, once its planned memory fits beside the cases running."""
    from pipeline.inference.footprint import planned_case_bytes

    need = planned_case_bytes(out, case_id)
    return run_isolated(predict_case, out, case_id, timeout_s=timeout_s, memory_bytes=need)


@task(
    name="predict-case",
    task_run_name="predict-{case_id}",
    tags=["gpu"],
    cache_key_fn=_case_key,
    persist_result=True,
    result_serializer="json",
)
def predict_case_task(out: str, case_id: str, plan: BatchPlan, timeout_s: float) -> dict:
    """One case to its done-marker in a child process killed at `timeout_s` (hung work stops).

    No retries: the same input and model fail the same way again.
    """
    try:
        return _predict_one(out, case_id, timeout_s)
    except CaseTimeout:  # recorded as TIMEOUT for finalize; a rerun redoes the case
        return record_timeout(out, case_id, timeout_s)


def _chunk_key(context, parameters) -> str:
    """The content keys of the chunk's cases, in order (a chunk is cached as a whole)."""
    keys = [
        _case_key(context, {"plan": parameters["plan"], "case_id": c, "out": parameters["out"]})
        for c in parameters["case_ids"]
    ]
    return content_key("predict-chunk", *keys)


@task(
    name="predict-chunk",
    task_run_name="predict-chunk-{chunk}",
    tags=["gpu"],
    cache_key_fn=_chunk_key,
    persist_result=True,
    result_serializer="json",
)
def predict_chunk_task(out: str, chunk: int, case_ids: list[str], plan: BatchPlan, timeout_s: float) -> list:
    """Several cases one after the other (large batches: fewer task runs), each as predict-case.

    A case's done-marker makes it "skipped" when the chunk runs again (a rerun after a worker
    was lost mid-chunk redoes only the cases without one).
    """
    return [predict_case_task.fn(out, case_id, plan, timeout_s) for case_id in case_ids]


# Up to this many cases, one task per case (per-case names, states and cache entries); above,
# cases are grouped so that a batch makes about this many predict tasks (bench/scale.py).
MAX_CASE_TASKS = 200


def chunk_size_for(cases: int, slots: int = 1) -> int:
    """Cases per predict task: 1 up to MAX_CASE_TASKS cases, then enough for about
    MAX_CASE_TASKS tasks, but never so many that fewer tasks than 4 x `slots` remain."""
    if cases <= MAX_CASE_TASKS:
        return 1
    return max(1, min(-(-cases // MAX_CASE_TASKS), cases // (4 * max(1, slots))))


@task(name="finalize-batch", retries=2, retry_delay_seconds=[5, 30], tags=["io"], cache_policy=NO_CACHE)
def finalize_task(out: str) -> dict:
    """results.csv, quarantine.jsonl, run_manifest.json and report.html; a summary without sources."""
    return batch_summary(finalize_batch(out))


@task(name="track-batch", retries=0, tags=["tracking"], cache_policy=NO_CACHE)
def track_task(out: str, experiment: str) -> dict:
    """One MLflow run for the finalized batch. Never retried and never raises for an outage:
    MLflow's HTTP client already retries each request; after that the failure is a note."""
    return track_batch(out, experiment=experiment).to_json()


def _track(out: str, experiment: str, logger) -> dict:
    """track_task's record; a broken task (not an outage: those are returned) is a note too."""
    state = track_task(out, experiment, return_state=True)
    if state.is_completed():
        tracked = state.result()
    else:  # the batch stands regardless
        from pipeline.tracking import redact

        error = redact(state.message or "the tracking task failed")
        tracked = {"status": "failed", "experiment": experiment, "error": error}
    if tracked["status"] != "logged":
        logger.warning("batch not recorded in MLflow: %s", tracked["error"])
    return tracked


PROGRESS_EVERY_S = 5.0

_PREDICT_REFRESH = predict_case_task.with_options(refresh_cache=True)
_CHUNK_REFRESH = predict_chunk_task.with_options(refresh_cache=True)


def _submit_cases(runner, out: str, plan: BatchPlan, size: int, timeout_s: float) -> tuple[list, dict]:
    """One predict task per case (size 1) or per `size` cases: (futures, cases per task run ID).

    A case without a valid done-marker always runs (refresh_cache); the others may come from
    the cache. A chunk with any such case runs again; its done cases are then "skipped".
    """
    ids, todo = plan.case_ids, set(plan.todo)
    futures, cases = [], {}
    if size == 1:
        for case_id in ids:
            task = _PREDICT_REFRESH if case_id in todo else predict_case_task
            futures.append(runner.submit(task, out=out, case_id=case_id, plan=plan, timeout_s=timeout_s))
            cases[futures[-1].task_run_id] = 1
        return futures, cases
    for chunk, start in enumerate(range(0, len(ids), size)):
        case_ids = ids[start : start + size]
        task = _CHUNK_REFRESH if todo.intersection(case_ids) else predict_chunk_task
        futures.append(
            runner.submit(task, out=out, chunk=chunk, case_ids=case_ids, plan=plan, timeout_s=timeout_s)
        )
        cases[futures[-1].task_run_id] = len(case_ids)
    return futures, cases


def _run_cases(runner, out: str, plan: BatchPlan, chunk_size: int | None, timeout_s: float, logger) -> None:
    """Every planned case through the runner, the progress artifact following the finished ones."""
    progress = create_progress_artifact(
        0.0, key="batch-inference-progress", description="Cases finished in the running batch."
    )
    size = chunk_size or chunk_size_for(len(plan.case_ids), runner.slots)
    futures, cases = _submit_cases(runner, out, plan, size, timeout_s)
    total, last, finished = max(1, len(plan.case_ids)), time.monotonic(), 0
    for future in as_completed(futures):
        finished += cases[future.task_run_id]
        # At most one API call per PROGRESS_EVERY_S (and the last): a batch of thousands of
        # small cases must not spend its time updating a progress bar.
        if finished == len(plan.case_ids) or time.monotonic() - last >= PROGRESS_EVERY_S:
            update_progress_artifact(progress, 100.0 * finished / total)
            last = time.monotonic()
    for future in futures:
        # wait() first: it keeps the run's final state in the future. Without it `state` is read
        # from the API, which can still hold the running state just after the task finished.
        future.wait()
        state = future.state
        if not state.is_completed():  # a worker error (not a bad case): finalize lists it as failed
            logger.error("%s ended %s", future.task_run_id, state.name)


def _publish(summary: dict, model: dict) -> None:
    """The cases table, the summary page and the report link as the flow run's artifacts."""
    rows, note = table_rows(summary["rows"])
    create_table_artifact(
        key="batch-inference-cases",
        table=rows,
        description=f"Cases of the last batch inference (pseudonymous IDs; volumes in mL){note}.",
    )
    create_markdown_artifact(key="batch-inference-summary", markdown=summary_markdown(summary, model))
    create_link_artifact(
        key="batch-inference-report",
        link=Path(summary["report"]).as_uri(),
        link_text="QC report",
        description="Self-contained HTML report: every case with status, volumes and QC picture.",
    )


@flow(name="batch-inference", log_prints=False, validate_parameters=True)
def batch_inference_flow(
    source: str,
    out: str,
    model_uri: str = "models:/unet-seg@champion",
    device: str = "auto",
    batch_size: int | None = None,
    case_timeout_s: float = 1800.0,
    secret_file: str | None = None,
    mlflow_experiment: str | None = TRACKING_EXPERIMENT,
    task_runner: str = "threads",
    chunk_size: int | None = None,
) -> dict:
    """Predict every case under SOURCE into OUT; the final state is Failed when any case failed.

    The batch is recorded as one run of the MLflow experiment `mlflow_experiment` (None: not
    recorded) on $MLFLOW_TRACKING_URI (default: the work directory's store).
    `task_runner`: "threads" (this machine), "dask" (a local Dask cluster) or a Dask scheduler's
    address, tcp://HOST:8786 (README: "Adding a second GPU server"). `chunk_size`: cases per
    predict task; None picks 1 for up to MAX_CASE_TASKS cases, larger chunks above.
    """
    logger = get_run_logger()
    check_task_runner(task_runner)  # a wrong value fails the run before any work
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1 (or None: chosen from the batch); got {chunk_size}")
    if is_pacs_url(source):  # pulled into OUT/.spool/ first (credentials from UNET_PACS_*)
        source = pull_task(source, out, secret_file, None, None)["folder"]
    settings = BatchSettings(device=device, batch_size=batch_size, secret_file=secret_file)
    plan = prepare_task(source, out, model_uri, settings)
    with case_runner(task_runner, device=device) as runner:
        _run_cases(runner, out, plan, chunk_size, case_timeout_s, logger)
    summary = finalize_task(out)
    summary["tracking"] = _track(out, mlflow_experiment, logger) if mlflow_experiment else None
    model = {"name": plan.model_name, "version": plan.model_version, "sha256": plan.model_sha256}
    _publish(summary, {**model, "run_id": plan.model_run_id})
    message = summary_line(summary, model)
    logger.info("batch inference: %s", message)
    return (Failed if summary["failed"] else Completed)(message=message, data=summary)
