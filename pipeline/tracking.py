"""MLflow tracking and registry: the only module of the pipeline that imports MLflow.

- `Tracker` opens one run, logs params, tags, batched per-epoch metrics and artifacts, and always
  ends the run FINISHED or FAILED. Tracking failures never stop training: they are recorded in
  `Tracker.tracking_error` and logging goes quiet for the rest of the run.
- `Tracker.log_model` logs a folder written by `pipeline.model_store.save_model_dir` as an MLflow
  pyfunc model "from code" (no pickle: the weights stay safetensors, checked by sha256 on load).
- `register`, `load_registered` and `promote` (the champion/challenger gate on registry aliases).

MLflow's HTTP client retries a failed request 7 times with exponential backoff by default; set
MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_TIMEOUT to bound how long an unreachable
tracking server can hold up the start and end of training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import torch
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec

from pipeline.config import Workdir
from pipeline.model_store import LoadedModel, ModelIntegrityError, code_version, load_model_dir

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "unet-pipeline"
MODEL_NAME_IN_RUN = "model"  # the logged model's name inside its run
MODEL_DIR_ARTIFACT = "model_dir"  # key of the model folder in the pyfunc's artifacts

# Tag names (stable: dashboards and the gate key on them).
TAG_CODE_VERSION = "code_version"
TAG_DATASET_SHA = "dataset_manifest_sha256"
TAG_WEIGHTS_SHA = "weights_sha256"
TAG_SCORE = "val_mean_dice"  # the gate's score, recorded on every registered version
TAG_VAL_CASES_SHA = "val_cases_sha256"  # which validation cases that score was computed on
TAG_END_REASON = "end_reason"
TAG_MODEL_NAME = "model_name"  # on batch-inference runs: the registered model that predicted
TAG_MODEL_VERSION = "model_version"

CHAMPION = "champion"
CHALLENGER = "challenger"

# Per-request limits of MLflow's log_batch.
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_PARAM_VALUE_CHARS = 6000

# Keys that would carry patient identity. Params and tags are visible to everyone who can open the
# tracking UI, so these are refused outright rather than logged; use pseudonymous case IDs.
_IDENTIFYING_KEYS = ("patientname", "patientid", "patientbirth", "birthdate", "accession", "mrn")

# "Models from code": MLflow executes this file to build the pyfunc model when loading it, so the
# model class is imported by reference and nothing is pickled.
_MODEL_CODE = '''"""MLflow models-from-code entry point of the unet-pipeline U-Net (see pipeline.tracking)."""

from pipeline.tracking import set_pyfunc_model

set_pyfunc_model()
'''


class TrackingError(RuntimeError):
    """An explicit tracking operation (register, load, promote) that MLflow could not carry out."""


# ---------------------------------------------------------------------------------------------
# Where the store lives


def _artifact_root_for(tracking_uri: str) -> str | None:
    """Artifact location for new experiments: beside a SQLite store, else the store's choice.

    Without this MLflow puts the artifacts of a SQLite store under ./mlruns of the current
    directory, i.e. wherever the command happened to be started.
    """
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        db = Path(unquote(parsed.path))
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def _use_store(tracking_uri: str | None) -> str:
    """Point MLflow's process-wide URIs (used by model logging and loading) at the store."""
    uri = tracking_uri or Workdir.resolve().mlflow_tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        Path(unquote(parsed.path)).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def mlflow_ui_command(workdir: Workdir | str | Path | None = None) -> str:
    """The command that opens the MLflow UI on this work directory's store.

    For a tracking server ($MLFLOW_TRACKING_URI is http(s)) there is nothing to start: its URL.
    """
    wd = workdir if isinstance(workdir, Workdir) else Workdir.resolve(workdir)
    uri = wd.mlflow_tracking_uri()
    if urlparse(uri).scheme in ("http", "https"):
        return uri
    root = _artifact_root_for(uri) or wd.mlflow_artifacts.as_uri()
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)} --default-artifact-root {shlex.quote(root)}"


# ---------------------------------------------------------------------------------------------
# Params


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings to dotted keys with string values: {"train": {"lr": 1e-3}} -> {"train.lr": "0.001"}."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(list(value), default=str)
        else:
            flat[name] = str(value)
    return flat


