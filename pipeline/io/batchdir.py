"""The one on-disk batch protocol that ingest and predict share.

A batch runs in three steps that orchestrators may run as separate tasks: prepare (one call:
find the cases, decide which are to do) -> one call per case (in any process or machine that
sees the output folder) -> finalize (the tables and reports). What the steps hand each other
lives in the output folder ROOT (ingest's staging folder, predict's OUT), in its work folder:

    ROOT/.batch/batch.json             what prepare decided: case IDs, the to-do list, settings
    ROOT/.batch/cases/<case_id>.json   each case's inputs (its source files, relative paths)
    ROOT/.batch/failed/<case_id>.json  a quarantined or failed case's record, for finalize
    ROOT/.batch/locks/<case_id>.lock   one case's exclusive lock; prepare.lock: prepare's own

Like a manifest, the work folder links case IDs to source paths, so it stays inside ROOT and
never travels as task parameters. Every record is written atomically (`pipeline.io.atomic`):
a crash leaves the old file or the new one, never half of one. Locks are `flock`s: a holder
that dies releases its lock, so a killed worker never blocks a rerun.

A case is done when its done record stands. Predict's is the done-marker (`write_done_marker`:
the case key and each output's sha256); the case key (`case_key`) is one function over the
case's input bytes and the settings its outputs depend on, so a done-marker and an
orchestrator's cache key cannot disagree. Ingest's is the case's manifest record, keyed on its
inputs' sha256, which folds in the converter version.

Also here: the checks both stages make of their folders (`check_out_folder`,
`resolve_folders`) and the site secret that keys pseudonymous case IDs (`resolve_secret`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.io.atomic import atomic_open, write_text

log = logging.getLogger(__name__)

WORK_DIR = ".batch"
BATCH_FILE = "batch.json"  # what prepare decided (not the preprocessing plan: that is plan.json)
CASES_DIR = "cases"
FAILED_DIR = "failed"
LOCKS_DIR = "locks"
PREPARE_LOCK = "prepare.lock"  # beside the case locks; case IDs are case_<hex>, never this name
DONE_FILE = "done.json"


# ------------------------------------------------------------------------------------------
# Locks


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
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


# ------------------------------------------------------------------------------------------
# The work folder


class BatchDir:
    """The work folder of one output folder `root` (see the module docstring).

    batch = BatchDir(out)
    batch.write_batch({...})            prepare, last
    with batch.case_lock(case_id): ...  one case, in any process
    batch.record_failure(case_id, record or None)
    batch.failures()                    finalize
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.work = self.root / WORK_DIR

    # -- what prepare decided ------------------------------------------------------------

    @property
    def batch_file(self) -> Path:
        return self.work / BATCH_FILE

    def write_batch(self, batch: Mapping[str, Any], *, indent: int | None = None) -> None:
        write_text(self.batch_file, json.dumps(batch, indent=indent, default=str))

    def read_batch(self, step: str = "prepare") -> dict[str, Any]:
        """batch.json; FileNotFoundError naming `step` (the one that writes it) when it is absent."""
        try:
            return json.loads(self.batch_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.batch_file} does not exist: run {step} for {self.root} first"
            ) from None

    # -- the cases -----------------------------------------------------------------------

    def case_file(self, case_id: str) -> Path:
        return self.work / CASES_DIR / f"{case_id}.json"

    def write_case(self, case_id: str, data: Mapping[str, Any]) -> None:
        with atomic_open(self.case_file(case_id)) as fh:
            json.dump(data, fh, default=str)

    def read_case(self, case_id: str) -> dict[str, Any]:
        return json.loads(self.case_file(case_id).read_text(encoding="utf-8"))

    def case_lock(self, case_id: str):
        """An exclusive lock on one case (ROOT/.batch/locks/<case_id>.lock): one run of a case at a
        time; a second call for the same case waits, then finds the first one's done record."""
        return exclusive(self.work / LOCKS_DIR / f"{case_id}.lock")

    def prepare_lock(self):
        """An exclusive lock on preparing the batch (ROOT/.batch/locks/prepare.lock): two prepares
        of one ROOT run one after the other."""
        return exclusive(self.work / LOCKS_DIR / PREPARE_LOCK)

    # -- failure records -----------------------------------------------------------------

    def failure_file(self, case_id: str) -> Path:
        return self.work / FAILED_DIR / f"{case_id}.json"

    def record_failure(self, case_id: str, record: Mapping[str, Any] | None) -> None:
        """Write the case's failure record atomically; None removes it (the case succeeded)."""
        path = self.failure_file(case_id)
        if record is None:
            path.unlink(missing_ok=True)
            return
        with atomic_open(path) as fh:
            json.dump(record, fh, default=str)

    def failure(self, case_id: str) -> dict[str, Any] | None:
        """The case's failure record, or None."""
        try:
            return json.loads(self.failure_file(case_id).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def failures(self) -> dict[str, dict[str, Any]]:
        """Every failure record, by case ID (sorted)."""
        folder = self.work / FAILED_DIR
        return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))}

    def clear_failures(self) -> None:
        """Forget the failures of an earlier run (prepare does, before the cases run again)."""
        for path in (self.work / FAILED_DIR).glob("*.json"):
            path.unlink(missing_ok=True)

    def remove_temporaries(self) -> None:
        """Remove the temporary files of a run killed mid-write anywhere under ROOT (atomic writes
        never leave them at final paths). Only while no other run writes to ROOT."""
        for leftover in self.root.rglob(".*.tmp*"):
            leftover.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------
