"""Ingest: hospital DICOM folders, NIfTI files and MSD datasets into a validated staging dataset.

    ingest(SOURCE, STAGING) writes
        STAGING/images/<case_id>.nii.gz      one geometrically coherent 3D volume per case
        STAGING/labels/<case_id>.nii.gz      its label map, when the source has one (SEG or NIfTI)
        STAGING/manifest.jsonl               one line per case: ids, geometry, sources, sha256
        STAGING/quarantine.jsonl             one line per rejected or ignored input, with its reason
        STAGING/ingest_report.json           counts: accepted + quarantined + ignored = discovered
        STAGING/dataset.json                 label names -> values (nnU-Net v2 style)

Case IDs are pseudonymous and stable: an HMAC of the series key (DICOM) or of the relative NIfTI
path, keyed by a site secret made on first use. Nothing derived from tag values reaches a path,
a log line or the report; the manifest is the one table that links case IDs to source paths.

Each case's record is written (atomically, after its outputs) to STAGING/.records/<case_id>.json,
so a crash loses nothing finished and a rerun skips cases whose inputs have not changed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pipeline.errors import IGNORED_REASONS, InputRejected, Reason
from pipeline.io.atomic import atomic_open, write_text
from pipeline.io.batchdir import resolve_secret, sha256_file
from pipeline.io.dicom import (
    DicomHeader,
    SeriesGroup,
    assemble_series,
    dicomdir_references,
    load_series,
    planned_series_bytes,
    read_header,
)
from pipeline.io.manifest import MANIFEST
from pipeline.io.msd import DATASET_JSON, MsdDataset, is_msd_dataset, read_msd_dataset
from pipeline.io.nifti import (
    NiftiCase,
    analyze_files,
    is_nifti,
    load_label,
    load_nifti,
    pair_nifti_files,
    planned_nifti_bytes,
    value_counts,
)
from pipeline.io.seg import read_seg_labels, seg_referenced_series_uid, segment_names
from pipeline.io.volume import Volume, save_nifti
from pipeline.io.walk import discover, printable, printable_record, screen
from pipeline.system import available_cores, memory_bytes

log = logging.getLogger(__name__)

# Bump when the conversion itself changes, so reruns redo cases converted by older code.
CONVERTER_VERSION = "2"  # 2: DICOM transfer syntax detected from the data when the meta lacks it
RECORDS_DIR = ".records"
PLAN_DIR = ".plan"


@dataclass(frozen=True)
class IngestLimits:
    """Bounds checked from headers before any voxel buffer is allocated."""

    max_pixels_per_file: int = 2**28  # DICOM Rows x Columns x frames (256 Mi pixels)
    max_voxels: int = 2**30  # voxels of a NIfTI volume or of a DICOM series' volume
    max_bytes: int = 8 * 2**30  # NIfTI decompressed bytes (bounds gzip bombs)
    # A DICOM series some of whose files were refused one by one: False refuses it
    # (SERIES_INCOMPLETE); True stages the rest, marked partial in the manifest and the report.
    accept_partial_series: bool = False
    # Stage NIfTI files whose qform_code and sform_code are both 0 (orientation unknown): off,
    # they are NO_ORIENTATION; on, they are staged with codes 0 and "orientation": "unknown".
    allow_no_orientation: bool = False
    # Bytes that concurrent conversions may hold together (None: no bound beyond `workers`).
    memory_budget: int | None = None

    @classmethod
    def for_budget(cls, budget_bytes: int, **overrides: Any) -> IngestLimits:
        """Limits under which one case at the limit fits `budget_bytes` (see `planned_peak_bytes`).

        A NIfTI volume is held as float32 at most (4 bytes a voxel): max_voxels is what fits
        (budget - fixed overhead) / (PEAK_FACTOR x 4), never above the historical 2**30.
        """
        usable = max(0, budget_bytes - FIXED_OVERHEAD_BYTES)
        voxels = int(min(2**30, usable // int(PEAK_FACTOR * 4)))
        if voxels < 2**20:
            raise ValueError(
                f"a memory budget of {budget_bytes / 2**30:.2f} GiB leaves room for volumes of "
                f"{voxels} voxels; give ingest at least {(FIXED_OVERHEAD_BYTES + 6 * 2**20) / 2**30:.2f} GiB"
            )
        fields = {
            "max_voxels": voxels,
            "max_bytes": voxels * 8,  # float64 voxels, streamed into float32
            "max_pixels_per_file": min(2**28, voxels),
            "memory_budget": int(budget_bytes),
        }
        return cls(**(fields | overrides))

    @classmethod
    def from_config(cls, section: Any, **overrides: Any) -> IngestLimits:
        """Limits from the config's `ingest` section (pipeline.config.IngestConfig)."""
        budget_gb = section.memory_budget_gb
        budget = int(budget_gb * 2**30) if budget_gb else default_memory_budget()
        return cls.for_budget(budget, **({"allow_no_orientation": section.allow_no_orientation} | overrides))


def ingest_limits(config: str | Path | None = None, **overrides: Any) -> IngestLimits:
    """The limits an ingest runs under, as the CLI and the ingest flow read them: the config's
    `ingest` section (memory budget, allow_no_orientation) and `data.accept_partial_series`;
    `overrides` (IngestLimits fields) win. Raises pipeline.config.ConfigError for a bad file."""
    from pipeline.config import load_config

    cfg = load_config(config)
    partial = {"accept_partial_series": cfg.data.accept_partial_series}
    return IngestLimits.from_config(cfg.ingest, **(partial | overrides))


def default_memory_budget() -> int:
    """75 % of the memory this process may use (the machine's, or its container's limit)."""
    return int(0.75 * memory_bytes())


