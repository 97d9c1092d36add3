"""What a predicted case leaves behind: its settings, its done-marker, and the failure of one step.

The case key (`pipeline.io.batchdir.case_key`) is one function over the case's input bytes
(their sha256) and everything else its outputs depend on (`output_settings`: the model's
identity, plan and label names, the post-processing and precision, which outputs are written, the
input limits and the output format version). The done-marker of a case stores that key and the
sha256 of every output it lists; the Prefect task cache of `flows.inference` keys on the same
function. A marker counts only while its key matches and every output it lists is present with
the recorded bytes (`batchdir.read_done_marker`), so a rerun redoes a case whose options changed
or whose outputs went missing or were damaged.

A case runs as steps (read, predict, write the mask, the SEG, the QC picture, the records); an
exception in a step becomes `CaseFailed` with the step's reason code and a one-line message,
so one case's failure is that case's record and never the batch's traceback.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import InputRejected, Reason
from pipeline.io import batchdir

log = logging.getLogger(__name__)

# A case's outputs in OUT/<case_id>/, beside its done-marker (batchdir.DONE_FILE).
MASK_FILE = "seg.nii.gz"
SEG_FILE = "seg.dcm"
QC_FILE = "qc.png"
CASE_OUTPUTS = (MASK_FILE, SEG_FILE, QC_FILE)

# Bump when what a case's outputs contain changes, so reruns redo cases done by older code.
OUTPUT_VERSION = "3"  # 3: SEG without empty frames, QC drawn with Pillow
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


def write_done_marker(
    case_dir: Path, key: str, outputs: Sequence[str], result: Mapping[str, Any], **extra: Any
) -> dict[str, Any]:
    """`batchdir.write_done_marker` with the OUTPUT_VERSION of the code that wrote the outputs."""
    return batchdir.write_done_marker(case_dir, key, outputs, result, output_version=OUTPUT_VERSION, **extra)


def done_marker(out: Path, case_id: str, inputs_sha256: str, settings: Mapping[str, Any]) -> dict | None:
    """The earlier run's marker for this case if it is valid for the batch's `settings`."""
    return batchdir.read_done_marker(out / case_id, batchdir.case_key(inputs_sha256, settings))


def clear_case(case_dir: Path) -> None:
    """Forget an earlier run's outputs: the marker first, so a crash here leaves no false 'done'."""
    batchdir.clear_case(case_dir, CASE_OUTPUTS)


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