# user:password@ up to the last "@" of the address: passwords may hold "@" or "/" themselves.
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s@]*(?:@[^\s@]*)*@")
# Environment variables whose values must never appear in a message we keep.
_SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY")


def redact(text: str) -> str:
    """`text` without credentials: user:password@ in URLs and the values of MLflow's secret
    environment variables are replaced by ***."""
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _refuse_identifiers(keys: Iterable[str]) -> None:
    for key in keys:
        squashed = "".join(ch for ch in key.lower() if ch.isalnum())
        if any(word in squashed for word in _IDENTIFYING_KEYS):
            raise ValueError(
                f"refusing to log {key!r} to MLflow: it looks like a patient identifier. Log only "
                f"pseudonymous case IDs; keys containing {', '.join(_IDENTIFYING_KEYS)} are refused"
            )


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
    ) -> None:
        self.experiment = experiment
        self.run_name = run_name
        self.tracking_uri = tracking_uri
        self.flush_every_s = flush_every_s
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.tracking_error: str | None = None
        self.status: str | None = None  # FINISHED or FAILED once ended
        self.log_batch_calls = 0  # requests that carried metrics, params or tags
        self.metric_requests = 0  # of which carried per-epoch metrics
        self._tags = {TAG_CODE_VERSION: code_version(), **(dict(tags) if tags else {})}
        if dataset_sha256:
            self._tags[TAG_DATASET_SHA] = dataset_sha256
        _refuse_identifiers(self._tags)
        self._client: mlflow.MlflowClient | None = None
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
            self.tracking_uri = _use_store(self.tracking_uri)
            client = mlflow.MlflowClient(self.tracking_uri, self.tracking_uri)
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                self.experiment_id = client.create_experiment(
                    self.experiment, artifact_location=_artifact_root_for(self.tracking_uri)
                )
            else:
                self.experiment_id = exp.experiment_id
            run = client.create_run(self.experiment_id, run_name=self.run_name, tags=self._tags)
            self._client = client
            self.run_id = run.info.run_id
            self.run_name = run.info.run_name
            self._last_flush = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - any tracking failure (network, DB, MLflow) must not stop training
            self._fail("starting the MLflow run", exc)
        return self

    def end(self, failed: bool = False, reason: str | None = None) -> None:
        """Flush and end the run FINISHED (or FAILED); safe to call twice."""
        if self._client is None or self.run_id is None or self.status is not None:
            return
        status = "FAILED" if failed else "FINISHED"
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
        _refuse_identifiers(flat)
        entries = []
        for key, value in flat.items():
            if len(value) > _MAX_PARAM_VALUE_CHARS:
                log.info("param %s is %d characters; kept in the artifacts only", key, len(value))
                continue
            entries.append(Param(key, value))
        for chunk in _chunks(entries, _MAX_PARAMS_TAGS_PER_BATCH):
            self._send("logging params", params=chunk)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log a few metrics now (one request per MLflow batch limit), e.g. a batch's counts."""
        now_ms = int(time.time() * 1000)
        entries = [Metric(k, float(v), now_ms, int(step)) for k, v in metrics.items()]
        for chunk in _chunks(entries, _MAX_METRICS_PER_BATCH):
            self._send("logging metrics", metrics=chunk)

    def run_url(self) -> str | None:
        """The run's page on an http(s) tracking server (credentials removed); None for a local store."""
        if self.run_id is None or self.tracking_uri is None:
            return None
        parsed = urlparse(self.tracking_uri)
        if parsed.scheme not in ("http", "https"):
            return None
        base = parsed._replace(netloc=parsed.netloc.rpartition("@")[2], query="", fragment="").geturl()
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        _refuse_identifiers(tags)
        entries = [RunTag(k, str(v)) for k, v in tags.items()]
        for chunk in _chunks(entries, _MAX_PARAMS_TAGS_PER_BATCH):
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
        for chunk in _chunks(pending, _MAX_METRICS_PER_BATCH):
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

    def log_model(self, model_dir: str | Path, *, input_example: np.ndarray) -> str | None:
        """Log a folder from `save_model_dir` as an MLflow pyfunc model; return its model URI.

        `input_example` is a small (N, C, H, W) float32 batch; MLflow stores it and checks that
        the logged model predicts on it. Returns None (and sets `tracking_error`) when tracking
        has failed: the folder itself is untouched either way.
        """
        if not self.active:
            return None
        loaded = load_model_dir(model_dir)  # our own check first: never log a damaged model
        num_classes = loaded.unet_config.num_classes
        try:
            with tempfile.TemporaryDirectory() as tmp:
                code = Path(tmp, "unet_pyfunc_model.py")
                code.write_text(_MODEL_CODE, encoding="utf-8")
                # Created here, in this run's experiment: left to Model.log it would go to the
                # fluent API's current experiment (Default, with artifacts under ./mlruns).
                logged = self._client.create_logged_model(
                    self.experiment_id,
                    name=MODEL_NAME_IN_RUN,
                    source_run_id=self.run_id,
                    tags={TAG_WEIGHTS_SHA: loaded.sha256, TAG_CODE_VERSION: code_version()},
                )
                info = Model.log(
                    artifact_path=None,
                    name=MODEL_NAME_IN_RUN,
                    flavor=mlflow.pyfunc,
                    flavor_name="pyfunc.ModelFromCode",
                    run_id=self.run_id,
                    model_id=logged.model_id,
                    python_model=str(code),
                    artifacts={MODEL_DIR_ARTIFACT: str(Path(model_dir).resolve())},
                    signature=model_signature(loaded.unet_config.in_channels, num_classes),
                    input_example=np.ascontiguousarray(input_example, dtype=np.float32),
                    pip_requirements=_pip_requirements(),
                )
            self._send("tagging the run", tags=[RunTag(TAG_WEIGHTS_SHA, loaded.sha256)])
        except Exception as exc:  # noqa: BLE001 - see start()
            self._fail(f"logging the model {model_dir}", exc)
            return None
        return info.model_uri