# Peak resident memory of one ingest process: at most PEAK_FACTOR x its largest volume's decoded
# size (the voxels as held: float32 for float or scaled NIfTI) plus FIXED_OVERHEAD_BYTES (the
# interpreter, numpy, nibabel, pydicom, gzip and chunk buffers). Checked by the memory test in
# tests/pipeline/ingest/test_ingest.py. Measured with its label: 377 MiB for a 256 MiB float32 NIfTI
# at the limit (before streaming: 1008 MiB), 4.12 GiB for a 4 GiB one at 2**30 voxels (9.5 GB).
# DICOM (frames decoded into the one output array): 252 MiB for a 128 MiB int16 series at the
# limit, 641 MiB for a 512 MiB one (before: 369 and 1142 MiB, every decoded slice kept).
PEAK_FACTOR = 1.5
FIXED_OVERHEAD_BYTES = 256 * 2**20


def planned_peak_bytes(volume_bytes: int) -> int:
    """The memory one conversion of a case whose largest volume holds `volume_bytes` may need."""
    return int(PEAK_FACTOR * volume_bytes) + FIXED_OVERHEAD_BYTES


@dataclass
class IngestReport:
    """What happened to every discovered file, and to every case."""

    discovered: int = 0
    accepted: int = 0  # files that went into a case (images, SEGs, labels, dataset.json)
    quarantined: int = 0
    ignored: int = 0  # not inputs at all (reports, Thumbs.db, empty files, DICOMDIR)
    cases: int = 0
    cases_converted: int = 0
    cases_skipped: int = 0  # unchanged since the last run
    by_reason: dict[str, int] = field(default_factory=dict)
    # case_id -> what its series lacks (n_missing_files, missing_mm, message), for partial cases
    partial: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        return self.accepted + self.quarantined + self.ignored == self.discovered

    @property
    def clean(self) -> bool:
        """Nothing quarantined: every rejection, if any, is an ignored non-input (NOT_DICOM, ...)."""
        return self.quarantined == 0 and all(Reason(r) in IGNORED_REASONS for r in self.by_reason)


@dataclass
class CaseJob:
    """One planned case: everything a worker process needs to decode it, nothing identifying."""

    case_id: str
    kind: str  # "dicom" or "nifti"
    sources: list[str]  # relative paths of every input file of the case
    inputs_sha256: str
    group: SeriesGroup | None = None
    segs: list[str] = field(default_factory=list)
    nifti: NiftiCase | None = None
    allowed_labels: set[int] | None = None
    label_names: dict[int, str] = field(default_factory=dict)
    modality: str = "unknown"
    volume_bytes: int = 0  # in-memory size of its largest decoded volume, from the headers


# ------------------------------------------------------------------------------------------
# Pseudonyms


def case_id_for(key: str, secret: bytes) -> str:
    """Pseudonymous, stable case ID: 'case_' + 16 hex digits of HMAC-SHA256(secret, key)."""
    # surrogateescape: a file name that is not valid UTF-8 keys by its bytes (valid names: UTF-8).
    return "case_" + hmac.new(secret, key.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:16]


# ------------------------------------------------------------------------------------------
# Discovery


def _inputs_hash(
    root: Path, rels: Iterable[str], extra: str = "", known: Mapping[str, Future] | None = None
) -> str:
    """One hash over the relative paths and bytes of a case's inputs (order-independent).

    `known`: file digests already being computed (rel -> future of `sha256_file`)."""
    digest = hashlib.sha256(f"converter={CONVERTER_VERSION};{extra}".encode())
    for rel in sorted(rels):
        file_digest = known[rel].result() if known and rel in known else sha256_file(root / rel)
        digest.update(rel.encode("utf-8", "surrogateescape") + b"\0" + file_digest.encode("ascii"))
    return digest.hexdigest()


def _rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


# ------------------------------------------------------------------------------------------
# Planning: which files make which case


