"""What a worker does: open a planned batch, run one case step by step to its done-marker.

A case runs as steps (read, preprocess, predict, write the mask, the SEG, the QC picture, the
done-marker); a bad input becomes a quarantined result, a failure in any step a failed one with
the step's reason code (`records.step`), recorded in the batch's work folder for `finalize_batch`.
One case's failure is that case's record, never the batch's traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import InputRejected, Reason, Status
from pipeline.inference.cases import PredictCase, case_from_json, load_image
from pipeline.inference.memory import Pending
from pipeline.inference.model import ModelHandle, cached_model, plan_of
from pipeline.inference.predictor import PredictOptions, predict_volume
from pipeline.inference.records import (
    MASK_FILE,
    QC_FILE,
    SEG_FILE,
    CaseFailed,
    clear_case,
    clip_line,
    one_line,
    step,
    write_done_marker,
)
from pipeline.inference.results import CaseResult
from pipeline.ingest import IngestLimits, job_from_json, kept_job
from pipeline.io.batchdir import BatchDir, case_key, load_or_create_secret
from pipeline.io.model_dir import code_version
from pipeline.io.volume import Volume
from pipeline.outputs import masks, qc

log = logging.getLogger(__name__)


@dataclass
class OpenBatch:
    """A planned batch as a worker sees it: the plan, the model, the options."""

    out: Path
    source: Path
    meta: dict[str, Any]
    handle: ModelHandle
    options: PredictOptions
    device: torch.device
    limits: IngestLimits
    settings: dict[str, Any]  # records.output_settings of the batch

    @property
    def work(self) -> BatchDir:
        """The batch's work folder (OUT/.batch/)."""
        return BatchDir(self.out)

    def key(self, case: PredictCase) -> str:
        """The case key of `case` in this batch."""
        return case_key(case.inputs_sha256, self.settings)

    def case(self, case_id: str) -> PredictCase:
        """A planned case without its ingest job (see `job_for`)."""
        return case_from_json(self.work.read_case(case_id))

    def job_for(self, case: PredictCase) -> PredictCase:
        """The case with its ingest job: the one `prepare_batch(keep_jobs=True)` kept in this
        process when its files are unchanged, else rebuilt (DICOM: headers re-read; raises
        InputRejected)."""
        kept = kept_job(self.out, case.case_id)
        if kept is not None and kept.inputs_sha256 == case.inputs_sha256:
            return dataclasses.replace(case, job=kept)
        data = self.work.read_case(case.case_id)
        if data["job"] is None:
            return case
        secret = load_or_create_secret(Path(self.meta["secret_file"]))
        job = job_from_json(data["job"], self.source, secret, self.limits)
        return dataclasses.replace(case, job=job)


def open_batch(out: Path) -> OpenBatch:
    """The planned batch in OUT, its model loaded once per process (`model.cached_model`)."""
    meta = BatchDir(out).read_batch("prepare_batch")
    m = meta["model"]
    loaded = cached_model(Path(meta["model_dir"]), m["sha256"], meta["device"])
    handle = ModelHandle(loaded, m["uri"], m["name"], m["version"], m["sha256"], m.get("run_id"))
    options = PredictOptions(**meta["options"])
    return OpenBatch(
        out=out,
        source=Path(meta["source"]),
        meta=meta,
        handle=handle,
        options=options,
        device=next(loaded.model.parameters()).device,
        limits=IngestLimits(**meta["limits"]),
        settings=meta["settings"],
    )


def _volumes(mask: np.ndarray, spacing: tuple[float, ...], names: dict[int, str]) -> tuple[dict, dict]:
    counts = np.bincount(mask.ravel(), minlength=max(names) + 1)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    voxels = {names[v]: int(counts[v]) for v in sorted(names) if v != 0}
    return {k: round(n * voxel_ml, 4) for k, n in voxels.items()}, voxels


@dataclass
class Loaded:
    """One case read and preprocessed, ready for the network."""

    case: PredictCase  # with its job rebuilt
    volume: Volume
    slices: torch.Tensor
    info: Any
    seconds: float


def load(batch: OpenBatch, case: PredictCase) -> Loaded:
    """Read and preprocess one case; a refused input raises InputRejected, any other failure
    CaseFailed with READ_FAILED (reading) or PREDICTION_FAILED (preprocessing)."""
    from pipeline.planning.transforms import preprocess_volume  # MONAI: imported with the first case

    t0 = time.perf_counter()
    with step(Reason.READ_FAILED, "reading the image"):
        case = batch.job_for(case)
        volume = load_image(case, batch.source, batch.limits)
    with step(Reason.PREDICTION_FAILED, "preprocessing"):
        slices, info = preprocess_volume(volume, plan_of(batch.handle.loaded))
    return Loaded(case, volume, slices, info, time.perf_counter() - t0)


@dataclass
class Predicted:
    """One case through the network, its outputs not yet written (what a writer takes)."""

    case: PredictCase  # with its job rebuilt
    volume: Volume
    mask: np.ndarray  # uint8 labels on the volume's grid
    seconds: float  # reading, preprocessing and predicting


