"""The terminal's rules hold in the worker processes the command line starts."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A fresh interpreter: the command line's set-up, then a forkserver pool as ingest starts one,
# whose worker reads a name too long for its VR (pydicom warns, as on a real archive's oddity)
# and logs a warning of ours.
SCRIPT = textwrap.dedent(
    """
    import logging, os, sys
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    from pipeline.logs import logging_state, setup_logging, worker_logging

    def convert():
        import pydicom
        ds = pydicom.Dataset()
        ds.PatientName = "N" * 300  # pydicom: "The PN component length (300) exceeds ..."
        logging.getLogger("pipeline.ingest.test").warning("a warning of ours")
        return len(str(ds.PatientName))

    if __name__ == "__main__":
        setup_logging(verbose=sys.argv[1] == "verbose", log_file="run.log")  # relative: ours
        assert logging_state() == (sys.argv[1] == "verbose", os.path.abspath("run.log"))
        with ProcessPoolExecutor(
            1, mp_context=get_context("forkserver"), initializer=worker_logging, initargs=(logging_state(),)
        ) as pool:
            print(pool.submit(convert).result())
    """
)


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_a_worker_keeps_library_warnings_off_the_terminal_unless_verbose(tmp_path, verbose):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), "verbose" if verbose else "quiet"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "300"
    assert "WARNING pipeline.ingest.test: a warning of ours" in done.stderr
    # pydicom's warning goes through logging: shown with --verbose, off the terminal otherwise
    assert ("PN component length" in done.stderr) is verbose
    assert ("WARNING py.warnings:" in done.stderr) is verbose
    if not verbose:  # the quiet terminal holds our own lines only
        assert done.stderr.splitlines() == ["WARNING pipeline.ingest.test: a warning of ours"]
    # the log file (named relative to the parent's folder) has everything, the worker's included
    log = (tmp_path / "run.log").read_text()
    assert "PN component length" in log and "a warning of ours" in log