class CasePlanner:
    """Decides which discovered files make which case, and rejects the rest with reasons.

    Used by ingest and by predict (which validates its sources by the same rules):
        planner = CasePlanner(source, secret, limits); planner.plan(discover(source), progress)
        planner.jobs, planner.rejected
    """

    def __init__(self, source: Path, secret: bytes, limits: IngestLimits) -> None:
        self.source = source
        self.secret = secret
        self.limits = limits
        self.jobs: list[CaseJob] = []
        self.rejected: list[InputRejected] = []
        self.accepted: set[str] = set()
        self.label_names: dict[str, int] = {"background": 0}

    def reject(self, err: InputRejected) -> None:
        self.rejected.append(err)

    def plan(self, entries: list[Path], progress: bool) -> None:
        """Plan the cases of `discover`'s entries; every entry ends in a job or a rejection.

        Entries are screened first (`pipeline.io.walk.screen`: lstat only, nothing opened), so
        FIFOs, devices, broken links and links leaving the root never reach a reader.
        """
        files, rejected = screen(entries, self.source)
        for err in rejected:
            self.reject(err)
        msd_roots = sorted({p.parent for p in files if p.name == DATASET_JSON and is_msd_dataset(p.parent)})
        in_msd: set[Path] = set()
        for root in msd_roots:
            members = [p for p in files if root in p.parents and p not in in_msd]
            in_msd.update(members)
            self._plan_msd(root, members)
        rest = [p for p in files if p not in in_msd]
        analyze, rejected = analyze_files(rest, self.source)
        for err in rejected:
            self.reject(err)
        rest = [p for p in rest if p not in analyze]
        niftis = [p for p in rest if is_nifti(p)]
        others = [p for p in rest if not is_nifti(p)]
        if niftis:
            cases, rejected = pair_nifti_files(niftis, self.source)
            for err in rejected:
                self.reject(err)
            for case in cases:
                self._add_nifti_job(case, allowed=None, names={})
        if others:
            self._plan_dicom(others, progress)
            self._check_dicomdirs(others)

    def _check_dicomdirs(self, files: list[Path]) -> None:
        """A DICOMDIR listing files that are not in the source says so (MISSING_REFERENCED_FILE).

        Media copied off a CD often change case or lose the ISO 9660 ';1' version suffix, so a
        reference matches a present file case-insensitively, with or without the suffix.
        """
        dicomdirs = [e.path for e in self.rejected if e.reason == Reason.DICOMDIR]
        if not dicomdirs:
            return
        present = {self._media_key(_rel(p, self.source)) for p in files}
        for rel in dicomdirs:
            try:
                targets, rejected = dicomdir_references(self.source / rel, self.source)
            except InputRejected as err:
                self.reject(InputRejected(err.reason, err.path, err.message, {**err.details, "files": []}))
                continue
            for err in rejected:  # invalid or escaping File IDs: noted, the DICOMDIR stays ignored
                self.reject(InputRejected(err.reason, err.path, err.message, {**err.details, "files": []}))
            missing = [t for t in targets if self._media_key(_rel(t, self.source)) not in present]
            if missing:
                shown = [printable(_rel(t, self.source)) for t in missing]
                self.reject(
                    InputRejected(
                        Reason.MISSING_REFERENCED_FILE,
                        rel,
                        f"the DICOMDIR lists {len(targets)} files of which {len(missing)} are not in the "
                        f"source (e.g. {', '.join(shown[:3])}): the copy of the media is incomplete, and "
                        "series may be missing slices. Copy the whole media.",
                        {
                            "files": [],
                            "referenced": len(targets),
                            "missing": len(missing),
                            "examples": shown[:20],
                        },
                    )
                )

    @staticmethod
    def _media_key(rel: str) -> str:
        return "/".join(part.split(";")[0].rstrip(".") for part in rel.lower().split("/"))

    # -- NIfTI and MSD ------------------------------------------------------------------

    def _plan_msd(self, root: Path, files: list[Path]) -> None:
        rel_json = _rel(root / DATASET_JSON, self.source)
        try:
            dataset: MsdDataset = read_msd_dataset(root, source_root=self.source, files=files)
        except InputRejected as err:
            self.reject(err)
            for p in files:  # the dataset cannot be understood: none of its files is used
                if p.name != DATASET_JSON:
                    self.reject(
                        InputRejected(
                            err.reason, _rel(p, self.source), f"part of a dataset that {err.message}"
                        )
                    )
            return
        for err in dataset.rejected:
            self.reject(err)
        for err in dataset.missing:  # entries naming no file of the source: listed, no file claimed
            self.reject(InputRejected(err.reason, err.path, err.message, {**err.details, "files": []}))
        for note in dataset.notes:
            log.warning("%s: %s", printable(rel_json), note)
        names = {value: name for name, value in dataset.labels.items()}
        self.accepted.add(rel_json)
        used = {rel_json} | {e.path for e in dataset.rejected}
        for case in dataset.cases:
            used.update(case.channels)
            if case.label:
                used.add(case.label)
            self._add_nifti_job(case, allowed=dataset.allowed_labels, names=names)
        for p in files:  # files beside the dataset folders (README, licence): not inputs
            rel = _rel(p, self.source)
            if rel not in used:
                self.reject(InputRejected(Reason.NOT_DICOM, rel, "not part of the dataset's image folders"))

    def _add_nifti_job(self, case: NiftiCase, *, allowed: set[int] | None, names: dict[int, str]) -> None:
        sources = list(case.channels) + ([case.label] if case.label else [])
        if len(case.channels) > 1:
            for rel in sources:
                self.reject(
                    InputRejected(
                        Reason.UNSUPPORTED_DIMENSIONS,
                        rel,
                        f"multi-channel case ({len(case.channels)} channels); this release stages "
                        "single-channel images only: stage one channel per dataset",
                        {"channels": list(case.channels)},
                    )
                )
            return
        self._register_names(names)
        self.jobs.append(
            CaseJob(
                case_id=case_id_for(f"nifti:{case.key}", self.secret),
                kind="nifti",
                sources=sources,
                inputs_sha256=_inputs_hash(self.source, sources),
                nifti=case,
                allowed_labels=allowed,
                label_names={v: n for v, n in names.items() if v != 0},
                volume_bytes=max(planned_nifti_bytes(self.source / rel) for rel in sources),
            )
        )

    def _register_names(self, names: dict[int, str]) -> None:
        for value, name in sorted(names.items()):
            self.label_names.setdefault(name, value)

    # -- DICOM -----------------------------------------------------------------------------

    def _plan_dicom(self, files: list[Path], progress: bool) -> None:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher:
            self._plan_dicom_files(files, progress, hasher)

    def _plan_dicom_files(self, files: list[Path], progress: bool, hasher: ThreadPoolExecutor) -> None:
        headers: list[DicomHeader] = []
        # Each accepted file's bytes are hashed in a thread while the next headers are parsed
        # (hashlib releases the GIL): the input hashes cost no extra time on two cores.
        digests: dict[str, Future] = {}
        for path in tqdm(files, desc="reading headers", unit="file", disable=not progress, leave=False):
            try:
                # keep_damaged: a cut file still names its instance and series, so assembly can
                # use an intact copy of it or say which part of its series is missing.
                header = read_header(path, self.source, self.limits.max_pixels_per_file, keep_damaged=True)
            except InputRejected as err:
                self.reject(err)
                continue
            if header.damage is not None and header.is_segmentation:
                self.reject(header.damage)
                continue
            headers.append(header)
            if header.damage is None:
                digests[header.rel] = hasher.submit(sha256_file, header.path)
        images = [h for h in headers if not h.is_segmentation]
        segs_by_series: dict[str, list[DicomHeader]] = defaultdict(list)
        for h in headers:
            if h.is_segmentation:
                try:
                    segs_by_series[seg_referenced_series_uid(h.path, h.rel)].append(h)
                except InputRejected as err:
                    self.reject(err)
        groups, rejected = assemble_series(images, accept_partial=self.limits.accept_partial_series)
        for err in rejected:
            self.reject(err)
        matched: set[str] = set()
        for group in groups:
            series_uid = group.headers[0].series_uid
            segs = [s.rel for s in segs_by_series.get(series_uid, [])]
            sources = [h.rel for h in group.headers] + segs
            self.jobs.append(
                CaseJob(
                    case_id=case_id_for(f"dicom:{group.key}", self.secret),
                    kind="dicom",
                    sources=sources,
                    # What a partial series lacks is part of its inputs: a change reconverts it.
                    inputs_sha256=_inputs_hash(
                        self.source,
                        sources,
                        extra=json.dumps(group.partial, sort_keys=True) if group.partial else "",
                        known=digests,
                    ),
                    group=group,
                    segs=segs,
                    modality=group.modality,
                    volume_bytes=planned_series_bytes(group),
                )
            )
            matched.update(segs)
        for series_segs in segs_by_series.values():
            for seg in series_segs:
                if seg.rel not in matched:
                    self.reject(
                        InputRejected(
                            Reason.MISSING_LABEL_SOURCE,
                            seg.rel,
                            "a DICOM SEG whose referenced series is not among the accepted series "
                            "(absent from the source, or quarantined: see its own line)",
                        )
                    )