def _write_outputs(batch: OpenBatch, case: PredictCase, volume: Volume, mask: np.ndarray) -> list[str]:
    """Write the case's outputs, each in its own step; returns the names written."""
    handle, names = batch.handle, batch.handle.label_names
    case_dir = batch.out / case.case_id
    with step(Reason.OUTPUT_WRITE_FAILED, "writing the NIfTI mask"):
        clear_case(case_dir)
        masks.write_mask_nifti(case_dir / MASK_FILE, mask, volume.affine)
    outputs = [MASK_FILE]
    job = case.job
    if batch.meta["write_seg"] and case.kind == "dicom" and job is not None and job.group is not None:
        with step(Reason.SEG_WRITE_FAILED, "writing the DICOM SEG"):
            masks.write_dicom_seg(
                case_dir / SEG_FILE,
                mask,
                job.group,
                names,
                algorithm_name=handle.name,
                algorithm_version=handle.version,
                software_version=code_version(),
            )
        outputs.append(SEG_FILE)
    if batch.meta["write_qc"]:
        with step(Reason.QC_WRITE_FAILED, "drawing the QC picture"):
            qc.write_qc_png(
                case_dir / QC_FILE,
                volume.data,
                mask,
                names,
                affine=volume.affine,
                modality=volume.modality,
                title=case.case_id,
            )
        outputs.append(QC_FILE)
    return outputs


def run_case(case: PredictCase, pending: Pending, batch: OpenBatch) -> CaseResult:
    """Run one case to its done-marker, step by step (`predict_loaded`, then `write_case`, in
    this thread). Never raises for the case."""
    predicted = predict_loaded(case, pending, batch)
    return predicted if isinstance(predicted, CaseResult) else write_case(batch, predicted)


def predict_loaded(case: PredictCase, pending: Pending, batch: OpenBatch) -> Predicted | CaseResult:
    """The first half of a case: take its load and predict its mask. A bad input or a failed
    step is the case's result already (recorded as `write_case` records a failure)."""
    t0 = time.perf_counter()
    try:
        loaded: Loaded = pending.take()
        case = loaded.case
        with step(Reason.PREDICTION_FAILED, "predicting"):
            mask = predict_volume(
                batch.handle,
                loaded.volume,
                batch.options,
                device=batch.device,
                prepared=(loaded.slices, loaded.info),
            )
            del loaded.slices  # the largest buffer left: not needed by the writers
        return Predicted(case, loaded.volume, mask, loaded.seconds + time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - one case's failure, at any step, is that case's record
        return _failed(batch, case, exc)


def write_case(batch: OpenBatch, predicted: Predicted) -> CaseResult:
    """The second half of a case: its outputs, then its done-marker, last. A failed step is the
    case's failure record with the step's reason (its partial outputs removed). Never raises
    for the case; safe to run in another thread than the prediction (one thread per case)."""
    t0 = time.perf_counter()
    case, volume, mask = predicted.case, predicted.volume, predicted.mask
    try:
        outputs = _write_outputs(batch, case, volume, mask)
        volumes_ml, voxels = _volumes(mask, volume.spacing, batch.handle.label_names)
        result = CaseResult(
            case.case_id,
            case.source,
            Status.OK,
            volumes_ml=volumes_ml,
            voxels=voxels,
            seconds=round(predicted.seconds + time.perf_counter() - t0, 3),
        )
        with step(Reason.RECORD_WRITE_FAILED, "writing the done-marker"):
            batch.work.record_failure(case.case_id, None)
            write_done_marker(  # last: the case is done only now
                batch.out / case.case_id,
                batch.key(case),
                outputs,
                result.to_json(),
                inputs_sha256=case.inputs_sha256,
                model_sha256=batch.handle.sha256,
                model_version=batch.handle.version,
                finished=datetime.now(UTC).isoformat(timespec="seconds"),
            )
        log.info("case %s: ok in %.2f s", case.case_id, result.seconds)
        return result
    except Exception as exc:  # noqa: BLE001 - one case's failure, at any step, is that case's record
        return _failed(batch, case, exc)


def _failed(batch: OpenBatch, case: PredictCase, exc: Exception) -> CaseResult:
    """A case's bad input (quarantined) or failed step (failed) as its result and its failure
    record in OUT/.batch/failed/ for `finalize_batch`, its partial outputs removed."""
    if isinstance(exc, InputRejected):
        err = exc
        err.details.setdefault("files", [case.source])
        record = {"status": Status.QUARANTINED, "case_id": case.case_id, **err.to_record()}
        log.warning("case %s quarantined: %s", case.case_id, err.reason.value)
        result = CaseResult(
            case.case_id, case.source, Status.QUARANTINED, err.reason.value, message=clip_line(err.message)
        )
    else:
        failed = exc if isinstance(exc, CaseFailed) else CaseFailed(Reason.PREDICTION_FAILED, one_line(exc))
        record = {
            "status": Status.FAILED,
            "case_id": case.case_id,
            "path": case.source,
            "reason": failed.reason.value,
            "message": failed.message,
        }
        # The type only: the message may quote a file name, and logs carry no identifiers.
        cause = type(exc.__cause__ or exc).__name__
        log.error("case %s failed: %s (%s)", case.case_id, failed.reason.value, cause)
        result = CaseResult(
            case.case_id, case.source, Status.FAILED, failed.reason.value, message=failed.message
        )
    # No mask of a case that is not done; when the case folder itself is the problem (a file in
    # its place) there is nothing to clear.
    with contextlib.suppress(OSError):
        clear_case(batch.out / case.case_id)
    try:
        batch.work.record_failure(case.case_id, record)
    except OSError as exc:  # finalize_batch then lists the case as NO_RESULT
        log.error("case %s: its failure record could not be written (%s)", case.case_id, type(exc).__name__)
    return result
