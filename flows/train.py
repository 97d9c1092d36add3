"""train_flow: a staging dataset to a trained, logged, registered and gated model."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL

from flows.common import config_hash, content_key, path_key
from pipeline.config import PipelineConfig, Workdir, load_config
from pipeline.io.model_dir import code_version
from pipeline.tracking import TAG_PREFECT_FLOW_RUN_ID, TAG_PREFECT_FLOW_RUN_URL, dataset_sha256
from pipeline.tracking.release import gate_run, register_model, summary_markdown, train_and_log


def flow_run_tags() -> dict[str, str]:
    """This flow run's ID and, when Prefect knows its UI's address, its page: for MLflow tags."""
    tags = {}
    if flow_run.id:
        tags[TAG_PREFECT_FLOW_RUN_ID] = str(flow_run.id)
        if PREFECT_UI_URL.value():  # unset for the embedded server: no page to link to
            tags[TAG_PREFECT_FLOW_RUN_URL] = str(flow_run.ui_url)
    return tags


def _train_key(context, parameters) -> str:
    """Content key: the staged data (manifest with its sha256s), the config, the code version."""
    staging = Path(parameters["staging"])
    return content_key(
        "train",
        dataset_sha256(staging / "manifest.jsonl"),
        config_hash(parameters["config"]),
        code_version(),
        path_key(parameters["run_dir"]),
    )


@task(
    name="train-model",
    tags=["gpu"],
    cache_key_fn=_train_key,
    persist_result=True,
    result_serializer="json",
)
def train_task(
    staging: str, run_dir: str, config: dict, tracking_uri: str, run_tags: dict | None = None
) -> dict:
    """Train and log (no retries: deterministic compute; it resumes from its checkpoint if rerun)."""
    trained = train_and_log(
        staging, run_dir, PipelineConfig.from_dict(config), tracking_uri=tracking_uri, run_tags=run_tags
    )
    return trained.summary()


@task(
    name="register-model",
    retries=3,
    retry_delay_seconds=[5, 30, 120],
    tags=["tracking"],
    cache_policy=NO_CACHE,
)
def register_task(model_uri: str, name: str, tracking_uri: str, tags: dict | None = None) -> int:
    return register_model(model_uri, name, tracking_uri=tracking_uri, tags=tags)


@task(
    name="champion-gate",
    retries=3,
    retry_delay_seconds=[5, 30, 120],
    tags=["tracking"],
    cache_policy=NO_CACHE,
)
def gate_task(name: str, version: int, run_dir: str, staging: str, config: dict, tracking_uri: str) -> bool:
    return gate_run(
        name, version, run_dir, staging, PipelineConfig.from_dict(config), tracking_uri=tracking_uri
    )


@flow(name="train", validate_parameters=True)
def train_flow(
    staging: str,
    config_file: str | None = None,
    register_as: str | None = None,
    run_dir: str | None = None,
    config_overrides: dict | None = None,
    folds: int | None = None,
) -> dict:
    """Train on STAGING, log to MLflow, register as REGISTER_AS (default: the config's name), gate it.

    `config_overrides` maps sections to fields, e.g. {"train": {"time_budget_minutes": 3}}.
    `folds` K > 1 (data.folds): K-fold cross-validation, one model per fold (one after the
    other, each an MLflow run nested under the flow's run), registered as their ensemble.
    """
    logger = get_run_logger()
    config = load_config(config_file)
    if config_overrides:
        config = config.replace(**config_overrides)
    if folds is not None:
        config = config.replace(data={"folds": folds})
    workdir = Workdir.resolve()
    uri = workdir.mlflow_tracking_uri()
    # One folder per (data, config): a rerun resumes its own checkpoint, never another dataset's.
    key = content_key(dataset_sha256(Path(staging) / "manifest.jsonl"), config_hash(config.to_dict()))
    run_dir = run_dir or str(workdir.root / "runs" / f"train-{key[:12]}")
    name = register_as or config.tracking.registered_model_name
    # The MLflow run and the model version point back at this flow run (and its page).
    prefect_tags = flow_run_tags()
    summary = train_task(staging, run_dir, config.to_dict(), uri, prefect_tags)
    version, champion = None, False
    if summary["model_uri"]:
        version = register_task(summary["model_uri"], name, uri, prefect_tags)
        champion = gate_task(name, version, run_dir, staging, config.to_dict(), uri)
    else:
        logger.warning("tracking failed (%s); the model stays in %s", summary["tracking_error"], run_dir)
    create_markdown_artifact(
        key="train-summary", markdown=summary_markdown(summary, name, version, champion, uri)
    )
    return {**summary, "model_name": name, "model_version": version, "champion": champion}