# ------------------------------------------------------------------------------------------
# Conversion (runs in worker processes)


def _remap_labels(label: Volume, names: dict[int, str], table: dict[str, int]) -> Volume:
    """Renumber a label map's values so that equal names get equal values across cases."""
    import numpy as np

    lut = np.arange(max(256, int(label.data.max()) + 1), dtype=np.int64)
    for value, name in names.items():
        lut[value] = table[name]
    if all(lut[v] == v for v in names):
        return label
    data = lut[label.data].astype(label.data.dtype)
    return Volume(data, label.affine, "SEG", label.meta)


def _seg_label(job: CaseJob, source: Path, grid: Volume, table: dict[str, int] | None) -> Volume | None:
    """The label Volume of a DICOM case's SEGs on the image's grid (None without SEGs).

    Only the image's shape, affine and modality are used: `grid` may be a stand-in without voxels.
    """
    label: Volume | None = None
    for rel in job.segs:
        seg_label, names = read_seg_labels(source / rel, rel, job.group.headers, grid)  # type: ignore[union-attr]
        if table is not None:
            seg_label = _remap_labels(seg_label, names, table)
        if label is None:
            label = seg_label
        else:  # several SEGs for one series: later segments paint over earlier ones
            label.data[seg_label.data > 0] = seg_label.data[seg_label.data > 0]
    return label


def _stand_in(image: Volume) -> Volume:
    """The image's grid, dtype and facts with a zero-byte stand-in for its voxels."""
    return Volume(
        np.broadcast_to(image.data.dtype.type(0), image.shape), image.affine, image.modality, image.meta
    )


def load_case(
    job: CaseJob, source: Path, limits: IngestLimits, table: dict[str, int] | None = None
) -> tuple[Volume, Volume | None]:
    """Decode one planned case: its image Volume and, when the source has one, its label Volume.

    `table` maps label names to values across cases (DICOM SEG segment numbers are renumbered by
    name); without it, SEG segment numbers are kept. Raises InputRejected for a bad input.
    """
    label: Volume | None = None
    if job.kind == "dicom":
        if job.group is None:
            raise ValueError(f"case {job.case_id}: a DICOM job without its series group")
        image = load_series(job.group, max_voxels=limits.max_voxels)
        return image, _seg_label(job, source, image, table)
    if job.nifti is None:
        raise ValueError(f"case {job.case_id}: a NIfTI job without its files")
    image = load_nifti(
        source / job.nifti.image,
        job.nifti.image,
        max_voxels=limits.max_voxels,
        max_bytes=limits.max_bytes,
        allow_no_orientation=limits.allow_no_orientation,
    )
    if job.nifti.label:
        label = load_label(
            source / job.nifti.label,
            job.nifti.label,
            image,
            allowed_labels=job.allowed_labels,
            max_voxels=limits.max_voxels,
            max_bytes=limits.max_bytes,
            allow_no_orientation=limits.allow_no_orientation,
        )
    return image, label


