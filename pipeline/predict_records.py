"""What a predicted case leaves behind: its key, its done-marker, and the failure of one step.

The case key is one function (`case_key`) over the case's input bytes (their sha256) and
everything else its outputs depend on (`output_settings`: the model's identity, plan and label
names, the post-processing and precision, which outputs are written, the input limits and the
output format version). The done-marker of a case stores that key and the sha256 of every output
it lists; the Prefect task cache of `flows.inference` keys on the same function. A marker counts
only while its key matches and every output it lists is present with the recorded bytes, so a
rerun redoes a case whose options changed or whose outputs went missing or were damaged.

A case runs as steps (read, predict, write the mask, the SEG, the QC picture, the records); an
exception in a step becomes `CaseFailed` with the step's reason code and a one-line message,
so one case's failure is that case's record and never the batch's traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import InputRejected, Reason
from pipeline.io.atomic import atomic_open

log = logging.getLogger(__name__)

# Bump when what a case's outputs contain changes, so reruns redo cases done by older code.
OUTPUT_VERSION = "2"
DONE_FILE = "done.json"
MESSAGE_MAX = 240  # characters of a failure message kept in results.csv and the report


def output_settings(
    *,
    model: Mapping[str, Any],
    mask_options: Mapping[str, Any],
    write_seg: bool,
    write_qc: bool,
    limits: Mapping[str, Any],
) -> dict[str, Any]:
    """Everything besides the input bytes that a case's outputs depend on (JSON-serializable).

    `model` holds name, version, weights sha256, plan sha256 and label names (the SEG names its
    segments and algorithm after them); `mask_options` what changes the mask (post-processing,
    precision); `limits` decide whether a case is refused at all.
    """
    return {
        "output_version": OUTPUT_VERSION,
        "model": dict(model),
        "mask_options": dict(mask_options),
        "write_seg": bool(write_seg),
        "write_qc": bool(write_qc),
        "limits": dict(limits),
    }


def case_key(inputs_sha256: str, settings: Mapping[str, Any]) -> str:
    """The one key of a case's outputs: its input hash and `output_settings`, as a sha256.

    Done-markers and the Prefect task cache both use it, so the two cannot disagree.
    """
    blob = json.dumps({"inputs_sha256": inputs_sha256, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_done_marker(
    case_dir: Path, key: str, outputs: Sequence[str], result: Mapping[str, Any], **extra: Any
) -> dict[str, Any]:
    """Write `case_dir/done.json` (atomically, last): the key, each output's sha256, the result."""
    marker = {
        "case_key": key,
        "output_version": OUTPUT_VERSION,
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


# ------------------------------------------------------------------------------------------
# Steps


class CaseFailed(Exception):
    """One step of one case failed: `reason` says which step, `message` what happened (one line)."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.reason, self.message))


_SPACE = re.compile(r"\s+")


def clip_line(text: str) -> str:
    """`text` on one line (whitespace runs collapsed), at most MESSAGE_MAX characters."""
    text = _SPACE.sub(" ", text).strip()
    return text if len(text) <= MESSAGE_MAX else text[: MESSAGE_MAX - 3] + "..."


def one_line(exc: BaseException) -> str:
    """`Type: message` on one line, at most MESSAGE_MAX characters."""
    return clip_line(f"{type(exc).__name__}: {exc}")


@contextmanager
def step(reason: Reason, what: str) -> Iterator[None]:
    """Run one step of a case: any exception becomes CaseFailed(reason, "what: Type: message").

    A refused input (InputRejected) and an already classified failure pass through unchanged.
    Every Exception is caught on purpose: a library raising an unexpected type (AttributeError
    from a DICOM writer, say) must fail this case, not the batch. KeyboardInterrupt and
    SystemExit are not Exceptions and still stop the run.
    """
    try:
        yield
    except (InputRejected, CaseFailed):
        raise
    except Exception as exc:  # every Exception on purpose: see the docstring
        raise CaseFailed(reason, f"{what}: {one_line(exc)}") from exc
