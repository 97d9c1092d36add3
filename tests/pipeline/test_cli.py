import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline import __version__
from pipeline.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"unet-pipeline {__version__}"


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "doctor" in result.output


def test_doctor_reports_versions_device_and_stores(tmp_path):
    import torch

    result = runner.invoke(app, ["doctor", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"torch      {torch.__version__}" in result.output
    for name in ("monai", "prefect", "mlflow", "pydicom", "nibabel"):
        assert f"  {name}" in result.output
    assert "device: CPU" in result.output or "device: CUDA" in result.output
    assert f"sqlite:///{tmp_path.resolve()}/mlflow.db" in result.output
    assert f"PREFECT_HOME={tmp_path.resolve()}/prefect" in result.output


def test_doctor_honours_tracking_server(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    result = runner.invoke(app, ["doctor", "--workdir", str(tmp_path)])
    assert "mlflow tracking  http://127.0.0.1:5000" in result.output


def test_console_script_installed():
    exe = shutil.which("unet-pipeline", path=str(Path(sys.executable).parent))
    assert exe, "the console script unet-pipeline is not installed next to the interpreter"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"unet-pipeline {__version__}"


def test_train_refuses_more_folds_than_labelled_cases_before_any_run(tmp_path):
    from tests.pipeline.ingest.staging_fixture import make_staging

    staging = make_staging(tmp_path, n_cases=3, size=32)
    result = runner.invoke(app, ["train", str(staging), "--folds", "4", "--workdir", str(tmp_path / "wd")])
    assert result.exit_code == 2
    assert "folds=4 exceeds the 3 labelled case(s)" in result.output and "--folds 3 or fewer" in result.output
    assert not (tmp_path / "wd" / "mlflow.db").exists()  # refused before an MLflow run was opened


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--folds", "0"], "--folds"), (["--folds", "2", "--config", "FOLD3"], "data.fold must be in 0..1")],
)
def test_train_refuses_a_bad_fold_count(tmp_path, args, message):
    config = tmp_path / "fold3.yaml"
    config.write_text("data:\n  fold: 3\n  folds: 4\n")
    args = [str(config) if a == "FOLD3" else a for a in args]
    result = runner.invoke(app, ["train", str(tmp_path), *args, "--workdir", str(tmp_path / "wd")])
    assert result.exit_code == 2
    assert message in result.output