def _load_and_save(job: CaseJob, source: Path, staging: Path, limits: IngestLimits, table: dict[str, int]):
    """Decode the case and write its NIfTI outputs; returns (image geometry Volume, label values).

    A case holds one volume at a time: the image is written and released before its label is
    read (the label needs only the image's grid), so the peak is the larger of the two, not
    their sum. The returned Volume's data is a zero-byte stand-in of the image's shape and dtype.
    """
    image_path = staging / f"images/{job.case_id}.nii.gz"
    label_path = staging / f"labels/{job.case_id}.nii.gz"
    if job.kind == "dicom" and job.group is not None:
        image = load_series(job.group, max_voxels=limits.max_voxels)
        save_nifti(image, image_path)
        grid = _stand_in(image)
        del image
        if not job.segs:
            return grid, None
        try:
            label = _seg_label(job, source, grid, table)
            save_nifti(label, label_path)  # type: ignore[arg-type]
        except BaseException:
            image_path.unlink(missing_ok=True)  # a quarantined case leaves no image behind
            raise
        return grid, sorted(value_counts(label.data))  # type: ignore[union-attr]
    if job.kind == "nifti" and job.nifti is not None:
        image = load_nifti(
            source / job.nifti.image,
            job.nifti.image,
            max_voxels=limits.max_voxels,
            max_bytes=limits.max_bytes,
            allow_no_orientation=limits.allow_no_orientation,
        )
        save_nifti(image, image_path)
        grid = _stand_in(image)
        del image
        if not job.nifti.label:
            return grid, None
        try:
            label = load_label(
                source / job.nifti.label,
                job.nifti.label,
                grid,
                allowed_labels=job.allowed_labels,
                max_voxels=limits.max_voxels,
                max_bytes=limits.max_bytes,
                allow_no_orientation=limits.allow_no_orientation,
            )
            save_nifti(label, label_path)
        except BaseException:
            image_path.unlink(missing_ok=True)  # a quarantined case leaves no image behind
            raise
        return grid, sorted(label.meta["label_values"])
    image, label = load_case(job, source, limits, table)
    save_nifti(image, image_path)
    values = None
    if label is not None:
        save_nifti(label, label_path)
        values = sorted(value_counts(label.data))
    return image, values


def _convert(job: CaseJob, source: Path, staging: Path, limits: IngestLimits, table: dict[str, int]) -> dict:
    """Convert one case and write its outputs; returns its manifest record."""
    image, labels_present = _load_and_save(job, source, staging, limits, table)
    image_rel = f"images/{job.case_id}.nii.gz"
    label_rel = f"labels/{job.case_id}.nii.gz" if labels_present is not None else None
    modality = image.modality if image.modality != "unknown" else job.modality
    record = {
        "case_id": job.case_id,
        "image": image_rel,
        "label": label_rel,
        "modality": modality,
        "shape": list(image.shape),
        "spacing": [round(s, 6) for s in image.spacing],
        "affine": [[round(float(v), 6) for v in row] for row in image.affine],
        "dtype": str(image.data.dtype),
        "labels_present": labels_present or [],
        "source": {"kind": job.kind, "files": job.sources},
        # A partial DICOM series (accepted by IngestLimits.accept_partial_series): what it lacks.
        "partial": job.group.partial if job.group is not None else None,
        "sha256": {
            "inputs": job.inputs_sha256,
            "image": sha256_file(staging / image_rel),
            "label": sha256_file(staging / label_rel) if label_rel else None,
        },
    }
    if image.meta.get("affine_source") == "none":  # staged only when the config opts in
        record["orientation"] = "unknown"
    with atomic_open(staging / RECORDS_DIR / f"{job.case_id}.json") as fh:
        json.dump(record, fh)
    return record


def _convert_safely(
    job: CaseJob, source: Path, staging: Path, limits: IngestLimits, table: dict[str, int]
) -> tuple[str, dict | None, InputRejected | None]:
    """A case either yields its record or one InputRejected, never an exception."""
    try:
        return job.case_id, _convert(job, source, staging, limits, table), None
    except InputRejected as err:
        # The whole case is quarantined, not just the file that failed: list all its inputs.
        err.details.setdefault("files", job.sources)
        return job.case_id, None, err
    except Exception as exc:  # noqa: BLE001 - one case's failure is its record, never the batch's
        # A failure we did not classify: keep the batch going and say what happened.
        err = InputRejected(
            Reason.CONVERSION_FAILED,
            job.sources[0],
            f"conversion failed with {type(exc).__name__}: {exc}",
            {"files": job.sources},
        )
        return job.case_id, None, err


def _previous_record(staging: Path, job: CaseJob) -> dict | None:
    """The record of an earlier run for this case, if its inputs are unchanged and outputs exist."""
    path = staging / RECORDS_DIR / f"{job.case_id}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("sha256", {}).get("inputs") != job.inputs_sha256:
        return None
    outputs = [record.get("image"), record.get("label")]
    if not all((staging / rel).is_file() for rel in outputs if rel):
        return None
    return record


# ------------------------------------------------------------------------------------------
# The stage, in three steps that orchestrators may run as separate tasks:
#   plan_ingest (header pass, one call) -> convert_case (one per case, in any process)
#   -> finalize_ingest (manifest, quarantine, report). `ingest` runs all three.
#
# The plan lives in STAGING/.plan/: plan.json (discovered files, rejections, label table, case
# IDs) and jobs/<case_id>.json (each case's input files). Like the manifest, it links case IDs
# to source paths, so it stays inside the staging folder and never travels as task parameters.


def _resolve(source: str | Path, staging: str | Path) -> tuple[Path, Path]:
    source, staging = Path(source).resolve(), Path(staging).resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"ingest source {source} is not a folder")
    if staging == source or source in staging.parents:
        raise ValueError(f"the staging folder {staging} must not be inside the source {source}")
    return source, staging


def _job_to_json(job: CaseJob) -> dict[str, Any]:
    return {
        "case_id": job.case_id,
        "kind": job.kind,
        "sources": job.sources,
        "inputs_sha256": job.inputs_sha256,
        "images": [h.rel for h in job.group.headers] if job.group else [],
        "partial": job.group.partial if job.group else None,
        "segs": job.segs,
        "nifti": asdict(job.nifti) if job.nifti else None,
        "allowed_labels": sorted(job.allowed_labels) if job.allowed_labels is not None else None,
        "label_names": {str(k): v for k, v in job.label_names.items()},
        "modality": job.modality,
        "volume_bytes": job.volume_bytes,
    }


