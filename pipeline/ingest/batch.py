"""The ingest stage as a batch, in three steps that orchestrators may run as separate tasks:

    prepare_ingest (header pass, one call) -> convert_case (one per case, in any process)
    -> finalize_ingest (manifest, quarantine, report). `ingest` runs all three.

The steps hand each other what they decided through the staging folder's work folder
(`pipeline.io.batchdir`): STAGING/.batch/batch.json (discovered files, rejections, label table,
case IDs, the to-do list, the limits), cases/<case_id>.json (each case's input files), failed/
(quarantined cases) and locks/ (one conversion of a case at a time). Like the manifest, it links
case IDs to source paths, so it stays inside the staging folder and never travels as task
parameters.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pipeline.errors import InputRejected, Reason, Status
from pipeline.ingest.convert import RECORDS_DIR, convert_safely, previous_record
from pipeline.ingest.finder import CaseFinder, label_table, relative
from pipeline.ingest.jobs import CaseJob, forget_jobs, job_from_json, job_to_json, keep_job, kept_job
from pipeline.ingest.limits import IngestLimits
from pipeline.ingest.queue import ConversionQueue
from pipeline.ingest.report import IngestReport, account, write_outputs
from pipeline.io.batchdir import BatchDir, resolve_folders, resolve_secret
from pipeline.io.walk import discover
from pipeline.logs import logging_state, worker_logging
from pipeline.system import available_cores

log = logging.getLogger(__name__)

PREPARE = "prepare_ingest"  # the step that writes batch.json (named when it is missing)


@dataclass(frozen=True)
class IngestJobs:
    """What `prepare_ingest` decided: every case, and those whose inputs changed since their last
    outputs."""

    cases: list[str]
    todo: list[str]

    def input_hash(self, staging: str | Path, case_id: str) -> str:
        """sha256 over the case's input files' bytes (a content key for caches)."""
        return BatchDir(staging).read_case(case_id)["inputs_sha256"]


def _resolve(source: str | Path, staging: str | Path) -> tuple[Path, Path]:
    return resolve_folders(source, staging, stage="ingest", out_name="staging folder")


def _result(case_id: str, status: Status, reason: Reason | None = None, message: str | None = None) -> dict:
    """One case's outcome as the steps return it (nothing identifying: no path, no file name)."""
    return {"case_id": case_id, "status": status, "reason": reason, "message": message}


def _failure_record(err: InputRejected, status: Status) -> dict[str, Any]:
    return {"status": status.value, **err.to_record()}


def _rejection_from_record(rec: dict[str, Any]) -> InputRejected:
    rec = dict(rec)
    rec.pop("status", None)
    reason, path, message = Reason(rec.pop("reason")), rec.pop("path"), rec.pop("message")
    return InputRejected(reason, path, message, rec)


def prepare_ingest(
    source: str | Path,
    staging: str | Path,
    *,
    secret_file: str | Path | None = None,
    limits: IngestLimits | None = None,
    progress: bool = False,
    keep_jobs: bool = False,
) -> IngestJobs:
    """Step 1: discover and validate `source`, find its cases, and record them in STAGING/.batch/.

    Cases whose inputs are unchanged since an earlier run keep their outputs (not in `todo`).
    keep_jobs: keep the DICOM jobs found in this process for `convert_case` here or handed to
    a pool (`ingest` does), sparing a second header pass; orchestrators that convert elsewhere
    leave it off (the jobs would only hold memory).
    """
    source, staging = _resolve(source, staging)
    limits = limits or IngestLimits()
    secret = resolve_secret(secret_file)
    staging.mkdir(parents=True, exist_ok=True)
    batch = BatchDir(staging)
    with batch.prepare_lock():
        files = discover(source)
        finder = CaseFinder(source, secret, limits)
        finder.find(files, progress)
        table = label_table(staging, finder)
        batch.clear_failures()
        # Temporary files of a run that was killed mid-write. One ingest per staging folder at a
        # time: its conversions may run anywhere, but only after this step.
        batch.remove_temporaries()
        forget_jobs(staging)
        todo = []
        for job in finder.jobs:
            batch.write_case(job.case_id, job_to_json(job))
            if previous_record(staging, job.case_id, job.inputs_sha256) is None:
                todo.append(job.case_id)
                if keep_jobs:
                    keep_job(staging, job)
        decided = {
            "files": [relative(p, source) for p in files],
            "rejected": [{"reason": e.reason.value, **e.to_record()} for e in finder.rejected],
            "accepted": sorted(finder.accepted),
            "table": table,
            "cases": [job.case_id for job in finder.jobs],
            "todo": todo,
            "limits": asdict(limits),
        }
        batch.write_batch(decided)
    return IngestJobs(cases=decided["cases"], todo=todo)


