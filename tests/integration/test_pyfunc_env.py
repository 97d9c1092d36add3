"""The registered model stands on its own: a fresh environment from its own requirements serves it.

A real `mlflow server` (SQLite, proxied artifacts) on a free loopback port holds the champion.
A virtual environment is made with `python3 -m venv` and only the model's requirements.txt
(pip's configured indexes; torch held to this project's build so pip never fetches a CUDA
wheel). From it, with no checkout on sys.path (`python -I`, another working directory), the
champion is loaded from the server and segments demo cases; `mlflow models serve` from the same
environment answers one scoring request. Both masks must equal what `unet-pipeline predict`
(this checkout's CLI, in a subprocess) writes for the same files, voxel for voxel.

The environment is cached by the hash of the requirements (and the Python and torch it was
built with) under ~/.cache/unet-pipeline/pyfunc-venv-<hash>, so reruns and CI skip the install.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import version as package_version
from pathlib import Path

import httpx
import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipeline.tracking import Tracker, promote, register
from tests.integration.test_servers import Service, _clean_env, _free_port, _healthy
from tests.pipeline.inference.predict_fixture import make_predict_setup, save_untrained_model

# A cold cache installs the whole environment (about 10 minutes on a busy 2-core machine).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NAME = "standalone-seg"
VENV_INSTALL_TIMEOUT_S = 1500


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unet-pipeline"


def _outside_env() -> dict[str, str]:
    """The environment of a process that knows nothing of this checkout or its venv."""
    env = _clean_env()
    for key in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "UNET_PIPELINE_WORKDIR"):
        env.pop(key, None)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if str(BIN) not in p)
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    service = Service(
        "mlflow server",
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            (root / "artifacts").as_uri(),
        ],
        _clean_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        root / "mlflow-server.log",
        lambda: _healthy(f"http://127.0.0.1:{port}/health"),
    )
    service.start(timeout_s=180)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        service.stop()


@pytest.fixture(scope="module")
def champion(server, tmp_path_factory):
    """The champion on the server, and the masks `unet-pipeline predict` wrote with it."""
    root = tmp_path_factory.mktemp("standalone")
    setup = make_predict_setup(root, n_cases=2, size=32)
    # Seed 7's untrained network (three input slices: the plan's context for these volumes)
    # splits them between the labels.
    model_dir = save_untrained_model(setup.plan, root / "model-seed7", seed=7)
    with Tracker(tracking_uri=server, run_name="standalone-test") as tracker:
        model_uri = tracker.log_model(model_dir, val_dice={"mean": 0.5})
    assert tracker.tracking_error is None
    version = register(model_uri, NAME, tracking_uri=server)
    promote(NAME, version, 0.5, margin=0.0, tracking_uri=server)

    images = sorted((setup.demo.msd_root / "imagesTr").glob("*.nii.gz"))
    out = root / "predicted"
    env = _clean_env() | {"MLFLOW_TRACKING_URI": server, "UNET_PIPELINE_WORKDIR": str(root / "workdir")}
    argv = [str(BIN / "unet-pipeline"), "predict", str(images[0].parent)]
    cli = subprocess.run(
        [*argv, "--model", f"models:/{NAME}@champion", "--out", str(out)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    table = pd.read_csv(out / "results.csv", dtype=str)
    masks = {}
    for image in images:
        case_id = table.loc[table["source"].str.endswith(image.name), "case_id"].item()
        masks[image.name] = np.asarray(nib.load(out / case_id / "seg.nii.gz").dataobj)
        assert len(np.unique(masks[image.name])) > 1  # not an empty or constant mask
    return {"uri": f"models:/{NAME}@champion", "images": images, "masks": masks, "server": server}


def _torch_constraint() -> str:
    """This project's torch build (2.13.0+cpu here): the fresh venv gets exactly it, never CUDA."""
    return f"torch=={package_version('torch')}\n"


