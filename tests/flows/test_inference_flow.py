"""batch_inference_flow on Prefect's ephemeral API with a tiny untrained model and demo NIfTI cases.

One module-scoped API server (its start costs about 10 s); PREFECT_HOME and result storage live in
a temporary folder. Most tests run the real flow; the lock and timeout tests call the pipeline
steps and `run_isolated` directly.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from pipeline.inference.batch import BatchSettings, finalize_batch, predict_case, prepare_batch
from tests.flows.prefect_api import temporary_prefect_api
from tests.pipeline.inference.predict_fixture import PredictSetup, make_predict_setup

CASE_ID = re.compile(r"^case_[0-9a-f]{16}$")


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A temporary Prefect API for the module; yields the flows module under test."""
    with temporary_prefect_api(tmp_path_factory.mktemp("prefect-home")):
        import flows.inference

        yield flows.inference


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> PredictSetup:
    return make_predict_setup(tmp_path_factory.mktemp("flow"), n_cases=6, size=32)


def _source(setup: PredictSetup, root: Path, n: int, broken: bool = False) -> Path:
    src = root / f"src{n}"
    src.mkdir()
    for case in setup.demo.cases[:n]:
        shutil.copy(setup.demo.msd_root / case.msd_image, src / Path(case.msd_image).name)
    if broken:  # a NIfTI file cut short: a case of its own, quarantined when it is loaded
        (src / "broken.nii").write_bytes((src / Path(setup.demo.cases[0].msd_image).name).read_bytes()[:100])
    return src


