"""Where the MLflow store lives, the names we record in it, and what must never reach it.

Tag names are stable (dashboards, the gate and batch lookups key on them). Params and tags are
visible to everyone who can open the tracking UI: `refuse_identifiers` keeps patient identity
out and `redact` keeps credentials out of every message we keep.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

import mlflow

from pipeline.config import Workdir

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
TAG_LABELS = "labels"  # on logged models and versions: "1=liver, 2=tumour"
TAG_MODALITIES = "plan.modalities"  # the modalities the plan normalizes (CT, MR, ...)
TAG_SPACING = "plan.spacing_mm"  # the plan's in-plane target spacing
TAG_VAL_DICE_PREFIX = "val_dice."  # on logged models and versions: val_dice.<label>, val_dice.mean
TAG_VAL_DICE_MEAN = "val_dice.mean"
TAG_PREFECT_FLOW_RUN_ID = "prefect.flow_run_id"
TAG_PREFECT_FLOW_RUN_URL = "prefect.flow_run_url"
TAG_FOLDS = "cv.folds"  # on a cross-validation's parent run: its number of folds
TAG_FOLD = "cv.fold"  # on a fold's run, nested under the parent
TAG_FOLD_RESUMED = "cv.fold_resumed"  # on a fold's run recorded from an earlier run's result
MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's own tag: its UI nests a run under that run

CHAMPION = "champion"
CHALLENGER = "challenger"

# Keys that would carry patient identity. Params and tags are visible to everyone who can open the
# tracking UI, so these are refused outright rather than logged; use pseudonymous case IDs.
_IDENTIFYING_KEYS = ("patientname", "patientid", "patientbirth", "birthdate", "accession", "mrn")


class TrackingError(RuntimeError):
    """An explicit tracking operation (register, load, promote) that MLflow could not carry out."""


def artifact_root_for(tracking_uri: str) -> str | None:
    """Artifact location for new experiments: beside a SQLite store, else the store's choice.

    Without this MLflow puts the artifacts of a SQLite store under ./mlruns of the current
    directory, i.e. wherever the command happened to be started.
    """
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        db = Path(unquote(parsed.path))
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def use_store(tracking_uri: str | None) -> str:
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
    root = artifact_root_for(uri) or wd.mlflow_artifacts.as_uri()
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)} --default-artifact-root {shlex.quote(root)}"


def _ui_base(tracking_uri: str | None) -> str | None:
    """The UI's base URL of an http(s) tracking server, credentials removed; None for local stores."""
    if not tracking_uri:
        return None
    parsed = urlparse(tracking_uri)
    if parsed.scheme not in ("http", "https"):
        return None
    return (
        parsed._replace(netloc=parsed.netloc.rpartition("@")[2], query="", fragment="").geturl().rstrip("/")
    )


def run_page_url(tracking_uri: str | None, experiment_id: str | None, run_id: str | None) -> str | None:
    """The run's page in the MLflow UI of an http(s) tracking server; None for a local store."""
    base = _ui_base(tracking_uri)
    if base is None or not experiment_id or not run_id:
        return None
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_page_url(tracking_uri: str | None, name: str, version: int | str | None) -> str | None:
    """The model version's page in the MLflow UI of an http(s) tracking server; None otherwise."""
    base = _ui_base(tracking_uri)
    if base is None or version is None:
        return None
    return f"{base}/#/models/{quote(name, safe='')}/versions/{version}"


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


def refuse_identifiers(keys: Iterable[str]) -> None:
    """Raise ValueError for a key that looks like a patient identifier (PatientName, MRN, ...)."""
    for key in keys:
        squashed = "".join(ch for ch in key.lower() if ch.isalnum())
        if any(word in squashed for word in _IDENTIFYING_KEYS):
            raise ValueError(
                f"refusing to log {key!r} to MLflow: it looks like a patient identifier. Log only "
                f"pseudonymous case IDs; keys containing {', '.join(_IDENTIFYING_KEYS)} are refused"
            )


def chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def dataset_sha256(manifest: str | Path) -> str:
    """sha256 of a dataset manifest file (its bytes), for the run's dataset tag and input."""
    return hashlib.sha256(Path(manifest).read_bytes()).hexdigest()


def label_summary(label_names: Mapping[int, str]) -> str:
    """ "1=liver, 2=tumour": the foreground labels of a model, for tags and descriptions."""
    return ", ".join(
        f"{int(k)}={v}" for k, v in sorted(label_names.items(), key=lambda kv: int(kv[0])) if int(k)
    )