def _build_venv(target: Path, requirements: Path, constraints: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True, timeout=300)
    pip = [str(target / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    install = subprocess.run(
        [*pip, "install", "--quiet", "-r", str(requirements), "-c", str(constraints)],
        env=_outside_env(),
        capture_output=True,
        text=True,
        timeout=VENV_INSTALL_TIMEOUT_S,
    )
    assert install.returncode == 0, f"installing the model's requirements failed:\n{install.stderr[-4000:]}"
    check = subprocess.run([*pip, "check"], env=_outside_env(), capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.fixture(scope="module")
def fresh_venv(champion, tmp_path_factory):
    """A venv made from the model's own requirements.txt only, cached by their hash."""
    os.environ["MLFLOW_TRACKING_URI"] = champion["server"]
    try:
        requirements = Path(mlflow.pyfunc.get_model_dependencies(champion["uri"], format="pip"))
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    reqs = requirements.read_text()
    assert "unet-pipeline" not in reqs and "prefect" not in reqs  # nothing only this checkout has
    constraints = tmp_path_factory.mktemp("constraints") / "constraints.txt"
    constraints.write_text(_torch_constraint())
    key = hashlib.sha256((reqs + constraints.read_text() + sys.version).encode()).hexdigest()[:16]
    target = _cache_root() / f"pyfunc-venv-{key}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process building the same venv: wait
        if not (target / ".complete").is_file():
            shutil.rmtree(target, ignore_errors=True)  # a build interrupted earlier
            try:
                _build_venv(target, requirements, constraints)
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise
            (target / ".complete").write_text(reqs)
    return target


_LOAD_AND_SEGMENT = textwrap.dedent(
    """
    import importlib.util, json, sys
    import mlflow, pandas as pd, torch

    model = mlflow.pyfunc.load_model(sys.argv[1])
    paths, outs = json.loads(sys.argv[2]), json.loads(sys.argv[3])
    result = model.predict(pd.DataFrame({"path": paths, "out": outs}))
    import pipeline
    print(json.dumps({
        "pipeline": pipeline.__file__,
        "flows_importable": importlib.util.find_spec("flows") is not None,
        "torch": torch.__version__,
        "sys_path": sys.path,
        "mask_paths": list(result["mask_path"]),
    }))
    """
)


def test_a_fresh_venv_loads_the_champion_and_segments_as_predict_does(champion, fresh_venv, tmp_path):
    images = champion["images"]
    outs = [str(tmp_path / f"mask-{i}.nii.gz") for i in range(len(images))]
    argv = [str(fresh_venv / "bin" / "python"), "-I", "-c", _LOAD_AND_SEGMENT, champion["uri"]]
    run = subprocess.run(
        [*argv, json.dumps([str(p) for p in images]), json.dumps(outs)],
        env=_outside_env() | {"MLFLOW_TRACKING_URI": champion["server"]},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    # The project's code came with the model, not from this checkout or an installed package.
    assert not Path(report["pipeline"]).is_relative_to(REPO), report["pipeline"]
    assert Path(report["pipeline"]).parent.parent.name == "code"
    assert not report["flows_importable"]
    assert not [p for p in report["sys_path"] if p and Path(p).is_relative_to(REPO)]
    assert report["torch"] == package_version("torch")  # the CPU build here, never a CUDA download
    assert report["mask_paths"] == outs
    for image, out in zip(images, outs, strict=True):
        np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), champion["masks"][image.name])


def test_mlflow_models_serve_answers_a_scoring_request(champion, fresh_venv, tmp_path):
    port = _free_port()
    serve = [str(fresh_venv / "bin" / "mlflow"), "models", "serve", "-m", champion["uri"]]
    env = _outside_env() | {"MLFLOW_TRACKING_URI": champion["server"]}
    # As `source bin/activate` would: the server is started as `uvicorn` from PATH.
    env["PATH"] = os.pathsep.join([str(fresh_venv / "bin"), env.get("PATH", "")])
    service = Service(
        "mlflow models serve",
        [*serve, "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env,
        tmp_path / "serve.log",
        lambda: _healthy(f"http://127.0.0.1:{port}/ping"),
    )
    service.start(timeout_s=300)
    try:
        image = champion["images"][1]
        response = httpx.post(
            f"http://127.0.0.1:{port}/invocations",
            json={"dataframe_records": [{"path": str(image)}]},
            timeout=300,
        )
        assert response.status_code == 200, response.text[:2000]
        predictions = response.json()["predictions"]
        assert len(predictions) == 1 and predictions[0]["mask_path"] is None
        mask = np.asarray(predictions[0]["mask"], dtype=np.uint8)
        np.testing.assert_array_equal(mask, champion["masks"][image.name])

        bad = httpx.post(
            f"http://127.0.0.1:{port}/invocations",
            json={"dataframe_records": [{"path": str(tmp_path / "missing.nii.gz")}]},
            timeout=60,
        )
        assert bad.status_code == 400 and "is not a file" in bad.text
    finally:
        pid = service.proc.pid
        service.stop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 0)
            pytest.fail(f"mlflow models serve (pid {pid}) is still running")
