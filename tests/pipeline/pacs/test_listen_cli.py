"""`unet-pipeline listen` as a process: C-STORE a series into it, see the study complete, stop it by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom

from pipeline.pacs.dimse import store
from pipeline.pacs.url import parse_pacs_url
from tests.pipeline.pacs.orthanc import free_port

REPO = Path(__file__).resolve().parents[3]


def test_listen_receives_a_study_and_announces_it_when_quiet(pacs_setup, tmp_path, monkeypatch):
    port = free_port()
    out = tmp_path / "incoming"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = ["listen", "--aet", "UNET_PIPELINE", "--port", str(port), "--out", str(out), "--quiet", "1"]
    args += ["--bind", "127.0.0.1", "--allow", "SENDER", "--secret-file", str(pacs_setup.secret)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        line = proc.stdout.readline()
        assert "listening as UNET_PIPELINE" in line, line
        case = pacs_setup.demo.cases[0]
        datasets = [pydicom.dcmread(pacs_setup.demo.dicom_root / f) for f in case.dicom_files]
        monkeypatch.setenv("UNET_PACS_AET", "SENDER")
        stored = store(parse_pacs_url(f"dimse://UNET_PIPELINE@127.0.0.1:{port}"), datasets)
        assert len(stored) == len(datasets)
        deadline = time.monotonic() + 60
        lines = []
        while time.monotonic() < deadline:
            lines.append(proc.stdout.readline())
            if "study complete:" in lines[-1]:
                break
        assert "study complete:" in lines[-1], lines
        folder = Path(lines[-1].split("study complete:")[1].strip())
        assert folder.parent == out.resolve() / "studies"
        assert len(list(folder.glob("*.dcm"))) == len(datasets)
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert f"stopped: {len(datasets)} instances received, 1 studies complete" in rest


def test_listen_needs_results_with_a_deployment(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = ["listen", "--aet", "X", "--port", "1", "--out", str(tmp_path), "--deployment", "a/b"]
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "--deployment needs --results" in done.stderr
