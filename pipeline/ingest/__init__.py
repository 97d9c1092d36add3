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

Modules, in run order: `finder` (which files make which case: `CaseFinder`), `jobs` (the job
records and their JSON form, shared with predict), `limits` (sizes and the memory budget),
`queue` (which cases may convert now), `convert` (one case), `report` (the batch's tables),
`batch` (the three steps and `ingest`). The names below are the package's interface.
"""

from pipeline.ingest.batch import (
    IngestJobs,
    convert_case,
    finalize_ingest,
    ingest,
    prepare_ingest,
    record_case_failure,
)
from pipeline.ingest.convert import CONVERTER_VERSION, load_case
from pipeline.ingest.finder import CaseFinder
from pipeline.ingest.jobs import (
    CaseJob,
    case_id_for,
    forget_jobs,
    job_from_json,
    job_to_json,
    keep_job,
    kept_job,
)
from pipeline.ingest.limits import (
    FIXED_OVERHEAD_BYTES,
    PEAK_FACTOR,
    IngestLimits,
    default_memory_budget,
    ingest_limits,
    planned_peak_bytes,
)
from pipeline.ingest.queue import ConversionQueue
from pipeline.ingest.report import IngestReport

__all__ = [
    "CONVERTER_VERSION",
    "FIXED_OVERHEAD_BYTES",
    "PEAK_FACTOR",
    "CaseFinder",
    "CaseJob",
    "ConversionQueue",
    "IngestJobs",
    "IngestLimits",
    "IngestReport",
    "case_id_for",
    "convert_case",
    "default_memory_budget",
    "finalize_ingest",
    "forget_jobs",
    "ingest",
    "ingest_limits",
    "job_from_json",
    "job_to_json",
    "keep_job",
    "kept_job",
    "load_case",
    "planned_peak_bytes",
    "prepare_ingest",
    "record_case_failure",
]
