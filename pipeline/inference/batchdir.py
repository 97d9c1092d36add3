"""The batch on disk: what OUT holds while a batch runs, and the locks that let workers share it.

    OUT/<case_id>/      seg.nii.gz, seg.dcm, qc.png and done.json (`records`), written last
    OUT/.plan/          batch.json (model identity, options, rejected inputs, case IDs),
                        cases/<case_id>.json (each case's record: its input files),
                        model/ (the verified model folder, so workers never need the registry),
                        failed/<case_id>.json (a quarantined or failed case's record),
                        locks/<case_id>.lock and locks/prepare.lock

Like results.csv, the plan links case IDs to source paths, so it stays inside OUT and never
travels as task parameters. One batch per OUT folder at a time.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.io.atomic import atomic_open, write_text
from pipeline.io.batchdir import DONE_FILE, case_key, read_done_marker
from pipeline.io.model_dir import MODEL_FILE, save_model_dir

if TYPE_CHECKING:
    from pipeline.inference.cases import PredictCase
    from pipeline.inference.model import ModelHandle

MASK_FILE = "seg.nii.gz"
SEG_FILE = "seg.dcm"
QC_FILE = "qc.png"
CASE_OUTPUTS = (MASK_FILE, SEG_FILE, QC_FILE)

PLAN_DIR = ".plan"
BATCH_FILE = "batch.json"
MODEL_DIR = "model"
PREPARE_LOCK = "prepare.lock"  # beside the case locks; case IDs are case_<hex>, never this name


def plan_dir(out: Path) -> Path:
    return out / PLAN_DIR


# ------------------------------------------------------------------------------------------
# The plan's files


def write_batch(out: Path, batch: dict[str, Any]) -> None:
    write_text(plan_dir(out) / BATCH_FILE, json.dumps(batch, indent=1, default=str))


def read_batch(out: Path) -> dict[str, Any]:
    """OUT/.plan/batch.json; FileNotFoundError saying to run prepare_batch when there is none."""
    path = plan_dir(out) / BATCH_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: run prepare_batch for {out} first") from None


def write_case_record(out: Path, case_id: str, record: dict[str, Any]) -> None:
    with atomic_open(plan_dir(out) / "cases" / f"{case_id}.json") as fh:
        json.dump(record, fh)


def read_case_record(out: Path, case_id: str) -> dict[str, Any]:
    """A planned case's record (`cases.case_to_json` and its planned bytes): the one reader."""
    path = plan_dir(out) / "cases" / f"{case_id}.json"
    return json.loads(path.read_text(encoding="utf-8"))


def record_failure(out: Path, case_id: str, record: dict[str, Any] | None) -> None:
    """Write a quarantined or failed case's record (None: remove an earlier run's)."""
    path = plan_dir(out) / "failed" / f"{case_id}.json"
    if record is None:
        path.unlink(missing_ok=True)
        return
    with atomic_open(path) as fh:
        json.dump(record, fh, default=str)


def read_failure(out: Path, case_id: str) -> dict[str, Any] | None:
    path = plan_dir(out) / "failed" / f"{case_id}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def clear_failures(out: Path) -> None:
    shutil.rmtree(plan_dir(out) / "failed", ignore_errors=True)


def read_model_record(model_dir: Path) -> dict[str, Any]:
    """The staged model folder's model.json."""
    return json.loads((model_dir / MODEL_FILE).read_text(encoding="utf-8"))


def stage_model(handle: ModelHandle, dst: Path) -> None:
    """Copy the verified model folder to `dst` (workers reload it from there, never the registry)."""
    try:
        if read_model_record(dst)["weights_sha256"] == handle.sha256:
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


# ------------------------------------------------------------------------------------------
# The case folders


def done_marker(out: Path, case: PredictCase, settings: dict[str, Any]) -> dict | None:
    """The earlier run's marker for this case if it is valid for the batch's `settings`."""
    return read_done_marker(out / case.case_id, case_key(case.inputs_sha256, settings))


def clear_case(case_dir: Path) -> None:
    """Forget an earlier run's outputs: the marker first, so a crash here leaves no false 'done'."""
    (case_dir / DONE_FILE).unlink(missing_ok=True)
    for name in CASE_OUTPUTS:
        (case_dir / name).unlink(missing_ok=True)


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


def resolve_paths(source: str | Path, out: str | Path) -> tuple[Path, Path]:
    """(SOURCE, OUT) resolved; raises when SOURCE is missing or OUT lies inside it."""
    source, out = Path(source).resolve(), check_out_folder(out)
    if not source.exists():
        raise FileNotFoundError(f"predict source {source} does not exist")
    if out == source or (source.is_dir() and source in out.parents):
        raise ValueError(f"the output folder {out} must not be inside the source {source}")
    return source, out


# ------------------------------------------------------------------------------------------
# Locks


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


def case_lock(out: Path, case_id: str):
    """An exclusive lock on one case (OUT/.plan/locks/<case_id>.lock)."""
    return _exclusive(plan_dir(out) / "locks" / f"{case_id}.lock")


def plan_lock(out: Path):
    """An exclusive lock on staging the model and writing the plan (OUT/.plan/locks/prepare.lock):
    two prepare_batch calls on one OUT run one after the other, the second finding the model staged."""
    return _exclusive(plan_dir(out) / "locks" / PREPARE_LOCK)
