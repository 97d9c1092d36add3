"""Batch inference: a registered model to label masks in each source's own geometry.

    predict(SOURCE, MODEL, OUT) writes, per case (OUT/<case_id>/, pseudonymous folder names):
        seg.nii.gz   uint8 labels, the source image's exact shape and affine (qform == sform)
        seg.dcm      a DICOM SEG referencing the source instances (DICOM inputs only)
        qc.png       three planes through the labels and an axial montage, contours over the slice
        done.json    the done-marker, written last: the case key, each output's sha256, the result
    and, for the batch: results.csv, quarantine.jsonl, run_manifest.json and report.html.

The model is loaded and verified (sha256, no pickle) once, before any case runs. SOURCE goes
through the ingest rules (`CaseFinder`: DICOM series, NIfTI, MSD datasets; MSD datasets predict
their imagesTs) or is a staging folder (its manifest). Each case is preprocessed with the model's
own plan, its slices run through the network in batches, argmax'd (uint8 labels, never a whole
volume of float probabilities), mapped back to the native grid and optionally post-processed
per label (`predict_prepared`: the same path validation during training scores). A background
thread loads and preprocesses the next case while the current one computes, when the planned
peaks of both fit the memory budget (`predict_memory`).

Reliability: every output is written atomically and the done-marker last, so a crash leaves a
case without a marker and the rerun redoes it; a case whose case key changed (input bytes,
model, any option that changes its outputs: `predict_records.case_key`) or whose outputs are
missing or no longer match the marker's sha256 is redone; one bad case is quarantined (bad
input) or failed with the reason code of the step that failed (READ_FAILED, PREDICTION_FAILED,
OUTPUT_WRITE_FAILED, SEG_WRITE_FAILED, QC_WRITE_FAILED, RECORD_WRITE_FAILED) and a one-line
message, and the batch goes on. Exit codes: see `PredictSummary.exit_code`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from pipeline.errors import IGNORED_REASONS, InputRejected, Reason
from pipeline.ingest import CaseFinder, CaseJob, IngestLimits, job_from_json, job_to_json, load_case
from pipeline.io.atomic import atomic_open, write_text
from pipeline.io.batchdir import DONE_FILE, case_key, load_or_create_secret, read_done_marker
from pipeline.io.model_dir import LoadedModel, code_version
from pipeline.io.nifti import load_nifti
from pipeline.io.volume import Volume
from pipeline.io.walk import discover
from pipeline.predict_memory import Pending, default_budget, planned_case_bytes, prefetch
from pipeline.predict_records import (
    OUTPUT_VERSION,
    CaseFailed,
    clip_line,
    one_line,
    output_settings,
    step,
    write_done_marker,
)
from pipeline.runtime import autocast, configure_threads, prepare_model, resolve_precision, to_input

log = logging.getLogger(__name__)

MASK_FILE = "seg.nii.gz"
SEG_FILE = "seg.dcm"
QC_FILE = "qc.png"
CASE_OUTPUTS = (MASK_FILE, SEG_FILE, QC_FILE)

EXIT_OK, EXIT_PARTIAL, EXIT_NOTHING = 0, 1, 2


class ModelLoadError(RuntimeError):
    """The model could not be loaded or verified; no case was run."""


# ------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class ModelHandle:
    """A verified model and what identifies it in outputs."""

    loaded: LoadedModel
    uri: str
    name: str
    version: str  # registry version number, "run"/"logged", or "local" for a folder
    sha256: str  # of the weights, checked on load
    run_id: str | None = None  # the MLflow run that produced a registered version, when known

    @property
    def label_names(self) -> dict[int, str]:
        return self.loaded.label_names


def _name_and_version(uri: str, loaded: LoadedModel) -> tuple[str, str]:
    """models:/NAME/VERSION -> (NAME, VERSION); models:/NAME@ALIAS -> (NAME, "@ALIAS"); folders by name.

    Without the registry: `load_model` resolves aliases to version numbers with pipeline.tracking.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "models":
        ref = (parsed.netloc + parsed.path).strip("/")
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return name, f"@{alias}"
        parts = ref.split("/")
        if len(parts) == 2:
            return parts[0], parts[1]
        return ref, "logged"
    if parsed.scheme == "runs":
        return (parsed.netloc + parsed.path).strip("/"), "run"
    return Path(uri).resolve().name, "local"


def load_model(uri: str | Path, device: str = "auto", *, dst: str | Path | None = None) -> ModelHandle:
    """Load and verify the model at `uri` (models:/..., runs:/..., or a folder) on `device`.

    `models:/NAME@ALIAS` is resolved to its version number first and that version is loaded, so
    the alias cannot move between the lookup and the download. Registry models are downloaded
    to `dst` when given (kept there), else to a temporary folder.
    Raises ModelLoadError naming the model when it is missing, tampered with or partial.
    """
    from pipeline import tracking  # imports MLflow: only when a model is actually loaded
    from pipeline.runtime import resolve_device

    uri = str(uri)
    run_id = None
    try:
        dev = resolve_device(device)
        load_uri = uri
        if _is_registered(uri):
            name, version = tracking.resolve_model_version(uri)
            load_uri = f"models:/{name}/{version}"
            run_id = tracking.model_version_run_id(name, version)
        loaded = tracking.load_registered(load_uri, device=str(dev.type), dst=dst)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"refusing to predict with the model {uri}: {exc}") from exc
    if _is_registered(uri):
        name, version = load_uri.removeprefix("models:/").split("/")
    else:
        name, version = _name_and_version(uri, loaded)
    return ModelHandle(
        loaded=loaded, uri=uri, name=name, version=version, sha256=loaded.sha256, run_id=run_id
    )


def _is_registered(uri: str) -> bool:
    """models:/NAME@ALIAS or models:/NAME/VERSION (not a logged model's models:/m-ID)."""
    parsed = urlparse(uri)
    ref = (parsed.netloc + parsed.path).strip("/")
    return parsed.scheme == "models" and ("@" in ref or ref.count("/") == 1)


