"""The model predict runs: loaded and verified once (sha256, no pickle), then cached per process.

`load_model` takes a registry URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/...) or a
model folder and returns a `ModelHandle`: the loaded network with its plan and what identifies it
in outputs. A worker process keeps one model (`cached_model`): a long-lived worker loads it once;
a batch with another model replaces it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.io.model_dir import MODEL_FILE, LoadedModel, save_model_dir
from pipeline.planning.plan import Plan
from pipeline.runtime import configure_threads, prepare_model, resolve_device


class ModelLoadError(RuntimeError):
    """The model could not be loaded or verified; no case was run."""


@dataclass(frozen=True)
class ModelHandle:
    """A verified model and what identifies it in outputs."""

    loaded: LoadedModel
    uri: str
    name: str
    version: str  # registry version number, "run"/"logged", or "local" for a folder
    sha256: str  # of the weights, checked on load
    run_id: str | None = None  # the MLflow run that produced a registered version, when known

    @property
    def label_names(self) -> dict[int, str]:
        return self.loaded.label_names


def _name_and_version(uri: str, loaded: LoadedModel) -> tuple[str, str]:
    """models:/NAME/VERSION -> (NAME, VERSION); models:/NAME@ALIAS -> (NAME, "@ALIAS"); folders by name.

    Without the registry: `load_model` resolves aliases to version numbers with pipeline.tracking.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "models":
        ref = (parsed.netloc + parsed.path).strip("/")
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return name, f"@{alias}"
        parts = ref.split("/")
        if len(parts) == 2:
            return parts[0], parts[1]
        return ref, "logged"
    if parsed.scheme == "runs":
        return (parsed.netloc + parsed.path).strip("/"), "run"
    return Path(uri).resolve().name, "local"


def load_model(uri: str | Path, device: str = "auto", *, dst: str | Path | None = None) -> ModelHandle:
    """Load and verify the model at `uri` (models:/..., runs:/..., or a folder) on `device`.

    `models:/NAME@ALIAS` is resolved to its version number first and that version is loaded, so
    the alias cannot move between the lookup and the download. Registry models are downloaded
    to `dst` when given (kept there), else to a temporary folder.
    Raises ModelLoadError naming the model when it is missing, tampered with or partial.
    """
    from pipeline import tracking  # imports MLflow: only when a model is actually loaded

    uri = str(uri)
    run_id = None
    try:
        dev = resolve_device(device)
        load_uri = uri
        if _is_registered(uri):
            name, version = tracking.resolve_model_version(uri)
            load_uri = f"models:/{name}/{version}"
            run_id = tracking.model_version_run_id(name, version)
        loaded = tracking.load_registered(load_uri, device=str(dev.type), dst=dst)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"refusing to predict with the model {uri}: {exc}") from exc
    if _is_registered(uri):
        name, version = load_uri.removeprefix("models:/").split("/")
    else:
        name, version = _name_and_version(uri, loaded)
    return ModelHandle(
        loaded=loaded, uri=uri, name=name, version=version, sha256=loaded.sha256, run_id=run_id
    )


def _is_registered(uri: str) -> bool:
    """models:/NAME@ALIAS or models:/NAME/VERSION (not a logged model's models:/m-ID)."""
    parsed = urlparse(uri)
    ref = (parsed.netloc + parsed.path).strip("/")
    return parsed.scheme == "models" and ("@" in ref or ref.count("/") == 1)


def plan_of(loaded: LoadedModel) -> Plan:
    """The preprocessing Plan the model was trained with (predict reuses exactly that copy)."""
    return Plan.from_dict(loaded.plan)


# The model loaded in this process, by (weights sha256, device): a long-lived worker loads it
# once; a batch with another model replaces it.
_MODELS: dict[tuple[str, str], LoadedModel] = {}
_MODELS_LOCK = threading.Lock()


def _model_key(sha256: str, device: str) -> tuple[str, str]:
    return sha256, str(resolve_device(device))


def remember_model(handle: ModelHandle, device: str) -> None:
    """Keep `handle`'s network as this process's model for `device` (prepare_batch's process
    then predicts without loading it again)."""
    dev = next(handle.loaded.model.parameters()).device
    configure_threads()
    net = prepare_model(handle.loaded.model, dev, channels_last=True).eval()
    with _MODELS_LOCK:
        _MODELS.clear()
        _MODELS[_model_key(handle.sha256, device)] = dataclasses.replace(handle.loaded, model=net)


def cached_model(model_dir: Path, sha256: str, device: str) -> LoadedModel:
    """The verified model of a batch, loaded at most once per process and device."""
    from pipeline.io.model_dir import load_model_dir

    key = _model_key(sha256, device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            try:
                loaded = load_model_dir(model_dir, device=resolve_device(device))
            except (ValueError, RuntimeError, OSError) as exc:
                raise ModelLoadError(f"refusing to predict with the model {model_dir}: {exc}") from exc
            if loaded.sha256 != sha256:
                raise ModelLoadError(
                    f"the model at {model_dir} has weights sha256 {loaded.sha256}, but the batch "
                    f"was planned with {sha256}; run prepare_batch again"
                )
            configure_threads()
            dev = next(loaded.model.parameters()).device
            net = prepare_model(loaded.model, dev, channels_last=True).eval()
            _MODELS.clear()  # one model per process: a new version frees the last one's memory
            _MODELS[key] = dataclasses.replace(loaded, model=net)
        return _MODELS[key]


# ------------------------------------------------------------------------------------------
# The model staged in a batch's work folder (workers reload it there, never from the registry)

MODEL_DIR = "model"  # beside batch.json in the batch's work folder


def read_model_record(model_dir: Path) -> dict[str, Any]:
    """The staged model folder's model.json."""
    return json.loads((model_dir / MODEL_FILE).read_text(encoding="utf-8"))


def stage_model(handle: ModelHandle, dst: Path) -> None:
    """Copy the verified model folder to `dst` (workers reload it from there, never the registry)."""
    try:
        if read_model_record(dst)["weights_sha256"] == handle.sha256:
            return  # an earlier prepare of this batch staged these weights; loading re-verifies them
    except (OSError, ValueError, KeyError):
        pass
    # Unique names beside `dst` (never a fixed .tmp a second writer could clobber); the caller
    # holds the plan lock, so only the swap below is seen by workers, never a half-copied folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    old = tmp.with_name(tmp.name.removesuffix(".tmp") + ".old")
    try:
        src = handle.loaded.path
        if (src / MODEL_FILE).is_file():
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        else:  # a handle whose download is gone: write the same weights again (same sha256)
            save_model_dir(
                handle.loaded.model,
                tmp,
                plan=handle.loaded.plan,
                config=handle.loaded.config,
                label_names=handle.loaded.label_names,
            )
        if dst.exists():
            os.replace(dst, old)  # a folder cannot replace a non-empty folder: move it aside first
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