def _run(flows_mod, setup, src, out, *, flow=None, **kw):
    """batch_inference_flow (or `flow`, e.g. with another task runner) on the test model."""
    return (flow or flows_mod.batch_inference_flow)(
        str(src),
        str(out),
        model_uri=str(setup.model_dir),
        device="cpu",
        secret_file=str(setup.secret),
        return_state=True,
        **kw,
    )


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _task_runs(flow_run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


@pytest.mark.slow
def test_flow_writes_outputs_and_artifacts_and_a_rerun_comes_from_the_cache(prefect_api, setup, tmp_path):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    src, out = _source(setup, tmp_path, 6, broken=True), tmp_path / "out"
    state = _run(prefect_api, setup, src, out)
    assert state.is_completed(), state.message
    summary = state.result()
    assert (summary["ok"], summary["quarantined"], summary["failed"], summary["processed"]) == (6, 1, 0, 6)
    ok = [r["case"] for r in summary["rows"] if r["status"] == "ok"]
    assert len(ok) == 6 and all(CASE_ID.match(c) for c in ok)
    for case_id in ok:
        assert {p.name for p in (out / case_id).iterdir()} == {"seg.nii.gz", "qc.png", "done.json"}
    for name in ("results.csv", "quarantine.jsonl", "run_manifest.json", "report.html"):
        assert (out / name).is_file()
    assert (out / ".batch" / "model" / "weights.safetensors").is_file()

    flow_run_id = state.state_details.flow_run_id
    with _client() as client:
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    by_key = {a.key: a for a in artifacts}
    assert set(by_key) >= {
        "batch-inference-progress",
        "batch-inference-cases",
        "batch-inference-summary",
        "batch-inference-report",
    }
    assert float(by_key["batch-inference-progress"].data) == pytest.approx(100.0)
    table = by_key["batch-inference-cases"].data
    assert "quarantined" in table and all(c in table for c in ok)
    markdown = by_key["batch-inference-summary"].data
    assert "**model** version **local**" in markdown and str(out / "report.html") in markdown
    assert (out / "report.html").as_uri() in by_key["batch-inference-report"].data
    # No source names or paths of the cases in names or artifacts: case IDs only.
    names = [t.name for t in _task_runs(flow_run_id) if t.name.startswith("predict-")]
    assert len(names) == 7 and all(re.fullmatch(r"predict-case_[0-9a-f]{16}", n) for n in names)
    for text in (table, markdown):
        assert "broken.nii" not in text and not any(Path(c.msd_image).name in text for c in setup.demo.cases)

    rerun = _run(prefect_api, setup, src, out)
    assert rerun.is_completed(), rerun.message
    again = rerun.result()
    assert (again["ok"], again["skipped"], again["processed"], again["quarantined"]) == (6, 6, 0, 1)
    runs = _task_runs(rerun.state_details.flow_run_id)
    states = sorted(t.state.name for t in runs if t.name.startswith("predict-"))
    assert states == ["Cached"] * 6 + ["Completed"]  # the quarantined case has no done-marker: it reruns


def _markdown(flow_run_id) -> str:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as client:
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return next(a.data for a in artifacts if a.key == "batch-inference-summary")


def test_the_batch_is_one_finished_mlflow_run_without_source_paths(prefect_api, setup, tmp_path):
    import mlflow

    from pipeline.config import Workdir

    src, out = _source(setup, tmp_path, 3), tmp_path / "out"
    state = _run(prefect_api, setup, src, out, mlflow_experiment="batch-test")
    assert state.is_completed(), state.message
    manifest = json.loads((out / "run_manifest.json").read_text())
    tracked = manifest["tracking"]
    assert tracked["status"] == "logged" and tracked["error"] is None, tracked
    assert state.result()["tracking"] == tracked

    uri = Workdir.resolve().mlflow_tracking_uri()  # the test's own work directory (conftest)
    client = mlflow.MlflowClient(uri)
    run = client.get_run(tracked["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "batch-test"
    assert run.data.tags["model_name"] == "model" and run.data.tags["model_version"] == "local"
    assert run.data.tags["weights_sha256"] == manifest["model"]["sha256"]
    counts = {
        k: run.data.metrics[k] for k in ("cases", "ok", "processed", "skipped", "quarantined", "failed")
    }
    assert counts == {"cases": 3, "ok": 3, "processed": 3, "skipped": 0, "quarantined": 0, "failed": 0}
    labels = [n for v, n in sorted(setup.plan.label_names.items()) if v != 0]
    for label in labels:
        assert run.data.metrics[f"mean_volume_ml.{label}"] >= 0
    params = run.data.params
    assert params["model.weights_sha256"] == manifest["model"]["sha256"] and params["options.device"] == "cpu"
    sources = [str(src), str(setup.demo.root), *(Path(c.msd_image).name for c in setup.demo.cases)]
    for text in [*params.values(), *run.data.tags.values()]:
        assert not any(s in text for s in sources), text
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"results.csv", "report.html"}
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    table = (local / "results.csv").read_text()
    assert table.splitlines()[0].startswith("case_id,status,") and "source" not in table.splitlines()[0]
    for text in (table, (local / "report.html").read_text()):
        assert not any(s in text for s in sources)
        assert all(c in text for c in manifest["inputs"])  # every case, by its pseudonymous ID
    assert f"run `{run.info.run_id}`" in _markdown(state.state_details.flow_run_id)


def test_an_unreachable_tracking_server_leaves_a_note_and_a_completed_flow(
    prefect_api, setup, tmp_path, monkeypatch
):
    # Fail at once (MLflow's default is 7 retries with backoff), as tests/integration does.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://pipeline:s3cret-pw@127.0.0.1:9")
    src, out = _source(setup, tmp_path, 2), tmp_path / "out"
    t0 = time.perf_counter()
    state = _run(prefect_api, setup, src, out)
    assert state.is_completed(), state.message
    assert time.perf_counter() - t0 < 120
    assert len(list(out.glob("case_*/seg.nii.gz"))) == 2
    tracked = json.loads((out / "run_manifest.json").read_text())["tracking"]
    assert tracked["status"] == "failed" and tracked["run_id"] is None
    assert tracked["experiment"] == "batch-inference"
    assert "127.0.0.1:9" in tracked["error"]
    markdown = _markdown(state.state_details.flow_run_id)
    assert "MLflow tracking failed" in markdown and "127.0.0.1:9" in markdown
    for text in (json.dumps(tracked), markdown):
        assert "s3cret-pw" not in text


def test_a_failing_case_fails_the_flow_and_the_others_finish(prefect_api, setup, tmp_path):
    src, out = _source(setup, tmp_path, 3), tmp_path / "out"
    plan = prepare_batch(src, setup.model_dir, out, BatchSettings(device="cpu", secret_file=setup.secret))
    victim = plan.case_ids[0]
    (out / victim).write_text("a file where the case folder goes")  # writing its outputs fails
    state = _run(prefect_api, setup, src, out)
    assert state.is_failed()
    assert "1 failed" in state.message
    summary = state.result(raise_on_failure=False)
    statuses = {r["case"]: r["status"] for r in summary["rows"]}
    assert statuses == {**dict.fromkeys(plan.case_ids, "ok"), victim: "failed"}
    assert all((out / c / "done.json").is_file() for c in plan.case_ids if c != victim)
    with open(out / "results.csv", newline="", encoding="utf-8") as fh:
        (row,) = [r for r in csv.DictReader(fh) if r["status"] == "failed"]
    assert row["case_id"] == victim and row["reason"] == "OUTPUT_WRITE_FAILED"
    assert "NotADirectoryError" in row["message"] or "FileExistsError" in row["message"]


def test_the_task_cache_key_is_the_done_markers_case_key(prefect_api, setup, tmp_path):
    """One function keys both: the Prefect cache of predict-case and the done-markers."""
    from flows.common import content_key, path_key
    from pipeline.io.batchdir import case_key

    src, out = _source(setup, tmp_path, 2), tmp_path / "out"
    plan = prepare_batch(src, setup.model_dir, out, BatchSettings(device="cpu", secret_file=setup.secret))
    for case_id in plan.case_ids:
        assert predict_case(out, case_id)["status"] == "ok"
    for case_id in plan.case_ids:
        marker = json.loads((out / case_id / "done.json").read_text())
        assert marker["case_key"] == case_key(plan.inputs_sha256[case_id], plan.settings)
        task_key = prefect_api._case_key(None, {"plan": plan, "case_id": case_id, "out": str(out)})
        assert task_key == content_key("predict", case_id, marker["case_key"], path_key(out))
    # An option that changes the outputs changes both keys: no QC picture, no cache hit.
    other = prepare_batch(
        src, setup.model_dir, out, BatchSettings(device="cpu", secret_file=setup.secret, write_qc=False)
    )
    assert sorted(other.todo) == sorted(plan.case_ids)
    for case_id in plan.case_ids:
        params = {"case_id": case_id, "out": str(out)}
        assert prefect_api._case_key(None, {**params, "plan": other}) != prefect_api._case_key(
            None, {**params, "plan": plan}
        )


def test_the_same_case_submitted_twice_at_once_is_processed_once(setup, tmp_path):
    src, out = _source(setup, tmp_path, 1), tmp_path / "out"
    plan = prepare_batch(src, setup.model_dir, out, BatchSettings(device="cpu", secret_file=setup.secret))
    (case_id,) = plan.todo
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(predict_case(out, case_id))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["status"] for r in results) == ["ok", "skipped"]
    assert {r["case_id"] for r in results} == {case_id}
    assert finalize_batch(out).processed == 1


def test_a_case_past_its_timeout_is_killed_and_the_batch_goes_on(prefect_api, setup, tmp_path):
    from flows.workers import CaseTimeout, run_isolated

    t0 = time.perf_counter()
    with pytest.raises(CaseTimeout):
        run_isolated(time.sleep, 60, timeout_s=1.0)
    assert time.perf_counter() - t0 < 15

    src, out = _source(setup, tmp_path, 2), tmp_path / "out"
    plan = prepare_batch(src, setup.model_dir, out, BatchSettings(device="cpu", secret_file=setup.secret))
    hung, fine = plan.case_ids
    task = prefect_api.predict_case_task.fn
    assert task(str(out), hung, plan, 0.001)["reason"] == "TIMEOUT"
    assert task(str(out), fine, plan, 120.0)["status"] == "ok"
    summary = finalize_batch(out)
    assert {r.case_id: (r.status, r.reason) for r in summary.results} == {
        hung: ("failed", "TIMEOUT"),
        fine: ("ok", ""),
    }
    assert not (out / hung / "done.json").exists()
    with open(out / "results.csv", newline="", encoding="utf-8") as fh:
        assert {r["case_id"]: r["reason"] for r in csv.DictReader(fh)}[hung] == "TIMEOUT"


@pytest.mark.slow
def test_dask_task_runner_with_a_local_cluster(prefect_api, setup, tmp_path):
    src, out = _source(setup, tmp_path, 3), tmp_path / "out"
    state = _run(prefect_api, setup, src, out, task_runner="dask")
    assert state.is_completed(), state.message
    assert state.result()["ok"] == 3
    assert len(list(out.glob("case_*/done.json"))) == 3
