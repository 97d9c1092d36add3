"""pacs_batch_flow: pull matching studies from a PACS, segment them, push the DICOM SEGs back.

pull (QIDO-RS/C-FIND search with relative dates resolved now in the site's time zone, WADO-RS or
C-MOVE into OUT/.spool/; retried: network I/O) -> batch_inference_flow on the spool's complete
series (a subflow: the same ingest rules, per-case tasks and MLflow record as a folder batch) ->
push-case per ok case (STOW-RS or C-STORE; a refusing or down PACS is the case's `push_failed`
record, retried by the next run, never a second push of a stored case) -> finalize (results.csv
gains the push columns).

Credentials come from the worker's environment (UNET_PACS_*, UNET_PUSH_*) or from Prefect Secret
blocks named by `credentials_block` / `push_credentials_block`, whose value is JSON
{"username": ..., "password": ...} or {"token": ...}. Only the block's name travels as a
parameter; the secret is read inside the task and never logged, returned or stored.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed

from flows.inference import batch_inference_flow, finalize_task
from flows.pull import credentials, pull_task
from flows.reporting import pacs_markdown, pacs_message, pacs_summary
from pipeline.pacs.push import push_case


@task(
    name="pacs-push-case",
    task_run_name="push-{case_id}",
    retries=0,  # a failure is recorded on the case and retried by the next run
    tags=["io", "pacs"],
    cache_policy=NO_CACHE,
)
def push_case_task(out: str, case_id: str, destination: str, block: str | None, with_sr: bool) -> dict:
    return push_case(out, case_id, destination, credentials=credentials(block, push=True), with_sr=with_sr)


@flow(name="pacs-batch", log_prints=False, validate_parameters=True)
def pacs_batch_flow(
    source: str,
    out: str,
    push: str | None = None,
    model_uri: str = "models:/unet-seg@champion",
    device: str = "auto",
    batch_size: int | None = None,
    case_timeout_s: float = 1800.0,
    secret_file: str | None = None,
    site_timezone: str | None = None,
    credentials_block: str | None = None,
    push_credentials_block: str | None = None,
    push_sr: bool = False,
    mlflow_experiment: str | None = "batch-inference",
    task_runner: str = "threads",
) -> dict:
    """Pull SOURCE (a PACS URL whose query may say StudyDate=yesterday), predict, push to PUSH.

    `task_runner`: where the cases are predicted (batch_inference_flow's parameter: "threads" or
    a Dask scheduler's address, tcp://HOST:8786).

    `site_timezone` (IANA name; default $UNET_SITE_TIMEZONE or the machine's zone) resolves the
    query's relative dates when the run starts. The final state is Failed when a case failed or
    a push failed (the masks are written either way; the next run pushes what is missing).
    """
    t0 = time.perf_counter()
    pulled = pull_task(source, out, secret_file, site_timezone, credentials_block)
    t_pull = time.perf_counter()
    inference_state = batch_inference_flow(
        pulled["folder"],
        out,
        model_uri=model_uri,
        device=device,
        batch_size=batch_size,
        case_timeout_s=case_timeout_s,
        secret_file=secret_file,
        mlflow_experiment=mlflow_experiment,
        task_runner=task_runner,
        return_state=True,
    )
    inference = inference_state.result(raise_on_failure=False)
    if not isinstance(inference, dict):  # the subflow broke before its summary (model refused...)
        return Failed(message=f"batch inference did not run: {inference_state.message}")
    t_predict = time.perf_counter()
    pushed: list[dict] = []
    if push:
        ok = [row["case"] for row in inference["rows"] if row["status"] == "ok"]
        futures = [push_case_task.submit(out, c, push, push_credentials_block, push_sr) for c in ok]
        pushed = [f.result() for f in futures]
        inference = finalize_task(out)  # results.csv gains the push columns
    seconds = {"pull": t_pull - t0, "predict": t_predict - t_pull, "push": time.perf_counter() - t_predict}
    summary = pacs_summary(pulled, inference, pushed, destination_given=bool(push), seconds=seconds)
    create_markdown_artifact(key="pacs-batch-summary", markdown=pacs_markdown(summary, out))
    message = pacs_message(summary)
    get_run_logger().info("pacs batch: %s", message)
    if summary["inference"]["failed"] or summary["push"]["push_failed"]:
        return Failed(message=message, data=summary)
    return Completed(message=message, data=summary)
