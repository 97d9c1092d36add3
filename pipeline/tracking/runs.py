"""One MLflow run: params, tags, metrics, the staged dataset, system metrics and the model.

- `Tracker` opens one run, logs params, tags, batched per-epoch metrics and artifacts, and always
  ends the run FINISHED or FAILED. Tracking failures never stop training: they are recorded in
  `Tracker.tracking_error` and logging goes quiet for the rest of the run.
- The run is created with MLflow's context tags (mlflow.user, mlflow.source.*, the git commit),
  as `mlflow.start_run` would set them, and can sample system metrics (CPU, memory, disk,
  network; GPU where NVML is installed) under system/.
- `Tracker.log_dataset` records the staged dataset as the run's input (digest: the manifest
  hash; profile: case counts and the split).
- `Tracker.log_model` logs a folder written by `pipeline.io.model_dir.save_model_dir` as the
  volume pyfunc of `pipeline.tracking.pyfunc` (from code, with the project's code and pinned
  requirements; the weights stay safetensors, checked by sha256 on load).

MLflow's HTTP client retries a failed request 7 times with exponential backoff by default; set
MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_TIMEOUT to bound how long an unreachable
tracking server can hold up the start and end of training.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import mlflow
import yaml
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.models import Model

from pipeline.io.model_dir import code_version, load_model_dir
from pipeline.tracking import pyfunc
from pipeline.tracking.datasets import CONTEXT_TRAINING, manifest_dataset
from pipeline.tracking.store import (
    DEFAULT_EXPERIMENT,
    MODEL_DIR_ARTIFACT,
    MODEL_NAME_IN_RUN,
    TAG_CODE_VERSION,
    TAG_DATASET_SHA,
    TAG_END_REASON,
    TAG_LABELS,
    TAG_MODALITIES,
    TAG_SPACING,
    TAG_VAL_DICE_PREFIX,
    TAG_WEIGHTS_SHA,
    artifact_root_for,
    chunks,
    flatten,
    label_summary,
    redact,
    refuse_identifiers,
    run_page_url,
    use_store,
)

log = logging.getLogger(__name__)

# Per-request limits of MLflow's log_batch.
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_PARAM_VALUE_CHARS = 6000


# ---------------------------------------------------------------------------------------------
# The run


class Tracker:
    """One MLflow run of a training job. Use as a context manager.

    Every method is a no-op once tracking has failed; the first failure is kept in
    `tracking_error` (and logged as a warning), never raised: the model is saved locally
    before it is logged, so a tracking outage costs the record, not the model.

    Per-epoch metrics are buffered and sent with MlflowClient.log_batch at most every
    `flush_every_s` seconds (and when the run ends), so a run of many epochs costs a handful of
    requests instead of one per metric.
    """

    def __init__(
        self,
        *,
        experiment: str = DEFAULT_EXPERIMENT,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        dataset_sha256: str | None = None,
        tags: Mapping[str, str] | None = None,
        flush_every_s: float = 10.0,
        system_metrics: bool = False,
    ) -> None:
        self.experiment = experiment
        self.run_name = run_name
        self.tracking_uri = tracking_uri
        self.flush_every_s = flush_every_s
        self.system_metrics = system_metrics  # sample CPU/memory/GPU under system/ while the run is open
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.tracking_error: str | None = None
        self.status: str | None = None  # FINISHED or FAILED once ended
        self.log_batch_calls = 0  # requests that carried metrics, params or tags
        self.metric_requests = 0  # of which carried per-epoch metrics
        self._tags = {TAG_CODE_VERSION: code_version(), **(dict(tags) if tags else {})}
        if dataset_sha256:
            self._tags[TAG_DATASET_SHA] = dataset_sha256
        refuse_identifiers(self._tags)
        self._client: mlflow.MlflowClient | None = None
        self._monitor: Any = None  # MLflow's SystemMetricsMonitor while it samples
        self._system_samples = 0
        self._pending: list[Metric] = []
        self._last_flush = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True while the run is open and tracking has not failed."""
        return self._client is not None and self.run_id is not None and self.tracking_error is None

    def _fail(self, what: str, exc: BaseException) -> None:
        # Kept in summaries, manifests and Prefect artifacts: no credentials in it.
        message = redact(f"{what} failed on {self.tracking_uri}: {type(exc).__name__}: {exc}")
        if self.tracking_error is None:
            self.tracking_error = message
            log.warning("MLflow tracking disabled for the rest of this run: %s", message)
        else:
            log.warning("%s", message)

    def start(self) -> Tracker:
        """Open the run (creating the experiment, with its artifacts beside a SQLite store)."""
        try:
            self.tracking_uri = use_store(self.tracking_uri)
            client = mlflow.MlflowClient(self.tracking_uri, self.tracking_uri)
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                self.experiment_id = client.create_experiment(
                    self.experiment, artifact_location=artifact_root_for(self.tracking_uri)
                )
            else:
                self.experiment_id = exp.experiment_id
            # The client skips MLflow's run context providers (mlflow.start_run applies them):
            # resolve them here so the run shows its user, entry point and git commit.
            from mlflow.tracking.context.registry import resolve_tags

            run = client.create_run(self.experiment_id, run_name=self.run_name, tags=resolve_tags(self._tags))
            self._client = client
            self.run_id = run.info.run_id
            self.run_name = run.info.run_name
            self._last_flush = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - any tracking failure (network, DB, MLflow) must not stop training
            self._fail("starting the MLflow run", exc)
            return self
        if self.system_metrics:
            self._start_system_metrics()
        return self

    def _start_system_metrics(self) -> None:
        """MLflow's sampler (every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s, default 10) in a thread."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.tracking_uri)
            monitor.start()
            self._monitor = monitor
        except Exception as exc:  # noqa: BLE001 - psutil missing or a failing probe: the run goes on without
            log.warning("system metrics are not recorded for this run: %s: %s", type(exc).__name__, exc)

    @property
    def system_metrics_samples(self) -> int:
        """How many system-metric samples have been handed to MLflow so far (0 when off)."""
        if self._monitor is not None:
            return int(getattr(self._monitor, "_logging_step", 0))
        return self._system_samples

    def _stop_system_metrics(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        try:
            monitor.finish()  # joins the sampler and flushes what it queued
        except Exception as exc:  # noqa: BLE001 - see start()
            log.warning("stopping the system metrics sampler failed: %s", exc)
        self._system_samples = int(getattr(monitor, "_logging_step", 0))

    def end(self, failed: bool = False, reason: str | None = None) -> None:
        """Flush and end the run FINISHED (or FAILED); safe to call twice."""
        if self._client is None or self.run_id is None or self.status is not None:
            return
        status = "FAILED" if failed else "FINISHED"
        self._stop_system_metrics()
        if self.tracking_error is None:
            self.flush()
        try:
            if reason:
                self._client.set_tag(self.run_id, TAG_END_REASON, reason[:5000])
            self._client.set_terminated(self.run_id, status)
            self.status = status
        except Exception as exc:  # noqa: BLE001 - see start()
            self._fail(f"ending the MLflow run {self.run_id} as {status}", exc)

    def __enter__(self) -> Tracker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # BaseException included: Ctrl-C (KeyboardInterrupt) ends the run FAILED, not RUNNING.
        reason = None if exc_type is None else f"{exc_type.__name__}: {exc}"
        self.end(failed=exc_type is not None, reason=reason)

    # -- logging --------------------------------------------------------------------------

    def _send(self, what: str, *, metrics=(), params=(), tags=()) -> bool:
        if not self.active:
            return False
        try:
            self._client.log_batch(self.run_id, metrics=metrics, params=params, tags=tags, synchronous=True)
        except Exception as exc:  # noqa: BLE001 - see start()
            self._fail(what, exc)
            return False
        self.log_batch_calls += 1
        return True

    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        """Log nested params as dotted keys; values over MLflow's limit go to artifacts only."""
        flat = flatten(params, prefix)
        refuse_identifiers(flat)
        entries = []
        for key, value in flat.items():
            if len(value) > _MAX_PARAM_VALUE_CHARS:
                log.info("param %s is %d characters; kept in the artifacts only", key, len(value))
                continue
            entries.append(Param(key, value))
        for chunk in chunks(entries, _MAX_PARAMS_TAGS_PER_BATCH):
            self._send("logging params", params=chunk)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log a few metrics now (one request per MLflow batch limit), e.g. a batch's counts."""
        now_ms = int(time.time() * 1000)
        entries = [Metric(k, float(v), now_ms, int(step)) for k, v in metrics.items()]
        for chunk in chunks(entries, _MAX_METRICS_PER_BATCH):
            self._send("logging metrics", metrics=chunk)

    def run_url(self) -> str | None:
        """The run's page on an http(s) tracking server (credentials removed); None for a local store."""
        return run_page_url(self.tracking_uri, self.experiment_id, self.run_id)

    def log_dataset(self, staging: str | Path, split: Mapping[str, list[str]] | None = None) -> None:
        """Record the staging folder as the run's training input (see `datasets.manifest_dataset`)."""
        if not self.active:
            return
        try:
            dataset = manifest_dataset(staging, split)
            context = InputTag("mlflow.data.context", CONTEXT_TRAINING)
            self._client.log_inputs(
                self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[context])]
            )
        except Exception as exc:  # noqa: BLE001 - see start()
            self._fail(f"logging the dataset input {staging}", exc)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        refuse_identifiers(tags)
        entries = [RunTag(k, str(v)) for k, v in tags.items()]
        for chunk in chunks(entries, _MAX_PARAMS_TAGS_PER_BATCH):
            self._send("setting tags", tags=chunk)

    def log_config(self, config: Mapping[str, Any], plan: Mapping[str, Any]) -> None:
        """The resolved config and the dataset plan, as params and as config.yaml / plan.json."""
        self.log_params(config)
        self.log_params(plan, prefix="plan.")
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp, "config.yaml")
            cfg.write_text(yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False))
            pln = Path(tmp, "plan.json")
            pln.write_text(json.dumps(plan, indent=2, default=str) + "\n")
            self.log_artifact(cfg)
            self.log_artifact(pln)

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Training callback: buffer this epoch's metrics; send them when the flush interval is up."""
        if not self.active:
            return
        now_ms = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now_ms, int(epoch)) for k, v in metrics.items())
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Send the buffered metrics now (in batches of MLflow's per-request limit)."""
        pending, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        for chunk in chunks(pending, _MAX_METRICS_PER_BATCH):
            if self._send("logging metrics", metrics=chunk):
                self.metric_requests += 1

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file (training curves, QC PNGs, reports) into the run's artifacts."""
        if not self.active:
            return
        try:
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as exc:  # noqa: BLE001 - see start()
            self._fail(f"logging the artifact {path}", exc)

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        for path in paths:
            self.log_artifact(path, artifact_path)

    def log_model(self, model_dir: str | Path, *, val_dice: Mapping[str, float] | None = None) -> str | None:
        """Log a folder from `save_model_dir` as the volume pyfunc; return its model URI.

        The logged model carries the project's code (code_paths), pinned pip requirements, the
        volume signature and a synthetic input example (which MLflow runs through the model
        now). Its tags hold the facts `register` copies onto a version: labels, the plan's
        spacing and modalities, the code version, the weights sha256 and `val_dice` (label ->
        Dice, "mean" included) when given. Returns None (and sets `tracking_error`) when
        tracking has failed: the folder itself is untouched either way.
        """
        if not self.active:
            return None
        loaded = load_model_dir(model_dir)  # our own check first: never log a damaged model
        plan = loaded.plan
        modalities = sorted(k for k in plan.get("normalization", {}) if k != "default")
        tags = {
            TAG_WEIGHTS_SHA: loaded.sha256,
            TAG_CODE_VERSION: code_version(),
            TAG_LABELS: label_summary(loaded.label_names),
            TAG_MODALITIES: ", ".join(modalities) or "any",
            TAG_SPACING: f"{float(plan['target_spacing']):g}",
        }
        for label, value in (val_dice or {}).items():
            if math.isfinite(float(value)):  # NaN when no validation ran: no score, not "nan"
                tags[f"{TAG_VAL_DICE_PREFIX}{label}"] = f"{float(value):.4f}"
        try:
            with pyfunc.model_code_file() as code, pyfunc.code_paths() as code_paths:
                # Created here, in this run's experiment: left to Model.log it would go to the
                # fluent API's current experiment (Default, with artifacts under ./mlruns).
                logged = self._client.create_logged_model(
                    self.experiment_id, name=MODEL_NAME_IN_RUN, source_run_id=self.run_id, tags=tags
                )
                info = Model.log(
                    artifact_path=None,
                    name=MODEL_NAME_IN_RUN,
                    flavor=mlflow.pyfunc,
                    flavor_name="pyfunc.ModelFromCode",
                    run_id=self.run_id,
                    model_id=logged.model_id,
                    python_model=code,
                    code_paths=code_paths,
                    artifacts={MODEL_DIR_ARTIFACT: str(Path(model_dir).resolve())},
                    signature=pyfunc.model_signature(),
                    input_example=pyfunc.input_example(plan),
                    pip_requirements=pyfunc.pip_requirements(),
                )
            self._send("tagging the run", tags=[RunTag(TAG_WEIGHTS_SHA, loaded.sha256)])
        except Exception as exc:  # noqa: BLE001 - see start()
            self._fail(f"logging the model {model_dir}", exc)
            return None
        return info.model_uri