def model_signature(in_channels: int, num_classes: int) -> ModelSignature:
    """float32 (N, C_in, H, W) in, float32 logits (N, num_classes, H, W) out; N, H, W free."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, in_channels, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes, -1, -1))]),
    )


def _pip_requirements() -> list[str]:
    """Pinned explicitly: MLflow's inference of requirements loads the model in a subprocess (slow).

    The model class is loaded by reference, so the unet-pipeline package must be installed
    wherever the model is served.
    """
    reqs = []
    for name in ("unet-pipeline", "mlflow", "torch", "safetensors", "numpy"):
        try:
            reqs.append(f"{name}=={package_version(name).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


# ---------------------------------------------------------------------------------------------
# The pyfunc model (loaded by MLflow through _MODEL_CODE)


class UNetPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper: float32 (N, C, H, W) array -> float32 logits (N, num_classes, H, W)."""

    def load_context(self, context) -> None:
        self.loaded = load_model_dir(context.artifacts[MODEL_DIR_ARTIFACT])  # sha256 checked

    # np.ndarray is a hint MLflow accepts without deriving a schema from it (the signature is explicit).
    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            return self.loaded.model(batch).float().numpy()


def set_pyfunc_model() -> None:
    """Called by the models-from-code file when MLflow loads the model."""
    mlflow.models.set_model(UNetPyfunc())


# ---------------------------------------------------------------------------------------------
# Registry


# MLflow's registry announces each registration with print() to stderr (eprint in
# mlflow.tracking._model_registry.fluent), not through a logger, so no logger level silences them.
# While we register, stderr passes through a filter that turns exactly these lines into DEBUG
# records and forwards everything else (warnings, other threads' output) unchanged.
_REGISTRY_NOTICES = re.compile(
    r"^(Successfully registered model '.*'\.|Registered model .* already exists\. Creating a new "
    r"version of this model\.\.\.|Created version '.*' of model '.*'\.)$"
)
_STDERR_SWAP = threading.Lock()


