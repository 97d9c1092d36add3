"""Batch inference: a registered model to label masks in each source's own geometry.

    predict(SOURCE, MODEL, OUT) writes, per case (OUT/<case_id>/, pseudonymous folder names):
        seg.nii.gz   uint8 labels, the source image's exact shape and affine (qform == sform)
        seg.dcm      a DICOM SEG referencing the source instances (DICOM inputs only)
        qc.png       a montage of slices with the mask overlaid
        done.json    the done-marker, written last: input hash, model name/version/sha256, result
    and, for the batch: results.csv, quarantine.jsonl, run_manifest.json and report.html.

The model is loaded and verified (sha256, no pickle) once, before any case runs. SOURCE goes
through the ingest rules (`CasePlanner`: DICOM series, NIfTI, MSD datasets; MSD datasets predict
their imagesTs) or is a staging folder (its manifest). Each case is preprocessed with the model's
own plan, its slices run through the network in batches, argmax'd (uint8 labels, never a whole
volume of float probabilities), optionally post-processed per label, and resampled to the
native grid. A background thread loads and preprocesses the next case while the current one
computes.

Reliability: every output is written atomically and the done-marker last, so a crash leaves a
case without a marker and the rerun redoes it; a case whose input hash, model sha256 or
post-processing changed is redone; one bad case is quarantined (bad input) or failed
(anything else) and the batch goes on. Exit codes: see `PredictSummary.exit_code`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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
from pipeline.ingest import CaseJob, CasePlanner, IngestLimits, discover, load_case, load_or_create_secret
from pipeline.io.atomic import atomic_open
from pipeline.io.nifti import load_nifti
from pipeline.io.volume import Volume
from pipeline.model_store import LoadedModel, code_version
from pipeline.runtime import autocast, configure_threads, prepare_model, resolve_precision, to_input

log = logging.getLogger(__name__)

# Bump when what a case's outputs contain changes, so reruns redo cases done by older code.
OUTPUT_VERSION = "1"
DONE_FILE = "done.json"
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
    version: str  # registry version, alias, or "local" for a folder
    sha256: str  # of the weights, checked on load

    @property
    def label_names(self) -> dict[int, str]:
        return self.loaded.label_names


def _name_and_version(uri: str, loaded: LoadedModel) -> tuple[str, str]:
    """models:/NAME/VERSION -> (NAME, VERSION); models:/NAME@ALIAS -> (NAME, "@ALIAS"); folders by name.

    An alias is not resolved to its version number here (that needs an MLflow client call in
    pipeline.tracking); the weights sha256 identifies the model exactly in every output.
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


def load_model(uri: str | Path, device: str = "auto") -> ModelHandle:
    """Load and verify the model at `uri` (models:/..., runs:/..., or a folder) on `device`.

    Raises ModelLoadError naming the model when it is missing, tampered with or partial.
    """
    from pipeline import tracking  # imports MLflow: only when a model is actually loaded
    from pipeline.runtime import resolve_device

    uri = str(uri)
    try:
        dev = resolve_device(device)
        loaded = tracking.load_registered(uri, device=str(dev.type))
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"refusing to predict with the model {uri}: {exc}") from exc
    name, version = _name_and_version(uri, loaded)
    return ModelHandle(loaded=loaded, uri=uri, name=name, version=version, sha256=loaded.sha256)


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
    planner = CasePlanner(source, secret, limits)
    planner.plan(discover(source), progress)
    cases = []
    for job in planner.jobs:
        if job.kind == "dicom":
            assert job.group is not None  # CasePlanner always sets it for DICOM jobs
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
    return cases, planner.rejected


def _staging_cases(staging: Path) -> list[PredictCase]:
    from pipeline.ingest import read_manifest

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


def load_image(case: PredictCase, source: Path, limits: IngestLimits) -> Volume:
    """Decode one case's image (raises InputRejected for a bad input)."""
    if case.kind == "staging":
        assert case.image_path is not None
        volume = load_nifti(
            case.image_path, case.source, max_voxels=limits.max_voxels, max_bytes=limits.max_bytes
        )
        volume.modality = case.modality
        return volume
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

    def key(self) -> dict[str, Any]:
        """What changes the mask (part of the done-marker)."""
        return {"largest_component": self.largest_component, "fill_holes": self.fill_holes}


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

    Only one batch of logits exists at a time: memory is bounded by the batch, not the volume.
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