def _job_from_json(data: dict[str, Any], source: Path, secret: bytes, limits: IngestLimits) -> CaseJob:
    """Rebuild a planned case; a DICOM series is re-assembled from its files' headers."""
    group = None
    if data["kind"] == "dicom":
        headers = [read_header(source / rel, source, limits.max_pixels_per_file) for rel in data["images"]]
        groups, rejected = assemble_series(headers)
        matches = [g for g in groups if case_id_for(f"dicom:{g.key}", secret) == data["case_id"]]
        if len(matches) != 1:
            if rejected:
                raise rejected[0]
            raise InputRejected(
                Reason.CONVERSION_FAILED,
                data["images"][0],
                "the series changed between planning and conversion; run ingest again",
                {"files": data["sources"]},
            )
        group = matches[0]
        # The refused files are not among the job's images: what they left missing was found
        # when the whole source was planned.
        group.partial = data.get("partial")
    nifti = data.get("nifti")
    allowed = data.get("allowed_labels")
    return CaseJob(
        case_id=data["case_id"],
        kind=data["kind"],
        sources=list(data["sources"]),
        inputs_sha256=data["inputs_sha256"],
        group=group,
        segs=list(data["segs"]),
        nifti=NiftiCase(**{**nifti, "channels": tuple(nifti["channels"])}) if nifti else None,
        allowed_labels=set(allowed) if allowed is not None else None,
        label_names={int(k): v for k, v in data["label_names"].items()},
        modality=data["modality"],
        volume_bytes=int(data.get("volume_bytes", 0)),
    )


@dataclass(frozen=True)
class IngestPlan:
    """What step 1 decided: every case, and those whose inputs changed since their last outputs."""

    cases: list[str]
    todo: list[str]

    def input_hash(self, staging: str | Path, case_id: str) -> str:
        """sha256 over the case's input files' bytes (a content key for caches)."""
        path = Path(staging) / PLAN_DIR / "jobs" / f"{case_id}.json"
        return json.loads(path.read_text(encoding="utf-8"))["inputs_sha256"]


# Jobs planned in this process, so a conversion in the same process (or handed to a pool by
# `ingest`) skips the second header pass; a conversion elsewhere (a flow's task) re-reads the
# headers from the files named in jobs/<case_id>.json. Each entry carries the size and mtime of
# every file it read: a file changed since planning sends the case down the re-reading path,
# which notices what changed.
_PLANNED: dict[tuple[str, str], tuple[CaseJob, tuple]] = {}


def _file_stamps(job: CaseJob) -> tuple:
    """(size, mtime) of each of the job's DICOM files now."""
    if job.group is None:
        return ()
    stats = (h.path.stat() for h in job.group.headers)
    return tuple((st.st_size, st.st_mtime_ns) for st in stats)


def _read_stamps(job: CaseJob) -> tuple:
    """(size, mtime) of each file when its header was read (None where unknown: never fresh)."""
    return tuple(h.stamp for h in job.group.headers) if job.group is not None else ()


def _planned_job(staging: Path, case_id: str) -> CaseJob | None:
    """The job planned in this process, if its files are as they were when their headers were read.

    (The caller checks it against the plan on disk: `inputs_sha256`.)"""
    entry = _PLANNED.pop((str(staging), case_id), None)
    if entry is None:
        return None
    job, stamps = entry
    try:
        fresh = None not in stamps and _file_stamps(job) == stamps
    except OSError:
        fresh = False
    return job if fresh else None


def plan_ingest(
    source: str | Path,
    staging: str | Path,
    *,
    secret_file: str | Path | None = None,
    limits: IngestLimits | None = None,
    progress: bool = False,
    keep_jobs: bool = False,
) -> IngestPlan:
    """Step 1: discover and validate `source`, and record the plan in STAGING/.plan/.

    Cases whose inputs are unchanged since an earlier run keep their outputs (not in `todo`).
    keep_jobs: keep the planned DICOM jobs in this process for `convert_case` here or handed to
    a pool (`ingest` does), sparing a second header pass; orchestrators that convert elsewhere
    leave it off (the jobs would only hold memory).
    """
    source, staging = _resolve(source, staging)
    limits = limits or IngestLimits()
    secret = resolve_secret(secret_file)
    staging.mkdir(parents=True, exist_ok=True)
    files = discover(source)
    planner = CasePlanner(source, secret, limits)
    planner.plan(files, progress)
    table = _label_table(staging, planner)
    plan_dir = staging / PLAN_DIR
    shutil.rmtree(plan_dir / "failed", ignore_errors=True)
    # Temporary files of a run that was killed mid-write (atomic writes never leave them at
    # final paths). One ingest per staging folder at a time.
    for leftover in staging.rglob(".*.tmp*"):
        leftover.unlink(missing_ok=True)
    todo = []
    for key in [k for k in list(_PLANNED) if k[0] == str(staging)]:
        _PLANNED.pop(key, None)
    for job in planner.jobs:
        with atomic_open(plan_dir / "jobs" / f"{job.case_id}.json") as fh:
            json.dump(_job_to_json(job), fh)
        if _previous_record(staging, job) is None:
            todo.append(job.case_id)
            if keep_jobs and job.kind == "dicom":
                _PLANNED[(str(staging), job.case_id)] = (job, _read_stamps(job))
    plan = {
        "files": [_rel(p, source) for p in files],
        "rejected": [{"reason": e.reason.value, **e.to_record()} for e in planner.rejected],
        "accepted": sorted(planner.accepted),
        "table": table,
        "cases": [job.case_id for job in planner.jobs],
        "todo": todo,
        "limits": asdict(limits),
    }
    write_text(plan_dir / "plan.json", json.dumps(plan, default=str))
    return IngestPlan(cases=plan["cases"], todo=todo)


