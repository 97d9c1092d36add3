"""end_to_end_flow: ingest -> train -> register -> champion gate -> batch inference -> evaluate."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.inference import batch_inference_flow
from flows.ingest import ingest_flow
from flows.reporting import end_to_end_markdown
from flows.train import train_flow
from pipeline.training.data import split_holdout
from pipeline.training.metrics import evaluate_folders


@task(name="holdout-split", retries=2, retry_delay_seconds=[5, 30], tags=["io"], cache_policy=NO_CACHE)
def holdout_task(staging: str, fraction: float, seed: int, out: str) -> tuple[str, str]:
    train_view, test_view = split_holdout(staging, fraction, seed, out)
    return str(train_view), str(test_view)


@task(name="evaluate", tags=["io"], cache_policy=NO_CACHE)
def evaluate_task(predictions: str, truth_labels: str) -> dict:
    csv_path, means = evaluate_folders(predictions, truth_labels)
    return {"metrics_csv": str(csv_path), **means}


@flow(name="end-to-end", validate_parameters=True)
def end_to_end_flow(
    source: str,
    workdir: str,
    register_as: str = "unet-seg",
    holdout_fraction: float = 0.2,
    config_file: str | None = None,
    config_overrides: dict | None = None,
    secret_file: str | None = None,
) -> dict:
    """The whole job on SOURCE: stage it, train on most cases, gate, predict and score the rest."""
    root = Path(workdir)
    staging = str(root / "staging")
    ingest = ingest_flow(source, staging, secret_file=secret_file, config=config_file)
    train_view, test_view = holdout_task(staging, holdout_fraction, 0, str(root / "views"))
    trained = train_flow(
        train_view, config_file=config_file, register_as=register_as, config_overrides=config_overrides
    )
    predictions = str(root / "predictions")
    model_uri = f"models:/{trained['model_name']}/{trained['model_version']}"
    inference = batch_inference_flow(test_view, predictions, model_uri=model_uri, return_state=True)
    batch = inference.result(raise_on_failure=False)
    scores = evaluate_task(predictions, str(Path(test_view) / "labels"))
    summary = {"ingest": ingest, "train": trained, "inference": batch, "holdout": scores}
    create_markdown_artifact(key="end-to-end-summary", markdown=end_to_end_markdown(summary, predictions))
    get_run_logger().info("end to end: held-out mean Dice %.3f", scores.get("dice_mean", float("nan")))
    return summary