class _NoticeFilter:
    """A stderr stand-in: complete lines matching `_REGISTRY_NOTICES` go to the log at DEBUG."""

    def __init__(self, target: Any) -> None:
        self._target = target
        self._partial = ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            if _REGISTRY_NOTICES.match(line):
                log.debug("MLflow: %s", line)
            else:
                self._target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        # print() flushes only when asked: a notice and its newline never part here.
        if self._partial:
            self._target.write(self._partial)
            self._partial = ""
        self._target.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno...: the real stream's
        return getattr(self._target, name)


@contextmanager
def _registry_notices_to_debug() -> Iterator[None]:
    with _STDERR_SWAP:
        target = sys.stderr
        sys.stderr = notices = _NoticeFilter(target)
        try:
            yield
        finally:
            sys.stderr = target
            notices.flush()


def register(
    model_uri: str,
    name: str,
    *,
    tags: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> int:
    """Register `model_uri` (from `Tracker.log_model`) as a new version of `name`; return the version.

    The logged model's weights sha256 is copied onto the version as a tag.
    """
    _use_store(tracking_uri)
    all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    if model_uri.startswith("models:/m-"):
        logged = mlflow.MlflowClient().get_logged_model(model_uri.removeprefix("models:/"))
        if TAG_WEIGHTS_SHA in logged.tags:
            all_tags.setdefault(TAG_WEIGHTS_SHA, logged.tags[TAG_WEIGHTS_SHA])
    _refuse_identifiers(all_tags)
    with _registry_notices_to_debug():
        version = mlflow.register_model(model_uri, name, tags=all_tags or None)
    log.info("registered %s as %s version %s", model_uri, name, version.version)
    return int(version.version)


def resolve_model_version(uri: str, *, tracking_uri: str | None = None) -> tuple[str, str]:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> (NAME, VERSION number as a string).

    Outputs record the number, never the alias: an alias moves, a version does not.
    Raises TrackingError when the alias or version is not registered.
    """
    parsed = urlparse(str(uri))
    ref = (parsed.netloc + parsed.path).strip("/")
    if parsed.scheme != "models" or not ref or ("@" not in ref and ref.count("/") != 1):
        raise ValueError(f"expected models:/NAME@ALIAS or models:/NAME/VERSION, got {uri!r}")
    _use_store(tracking_uri)
    client = mlflow.MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
        name, version = ref.split("/")
        return name, str(client.get_model_version(name, version).version)
    except mlflow.MlflowException as exc:
        raise TrackingError(f"cannot resolve the model {uri}: {exc.message}") from exc


def model_version_run_id(name: str, version: str, *, tracking_uri: str | None = None) -> str | None:
    """The MLflow run that produced a registered version, when the registry knows it."""
    _use_store(tracking_uri)
    try:
        return mlflow.MlflowClient().get_model_version(name, version).run_id or None
    except mlflow.MlflowException:
        return None


def _find_model_dir(root: Path) -> Path:
    """The model folder inside a downloaded MLflow model (or `root` itself)."""
    if not root.is_dir():
        raise ModelIntegrityError(root, "no such model folder")
    if (root / "model.json").is_file():
        return root
    mlmodel = root / "MLmodel"
    if mlmodel.is_file():
        conf = Model.load(str(root)).flavors.get("python_function", {})
        artifact = conf.get("artifacts", {}).get(MODEL_DIR_ARTIFACT, {})
        if "path" in artifact:
            return root / artifact["path"]
    raise TrackingError(
        f"{root} is neither a model folder (model.json) nor an MLflow model logged by "
        f"Tracker.log_model (MLmodel with a {MODEL_DIR_ARTIFACT!r} artifact)"
    )


def load_registered(
    uri: str | Path,
    *,
    device: str = "cpu",
    tracking_uri: str | None = None,
    dst: str | Path | None = None,
) -> LoadedModel:
    """Load a model by `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN_ID/model`,
    `models:/MODEL_ID`, or a local folder (a model folder or a downloaded MLflow model).

    Registry models are downloaded to `dst` (default: a temporary folder removed after loading)
    and read with `load_model_dir`, which checks the sha256 of every file. No pickle, no code
    from the store is executed.
    """
    if len(urlparse(str(uri)).scheme) <= 1:  # a local folder (a one-letter scheme is a drive)
        return load_model_dir(_find_model_dir(Path(uri)), device=device)
    _use_store(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="unet-model-") as tmp:
        target = Path(dst) if dst is not None else Path(tmp)
        target.mkdir(parents=True, exist_ok=True)
        try:
            downloaded = Path(
                mlflow.artifacts.download_artifacts(artifact_uri=str(uri), dst_path=str(target))
            )
        except mlflow.MlflowException as exc:
            raise TrackingError(f"cannot download the model {uri}: {exc.message}") from exc
        return load_model_dir(_find_model_dir(downloaded), device=device)


def _version_tag_score(version: Any) -> float | None:
    value = version.tags.get(TAG_SCORE)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def promote(
    name: str,
    version: int | str,
    new_score: float,
    *,
    margin: float,
    val_cases_sha256: str | None = None,
    evaluate_fn: Callable[[LoadedModel], float] | None = None,
    tracking_uri: str | None = None,
) -> bool:
    """Champion/challenger gate on registry aliases; True when `version` became the champion.

    `version` becomes `champion` when there is no champion yet, or when
    new_score >= champion_score - margin; otherwise it becomes `challenger`. The champion's score
    is the `val_mean_dice` tag recorded on its version. When that score was computed on other
    validation cases (its `val_cases_sha256` tag differs from `val_cases_sha256`, or either is
    unknown) and `evaluate_fn` is given, the champion is loaded and re-scored with
    `evaluate_fn(loaded_model)` so both scores come from the same cases. Both scores and the
    decision are recorded as tags on `version`.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0 (a tolerated drop in mean Dice), got {margin!r}")
    uri = _use_store(tracking_uri)
    client = mlflow.MlflowClient()
    version = str(version)
    new_tags = {TAG_SCORE: f"{float(new_score):.6f}"}
    if val_cases_sha256:
        new_tags[TAG_VAL_CASES_SHA] = val_cases_sha256

    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.MlflowException:  # no champion yet (MLflow raises for a missing alias)
        champion = None

    champion_score: float | None = None
    champion_version = str(champion.version) if champion is not None else None  # int from some stores
    if champion is not None and champion_version != version:
        champion_score = _version_tag_score(champion)
        same_cases = val_cases_sha256 is not None and champion.tags.get(TAG_VAL_CASES_SHA) == val_cases_sha256
        if evaluate_fn is not None and (not same_cases or champion_score is None):
            loaded = load_registered(f"models:/{name}/{champion_version}", tracking_uri=uri)
            champion_score = float(evaluate_fn(loaded))
            new_tags["gate.champion_rescored"] = "true"
        elif champion_score is None:
            raise TrackingError(
                f"the champion {name} version {champion_version} has no {TAG_SCORE!r} tag and no "
                f"evaluate_fn was given to score it; pass evaluate_fn or tag the version"
            )
        elif not same_cases:
            log.warning(
                "champion %s v%s was scored on other validation cases; comparing anyway (pass "
                "evaluate_fn to re-score it on the same cases)",
                name,
                champion_version,
            )

    promoted = champion_score is None or float(new_score) >= champion_score - margin
    new_tags.update(
        {
            "gate.new_score": f"{float(new_score):.6f}",
            "gate.margin": str(margin),
            "gate.champion_version": champion_version or "none",
            "gate.champion_score": f"{champion_score:.6f}" if champion_score is not None else "none",
            "gate.decision": CHAMPION if promoted else CHALLENGER,
        }
    )
    for key, value in new_tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHAMPION if promoted else CHALLENGER, version)
    if promoted:
        # A challenger that just became champion no longer holds the challenger alias.
        try:
            if str(client.get_model_version_by_alias(name, CHALLENGER).version) == version:
                client.delete_registered_model_alias(name, CHALLENGER)
        except mlflow.MlflowException:
            pass
    log.info(
        "gate %s v%s: score %.4f vs champion %s (margin %s) -> %s",
        name,
        version,
        new_score,
        "none" if champion_score is None else f"{champion_score:.4f}",
        margin,
        CHAMPION if promoted else CHALLENGER,
    )
    return promoted


def dataset_sha256(manifest: str | Path) -> str:
    """sha256 of a dataset manifest file (its bytes), for the run's dataset tag."""
    return hashlib.sha256(Path(manifest).read_bytes()).hexdigest()