def convert_case(
    source: str | Path,
    staging: str | Path,
    case_id: str,
    *,
    secret_file: str | Path | None = None,
    _job: CaseJob | None = None,
) -> dict[str, Any]:
    """Step 2: convert one planned case; returns {"case_id", "status", "reason"}.

    status is "converted", "quarantined" or "unchanged" (its outputs from an earlier run stand).
    Never raises for bad input: a rejection is recorded for `finalize_ingest` and returned.
    (`_job`: the planned job itself, handed over by `ingest` to its worker processes.)
    """
    source, staging = _resolve(source, staging)
    plan_dir = staging / PLAN_DIR
    plan = json.loads((plan_dir / "plan.json").read_text(encoding="utf-8"))
    limits = IngestLimits(**plan["limits"])
    data = json.loads((plan_dir / "jobs" / f"{case_id}.json").read_text(encoding="utf-8"))
    if case_id not in plan["todo"]:
        return {"case_id": case_id, "status": "unchanged", "reason": None}
    try:
        job = _job if _job is not None else _planned_job(staging, case_id)
        if job is None or job.inputs_sha256 != data["inputs_sha256"]:
            job = _job_from_json(data, source, resolve_secret(secret_file), limits)
    except InputRejected as err:
        err.details.setdefault("files", data["sources"])
        result: tuple[str, dict | None, InputRejected | None] = (case_id, None, err)
    else:
        result = _convert_safely(job, source, staging, limits, plan["table"])
    _, _, err = result
    failed_path = plan_dir / "failed" / f"{case_id}.json"
    if err is not None:
        with atomic_open(failed_path) as fh:
            json.dump({"reason": err.reason.value, **err.to_record()}, fh, default=str)
        log.warning("case %s quarantined: %s", case_id, err.reason.value)
        return {"case_id": case_id, "status": "quarantined", "reason": err.reason.value}
    failed_path.unlink(missing_ok=True)
    return {"case_id": case_id, "status": "converted", "reason": None}


def _rejection_from_record(rec: dict[str, Any]) -> InputRejected:
    rec = dict(rec)
    rec.pop("status", None)
    reason, path, message = Reason(rec.pop("reason")), rec.pop("path"), rec.pop("message")
    return InputRejected(reason, path, message, rec)


