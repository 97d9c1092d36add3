"""train_flow on Prefect's ephemeral API: the MLflow run and the Prefect flow run point at each other.

A tiny two-epoch training on phantoms; the work directory's SQLite MLflow store (conftest gives
each test its own). PREFECT_UI_URL is set as a deployment sets it, so flow runs have pages.
"""

from __future__ import annotations

import asyncio

import mlflow
import pytest

from pipeline import tracking
from pipeline.config import Workdir
from tests.flows.prefect_api import temporary_prefect_api
from tests.pipeline.ingest.staging_fixture import TINY, make_staging

UI = "http://prefect.test:4200"


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A temporary Prefect API for the module; yields the flows module under test."""
    with temporary_prefect_api(tmp_path_factory.mktemp("prefect-home"), PREFECT_UI_URL=UI):
        import flows.train

        yield flows.train


async def _summary_artifact(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return next(a.data for a in artifacts if a.key == "train-summary")


@pytest.mark.slow
def test_train_flow_links_mlflow_and_prefect_both_ways(prefect_api, tmp_path):
    staging = make_staging(tmp_path, n_cases=4)
    state = prefect_api.train_flow(
        str(staging),
        register_as="flow-seg",
        run_dir=str(tmp_path / "run"),
        config_overrides={"model": TINY["model"], "train": TINY["train"]},
        return_state=True,
    )
    assert state.is_completed(), state
    result = state.result()
    flow_run_id = str(state.state_details.flow_run_id)

    client = mlflow.MlflowClient(Workdir.resolve().mlflow_tracking_uri())
    run = client.get_run(result["run_id"])
    assert run.data.tags[tracking.TAG_PREFECT_FLOW_RUN_ID] == flow_run_id
    assert run.data.tags[tracking.TAG_PREFECT_FLOW_RUN_URL] == f"{UI}/flow-runs/flow-run/{flow_run_id}"
    assert run.data.tags["mlflow.user"]
    # The staged dataset is the run's input, identified by its manifest.
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == tracking.dataset_sha256(staging / "manifest.jsonl")[:32]

    version = client.get_model_version("flow-seg", str(result["model_version"]))
    assert version.tags[tracking.TAG_PREFECT_FLOW_RUN_ID] == flow_run_id
    assert len(version.description.splitlines()) == 2

    summary = asyncio.run(_summary_artifact(state.state_details.flow_run_id))
    assert f"MLflow run `{result['run_id']}`" in summary
    assert f"models:/flow-seg/{result['model_version']}" in summary  # a local store: the URI to open


@pytest.mark.slow
def test_train_flow_cross_validates_with_folds(prefect_api, tmp_path):
    from pipeline.tracking import load_registered

    staging = make_staging(tmp_path, n_cases=4)
    state = prefect_api.train_flow(
        str(staging),
        register_as="flow-cv",
        run_dir=str(tmp_path / "run"),
        config_overrides={"model": TINY["model"], "train": {**TINY["train"], "val_qc_cases": 0}},
        folds=2,
        return_state=True,
    )
    assert state.is_completed(), state
    result = state.result()
    assert [f["fold"] for f in result["folds"]] == [0, 1]
    assert sum(f["val_cases"] for f in result["folds"]) == 4
    assert (tmp_path / "run" / "fold_0" / "model").is_dir() and (
        tmp_path / "run" / "fold_1" / "model"
    ).is_dir()
    uri = Workdir.resolve().mlflow_tracking_uri()
    assert load_registered(f"models:/flow-cv/{result['model_version']}", tracking_uri=uri).folds == 2
    summary = asyncio.run(_summary_artifact(state.state_details.flow_run_id))
    assert "2-fold cross-validation: out-of-fold mean Dice" in summary