def postprocess(labels: np.ndarray, *, largest_component: bool, fill_holes: bool) -> np.ndarray:
    """Per label value: keep its largest connected component (26-connected) and/or fill its holes.

    Holes are filled with the label only where they are background, so a lesion inside an organ
    keeps its own label.
    """
    if not (largest_component or fill_holes):
        return labels
    labels = labels.copy()
    structure = np.ones((3, 3, 3), bool)
    for value in (int(v) for v in np.unique(labels) if v != 0):
        mask = labels == value
        if largest_component:
            components, n = ndimage.label(mask, structure=structure)
            if n > 1:
                sizes = np.bincount(components.ravel())
                sizes[0] = 0
                keep = components == int(np.argmax(sizes))
                labels[mask & ~keep] = 0
                mask = keep
        if fill_holes:
            filled = ndimage.binary_fill_holes(mask)
            labels[filled & (labels == 0)] = value
    return labels


def predict_volume(
    handle: ModelHandle,
    volume: Volume,
    options: PredictOptions,
    *,
    device: torch.device,
    prepared: tuple[torch.Tensor, Any] | None = None,
) -> np.ndarray:
    """A uint8 label map on `volume`'s own grid (same shape; its affine applies)."""
    from pipeline.transforms import preprocess_volume, restore_labels

    slices, info = prepared or preprocess_volume(volume, _plan(handle))
    labels = segment_slices(
        handle.loaded.model,
        slices,
        device=device,
        batch_size=options.batch_size,
        amp_dtype=resolve_precision(options.precision, device),
        channels_last=options.channels_last,
    )
    mask = restore_labels(labels, info)
    if mask.shape != volume.shape:  # restore_labels' contract; checked because outputs rely on it
        raise RuntimeError(f"restored mask shape {mask.shape} != image shape {volume.shape}")
    return postprocess(mask, largest_component=options.largest_component, fill_holes=options.fill_holes)


def _plan(handle: ModelHandle):
    from pipeline.plan import Plan

    return Plan.from_dict(handle.loaded.plan)


# ------------------------------------------------------------------------------------------
# The batch


@dataclass
class CaseResult:
    """One row of results.csv."""

    case_id: str
    source: str
    status: str  # ok, quarantined, failed
    reason: str = ""
    volumes_ml: dict[str, float] = field(default_factory=dict)  # label name -> mL
    voxels: dict[str, int] = field(default_factory=dict)  # label name -> voxel count
    seconds: float = 0.0
    skipped: bool = False  # done by an earlier run with the same input and model

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


def _done_marker(out: Path, case: PredictCase, handle: ModelHandle, options: PredictOptions) -> dict | None:
    """The earlier run's result for this case if its input, model and options are unchanged."""
    path = out / case.case_id / DONE_FILE
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    expected = _marker_key(case, handle, options)
    if any(marker.get(k) != v for k, v in expected.items()):
        return None
    if not all((out / case.case_id / name).is_file() for name in marker.get("outputs", [])):
        return None
    return marker


def _marker_key(case: PredictCase, handle: ModelHandle, options: PredictOptions) -> dict[str, Any]:
    return {
        "output_version": OUTPUT_VERSION,
        "inputs_sha256": case.inputs_sha256,
        "model_sha256": handle.sha256,
        "model_version": handle.version,
        "postprocess": options.key(),
    }


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


@dataclass
class _Loaded:
    volume: Volume
    slices: torch.Tensor
    info: Any
    seconds: float