def convert_case(
    source: str | Path,
    staging: str | Path,
    case_id: str,
    *,
    secret_file: str | Path | None = None,
    _job: CaseJob | None = None,
) -> dict[str, Any]:
    """Step 2: convert one case; returns {"case_id", "status", "reason", "message"}.

    status is Status.CONVERTED, QUARANTINED or UNCHANGED (its outputs from an earlier run stand,
    or a second call for the case found the first one's). Holds the case's lock, so two calls
    for one case never write its outputs at once. Never raises for bad input: a rejection is
    recorded for `finalize_ingest` and returned. (`_job`: the job itself, handed over by
    `ingest` to its worker processes.)
    """
    source, staging = _resolve(source, staging)
    batch = BatchDir(staging)
    decided = batch.read_batch(PREPARE)
    limits = IngestLimits(**decided["limits"])
    data = batch.read_case(case_id)
    if case_id not in decided["todo"]:
        return _result(case_id, Status.UNCHANGED)
    with batch.case_lock(case_id):
        if previous_record(staging, case_id, data["inputs_sha256"]) is not None:
            return _result(case_id, Status.UNCHANGED)  # converted meanwhile by a call before this one
        try:
            job = _job if _job is not None else kept_job(staging, case_id)
            if job is None or job.inputs_sha256 != data["inputs_sha256"]:
                job = job_from_json(data, source, resolve_secret(secret_file), limits)
        except InputRejected as err:
            err.details.setdefault("files", data["sources"])
            result: tuple[str, dict | None, InputRejected | None] = (case_id, None, err)
        else:
            result = convert_safely(job, source, staging, limits, decided["table"])
        _, _, err = result
        if err is not None:
            batch.record_failure(case_id, _failure_record(err, Status.QUARANTINED))
            log.warning("case %s quarantined: %s", case_id, err.reason.value)
            return _result(case_id, Status.QUARANTINED, err.reason)
        batch.record_failure(case_id, None)
        return _result(case_id, Status.CONVERTED)


def record_case_failure(
    source: str | Path, staging: str | Path, case_id: str, reason: Reason, message: str
) -> dict[str, Any]:
    """Record a case that failed outside `convert_case` (its worker was stopped at its time limit:
    Reason.TIMEOUT), so `finalize_ingest` lists its files with the reason; returns its result
    (Status.FAILED, `reason`, `message`: say what happened, name no file)."""
    source, staging = _resolve(source, staging)
    batch = BatchDir(staging)
    sources = batch.read_case(case_id)["sources"]
    err = InputRejected(reason, sources[0], message, {"files": sources})
    batch.record_failure(case_id, _failure_record(err, Status.FAILED))
    log.warning("case %s failed: %s", case_id, reason.value)
    return _result(case_id, Status.FAILED, reason, message)


def finalize_ingest(source: str | Path, staging: str | Path) -> IngestReport:
    """Step 3: write the manifest, quarantine list, report and dataset.json from the batch."""
    source, staging = _resolve(source, staging)
    batch = BatchDir(staging)
    decided = batch.read_batch(PREPARE)
    failed = {case_id: _rejection_from_record(rec) for case_id, rec in batch.failures().items()}
    records: dict[str, dict] = {}
    for case_id in decided["cases"]:
        path = staging / RECORDS_DIR / f"{case_id}.json"
        if case_id not in failed and path.is_file():
            record = json.loads(path.read_text(encoding="utf-8"))
            if record["sha256"]["inputs"] == batch.read_case(case_id)["inputs_sha256"]:
                records[case_id] = record
    rejected = [_rejection_from_record(r) for r in decided["rejected"]] + list(failed.values())
    report = account(decided["files"], decided["accepted"], records, rejected)
    report.cases_converted = len(set(decided["todo"]) & set(records))
    report.cases_skipped = len(records) - report.cases_converted
    report.partial = {
        case_id: {k: record["partial"][k] for k in ("n_missing_files", "missing_mm", "message")}
        for case_id, record in sorted(records.items())
        if record.get("partial")
    }
    write_outputs(staging, records, rejected, report, decided["table"])
    log.info(
        "ingest: %d cases (%d converted, %d unchanged), %d files quarantined, %d ignored",
        report.cases,
        report.cases_converted,
        report.cases_skipped,
        report.quarantined,
        report.ignored,
    )
    return report


def ingest(
    source: str | Path,
    staging: str | Path,
    *,
    secret_file: str | Path | None = None,
    workers: int | None = None,
    limits: IngestLimits | None = None,
    progress: bool = False,
) -> IngestReport:
    """Validate and convert everything under `source` into the staging folder `staging`.

    Bad inputs are quarantined with a reason and the batch goes on. Input files are only read.
    `workers` processes convert cases in parallel (default: the CPUs available, at most 8); with
    `limits.memory_budget` set, cases run together only while the sum of their planned peaks
    (`planned_peak_bytes` of each case's largest volume) fits the budget; a case larger than the
    budget runs alone.
    """
    limits = limits or IngestLimits()
    todo = prepare_ingest(
        source, staging, secret_file=secret_file, limits=limits, progress=progress, keep_jobs=True
    ).todo
    bar = tqdm(total=len(todo), desc="converting", unit="case", disable=not progress or not todo)
    queue = ConversionQueue(staging, todo, limits, workers or min(8, available_cores()))
    if queue.slots <= 1 or len(todo) <= 1:
        for case_id in todo:
            convert_case(source, staging, case_id, secret_file=secret_file)
            bar.update(1)
    else:
        staged = Path(staging).resolve()
        running: dict[Future, str] = {}
        # forkserver: safe when the caller has threads (Prefect, MLflow), cheaper than spawn.
        with ProcessPoolExecutor(
            max_workers=queue.slots,
            mp_context=get_context("forkserver"),
            initializer=worker_logging,  # the terminal's rules (a bad tag's pydicom warning stays off it)
            initargs=(logging_state(),),
        ) as pool:
            while queue.busy:
                for case_id in queue.ready():
                    future = pool.submit(
                        convert_case,
                        source,
                        staging,
                        case_id,
                        secret_file=secret_file,
                        _job=kept_job(staged, case_id),
                    )
                    running[future] = case_id
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    queue.finished(running.pop(future))
                    future.result()
                    bar.update(1)
    bar.close()
    return finalize_ingest(source, staging)
