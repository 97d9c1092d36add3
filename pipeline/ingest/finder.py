"""Finding the cases of a source: which discovered files make which case, and why the rest are not.

`CaseFinder` applies the rules (DICOM series assembly, NIfTI pairs, MSD datasets, DICOMDIRs)
to the files `pipeline.io.walk.discover` lists; every file ends in a job (`CaseJob`) or a
rejection with its reason. Ingest and predict both find their cases with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from pipeline.errors import InputRejected, Reason
from pipeline.ingest.convert import CONVERTER_VERSION
from pipeline.ingest.jobs import CaseJob, case_id_for
from pipeline.ingest.limits import IngestLimits
from pipeline.io.batchdir import sha256_file
from pipeline.io.dicom import (
    DicomHeader,
    assemble_series,
    dicomdir_references,
    planned_series_bytes,
    read_header,
)
from pipeline.io.msd import DATASET_JSON, MsdDataset, is_msd_dataset, read_msd_dataset
from pipeline.io.nifti import NiftiCase, analyze_files, is_nifti, pair_nifti_files, planned_nifti_bytes
from pipeline.io.seg import seg_referenced_series_uid, segment_names
from pipeline.io.walk import printable, screen

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------
# Input hashes


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


def relative(path: Path, root: Path) -> str:
    """`path` relative to `root`, with forward slashes (how sources are named in every record)."""
    return Path(os.path.relpath(path, root)).as_posix()


# ------------------------------------------------------------------------------------------
# Which files make which case


class CaseFinder:
    """Decides which discovered files make which case, and rejects the rest with reasons.

    Used by ingest and by predict (which validates its sources by the same rules):
        finder = CaseFinder(source, secret, limits); finder.find(discover(source), progress)
        finder.jobs, finder.rejected
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

    def find(self, entries: list[Path], progress: bool) -> None:
        """Find the cases of `discover`'s entries; every entry ends in a job or a rejection.

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
            self._add_msd(root, members)
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
            self._add_dicom(others, progress)
            self._check_dicomdirs(others)

    def _check_dicomdirs(self, files: list[Path]) -> None:
        """A DICOMDIR listing files that are not in the source says so (MISSING_REFERENCED_FILE).

        Media copied off a CD often change case or lose the ISO 9660 ';1' version suffix, so a
        reference matches a present file case-insensitively, with or without the suffix.
        """
        dicomdirs = [e.path for e in self.rejected if e.reason == Reason.DICOMDIR]
        if not dicomdirs:
            return
        present = {self._media_key(relative(p, self.source)) for p in files}
        for rel in dicomdirs:
            try:
                targets, rejected = dicomdir_references(self.source / rel, self.source)
            except InputRejected as err:
                self.reject(InputRejected(err.reason, err.path, err.message, {**err.details, "files": []}))
                continue
            for err in rejected:  # invalid or escaping File IDs: noted, the DICOMDIR stays ignored
                self.reject(InputRejected(err.reason, err.path, err.message, {**err.details, "files": []}))
            missing = [t for t in targets if self._media_key(relative(t, self.source)) not in present]
            if missing:
                shown = [printable(relative(t, self.source)) for t in missing]
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

    def _add_msd(self, root: Path, files: list[Path]) -> None:
        rel_json = relative(root / DATASET_JSON, self.source)
        try:
            dataset: MsdDataset = read_msd_dataset(root, source_root=self.source, files=files)
        except InputRejected as err:
            self.reject(err)
            for p in files:  # the dataset cannot be understood: none of its files is used
                if p.name != DATASET_JSON:
                    self.reject(
                        InputRejected(
                            err.reason, relative(p, self.source), f"part of a dataset that {err.message}"
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
            rel = relative(p, self.source)
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

    def _add_dicom(self, files: list[Path], progress: bool) -> None:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher:
            self._add_dicom_files(files, progress, hasher)

    def _add_dicom_files(self, files: list[Path], progress: bool, hasher: ThreadPoolExecutor) -> None:
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


def label_table(staging: Path, finder: CaseFinder) -> dict[str, int]:
    """Label name -> value, stable across runs: earlier runs' values are kept, new names appended."""
    table: dict[str, int] = {}
    existing = staging / "dataset.json"
    if existing.is_file():
        table.update(json.loads(existing.read_text(encoding="utf-8")).get("labels", {}))
    for name, value in finder.label_names.items():
        table.setdefault(name, value)
    # DICOM SEG names are only known once read; give each new one the next free value.
    if any(j.kind == "dicom" and j.segs for j in finder.jobs):
        for job in finder.jobs:
            for rel in job.segs:
                try:
                    names = segment_names(finder.source / rel, rel)
                except InputRejected:
                    continue  # reported when the case converts
                for number, name in sorted(names.items()):
                    if name not in table:
                        taken = set(table.values())
                        table[name] = number if number not in taken else max(taken) + 1
    return table