def _resolve_paths(source: str | Path, out: str | Path) -> tuple[Path, Path]:
    source, out = Path(source).resolve(), Path(out).resolve()
    if not source.exists():
        raise FileNotFoundError(f"predict source {source} does not exist")
    if out == source or (source.is_dir() and source in out.parents):
        raise ValueError(f"the output folder {out} must not be inside the source {source}")
    return source, out


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
) -> PredictSummary:
    """Predict every case under `source` with `model` into `out`; see the module docstring.

    `batch_size` and `postprocess_masks` default to the model's training config (infer section);
    `postprocess_masks=True` turns on both largest-component and hole filling, False turns both off.
    Raises ModelLoadError (before any case runs), FileNotFoundError or ValueError for bad arguments;
    never for a bad case.
    """
    from pipeline import export
    from pipeline.config import PipelineConfig
    from pipeline.ingest import _secret  # the same site secret, and so the same case IDs, as ingest

    started = datetime.now(UTC)
    source, out = _resolve_paths(source, out)
    handle = model if isinstance(model, ModelHandle) else load_model(model, device)
    dev = next(handle.loaded.model.parameters()).device
    configure_threads()
    net = prepare_model(handle.loaded.model, dev, channels_last=True).eval()
    handle = dataclasses.replace(handle, loaded=dataclasses.replace(handle.loaded, model=net))
    try:
        infer = PipelineConfig.from_dict(handle.loaded.config or {}).infer
    except ValueError:  # a config from another code version: its infer section is advisory only
        log.warning("the model's training config does not validate here; using default infer options")
        infer = PipelineConfig().infer
    options = PredictOptions(
        batch_size=batch_size or infer.batch_size,
        largest_component=infer.largest_component if postprocess_masks is None else postprocess_masks,
        fill_holes=infer.fill_holes if postprocess_masks is None else postprocess_masks,
    )
    limits = limits or IngestLimits()
    plan = _plan(handle)

    secret = load_or_create_secret(Path(secret_file)) if secret_file else _secret(None)
    if source.is_file():  # one NIfTI file: plan its folder, keep that file
        root = source.parent
        cases, rejected = plan_cases(root, secret, limits, progress)
        rel = source.name
        cases = [c for c in cases if c.source == rel]
        rejected = [e for e in rejected if e.path == rel]
        source = root
    else:
        cases, rejected = plan_cases(source, secret, limits, progress)
    out.mkdir(parents=True, exist_ok=True)

    names = handle.label_names
    results: list[CaseResult] = []
    quarantine: list[dict[str, Any]] = []
    ignored = 0
    for err in rejected:
        files = err.details.get("files") or [err.path]
        if err.reason in IGNORED_REASONS:
            ignored += 1
            quarantine.append({"status": "ignored", **err.to_record()})
            continue
        quarantine.append({"status": "quarantined", **err.to_record()})
        results.append(
            CaseResult(
                "", _common_folder(files) if len(files) > 1 else err.path, "quarantined", err.reason.value
            )
        )

    todo: list[PredictCase] = []
    by_id: dict[str, CaseResult] = {}
    for case in cases:
        marker = _done_marker(out, case, handle, options)
        if marker is not None:
            result = CaseResult(**{**marker["result"], "skipped": True})
            by_id[case.case_id] = result
        else:
            todo.append(case)
    log.info("predict: %d cases, %d already done, %d to run", len(cases), len(by_id), len(todo))

    def load(case: PredictCase) -> _Loaded:
        from pipeline.transforms import preprocess_volume

        t0 = time.perf_counter()
        volume = load_image(case, source, limits)
        slices, info = preprocess_volume(volume, plan)
        return _Loaded(volume, slices, info, time.perf_counter() - t0)

    bar = tqdm(total=len(todo), desc="predicting", unit="case", disable=not progress or not todo)
    for case, future in _prefetch(todo, load):
        result = _run_case(case, future, handle, options, out, dev, names, write_seg, write_qc, quarantine)
        by_id[case.case_id] = result
        if on_case_done is not None:
            on_case_done(result)
        bar.update(1)
    bar.close()
    results = [by_id[c.case_id] for c in cases] + results

    summary = PredictSummary(out=out, results=results, ignored=ignored)
    label_list = [names[v] for v in sorted(names) if v != 0]
    export.write_results_csv(out / "results.csv", results, label_list, handle.name, handle.version)
    export.write_jsonl(out / "quarantine.jsonl", quarantine)
    manifest = {
        "model": {
            "uri": handle.uri,
            "name": handle.name,
            "version": handle.version,
            "sha256": handle.sha256,
            "code_version": handle.loaded.metadata.get("code_version"),
            "label_names": {str(k): v for k, v in names.items()},
        },
        "code_version": code_version(),
        "plan": handle.loaded.plan,
        "config": handle.loaded.config,
        "options": dataclasses.asdict(options) | {"device": str(dev)},
        "inputs": {c.case_id: {"source": c.source, "inputs_sha256": c.inputs_sha256} for c in cases},
        "counts": {
            "cases": len(results),
            "ok": summary.count("ok"),
            "processed": summary.processed,
            "skipped": summary.skipped,
            "quarantined": summary.count("quarantined"),
            "failed": summary.count("failed"),
            "ignored_files": ignored,
        },
        "exit_code": summary.exit_code,
        "started": started.isoformat(timespec="seconds"),
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


def _prefetch(
    cases: list[PredictCase], load: Callable[[PredictCase], _Loaded]
) -> Iterator[tuple[PredictCase, Future]]:
    """Yield (case, future of its loaded image) with the next case loading in the background."""
    if not cases:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict-load") as pool:
        future = pool.submit(load, cases[0])
        for i, case in enumerate(cases):
            current = future
            if i + 1 < len(cases):
                # Submitted before the current case computes: at most two cases in memory.
                future = pool.submit(load, cases[i + 1])
            yield case, current


def _run_case(
    case: PredictCase,
    future: Future,
    handle: ModelHandle,
    options: PredictOptions,
    out: Path,
    device: torch.device,
    names: dict[int, str],
    write_seg: bool,
    write_qc: bool,
    quarantine: list[dict[str, Any]],
) -> CaseResult:
    """Run one case to its done-marker; a bad case becomes a quarantined or failed result."""
    from pipeline import export

    case_dir = out / case.case_id
    _clear_case(case_dir)
    t0 = time.perf_counter()
    try:
        loaded: _Loaded = future.result()
        mask = predict_volume(
            handle, loaded.volume, options, device=device, prepared=(loaded.slices, loaded.info)
        )
        outputs = [MASK_FILE]
        export.write_mask_nifti(case_dir / MASK_FILE, mask, loaded.volume.affine)
        if write_seg and case.kind == "dicom" and case.job is not None and case.job.group is not None:
            export.write_dicom_seg(
                case_dir / SEG_FILE,
                mask,
                case.job.group,
                names,
                algorithm_name=handle.name,
                algorithm_version=handle.version,
                software_version=code_version(),
            )
            outputs.append(SEG_FILE)
        if write_qc:
            export.write_qc_png(case_dir / QC_FILE, loaded.volume.data, mask, names, title=case.case_id)
            outputs.append(QC_FILE)
        volumes_ml, voxels = _volumes(mask, loaded.volume.spacing, names)
        result = CaseResult(
            case.case_id,
            case.source,
            "ok",
            volumes_ml=volumes_ml,
            voxels=voxels,
            seconds=round(loaded.seconds + time.perf_counter() - t0, 3),
        )
        marker = {**_marker_key(case, handle, options), "outputs": outputs, "result": result.to_json()}
        marker["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        with atomic_open(case_dir / DONE_FILE) as fh:  # last: the case is done only now
            json.dump(marker, fh, indent=2)
        log.info("case %s: ok in %.2f s", case.case_id, result.seconds)
        return result
    except InputRejected as err:
        err.details.setdefault("files", [case.source])
        quarantine.append({"status": "quarantined", "case_id": case.case_id, **err.to_record()})
        log.warning("case %s quarantined: %s", case.case_id, err.reason.value)
        return CaseResult(case.case_id, case.source, "quarantined", err.reason.value)
    except (OSError, ValueError, RuntimeError, MemoryError, KeyError, IndexError, TypeError) as exc:
        # Not the input's fault as far as we know: keep the batch going, say what happened.
        quarantine.append(
            {
                "status": "failed",
                "case_id": case.case_id,
                "path": case.source,
                "reason": Reason.PREDICTION_FAILED.value,
                "message": f"prediction failed with {type(exc).__name__}: {exc}",
            }
        )
        log.error("case %s failed: %s", case.case_id, type(exc).__name__)
        return CaseResult(case.case_id, case.source, "failed", Reason.PREDICTION_FAILED.value)
