"""Batch inference: a registered model to label masks in each source's own geometry.

    predict(SOURCE, MODEL, OUT) writes, per case (OUT/<case_id>/, pseudonymous folder names):
        seg.nii.gz   uint8 labels, the source image's exact shape and affine (qform == sform)
        seg.dcm      a DICOM SEG referencing the source instances (DICOM inputs only)
        qc.png       three planes through the labels and an axial montage, contours over the slice
        done.json    the done-marker, written last: the case key, each output's sha256, the result
    and, for the batch: results.csv, quarantine.jsonl, run_manifest.json and report.html.

The batch runs in three steps that orchestrators may run as separate tasks:
    prepare_batch (model check, case plan; one call) -> predict_case (`worker`: one per case, in
    any process or machine that sees OUT) -> finalize_batch (tables, manifest, report), and
    optionally `pipeline.tracking.batch.track_batch` (the batch as one MLflow run).
`predict` runs the first three in one process. What the steps hand each other lives in OUT/.batch/,
the work folder of the batch protocol ingest shares (`pipeline.io.batchdir`), with the verified
model staged beside batch.json (`model.stage_model`), so workers never need the registry.

The model is loaded and verified (sha256, no pickle) once, before any case runs (`model`). The
cases are found by the ingest rules (`cases`) and predicted by `predictor`. A background thread
loads and preprocesses the next case while the model computes, when the planned peaks fit the
memory budget (`memory`); on a CPU several cases compute at once, each in its own model stream
with its share of the cores (`streams`); writer threads (`writers`) write the finished cases'
outputs and done-markers while the model works on the next ones, their planned bytes counted in
the same budget, each case's lock held until its done-marker stands.

Reliability: every output is written atomically and the done-marker last, so a crash leaves a
case without a marker and the rerun redoes it; a case whose case key changed (input bytes,
model, any option that changes its outputs: `records.case_key`) or whose outputs are missing or
no longer match the marker's sha256 is redone; one bad case is quarantined (bad input) or failed
with the reason code of the step that failed (READ_FAILED, PREDICTION_FAILED,
OUTPUT_WRITE_FAILED, SEG_WRITE_FAILED, QC_WRITE_FAILED, RECORD_WRITE_FAILED) and a one-line
message, and the batch goes on. Exit codes: see `PredictSummary.exit_code`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline.config import PipelineConfig, Workdir
from pipeline.errors import IGNORED_REASONS, Reason, Status
from pipeline.inference.cases import (
    PredictCase,
    case_from_json,
    case_size,
    case_to_json,
    common_folder,
    plan_cases,
)
from pipeline.inference.memory import (
    Pending,
    Writing,
    default_budget,
    planned_case_bytes,
    planned_write_bytes,
    prefetch,
)
from pipeline.inference.model import (
    MODEL_DIR,
    ModelHandle,
    ModelLoadError,
    load_model,
    read_model_record,
    remember_model,
    stage_model,
)
from pipeline.inference.predictor import PredictOptions
from pipeline.inference.records import OUTPUT_VERSION, clear_case, clip_line, done_marker, output_settings
from pipeline.inference.results import CaseResult, PredictSummary
from pipeline.inference.streams import ModelStreams, stream_layout
from pipeline.inference.worker import load, open_batch, predict_loaded, run_case, write_case
from pipeline.inference.writers import Writers
from pipeline.ingest import IngestLimits, forget_jobs, keep_job
from pipeline.io.batchdir import BatchDir, case_key, load_or_create_secret, resolve_folders
from pipeline.io.model_dir import code_version
from pipeline.outputs import report, tables

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchSettings:
    """How a batch runs and what it writes: the one value `predict`, `prepare_batch`, the CLI and
    the flow pass around (the flow builds it from its plain parameters)."""

    device: str = "auto"  # runtime.resolve_device: "auto", "cpu", "cuda", "cuda:1", ...
    batch_size: int | None = None  # slices per forward pass; None: the model's training config
    # True: largest component and hole filling on; False: both off; None: the training config
    postprocess_masks: bool | None = None
    secret_file: str | Path | None = None  # the site secret behind case IDs; None: the work dir's
    limits: IngestLimits = field(default_factory=IngestLimits)  # inputs refused before reading
    write_seg: bool = True  # a DICOM SEG beside each mask of a DICOM source
    write_qc: bool = True  # a QC picture per case
    # Bytes the cases in memory at once may take (`predict` only; never part of a case key).
    # None: limits.memory_budget, else half the memory available (`memory.default_budget`).
    memory_budget: int | None = None
    # Threads writing finished cases' outputs while the model works on the next (`predict` only;
    # never part of a case key). 0: each case written in the loop, before the next is predicted.
    writers: int = 2
    # Cases predicted at once, each in its own thread with its share of the intra-op threads
    # (`predict` only; never part of a case key). None: one per core up to 4 on a CPU, one on a GPU.
    model_streams: int | None = None


@dataclass(frozen=True)
class BatchPlan:
    """What `prepare_batch` decided; case IDs and hashes only (nothing identifying)."""

    case_ids: list[str]
    todo: list[str]  # cases without a valid done-marker
    inputs_sha256: dict[str, str]  # case ID -> sha256 over its input files' bytes
    model_sha256: str
    model_name: str
    model_version: str
    settings: dict[str, Any]  # records.output_settings: all but the input a case depends on
    options_sha256: str  # sha256 of `settings`
    model_run_id: str | None = None
    rejected: int = 0  # inputs quarantined while planning (no case ID)
    case_bytes: dict[str, int] = field(default_factory=dict)  # case ID -> planned peak memory

    def case_key(self, case_id: str) -> str:
        """The case key (`records.case_key`) of one planned case."""
        return case_key(self.inputs_sha256[case_id], self.settings)


def prepare_batch(
    source: str | Path,
    model: str | Path | ModelHandle,
    out: str | Path,
    settings: BatchSettings | None = None,
    *,
    progress: bool = False,
    keep_jobs: bool = False,
) -> BatchPlan:
    """Step 1: verify the model (ModelLoadError before anything is written), plan the cases and
    record the plan in OUT/.batch/; see `predict` for the arguments.

    Cases with a valid done-marker from an earlier run (same input, model and options) are not
    in `todo`. keep_jobs: keep the DICOM cases' series (their headers, read here) in this process
    for workers in it (`worker.OpenBatch.job_for`), sparing them a second header pass; `predict`
    does, orchestrators whose workers run elsewhere leave it off (the jobs would only hold memory).
    """
    settings = settings or BatchSettings()
    started = datetime.now(UTC)
    source, out = resolve_folders(source, out, stage="predict", files=True)
    work = BatchDir(out)
    device = settings.device
    with ExitStack() as held:
        with tempfile.TemporaryDirectory(prefix="unet-model-") as tmp:
            handle = model if isinstance(model, ModelHandle) else load_model(model, device, dst=tmp)
            if isinstance(model, ModelHandle):  # already on its device: workers use the same kind
                device = next(model.loaded.model.parameters()).device.type
            work.work.mkdir(parents=True, exist_ok=True)
            # Held until batch.json is written: a second prepare of this OUT waits, then finds
            # the model staged and writes the same plan again.
            held.enter_context(work.prepare_lock())
            stage_model(handle, work.work / MODEL_DIR)
        return _write_plan(
            handle, source, out, settings, started=started, device=device, progress=progress, keep=keep_jobs
        )


def _write_plan(
    handle: ModelHandle,
    source: Path,
    out: Path,
    settings: BatchSettings,
    *,
    started: datetime,
    device: str,
    progress: bool,
    keep: bool,
) -> BatchPlan:
    """prepare_batch once the model is staged (under the plan lock): plan the cases, write the plan."""
    work = BatchDir(out)
    model_dir = work.work / MODEL_DIR
    staged_sha = read_model_record(model_dir)["weights_sha256"]
    if staged_sha != handle.sha256:
        raise ModelLoadError(f"the model staged at {model_dir} has sha256 {staged_sha}, not {handle.sha256}")
    remember_model(handle, device)
    try:
        infer = PipelineConfig.from_dict(handle.loaded.config or {}).infer
    except ValueError:  # a config from another code version: its infer section is advisory only
        log.warning("the model's training config does not validate here; using default infer options")
        infer = PipelineConfig().infer
    options = PredictOptions.from_config(
        infer, batch_size=settings.batch_size, postprocess=settings.postprocess_masks
    )
    limits = settings.limits
    secret_path = Path(settings.secret_file) if settings.secret_file else Workdir.resolve().secret_file
    secret = load_or_create_secret(secret_path)
    if source.is_file():  # one NIfTI file: plan its folder, keep that file
        root = source.parent
        cases, rejected = plan_cases(root, secret, limits, progress)
        cases = [c for c in cases if c.source == source.name]
        rejected = [e for e in rejected if e.path == source.name]
        source = root
    else:
        cases, rejected = plan_cases(source, secret, limits, progress)

    quarantine: list[dict[str, Any]] = []
    rejected_results: list[dict[str, Any]] = []
    ignored = 0
    for err in rejected:
        files = err.details.get("files") or [err.path]
        if err.reason in IGNORED_REASONS:
            ignored += 1
            quarantine.append({"status": Status.IGNORED, **err.to_record()})
            continue
        quarantine.append({"status": Status.QUARANTINED, **err.to_record()})
        where = common_folder(files) if len(files) > 1 else err.path
        rejected_results.append(
            CaseResult(
                "", where, Status.QUARANTINED, err.reason.value, message=clip_line(err.message)
            ).to_json()
        )

    keyed = batch_output_settings(
        handle, options, write_seg=settings.write_seg, write_qc=settings.write_qc, limits=limits
    )
    work.clear_failures()
    forget_jobs(out)
    todo = []
    case_bytes = {}
    target = float(handle.loaded.plan.get("target_spacing") or 1.0)
    for case in cases:
        case_bytes[case.case_id] = planned_case_bytes(*case_size(case, source), target_spacing=target)
        work.write_case(case.case_id, {**case_to_json(case), "planned_bytes": case_bytes[case.case_id]})
        if done_marker(out, case.case_id, case.inputs_sha256, keyed) is None:
            todo.append(case.case_id)
            if keep and case.job is not None:
                keep_job(out, case.job)
    batch = {
        "source": str(source),
        "secret_file": str(secret_path.resolve()),
        "device": device,
        "model": {
            "uri": handle.uri,
            "name": handle.name,
            "version": handle.version,
            "sha256": handle.sha256,
            "run_id": handle.run_id,
            "code_version": handle.loaded.metadata.get("code_version"),
            "label_names": {str(k): v for k, v in handle.label_names.items()},
            "val_dice": handle.loaded.metadata.get("validation", {}).get("val_dice_mean"),
        },
        "model_dir": str(model_dir),
        "options": dataclasses.asdict(options),
        "write_seg": settings.write_seg,
        "write_qc": settings.write_qc,
        "limits": dataclasses.asdict(limits),
        "output_version": OUTPUT_VERSION,
        "settings": keyed,
        "options_sha256": hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest(),
        "case_bytes": case_bytes,
        "cases": [c.case_id for c in cases],
        "todo": todo,
        "quarantine": quarantine,
        "rejected_results": rejected_results,
        "ignored": ignored,
        "started": started.isoformat(timespec="seconds"),
    }
    work.write_batch(batch, indent=1)
    log.info("predict: %d cases, %d already done, %d to run", len(cases), len(cases) - len(todo), len(todo))
    return BatchPlan(
        case_ids=batch["cases"],
        todo=todo,
        inputs_sha256={c.case_id: c.inputs_sha256 for c in cases},
        model_sha256=handle.sha256,
        model_name=handle.name,
        model_version=handle.version,
        settings=keyed,
        options_sha256=batch["options_sha256"],
        model_run_id=handle.run_id,
        rejected=len(rejected_results),
        case_bytes=case_bytes,
    )


def batch_output_settings(
    handle: ModelHandle, options: PredictOptions, *, write_seg: bool, write_qc: bool, limits: IngestLimits
) -> dict[str, Any]:
    """`records.output_settings` of a batch: the model's identity, plan and label names,
    the mask options, which outputs are written and the input limits."""
    plan_json = json.dumps(handle.loaded.plan, sort_keys=True, default=str)
    plan_sha = hashlib.sha256(plan_json.encode()).hexdigest()
    model = {
        "name": handle.name,
        "version": handle.version,
        "sha256": handle.sha256,
        "plan_sha256": plan_sha,
        "label_names": {str(k): v for k, v in sorted(handle.label_names.items())},
    }
    # The memory budget only decides how many cases run at once, never what a case writes.
    refusals = {k: v for k, v in dataclasses.asdict(limits).items() if k != "memory_budget"}
    return output_settings(
        model=model,
        mask_options=options.mask_key(),
        write_seg=write_seg,
        write_qc=write_qc,
        limits=refusals,
    )


def _case_summary(result: CaseResult, status: str | None = None) -> dict[str, Any]:
    return {
        "case_id": result.case_id,
        "status": status or result.status,
        "reason": result.reason,
        "message": result.message,
        "seconds": result.seconds,
        "volumes": dict(result.volumes_ml),
    }


def predict_case(out: str | Path, case_id: str) -> dict[str, Any]:
    """Step 2: run one planned case to its done-marker; returns its summary (nothing identifying).

    {"case_id", "status": ok | quarantined | failed | skipped, "reason", "message", "seconds",
    "volumes"}.
    "skipped": a valid done-marker already stood (an earlier run, or the same case submitted
    twice: the per-case lock makes the second call wait and then find the first one's marker).
    Never raises for a bad case; raises ModelLoadError or FileNotFoundError when the batch
    itself cannot run (no plan, a changed model).
    """
    out = Path(out).resolve()
    batch = open_batch(out)
    case = batch.case(case_id)
    with batch.work.case_lock(case_id):
        marker = done_marker(out, case_id, case.inputs_sha256, batch.settings)
        if marker is not None:
            return _case_summary(CaseResult(**marker["result"]), Status.SKIPPED)
        return _case_summary(run_case(case, Pending.run(lambda: load(batch, case)), batch))


def record_timeout(out: str | Path, case_id: str, timeout_s: float) -> dict[str, Any]:
    """A case whose worker was killed at its time limit: its partial outputs removed and a
    failure record with Reason.TIMEOUT, so results.csv and the report say TIMEOUT (not
    NO_RESULT). Returns its summary, as `predict_case` would have; "skipped" when another
    worker finished the case meanwhile (its done-marker stands)."""
    out = Path(out).resolve()
    work = BatchDir(out)
    case = case_from_json(work.read_case(case_id))
    message = f"ran past its time limit of {timeout_s:.0f} s; its worker process was stopped"
    with work.case_lock(case_id):
        marker = done_marker(out, case_id, case.inputs_sha256, work.read_batch("prepare_batch")["settings"])
        if marker is not None:
            return _case_summary(CaseResult(**marker["result"]), Status.SKIPPED)
        with contextlib.suppress(OSError):  # a file where the case folder goes: nothing to clear
            clear_case(out / case_id)
        record = {"case_id": case_id, "path": case.source, "reason": Reason.TIMEOUT.value, "message": message}
        work.record_failure(case_id, {"status": Status.FAILED, **record})
    result = CaseResult(
        case_id, case.source, Status.FAILED, Reason.TIMEOUT.value, seconds=timeout_s, message=message
    )
    return _case_summary(result)


def label_list_of(meta: dict[str, Any]) -> list[str]:
    """The model's label names without background, in label order (the tables' columns)."""
    names = {int(k): v for k, v in meta["model"]["label_names"].items()}
    return [names[v] for v in sorted(names) if v != 0]


def collect_results(
    out: Path, meta: dict[str, Any]
) -> tuple[list[PredictCase], list[CaseResult], list[dict[str, Any]]]:
    """(planned cases, every result row, quarantine records) from the plan and the done-markers."""
    work = BatchDir(out)
    todo = set(meta["todo"])
    quarantine: list[dict[str, Any]] = list(meta["quarantine"])
    results: list[CaseResult] = []
    cases: list[PredictCase] = []
    for case_id in meta["cases"]:
        case = case_from_json(work.read_case(case_id))
        cases.append(case)
        marker = done_marker(out, case_id, case.inputs_sha256, meta["settings"])
        if marker is not None:
            results.append(CaseResult(**{**marker["result"], "skipped": case_id not in todo}))
            continue
        record = work.failure(case_id)
        if record is None:
            record = {
                "status": Status.FAILED,
                "case_id": case_id,
                "path": case.source,
                "reason": Reason.NO_RESULT.value,
                "message": "no result: the case timed out, its worker died, or it was not run",
            }
        quarantine.append(record)
        results.append(
            CaseResult(
                case_id, case.source, record["status"], record["reason"], message=clip_line(record["message"])
            )
        )
    results += [CaseResult(**r) for r in meta["rejected_results"]]
    return cases, results, quarantine


def finalize_batch(out: str | Path) -> PredictSummary:
    """Step 3: results.csv, quarantine.jsonl, run_manifest.json and report.html from the plan and
    the cases' done-markers. A planned case with neither a marker nor a failure record (its
    worker was killed or timed out, or it never ran) is listed as failed."""
    out = Path(out).resolve()
    meta = BatchDir(out).read_batch("prepare_batch")
    m = meta["model"]
    cases, results, quarantine = collect_results(out, meta)
    summary = PredictSummary(out=out, results=results, ignored=meta["ignored"])
    label_list = label_list_of(meta)
    tables.write_results_csv(out / "results.csv", results, label_list, m["name"], m["version"], case_root=out)
    tables.write_jsonl(out / "quarantine.jsonl", quarantine)
    model_dir = Path(meta["model_dir"])
    read = {n: json.loads((model_dir / f"{n}.json").read_text(encoding="utf-8")) for n in ("plan", "config")}
    manifest = {
        "model": dict(m),
        "code_version": code_version(),
        "plan": read["plan"],
        "config": read["config"],
        "options": meta["options"] | {"device": meta["device"]},
        "inputs": {c.case_id: {"source": c.source, "inputs_sha256": c.inputs_sha256} for c in cases},
        "counts": summary.counts(),
        "exit_code": summary.exit_code,
        "started": meta["started"],
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    tables.write_json(out / "run_manifest.json", manifest)
    report.write_report_html(out / "report.html", results, label_list, manifest, out)
    log.info(
        "predict: %d ok (%d skipped), %d quarantined, %d failed",
        summary.count(Status.OK),
        summary.skipped,
        summary.count(Status.QUARANTINED),
        summary.count(Status.FAILED),
    )
    return summary


def predict(
    source: str | Path,
    model: str | Path | ModelHandle,
    out: str | Path,
    settings: BatchSettings | None = None,
    *,
    progress: bool = False,
    on_case_done: Callable[[CaseResult], None] | None = None,
) -> PredictSummary:
    """Predict every case under `source` with `model` into `out`; see the module docstring and
    `BatchSettings` for the settings.

    Raises ModelLoadError (before any case runs), FileNotFoundError or ValueError for bad arguments;
    never for a bad case. The three steps in one process, pipelined: the next case loads in the
    background while the planned peaks fit `settings.memory_budget`, `settings.model_streams`
    cases compute at once (`streams`), and the outputs of finished cases are written by
    `settings.writers` threads (`writers`) while the model works on the next; each case's lock
    is held from its prediction until its done-marker stands.
    `on_case_done` (and the progress bar) fire once a case is fully done, in this thread.
    """
    settings = settings or BatchSettings()
    plan = prepare_batch(source, model, out, settings, progress=progress, keep_jobs=True)
    out = Path(out).resolve()
    try:
        if plan.todo:
            _predict_todo(out, plan, settings, progress, on_case_done)
    finally:
        forget_jobs(out)  # those of cases not run (an interrupt)
    return finalize_batch(out)


def _predict_todo(
    out: Path,
    plan: BatchPlan,
    settings: BatchSettings,
    progress: bool,
    on_case_done: Callable[[CaseResult], None] | None,
) -> None:
    """predict's step 2: the cases to do, pipelined (see `predict`).

    This thread loads (`prefetch`, which waits for room in the memory budget) and hands each
    case to a free model stream (`streams`). A stream predicts the case and hands it to the
    writers itself, so the bytes the budget counts are released without this thread: it may
    wait for room in the budget without stopping the work that makes room. A case's planned peak
    is held in `writing` from its hand-over to a stream until its prediction is handed on."""
    batch = open_batch(out)
    todo = [batch.case(case_id) for case_id in plan.todo]
    budget = settings.memory_budget if settings.memory_budget is not None else batch.limits.memory_budget
    if budget is None:
        budget = default_budget()
    caller_threads = torch.get_num_threads()
    threads = stream_layout(settings.model_streams, batch.device, caller_threads)
    log.debug("predict: %d model stream(s) of %s intra-op thread(s)", len(threads), threads)
    bar = tqdm(total=len(todo), desc="predicting", unit="case", disable=not progress)

    def done(result: CaseResult) -> None:  # a case fully done: outputs and marker, or its record
        if on_case_done is not None:
            on_case_done(result)
        bar.update(1)

    cost = lambda c: plan.case_bytes.get(c.case_id, 0)  # noqa: E731
    writing = Writing()
    write = lambda p: write_case(batch, p)  # noqa: E731

    def compute(case: PredictCase, pending: Pending, lock: ExitStack) -> CaseResult | None:
        """In a stream: predict the case and hand it to a writer (None), or write it here when
        there are no writer threads; a failed case's result is returned, its lock released."""
        try:
            if settings.writers < 1:  # serially, in this stream
                result = run_case(case, pending, batch)
            else:
                result = predict_loaded(case, pending, batch)
            del pending
            if isinstance(result, CaseResult):
                lock.close()
                return result
            writers.submit(result, lock, planned_write_bytes(cost(case)))
            return None
        except BaseException:  # not handed on: nothing else releases the case
            lock.close()
            raise
        finally:
            writing.release(cost(case))

    def not_taken(case: PredictCase, lock: ExitStack) -> None:
        """An interrupt while handing `case` over, before a stream took it: released here."""
        writing.release(cost(case))
        lock.close()

    def report() -> None:
        writers.poll()
        for result in model.results():
            if result is not None:
                done(result)

    with (
        Writers(write, workers=max(1, settings.writers), writing=writing, on_done=done) as writers,
        ModelStreams(threads, on_idle=report) as model,
    ):
        # The loader preprocesses with the caller's thread count, whatever the streams set.
        set_threads = lambda: torch.set_num_threads(caller_threads)  # noqa: E731
        cases = prefetch(
            todo, lambda c: load(batch, c), cost=cost, budget=budget, writing=writing, on_start=set_threads
        )
        for case, pending in cases:
            lock = ExitStack()  # held across predict and write; a stream or writer closes it
            lock.enter_context(batch.work.case_lock(case.case_id))
            writing.hold(cost(case))
            model.submit(compute, case, pending, lock, on_withdraw=partial(not_taken, case, lock))
            del pending
            report()
        model.drain()
        report()
    bar.close()
