"""The terminal's logging rules, in the CLI's process and in the worker processes it starts.

A successful run's terminal shows our own warnings and errors only: library notices (MONAI's
optional-decoder notice, pydicom's value checks on a name longer than its VR allows, ...) and the
Python warnings libraries raise go through logging and are kept off it unless --verbose.
`setup_logging` applies that in the CLI's process and remembers it; a process pool passes
`worker_logging` and `logging_state()` as its initializer, so a conversion or case worker keeps
the same rules (a worker is a fresh process: without them its warnings would print as Python's
default "file:line: UserWarning" lines, and its records would be lost or printed raw).
"""

from __future__ import annotations

import logging
import os
import sys

# Loggers whose warnings are ours to show; every other library's warnings (and Python warnings
# they raise) are detail: shown with --verbose and written to $UNET_PIPELINE_LOG_FILE, not shown
# on a successful run's terminal.
OWN_LOGGERS = ("pipeline", "flows", "unet_model", "__main__")
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"

# What `setup_logging` set in this process (verbose, the log file's absolute path or None); None
# while it has not been called.
_STATE: tuple[bool, str | None] | None = None


class _ThirdPartyQuiet:
    """A logging filter: our records pass; a library's pass only when they are errors."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose

    def filter(self, record) -> bool:
        if self.verbose or record.name.split(".")[0] in OWN_LOGGERS:
            return True
        return record.levelno >= 40  # logging.ERROR


def setup_logging(verbose: bool, log_file: str | None = None) -> None:
    """The terminal: our warnings and errors on stderr (INFO and library detail with --verbose).

    Library warnings and Python warnings are routed through logging and kept off the terminal
    unless --verbose; MLflow's artifact progress bars are off. With a `log_file` (default
    $UNET_PIPELINE_LOG_FILE), everything down to DEBUG is also written to that file.
    """
    global _STATE

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.captureWarnings(True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_unet_pipeline", False):
            root.removeHandler(handler)
            handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.WARNING)
    console.setFormatter(logging.Formatter(LOG_FORMAT))
    console.addFilter(_ThirdPartyQuiet(verbose))
    handlers: list[logging.Handler] = [console]
    log_file = log_file or os.environ.get("UNET_PIPELINE_LOG_FILE") or None
    if log_file:
        log_file = os.path.abspath(log_file)
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.setLevel(logging.DEBUG)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(process)d " + LOG_FORMAT))
        handlers.append(to_file)
    for handler in handlers:
        handler._unet_pipeline = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if (verbose or log_file) else logging.INFO)
    if not (verbose or log_file):
        # Nothing would show them: don't pay for formatting library INFO/DEBUG records.
        for name in ("monai", "mlflow", "pydicom", "highdicom", "matplotlib", "urllib3", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
    for name in OWN_LOGGERS[:3]:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    _STATE = (verbose, log_file)


def logging_state() -> tuple[bool, str | None] | None:
    """What a worker process needs to repeat this process's rules (`worker_logging`'s argument):
    the verbosity and the log file as this process resolved them (a worker's environment and
    working directory are its server's, not necessarily ours)."""
    return _STATE


def worker_logging(state: tuple[bool, str | None] | None) -> None:
    """In a worker process: the rules `setup_logging` set in its parent (`logging_state()`);
    nothing when the parent never set them (a program using the library keeps its own)."""
    if state is not None:
        setup_logging(*state)