# ------------------------------------------------------------------------------------------
# Sources


@dataclass
class PredictCase:
    """One case to predict: what to load and how to identify it (nothing identifying)."""

    case_id: str
    source: str  # relative to SOURCE: the series folder, the NIfTI file, or the staged image
    kind: str  # "dicom", "nifti" or "staging"
    inputs_sha256: str
    job: CaseJob | None = None
    image_path: Path | None = None  # staging only
    modality: str = "unknown"


def _common_folder(rels: list[str]) -> str:
    parents = [PurePosixPath(r).parent.parts for r in rels]
    common: list[str] = []
    for parts in zip(*parents, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return "/".join(common) or "."


def plan_cases(
    source: Path, secret: bytes, limits: IngestLimits, progress: bool = False
) -> tuple[list[PredictCase], list[InputRejected]]:
    """The cases under `source` by the ingest rules, and the rejected inputs."""
    if (source / "manifest.jsonl").is_file() and (source / "images").is_dir():
        return _staging_cases(source), []
    finder = CaseFinder(source, secret, limits)
    finder.find(discover(source), progress)
    cases = []
    for job in finder.jobs:
        if job.kind == "dicom":
            assert job.group is not None  # CaseFinder always sets it for DICOM jobs
            # Predict ignores annotations: a broken manual SEG must not stop a prediction.
            job = dataclasses.replace(job, segs=[])
            images = job.group.files
            cases.append(PredictCase(job.case_id, _common_folder(images), "dicom", job.inputs_sha256, job))
        else:
            assert job.nifti is not None
            if job.nifti.split == "training":
                continue  # an MSD dataset: predict its imagesTs, not the cases it was trained on
            job = dataclasses.replace(job, nifti=dataclasses.replace(job.nifti, label=None))
            cases.append(PredictCase(job.case_id, job.nifti.image, "nifti", job.inputs_sha256, job))
    return cases, finder.rejected


def _staging_cases(staging: Path) -> list[PredictCase]:
    from pipeline.io.manifest import read_manifest

    cases = []
    for row in read_manifest(staging):
        sha = row.get("sha256", {})
        cases.append(
            PredictCase(
                case_id=row["case_id"],
                source=row["image"],
                kind="staging",
                inputs_sha256=str(sha.get("image") or sha.get("inputs") or ""),
                image_path=staging / row["image"],
                modality=str(row.get("modality") or "unknown").upper(),
            )
        )
    return cases


def load_staged_volume(
    path: Path, rel: str, modality: str | None, limits: IngestLimits | None = None
) -> Volume:
    """A staged image (NIfTI) as predict reads it; validation during training reads it the same way."""
    limits = limits or IngestLimits()
    volume = load_nifti(path, rel, max_voxels=limits.max_voxels, max_bytes=limits.max_bytes)
    volume.modality = str(modality or "unknown").upper()
    return volume


def load_image(case: PredictCase, source: Path, limits: IngestLimits) -> Volume:
    """Decode one case's image (raises InputRejected for a bad input)."""
    if case.kind == "staging":
        assert case.image_path is not None
        return load_staged_volume(case.image_path, case.source, case.modality, limits)
    assert case.job is not None
    image, _ = load_case(case.job, source, limits)
    if image.modality == "unknown" and case.job.modality != "unknown":
        image.modality = case.job.modality
    return image


# ------------------------------------------------------------------------------------------
# One volume


@dataclass(frozen=True)
class PredictOptions:
    """How to run the network and post-process its output."""

    batch_size: int = 16  # slices per forward pass
    largest_component: bool = False  # keep the largest connected component of each label
    fill_holes: bool = False  # fill enclosed background holes of each label
    precision: str = "auto"  # runtime.resolve_precision: bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = True

    @classmethod
    def from_config(
        cls, infer: Any, *, batch_size: int | None = None, postprocess: bool | None = None
    ) -> PredictOptions:
        """The options of a config's infer section (`postprocess` overrides both clean-ups).

        Predict and validation during training both build their options here, so the champion
        gate scores what predict writes.
        """
        return cls(
            batch_size=batch_size or infer.batch_size,
            largest_component=infer.largest_component if postprocess is None else postprocess,
            fill_holes=infer.fill_holes if postprocess is None else postprocess,
        )

    def mask_key(self) -> dict[str, Any]:
        """What changes the mask (part of the case key); the batch size and layout do not."""
        return {
            "largest_component": self.largest_component,
            "fill_holes": self.fill_holes,
            "precision": self.precision,
        }


def segment_slices(
    model: torch.nn.Module,
    slices: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = True,
) -> torch.Tensor:
    """(S, 1, H, W) normalized slices -> (S, H, W) uint8 argmax labels on the CPU.

    The model must be in eval mode. Only one batch of logits exists at a time: memory is
    bounded by the batch, not the volume.
    """
    n, _, h, w = slices.shape
    out = torch.empty((n, h, w), dtype=torch.uint8)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            x = to_input(slices[start : start + batch_size], device, channels_last)
            with autocast(device, amp_dtype):
                logits = model(x)
            out[start : start + x.shape[0]] = logits.argmax(dim=1).to(torch.uint8).cpu()
    return out


# The one definition of "connected" for the largest-component clean-up, used by predict and by
# validation during training: 26-connectivity (faces, edges and corners), so a structure that
# narrows to a diagonal step on a thick-slice grid stays one component.
COMPONENT_STRUCTURE = np.ones((3, 3, 3), bool)


def postprocess(labels: np.ndarray, *, largest_component: bool, fill_holes: bool) -> np.ndarray:
    """Per label value: keep its largest connected component (COMPONENT_STRUCTURE) and/or fill
    its holes. Returns `labels` itself when neither is asked for, else a modified copy.

    Holes are filled with the label only where they are background, so a lesion inside an organ
    keeps its own label. Ties between equally large components keep the first in scan order.
    """
    if not (largest_component or fill_holes):
        return labels
    labels = labels.copy()
    for value in (int(v) for v in np.unique(labels) if v != 0):
        mask = labels == value
        if largest_component:
            components, n = ndimage.label(mask, structure=COMPONENT_STRUCTURE)
            if n > 1:
                sizes = np.bincount(components.ravel())
                sizes[0] = 0
                keep = components == int(np.argmax(sizes))
                del components
                labels[mask & ~keep] = 0
                mask = keep
        if fill_holes:
            filled = ndimage.binary_fill_holes(mask)
            labels[filled & (labels == 0)] = value
    return labels


def predict_prepared(
    model: torch.nn.Module,
    slices: torch.Tensor,
    info: Any,
    options: PredictOptions,
    *,
    device: torch.device,
) -> np.ndarray:
    """Preprocessed slices (`transforms.preprocess_volume`) -> post-processed uint8 labels on the
    original grid: the one prediction path of predict and of validation during training.

    `model` must be in eval mode on `device`.
    """
    from pipeline.planning.transforms import restore_labels

    labels = segment_slices(
        model,
        slices,
        device=device,
        batch_size=options.batch_size,
        amp_dtype=resolve_precision(options.precision, device),
        channels_last=options.channels_last,
    )
    mask = restore_labels(labels, info)
    del labels
    if mask.shape != tuple(info.original_shape):  # restore_labels' contract; outputs rely on it
        raise RuntimeError(f"restored mask shape {mask.shape} != image shape {tuple(info.original_shape)}")
    return postprocess(mask, largest_component=options.largest_component, fill_holes=options.fill_holes)


def predict_volume(
    model: ModelHandle | LoadedModel,
    volume: Volume,
    options: PredictOptions | None = None,
    *,
    device: torch.device | None = None,
    prepared: tuple[torch.Tensor, Any] | None = None,
) -> np.ndarray:
    """A uint8 label map on `volume`'s own grid (same shape; its affine applies).

    `model` is a loaded model (`model_dir.load_model_dir`, or `load_model`'s handle) with its
    plan; its network is put in eval mode. `options` default to PredictOptions(); `device` to
    the network's. `prepared` is `preprocess_volume(volume, plan)` when already computed.
    """
    from pipeline.planning.transforms import preprocess_volume

    loaded = model.loaded if isinstance(model, ModelHandle) else model
    options = options or PredictOptions()
    net = loaded.model.eval()
    device = device or next(net.parameters()).device
    slices, info = prepared or preprocess_volume(volume, _plan_of(loaded))
    if tuple(info.original_shape) != tuple(volume.shape):
        raise RuntimeError(f"preprocessed for shape {info.original_shape}, not the volume's {volume.shape}")
    return predict_prepared(net, slices, info, options, device=device)


def _plan_of(loaded: LoadedModel):
    from pipeline.planning.plan import Plan

    return Plan.from_dict(loaded.plan)


def _plan(handle: ModelHandle):
    return _plan_of(handle.loaded)


# ------------------------------------------------------------------------------------------
# The batch


@dataclass
class CaseResult:
    """One row of results.csv."""

    case_id: str
    source: str
    status: str  # ok, quarantined, failed
    reason: str = ""  # a Reason value for quarantined and failed cases
    volumes_ml: dict[str, float] = field(default_factory=dict)  # label name -> mL
    voxels: dict[str, int] = field(default_factory=dict)  # label name -> voxel count
    seconds: float = 0.0
    skipped: bool = False  # done by an earlier run with the same input and model
    message: str = ""  # one line: why the case was quarantined or failed

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PredictSummary:
    """What a batch did; `exit_code` is the CLI's."""

    out: Path
    results: list[CaseResult]
    ignored: int = 0  # files that are not inputs at all (reports, Thumbs.db)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def processed(self) -> int:
        return sum(r.status == "ok" and not r.skipped for r in self.results)

    @property
    def skipped(self) -> int:
        return sum(r.skipped for r in self.results)

    @property
    def exit_code(self) -> int:
        """0: every case ok; 1: some ok, some quarantined or failed; 2: no case ok."""
        if self.count("ok") == 0:
            return EXIT_NOTHING
        return EXIT_OK if self.count("ok") == len(self.results) else EXIT_PARTIAL


def _done_marker(out: Path, case: PredictCase, settings: dict[str, Any]) -> dict | None:
    """The earlier run's marker for this case if it is valid for the batch's `settings`."""
    return read_done_marker(out / case.case_id, case_key(case.inputs_sha256, settings))


def _clear_case(case_dir: Path) -> None:
    """Forget an earlier run's outputs: the marker first, so a crash here leaves no false 'done'."""
    (case_dir / DONE_FILE).unlink(missing_ok=True)
    for name in CASE_OUTPUTS:
        (case_dir / name).unlink(missing_ok=True)


def _volumes(mask: np.ndarray, spacing: tuple[float, ...], names: dict[int, str]) -> tuple[dict, dict]:
    counts = np.bincount(mask.ravel(), minlength=max(names) + 1)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    voxels = {names[v]: int(counts[v]) for v in sorted(names) if v != 0}
    return {k: round(n * voxel_ml, 4) for k, n in voxels.items()}, voxels


def check_out_folder(out: str | Path) -> Path:
    """`out` resolved, when it can be the output folder: an existing folder or a path that can be
    made one. Raises ValueError naming the path when it (or a parent of it) is a file."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder: give a folder (made if absent)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {out} cannot be made: {parent} is a file, not a folder")
            break
    return out


def _resolve_paths(source: str | Path, out: str | Path) -> tuple[Path, Path]:
    source, out = Path(source).resolve(), check_out_folder(out)
    if not source.exists():
        raise FileNotFoundError(f"predict source {source} does not exist")
    if out == source or (source.is_dir() and source in out.parents):
        raise ValueError(f"the output folder {out} must not be inside the source {source}")
    return source, out


# ------------------------------------------------------------------------------------------
# The batch, in three steps that orchestrators may run as separate tasks:
#   prepare_batch (model check, case plan; one call) -> predict_case (one per case, in any
#   process or machine that sees OUT) -> finalize_batch (tables, manifest, report), and
#   optionally track_batch (the batch as one MLflow run). `predict` runs the first three in one
#   process.
#
# The plan lives in OUT/.plan/: batch.json (model identity, options, rejected inputs, case IDs),
# cases/<case_id>.json (each case's input files), model/ (the verified model folder, so workers
# never need the registry), failed/<case_id>.json (a quarantined or failed case's record) and
# locks/<case_id>.lock. Like results.csv it links case IDs to source paths, so it stays inside
# OUT and never travels as task parameters. One batch per OUT folder at a time.

PLAN_DIR = ".plan"
PLAN_FILE = "batch.json"
PREPARE_LOCK = "prepare.lock"  # beside the case locks; case IDs are case_<hex>, never this name


@dataclass(frozen=True)
class BatchPlan:
    """What `prepare_batch` decided; case IDs and hashes only (nothing identifying)."""

    case_ids: list[str]
    todo: list[str]  # cases without a valid done-marker
    inputs_sha256: dict[str, str]  # case ID -> sha256 over its input files' bytes
    model_sha256: str
    model_name: str
    model_version: str
    settings: dict[str, Any]  # predict_records.output_settings: all but the input a case depends on
    options_sha256: str  # sha256 of `settings`
    model_run_id: str | None = None
    rejected: int = 0  # inputs quarantined while planning (no case ID)
    case_bytes: dict[str, int] = field(default_factory=dict)  # case ID -> planned peak memory

    def case_key(self, case_id: str) -> str:
        """The case key (`predict_records.case_key`) of one planned case."""
        return case_key(self.inputs_sha256[case_id], self.settings)


def _plan_dir(out: Path) -> Path:
    return out / PLAN_DIR


def _case_to_json(case: PredictCase) -> dict[str, Any]:
    return {
        "case_id": case.case_id,
        "source": case.source,
        "kind": case.kind,
        "inputs_sha256": case.inputs_sha256,
        "job": job_to_json(case.job) if case.job is not None else None,
        "image_path": str(case.image_path) if case.image_path is not None else None,
        "modality": case.modality,
    }


def _case_from_json(data: dict[str, Any]) -> PredictCase:
    """The case without its job (rebuilding a DICOM job re-reads headers: see `_job_for`)."""
    return PredictCase(
        case_id=data["case_id"],
        source=data["source"],
        kind=data["kind"],
        inputs_sha256=data["inputs_sha256"],
        image_path=Path(data["image_path"]) if data["image_path"] else None,
        modality=data["modality"],
    )


def _stage_model(handle: ModelHandle, dst: Path) -> None:
    """Copy the verified model folder to `dst` (workers reload it from there, never the registry)."""
    from pipeline.io.model_dir import MODEL_FILE, save_model_dir

    try:
        if json.loads((dst / MODEL_FILE).read_text(encoding="utf-8"))["weights_sha256"] == handle.sha256:
            return  # an earlier prepare of this batch staged these weights; loading re-verifies them
    except (OSError, ValueError, KeyError):
        pass
    # Unique names beside `dst` (never a fixed .tmp a second writer could clobber); the caller
    # holds the plan lock, so only the swap below is seen by workers, never a half-copied folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    old = tmp.with_name(tmp.name.removesuffix(".tmp") + ".old")
    try:
        src = handle.loaded.path
        if (src / MODEL_FILE).is_file():
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        else:  # a handle whose download is gone: write the same weights again (same sha256)
            save_model_dir(
                handle.loaded.model,
                tmp,
                plan=handle.loaded.plan,
                config=handle.loaded.config,
                label_names=handle.loaded.label_names,
            )
        if dst.exists():
            os.replace(dst, old)  # a folder cannot replace a non-empty folder: move it aside first
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def prepare_batch(
    source: str | Path,
    model: str | Path | ModelHandle,
    out: str | Path,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    postprocess_masks: bool | None = None,
    secret_file: str | Path | None = None,
    limits: IngestLimits | None = None,
    write_seg: bool = True,
    write_qc: bool = True,
    progress: bool = False,
) -> BatchPlan:
    """Step 1: verify the model (ModelLoadError before anything is written), plan the cases and
    record the plan in OUT/.plan/; see `predict` for the arguments.

    Cases with a valid done-marker from an earlier run (same input, model and options) are not
    in `todo`.
    """
    started = datetime.now(UTC)
    source, out = _resolve_paths(source, out)
    plan_dir = _plan_dir(out)
    with ExitStack() as held:
        with tempfile.TemporaryDirectory(prefix="unet-model-") as tmp:
            handle = model if isinstance(model, ModelHandle) else load_model(model, device, dst=tmp)
            if isinstance(model, ModelHandle):  # already on its device: workers use the same kind
                device = next(model.loaded.model.parameters()).device.type
            plan_dir.mkdir(parents=True, exist_ok=True)
            # Held until batch.json is written: a second prepare of this OUT waits, then finds
            # the model staged and writes the same plan again.
            held.enter_context(_plan_lock(out))
            _stage_model(handle, plan_dir / "model")
        return _write_plan(
            handle,
            source,
            out,
            started=started,
            device=device,
            batch_size=batch_size,
            postprocess_masks=postprocess_masks,
            secret_file=secret_file,
            limits=limits,
            write_seg=write_seg,
            write_qc=write_qc,
            progress=progress,
        )


def _write_plan(
    handle: ModelHandle,
    source: Path,
    out: Path,
    *,
    started: datetime,
    device: str,
    batch_size: int | None,
    postprocess_masks: bool | None,
    secret_file: str | Path | None,
    limits: IngestLimits | None,
    write_seg: bool,
    write_qc: bool,
    progress: bool,
) -> BatchPlan:
    """prepare_batch once the model is staged (under the plan lock): plan the cases, write the plan."""
    from pipeline.config import PipelineConfig, Workdir
    from pipeline.io.model_dir import MODEL_FILE

    plan_dir = _plan_dir(out)
    model_dir = plan_dir / "model"
    staged_sha = json.loads((model_dir / MODEL_FILE).read_text(encoding="utf-8"))["weights_sha256"]
    if staged_sha != handle.sha256:
        raise ModelLoadError(f"the model staged at {model_dir} has sha256 {staged_sha}, not {handle.sha256}")
    _remember_model(handle, device)
    try:
        infer = PipelineConfig.from_dict(handle.loaded.config or {}).infer
    except ValueError:  # a config from another code version: its infer section is advisory only
        log.warning("the model's training config does not validate here; using default infer options")
        infer = PipelineConfig().infer
    options = PredictOptions.from_config(infer, batch_size=batch_size, postprocess=postprocess_masks)
    limits = limits or IngestLimits()
    secret_path = Path(secret_file) if secret_file else Workdir.resolve().secret_file
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
            quarantine.append({"status": "ignored", **err.to_record()})
            continue
        quarantine.append({"status": "quarantined", **err.to_record()})
        where = _common_folder(files) if len(files) > 1 else err.path
        rejected_results.append(
            CaseResult("", where, "quarantined", err.reason.value, message=clip_line(err.message)).to_json()
        )

    settings = batch_settings(handle, options, write_seg=write_seg, write_qc=write_qc, limits=limits)
    shutil.rmtree(plan_dir / "failed", ignore_errors=True)
    todo = []
    case_bytes = {}
    target = float(handle.loaded.plan.get("target_spacing") or 1.0)
    for case in cases:
        case_bytes[case.case_id] = planned_case_bytes(*_case_size(case, source), target_spacing=target)
        with atomic_open(plan_dir / "cases" / f"{case.case_id}.json") as fh:
            json.dump({**_case_to_json(case), "planned_bytes": case_bytes[case.case_id]}, fh)
        if _done_marker(out, case, settings) is None:
            todo.append(case.case_id)
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
        "write_seg": write_seg,
        "write_qc": write_qc,
        "limits": dataclasses.asdict(limits),
        "output_version": OUTPUT_VERSION,
        "settings": settings,
        "options_sha256": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
        "case_bytes": case_bytes,
        "cases": [c.case_id for c in cases],
        "todo": todo,
        "quarantine": quarantine,
        "rejected_results": rejected_results,
        "ignored": ignored,
        "started": started.isoformat(timespec="seconds"),
    }
    write_text(plan_dir / PLAN_FILE, json.dumps(batch, indent=1, default=str))
    log.info("predict: %d cases, %d already done, %d to run", len(cases), len(cases) - len(todo), len(todo))
    return BatchPlan(
        case_ids=batch["cases"],
        todo=todo,
        inputs_sha256={c.case_id: c.inputs_sha256 for c in cases},
        model_sha256=handle.sha256,
        model_name=handle.name,
        model_version=handle.version,
        settings=settings,
        options_sha256=batch["options_sha256"],
        model_run_id=handle.run_id,
        rejected=len(rejected_results),
        case_bytes=case_bytes,
    )


def batch_settings(
    handle: ModelHandle, options: PredictOptions, *, write_seg: bool, write_qc: bool, limits: IngestLimits
) -> dict[str, Any]:
    """`predict_records.output_settings` of a batch: the model's identity, plan and label names,
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


# The model loaded in this process, by (weights sha256, device): a long-lived worker loads it
# once; a batch with another model replaces it.
_MODELS: dict[tuple[str, str], LoadedModel] = {}
_MODELS_LOCK = threading.Lock()


def _model_key(sha256: str, device: str) -> tuple[str, str]:
    from pipeline.runtime import resolve_device

    return sha256, str(resolve_device(device))


def _remember_model(handle: ModelHandle, device: str) -> None:
    dev = next(handle.loaded.model.parameters()).device
    configure_threads()
    net = prepare_model(handle.loaded.model, dev, channels_last=True).eval()
    with _MODELS_LOCK:
        _MODELS.clear()
        _MODELS[_model_key(handle.sha256, device)] = dataclasses.replace(handle.loaded, model=net)


def _cached_model(model_dir: Path, sha256: str, device: str) -> LoadedModel:
    """The verified model of a batch, loaded at most once per process and device."""
    from pipeline.io.model_dir import load_model_dir
    from pipeline.runtime import resolve_device

    key = _model_key(sha256, device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            try:
                loaded = load_model_dir(model_dir, device=resolve_device(device))
            except (ValueError, RuntimeError, OSError) as exc:
                raise ModelLoadError(f"refusing to predict with the model {model_dir}: {exc}") from exc
            if loaded.sha256 != sha256:
                raise ModelLoadError(
                    f"the model at {model_dir} has weights sha256 {loaded.sha256}, but the batch "
                    f"was planned with {sha256}; run prepare_batch again"
                )
            configure_threads()
            dev = next(loaded.model.parameters()).device
            net = prepare_model(loaded.model, dev, channels_last=True).eval()
            _MODELS.clear()  # one model per process: a new version frees the last one's memory
            _MODELS[key] = dataclasses.replace(loaded, model=net)
        return _MODELS[key]


@dataclass
class _Batch:
    """A planned batch as a worker sees it: the plan, the model, the options."""

    out: Path
    source: Path
    meta: dict[str, Any]
    handle: ModelHandle
    options: PredictOptions
    device: torch.device
    limits: IngestLimits
    settings: dict[str, Any]  # predict_records.output_settings of the batch

    def key(self, case: PredictCase) -> str:
        """The case key of `case` in this batch."""
        return case_key(case.inputs_sha256, self.settings)

    def case(self, case_id: str) -> PredictCase:
        path = _plan_dir(self.out) / "cases" / f"{case_id}.json"
        return _case_from_json(json.loads(path.read_text(encoding="utf-8")))

    def job_for(self, case: PredictCase) -> PredictCase:
        """The case with its ingest job rebuilt (DICOM: headers re-read; raises InputRejected)."""
        data = json.loads((_plan_dir(self.out) / "cases" / f"{case.case_id}.json").read_text("utf-8"))
        if data["job"] is None:
            return case
        secret = load_or_create_secret(Path(self.meta["secret_file"]))
        job = job_from_json(data["job"], self.source, secret, self.limits)
        return dataclasses.replace(case, job=job)


def _read_batch(out: Path) -> dict[str, Any]:
    path = _plan_dir(out) / PLAN_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: run prepare_batch for {out} first") from None


def _open_batch(out: Path) -> _Batch:
    meta = _read_batch(out)
    m = meta["model"]
    loaded = _cached_model(Path(meta["model_dir"]), m["sha256"], meta["device"])
    handle = ModelHandle(loaded, m["uri"], m["name"], m["version"], m["sha256"], m.get("run_id"))
    options = PredictOptions(**meta["options"])
    return _Batch(
        out=out,
        source=Path(meta["source"]),
        meta=meta,
        handle=handle,
        options=options,
        device=next(loaded.model.parameters()).device,
        limits=IngestLimits(**meta["limits"]),
        settings=meta["settings"],
    )


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` across threads and processes (flock: released on death).

    Each call opens the file itself, so two threads of one process exclude each other too.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _case_lock(out: Path, case_id: str):
    """An exclusive lock on one case (OUT/.plan/locks/<case_id>.lock)."""
    return _exclusive(_plan_dir(out) / "locks" / f"{case_id}.lock")


def _plan_lock(out: Path):
    """An exclusive lock on staging the model and writing the plan (OUT/.plan/locks/prepare.lock):
    two prepare_batch calls on one OUT run one after the other, the second finding the model staged."""
    return _exclusive(_plan_dir(out) / "locks" / PREPARE_LOCK)


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
    batch = _open_batch(out)
    case = batch.case(case_id)
    with _case_lock(out, case_id):
        marker = _done_marker(out, case, batch.settings)
        if marker is not None:
            return _case_summary(CaseResult(**marker["result"]), "skipped")
        return _case_summary(_run_case(case, Pending.run(lambda: _load(batch, case)), batch))


def _label_list(meta: dict[str, Any]) -> list[str]:
    """The model's label names without background, in label order (the tables' columns)."""
    names = {int(k): v for k, v in meta["model"]["label_names"].items()}
    return [names[v] for v in sorted(names) if v != 0]


def _collect_results(
    out: Path, meta: dict[str, Any]
) -> tuple[list[PredictCase], list[CaseResult], list[dict[str, Any]]]:
    """(planned cases, every result row, quarantine records) from the plan and the done-markers."""
    todo = set(meta["todo"])
    quarantine: list[dict[str, Any]] = list(meta["quarantine"])
    results: list[CaseResult] = []
    cases: list[PredictCase] = []
    for case_id in meta["cases"]:
        case = _case_from_json(
            json.loads((_plan_dir(out) / "cases" / f"{case_id}.json").read_text(encoding="utf-8"))
        )
        cases.append(case)
        marker = _done_marker(out, case, meta["settings"])
        failed_path = _plan_dir(out) / "failed" / f"{case_id}.json"
        if marker is not None:
            results.append(CaseResult(**{**marker["result"], "skipped": case_id not in todo}))
            continue
        if failed_path.is_file():
            record = json.loads(failed_path.read_text(encoding="utf-8"))
        else:
            record = {
                "status": "failed",
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
    from pipeline import export

    out = Path(out).resolve()
    meta = _read_batch(out)
    m = meta["model"]
    cases, results, quarantine = _collect_results(out, meta)
    summary = PredictSummary(out=out, results=results, ignored=meta["ignored"])
    label_list = _label_list(meta)
    export.write_results_csv(out / "results.csv", results, label_list, m["name"], m["version"], case_root=out)
    export.write_jsonl(out / "quarantine.jsonl", quarantine)
    model_dir = Path(meta["model_dir"])
    read = {n: json.loads((model_dir / f"{n}.json").read_text(encoding="utf-8")) for n in ("plan", "config")}
    manifest = {
        "model": dict(m),
        "code_version": code_version(),
        "plan": read["plan"],
        "config": read["config"],
        "options": meta["options"] | {"device": meta["device"]},
        "inputs": {c.case_id: {"source": c.source, "inputs_sha256": c.inputs_sha256} for c in cases},
        "counts": {
            "cases": len(results),
            "ok": summary.count("ok"),
            "processed": summary.processed,
            "skipped": summary.skipped,
            "quarantined": summary.count("quarantined"),
            "failed": summary.count("failed"),
            "ignored_files": meta["ignored"],
        },
        "exit_code": summary.exit_code,
        "started": meta["started"],
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    export.write_json(out / "run_manifest.json", manifest)
    export.write_report_html(out / "report.html", results, label_list, manifest, out)
    log.info(
        "predict: %d ok (%d skipped), %d quarantined, %d failed",
        summary.count("ok"),
        summary.skipped,
        summary.count("quarantined"),
        summary.count("failed"),
    )
    return summary


# ------------------------------------------------------------------------------------------
# The batch's record in MLflow (optional step 4, after finalize_batch)

TRACKING_EXPERIMENT = "batch-inference"
_METRIC_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")  # what MLflow accepts in a metric name


@dataclass(frozen=True)
class BatchTracking:
    """Where `track_batch` recorded a batch in MLflow, or why it could not (no credentials in it)."""

    experiment: str
    tracking_uri: str  # credentials removed
    run_id: str | None = None
    run_url: str | None = None  # the run's page, for an http(s) tracking server
    error: str | None = None  # set when tracking failed; the batch's outputs stand regardless

    @property
    def ok(self) -> bool:
        return self.error is None and self.run_id is not None

    def to_json(self) -> dict[str, Any]:
        """The "tracking" entry of run_manifest.json: status "logged" or "failed", and the fields."""
        return {"status": "logged" if self.ok else "failed", **dataclasses.asdict(self)}


def track_batch(
    out: str | Path, *, experiment: str = TRACKING_EXPERIMENT, tracking_uri: str | None = None
) -> BatchTracking:
    """Record a finalized batch as one MLflow run; the outcome becomes run_manifest.json's "tracking".

    Params: the model (name, version, weights sha256, its training run, code version) and the
    options. Tags: model_name, model_version and weights_sha256, so a model version's batches are
    found with `tags.model_name = 'NAME' and tags.model_version = 'N'`. Metrics: the counts and
    each label's mean volume (mL) over the ok cases. Artifacts: results.csv and report.html
    without their source column (pseudonymous case IDs only; no source path leaves OUT).
    `tracking_uri` defaults to the work directory's store ($MLFLOW_TRACKING_URI or SQLite).

    Never raises for a tracking failure (server down, refused credentials): the error is
    returned, noted in the manifest and logged as a warning, and a run that was opened is ended,
    not left RUNNING. Raises FileNotFoundError when the batch was not finalized.
    """
    from pipeline import export, tracking
    from pipeline.config import Workdir

    out = Path(out).resolve()
    meta = _read_batch(out)
    manifest_path = out / "run_manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{manifest_path} does not exist: run finalize_batch for {out} first"
        ) from None
    _, results, _ = _collect_results(out, meta)
    label_list = _label_list(meta)
    m = manifest["model"]
    params = {
        "model": {
            "name": m["name"],
            "version": m["version"],
            "weights_sha256": m["sha256"],
            "run_id": m.get("run_id") or "",
            "code_version": m.get("code_version") or "",
        },
        "options": manifest["options"],
        "write_seg": meta["write_seg"],
        "write_qc": meta["write_qc"],
        "output_version": meta["output_version"],
        "options_sha256": meta["options_sha256"],
    }
    metrics = {k: float(v) for k, v in manifest["counts"].items()}
    ok = [r for r in results if r.status == "ok"]
    for name in label_list:
        volumes = [r.volumes_ml[name] for r in ok if name in r.volumes_ml]
        if volumes:
            metrics[f"mean_volume_ml.{_METRIC_UNSAFE.sub('_', name)}"] = float(np.mean(volumes))
    tags = {
        tracking.TAG_MODEL_NAME: m["name"],
        tracking.TAG_MODEL_VERSION: m["version"],
        tracking.TAG_WEIGHTS_SHA: m["sha256"],
    }
    uri = tracking_uri or Workdir.resolve().mlflow_tracking_uri()
    with tracking.Tracker(
        experiment=experiment, run_name=f"{m['name']} v{m['version']}", tracking_uri=uri, tags=tags
    ) as tracker:
        tracker.log_params(params)
        tracker.log_metrics(metrics)
        if tracker.active:
            with tempfile.TemporaryDirectory(prefix="unet-batch-") as tmp:
                table = export.write_results_csv(
                    Path(tmp, "results.csv"),
                    results,
                    label_list,
                    m["name"],
                    m["version"],
                    with_sources=False,
                    case_root=out,
                )
                page = export.write_report_html(
                    Path(tmp, "report.html"), results, label_list, manifest, out, with_sources=False
                )
                tracker.log_artifacts([table, page])
    record = BatchTracking(
        experiment=experiment,
        tracking_uri=tracking.redact(uri),
        run_id=tracker.run_id,
        run_url=tracker.run_url(),
        error=tracker.tracking_error,
    )
    manifest["tracking"] = record.to_json()
    export.write_json(manifest_path, manifest)
    if record.ok:
        log.info("batch recorded in MLflow: experiment %s, run %s", experiment, record.run_id)
    else:
        log.warning(
            "the batch is NOT recorded in MLflow (its outputs are complete; rerun the batch when "
            "the server is back: finished cases are not redone): %s",
            record.error,
        )
    return record


def predict(
    source: str | Path,
    model: str | Path | ModelHandle,
    out: str | Path,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    postprocess_masks: bool | None = None,
    secret_file: str | Path | None = None,
    limits: IngestLimits | None = None,
    write_seg: bool = True,
    write_qc: bool = True,
    progress: bool = False,
    on_case_done: Callable[[CaseResult], None] | None = None,
    memory_budget: int | None = None,
) -> PredictSummary:
    """Predict every case under `source` with `model` into `out`; see the module docstring.

    `batch_size` and `postprocess_masks` default to the model's training config (infer section);
    `postprocess_masks=True` turns on both largest-component and hole filling, False turns both off.
    Raises ModelLoadError (before any case runs), FileNotFoundError or ValueError for bad arguments;
    never for a bad case. The three steps in one process, the next case loading in the background
    while the planned peaks of both fit `memory_budget` bytes (default: `limits.memory_budget`, else
    half the memory available, `predict_memory.default_budget`).
    """
    plan = prepare_batch(
        source,
        model,
        out,
        device=device,
        batch_size=batch_size,
        postprocess_masks=postprocess_masks,
        secret_file=secret_file,
        limits=limits,
        write_seg=write_seg,
        write_qc=write_qc,
        progress=progress,
    )
    out = Path(out).resolve()
    if plan.todo:
        batch = _open_batch(out)
        todo = [batch.case(case_id) for case_id in plan.todo]
        budget = memory_budget if memory_budget is not None else batch.limits.memory_budget
        if budget is None:
            budget = default_budget()
        bar = tqdm(total=len(todo), desc="predicting", unit="case", disable=not progress)
        cost = lambda c: plan.case_bytes.get(c.case_id, 0)  # noqa: E731
        for case, pending in prefetch(todo, lambda c: _load(batch, c), cost=cost, budget=budget):
            with _case_lock(out, case.case_id):
                result = _run_case(case, pending, batch)
            del pending
            if on_case_done is not None:
                on_case_done(result)
            bar.update(1)
        bar.close()
    return finalize_batch(out)


def _case_size(case: PredictCase, source: Path) -> tuple[int, tuple[float, ...]]:
    """(voxels, spacing in mm) of a planned case from its headers; (0, ()) when unknown."""
    import nibabel as nib

    job = case.job
    try:
        if job is not None and job.group is not None:
            spacing = np.linalg.norm(job.group.affine[:3, :3], axis=0)
            return int(np.prod(job.group.shape)), tuple(float(s) for s in spacing)
        if case.image_path is not None:
            path = case.image_path
        elif job is not None and job.nifti is not None:
            path = source / job.nifti.image
        else:
            return 0, ()
        header = nib.load(path).header  # the header only: no voxel is read
        shape = header.get_data_shape()[:3]
        return int(np.prod(shape)), tuple(float(z) for z in header.get_zooms()[:3])
    except (OSError, ValueError, TypeError, nib.filebasedimages.ImageFileError):
        return 0, ()  # an unreadable header: loading the case will say why


@dataclass
class _Loaded:
    case: PredictCase  # with its job rebuilt
    volume: Volume
    slices: torch.Tensor
    info: Any
    seconds: float


def _load(batch: _Batch, case: PredictCase) -> _Loaded:
    """Read and preprocess one case; a refused input raises InputRejected, any other failure
    CaseFailed with READ_FAILED (reading) or PREDICTION_FAILED (preprocessing)."""
    from pipeline.planning.transforms import preprocess_volume

    t0 = time.perf_counter()
    with step(Reason.READ_FAILED, "reading the image"):
        case = batch.job_for(case)
        volume = load_image(case, batch.source, batch.limits)
    with step(Reason.PREDICTION_FAILED, "preprocessing"):
        slices, info = preprocess_volume(volume, _plan(batch.handle))
    return _Loaded(case, volume, slices, info, time.perf_counter() - t0)


def _record_failure(out: Path, case_id: str, record: dict[str, Any] | None) -> None:
    path = _plan_dir(out) / "failed" / f"{case_id}.json"
    if record is None:
        path.unlink(missing_ok=True)
        return
    with atomic_open(path) as fh:
        json.dump(record, fh, default=str)


def _write_outputs(batch: _Batch, case: PredictCase, loaded: _Loaded, mask: np.ndarray) -> list[str]:
    """Write the case's outputs, each in its own step; returns the names written."""
    from pipeline import export

    handle, names = batch.handle, batch.handle.label_names
    case_dir = batch.out / case.case_id
    with step(Reason.OUTPUT_WRITE_FAILED, "writing the NIfTI mask"):
        _clear_case(case_dir)
        export.write_mask_nifti(case_dir / MASK_FILE, mask, loaded.volume.affine)
    outputs = [MASK_FILE]
    job = case.job
    if batch.meta["write_seg"] and case.kind == "dicom" and job is not None and job.group is not None:
        with step(Reason.SEG_WRITE_FAILED, "writing the DICOM SEG"):
            export.write_dicom_seg(
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
            export.write_qc_png(
                case_dir / QC_FILE,
                loaded.volume.data,
                mask,
                names,
                affine=loaded.volume.affine,
                modality=loaded.volume.modality,
                title=case.case_id,
            )
        outputs.append(QC_FILE)
    return outputs


def _run_case(case: PredictCase, pending: Pending, batch: _Batch) -> CaseResult:
    """Run one case to its done-marker, step by step; a bad input becomes a quarantined result,
    a failure in any step a failed one with the step's reason, recorded in OUT/.plan/failed/ for
    `finalize_batch` (and the case's partial outputs removed). Never raises for the case."""
    t0 = time.perf_counter()
    try:
        loaded: _Loaded = pending.take()
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
        outputs = _write_outputs(batch, case, loaded, mask)
        volumes_ml, voxels = _volumes(mask, loaded.volume.spacing, batch.handle.label_names)
        result = CaseResult(
            case.case_id,
            case.source,
            "ok",
            volumes_ml=volumes_ml,
            voxels=voxels,
            seconds=round(loaded.seconds + time.perf_counter() - t0, 3),
        )
        with step(Reason.RECORD_WRITE_FAILED, "writing the done-marker"):
            _record_failure(batch.out, case.case_id, None)
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
    except InputRejected as err:
        err.details.setdefault("files", [case.source])
        record = {"status": "quarantined", "case_id": case.case_id, **err.to_record()}
        log.warning("case %s quarantined: %s", case.case_id, err.reason.value)
        result = CaseResult(
            case.case_id, case.source, "quarantined", err.reason.value, message=clip_line(err.message)
        )
    except Exception as exc:  # noqa: BLE001 - one case's failure, at any step, is that case's record
        failed = exc if isinstance(exc, CaseFailed) else CaseFailed(Reason.PREDICTION_FAILED, one_line(exc))
        record = {
            "status": "failed",
            "case_id": case.case_id,
            "path": case.source,
            "reason": failed.reason.value,
            "message": failed.message,
        }
        # The type only: the message may quote a file name, and logs carry no identifiers.
        cause = type(exc.__cause__ or exc).__name__
        log.error("case %s failed: %s (%s)", case.case_id, failed.reason.value, cause)
        result = CaseResult(case.case_id, case.source, "failed", failed.reason.value, message=failed.message)
    # No mask of a case that is not done; when the case folder itself is the problem (a file in
    # its place) there is nothing to clear.
    with contextlib.suppress(OSError):
        _clear_case(batch.out / case.case_id)
    try:
        _record_failure(batch.out, case.case_id, record)
    except OSError as exc:  # finalize_batch then lists the case as NO_RESULT
        log.error("case %s: its failure record could not be written (%s)", case.case_id, type(exc).__name__)
    return result