def finalize_ingest(source: str | Path, staging: str | Path) -> IngestReport:
    """Step 3: write the manifest, quarantine list, report and dataset.json from the plan."""
    source, staging = _resolve(source, staging)
    plan_dir = staging / PLAN_DIR
    plan = json.loads((plan_dir / "plan.json").read_text(encoding="utf-8"))
    failed = {
        p.stem: _rejection_from_record(json.loads(p.read_text(encoding="utf-8")))
        for p in sorted((plan_dir / "failed").glob("*.json"))
    }
    records: dict[str, dict] = {}
    for case_id in plan["cases"]:
        path = staging / RECORDS_DIR / f"{case_id}.json"
        if case_id not in failed and path.is_file():
            record = json.loads(path.read_text(encoding="utf-8"))
            job = json.loads((plan_dir / "jobs" / f"{case_id}.json").read_text(encoding="utf-8"))
            if record["sha256"]["inputs"] == job["inputs_sha256"]:
                records[case_id] = record
    rejected = [_rejection_from_record(r) for r in plan["rejected"]] + list(failed.values())
    report = _account(plan["files"], plan["accepted"], records, rejected)
    report.cases_converted = len(set(plan["todo"]) & set(records))
    report.cases_skipped = len(records) - report.cases_converted
    report.partial = {
        case_id: {k: record["partial"][k] for k in ("n_missing_files", "missing_mm", "message")}
        for case_id, record in sorted(records.items())
        if record.get("partial")
    }
    _write_outputs(staging, records, rejected, report, plan["table"])
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
    todo = plan_ingest(
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
        with ProcessPoolExecutor(max_workers=queue.slots, mp_context=get_context("forkserver")) as pool:
            while queue.busy:
                for case_id in queue.ready():
                    future = pool.submit(
                        convert_case,
                        source,
                        staging,
                        case_id,
                        secret_file=secret_file,
                        _job=_planned_job(staged, case_id),
                    )
                    running[future] = case_id
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    queue.finished(running.pop(future))
                    future.result()
                    bar.update(1)
    bar.close()
    return finalize_ingest(source, staging)


class ConversionQueue:
    """Which planned cases may convert now, for `ingest`'s process pool and the ingest flow's tasks.

        queue = ConversionQueue(staging, case_ids, limits, slots)
        while queue.busy:
            for case_id in queue.ready(): start it
            ... when one ends: queue.finished(case_id)

    At most `slots` run at once (fewer when the budget cannot hold that many of the smallest);
    with `limits.memory_budget` set, cases start only while the planned peaks of those running
    (`planned_peak_bytes` of each case's largest volume, from the plan) fit the budget; a case
    larger than the budget runs alone. Cases not in `todo` (given: the others are unchanged and
    cost no conversion) plan no memory.
    """

    def __init__(
        self,
        staging: str | Path,
        case_ids: list[str],
        limits: IngestLimits,
        slots: int,
        todo: Iterable[str] | None = None,
    ) -> None:
        staged = Path(staging).resolve()
        convert = set(case_ids if todo is None else todo)
        self.peaks = {
            c: planned_peak_bytes(_planned_volume_bytes(staged, c)) if c in convert else 0 for c in case_ids
        }
        self.pending = list(case_ids)
        self.budget = limits.memory_budget
        self.slots = max(1, slots)
        if self.budget is not None and convert:
            self.slots = max(1, min(self.slots, self.budget // min(v for v in self.peaks.values() if v)))
        self.running: dict[str, int] = {}

    @property
    def busy(self) -> bool:
        """Cases are waiting or running."""
        return bool(self.pending or self.running)

    def ready(self) -> list[str]:
        """The cases that may start now (first fit, in order); they count as running."""
        admitted = _admit(self.pending, self.peaks, self.running, self.slots, self.budget)
        for case_id in admitted:
            self.running[case_id] = self.peaks[case_id]
        return admitted

    def finished(self, case_id: str) -> None:
        self.running.pop(case_id)


def _planned_volume_bytes(staging: Path, case_id: str) -> int:
    path = staging / PLAN_DIR / "jobs" / f"{case_id}.json"
    return int(json.loads(path.read_text(encoding="utf-8")).get("volume_bytes", 0))


def _admit(
    pending: list[str], peaks: dict[str, int], running: Mapping[Any, int], workers: int, budget: int | None
) -> list[str]:
    """Take from `pending` (first fit, in order) the cases that may start now; removes them.

    Within the budget the running cases' planned peaks sum to at most `budget`; with nothing
    running one case always starts, so a case larger than the budget runs, alone.
    """
    admitted = []
    used = sum(running.values())
    for case_id in list(pending):
        if len(running) + len(admitted) >= workers:
            break
        fits = budget is None or used + peaks[case_id] <= budget
        if fits or (not running and not admitted):
            admitted.append(case_id)
            pending.remove(case_id)
            used += peaks[case_id]
    return admitted


def _label_table(staging: Path, planner: CasePlanner) -> dict[str, int]:
    """Label name -> value, stable across runs: earlier runs' values are kept, new names appended."""
    table: dict[str, int] = {}
    existing = staging / "dataset.json"
    if existing.is_file():
        table.update(json.loads(existing.read_text(encoding="utf-8")).get("labels", {}))
    for name, value in planner.label_names.items():
        table.setdefault(name, value)
    # DICOM SEG names are only known once read; give each new one the next free value.
    if any(j.kind == "dicom" and j.segs for j in planner.jobs):
        for job in planner.jobs:
            for rel in job.segs:
                try:
                    names = segment_names(planner.source / rel, rel)
                except InputRejected:
                    continue  # reported when the case converts
                for number, name in sorted(names.items()):
                    if name not in table:
                        taken = set(table.values())
                        table[name] = number if number not in taken else max(taken) + 1
    return table


def _account(
    files: list[str], accepted: list[str], records: dict[str, dict], rejected: list[InputRejected]
) -> IngestReport:
    """Give every discovered file exactly one disposition and count them."""
    status: dict[str, str] = {}
    for err in rejected:
        # "files": the discovered files the rejection covers; [] for a note about no file of its
        # own (a dataset.json entry naming a file outside the dataset, a DICOMDIR's absent files).
        rels = err.details.get("files", [err.path])
        kind = "ignored" if err.reason in IGNORED_REASONS else "quarantined"
        for rel in rels:
            status.setdefault(rel, kind)
    for record in records.values():
        for rel in record["source"]["files"]:
            status.setdefault(rel, "accepted")
    for rel in accepted:
        status.setdefault(rel, "accepted")
    report = IngestReport(discovered=len(files), cases=len(records))
    counts = Counter(status.get(rel, "unaccounted") for rel in files)
    report.accepted, report.quarantined = counts["accepted"], counts["quarantined"]
    report.ignored = counts["ignored"]
    if counts["unaccounted"]:
        missing = [rel for rel in files if rel not in status]
        log.error(
            "ingest left %d files unaccounted for, e.g. %s", len(missing), [printable(m) for m in missing[:3]]
        )
    report.by_reason = dict(sorted(Counter(err.reason.value for err in rejected).items()))
    return report


def _write_outputs(
    staging: Path,
    records: dict[str, dict],
    rejected: list[InputRejected],
    report: IngestReport,
    table: dict[str, int],
) -> None:
    # Paths are written in their printable form: a name that is not valid UTF-8 shows its bytes
    # as \xNN instead of breaking the JSON (or the tools that read it).
    with atomic_open(staging / MANIFEST) as fh:
        for case_id in sorted(records):
            fh.write(json.dumps(printable_record(records[case_id])) + "\n")
    with atomic_open(staging / "quarantine.jsonl") as fh:
        for err in sorted(rejected, key=lambda e: (e.path, e.reason.value)):
            status = "ignored" if err.reason in IGNORED_REASONS else "quarantined"
            record = json.loads(json.dumps({"status": status, **err.to_record()}, default=str))
            fh.write(json.dumps(printable_record(record)) + "\n")
    report_dict = asdict(report) | {"balanced": report.balanced, "clean": report.clean}
    write_text(staging / "ingest_report.json", json.dumps(report_dict, indent=2) + "\n")
    dataset = {
        "name": "unet-pipeline staging",
        "labels": dict(sorted(table.items(), key=lambda kv: kv[1])),
        "modalities": sorted({r["modality"] for r in records.values()}),
        "numCases": len(records),
        "numLabelled": sum(1 for r in records.values() if r["label"]),
        "file_ending": ".nii.gz",
    }
    write_text(staging / "dataset.json", json.dumps(dataset, indent=2) + "\n")