# Done-markers


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def case_key(inputs_sha256: str, settings: Mapping[str, Any]) -> str:
    """The one key of a case's outputs: its input hash and the settings its outputs depend on
    (JSON-serializable), as a sha256. Done-markers and orchestrators' task caches both use it."""
    blob = json.dumps({"inputs_sha256": inputs_sha256, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def write_done_marker(
    case_dir: Path, key: str, outputs: Sequence[str], result: Mapping[str, Any], **extra: Any
) -> dict[str, Any]:
    """Write `case_dir/done.json` (atomically, last): the key, each output's sha256, the result."""
    marker = {
        "case_key": key,
        **extra,
        "outputs": {name: sha256_file(case_dir / name) for name in outputs},
        "result": dict(result),
    }
    with atomic_open(case_dir / DONE_FILE) as fh:
        json.dump(marker, fh, indent=2, default=str)
    return marker


def read_done_marker(case_dir: Path, key: str) -> dict[str, Any] | None:
    """The marker in `case_dir` when it is valid for `key`, else None.

    Valid: its case key equals `key` and every output it lists exists with the recorded sha256.
    A marker from older code (no key, outputs without hashes) is never valid: the case is redone.
    """
    try:
        marker = json.loads((case_dir / DONE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or marker.get("case_key") != key:
        return None
    outputs = marker.get("outputs")
    if not isinstance(outputs, dict) or not isinstance(marker.get("result"), dict):
        return None
    for name, recorded in outputs.items():
        try:
            actual = sha256_file(case_dir / name)
        except OSError:
            log.info("case %s: %s is missing; the case is redone", case_dir.name, name)
            return None
        if actual != recorded:
            log.warning("case %s: %s differs from its done-marker; the case is redone", case_dir.name, name)
            return None
    return marker


def clear_case(case_dir: Path, outputs: Sequence[str]) -> None:
    """Forget an earlier run's outputs: the marker first, so a crash here leaves no false 'done'."""
    (case_dir / DONE_FILE).unlink(missing_ok=True)
    for name in outputs:
        (case_dir / name).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------
# Folders


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


def resolve_folders(
    source: str | Path, out: str | Path, *, stage: str, out_name: str = "output folder", files: bool = False
) -> tuple[Path, Path]:
    """(source, out) resolved for a batch of `stage` ("ingest", "predict").

    The source must be a folder (or, with `files`, may be a single file); the output folder must
    be able to be one (`check_out_folder`) and must not lie inside the source, where the next
    run would read it as input. Raises FileNotFoundError or ValueError naming the paths.
    """
    source, out = Path(source).resolve(), check_out_folder(out)
    if files and not source.exists():
        raise FileNotFoundError(f"{stage} source {source} does not exist")
    if not files and not source.is_dir():
        raise FileNotFoundError(f"{stage} source {source} is not a folder")
    if out == source or (source.is_dir() and source in out.parents):
        raise ValueError(f"the {out_name} {out} must not be inside the source {source}")
    return source, out


# ------------------------------------------------------------------------------------------
# The site secret


def load_or_create_secret(path: Path) -> bytes:
    """The site secret keying case IDs; created (32 random bytes, mode 0600) on first use."""
    path = Path(path)
    if path.exists():
        secret = bytes.fromhex(path.read_text(encoding="ascii").strip())
        if len(secret) < 16:
            raise ValueError(f"site secret {path} is shorter than 16 bytes; delete it to make a new one")
        return secret
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(secret.hex() + "\n")
    log.info("created a new site secret at %s: keep it to keep case IDs stable", path)
    return secret


def secret_path(secret_file: str | Path | None) -> Path:
    """The site secret's file: `secret_file` when given, else the work directory's."""
    if secret_file:
        return Path(secret_file)
    # Lazy: the configuration (pydantic, YAML) is not needed to write or read a batch.
    from pipeline.config import Workdir

    return Workdir.resolve().secret_file


def resolve_secret(secret_file: str | Path | None) -> bytes:
    """The site secret (`load_or_create_secret` of `secret_path(secret_file)`)."""
    return load_or_create_secret(secret_path(secret_file))
