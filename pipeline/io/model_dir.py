"""The trained model on disk, without pickle: safetensors weights plus JSON config, plan and metadata.

A model folder holds:

- ``weights.safetensors``: the state_dict (safetensors never executes code on load);
- ``model.json``: format, UNetConfig, label names, sha256 of every other file, code version, time,
  and ``folds`` (K) for a cross-validation ensemble;
- ``plan.json``: the dataset plan inference must reuse exactly;
- ``config.json``: the resolved pipeline configuration the model was trained with.

A cross-validation model holds the K fold networks of one plan as one `UNetEnsemble` (its
state_dict: ``members.<k>.<key>``, in one weights file, so one sha256 names the whole model) and
predicts with the mean of their softmax. A folder without ``folds`` is one U-Net, as before.

The folder is written to a temporary sibling and renamed into place, so a crash leaves the old
model or the new one, never a mix. Loading checks every sha256 before the network is built.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

import pipeline
from pipeline.runtime import resolve_device
from unet_model import UNet, UNetConfig
from unet_model.ensemble import UNetEnsemble

log = logging.getLogger(__name__)

FORMAT = "unet-pipeline/1"
WEIGHTS_FILE = "weights.safetensors"
MODEL_FILE = "model.json"
PLAN_FILE = "plan.json"
CONFIG_FILE = "config.json"
REQUIRED_FILES = (WEIGHTS_FILE, MODEL_FILE, PLAN_FILE, CONFIG_FILE)


class ModelIntegrityError(ValueError):
    """A model folder that is missing a file, was modified after saving, or is not ours."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(
            f"refusing to load the model at {self.path}: {problem}. The folder was changed or only "
            f"partly copied after it was saved; copy it again from the registry or retrain."
        )


@dataclass(frozen=True)
class LoadedModel:
    """A verified model, ready to predict."""

    model: UNet | UNetEnsemble  # in eval mode, on the requested device; an ensemble holds the folds
    unet_config: UNetConfig  # one network's (an ensemble's members share it)
    plan: dict[str, Any]  # the dataset plan saved with the model: inference must use this copy
    config: dict[str, Any]  # the resolved pipeline configuration of the training run
    label_names: dict[int, str]  # output channel -> label name, background included
    sha256: str  # of weights.safetensors, as checked on load
    path: Path  # the folder read (for registry loads, a download that may since have been removed)
    metadata: dict[str, Any]  # the whole model.json (code_version, created, ...)

    @property
    def folds(self) -> int:
        """How many fold networks the model averages (1: a single U-Net)."""
        return fold_count(self.model)


@functools.cache
def code_version() -> str:
    """``pipeline.__version__``, plus ``git describe`` when running from a git checkout."""
    repo = Path(pipeline.__file__).resolve().parent.parent
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, or too slow
        return pipeline.__version__
    return f"{pipeline.__version__}+git.{described}" if described else pipeline.__version__


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def fold_count(model: UNet | UNetEnsemble) -> int:
    """The number of networks `model` averages: its members for an ensemble, else 1."""
    return len(model.members) if isinstance(model, UNetEnsemble) else 1


def save_model_dir(
    model: UNet | UNetEnsemble,
    out_dir: Path,
    *,
    plan: dict[str, Any],
    config: dict[str, Any],
    label_names: dict[int, str],
    validation: dict[str, float] | None = None,
    fold_val_cases: list[list[str]] | None = None,
) -> Path:
    """Write `model` to the folder `out_dir` (replacing a previous model there) and return it.

    `validation`: the model's validation metrics (e.g. val_dice_mean), kept in model.json so that
    a batch report can show them without asking the tracking server. `fold_val_cases`: for an
    ensemble, each member's held-out case IDs (pseudonymous, as staged), so that a case it
    trained on can be scored by the one member that did not (`release.evaluate_on_cases`).

    Weights are copied to contiguous CPU tensors first (channels_last weights are strided, and
    safetensors stores plain row-major buffers). `plan` and `config` must be JSON-serializable.
    An ensemble of one is written as its one U-Net (the folder of a single model).
    """
    out_dir = Path(out_dir)
    if isinstance(model, UNetEnsemble) and len(model.members) == 1:
        model = model.members[0]
    unet_config = model.config
    if len(label_names) != unet_config.num_classes:
        raise ValueError(
            f"label_names has {len(label_names)} entries {label_names!r} but the model has "
            f"{unet_config.num_classes} output classes; give one name per class, background included"
        )
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    weights = save_safetensors_bytes(state, metadata={"format": FORMAT})
    files = {WEIGHTS_FILE: weights, PLAN_FILE: _json_bytes(plan), CONFIG_FILE: _json_bytes(config)}
    meta = {
        "format": FORMAT,
        "unet_config": unet_config.to_dict(),
        "label_names": {str(int(k)): str(v) for k, v in sorted(label_names.items())},
        "weights_sha256": sha256_bytes(weights),
        "files_sha256": {name: sha256_bytes(data) for name, data in files.items()},
        "code_version": code_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "validation": {k: float(v) for k, v in (validation or {}).items()},
    }
    if isinstance(model, UNetEnsemble):
        meta["folds"] = len(model.members)  # absent for one U-Net: folders of single models unchanged
        if fold_val_cases is not None:
            if len(fold_val_cases) != len(model.members):
                raise ValueError(
                    f"fold_val_cases has {len(fold_val_cases)} entries for {len(model.members)} members"
                )
            meta["fold_val_cases"] = [sorted(str(c) for c in cases) for cases in fold_val_cases]
    files[MODEL_FILE] = _json_bytes(meta)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, data in files.items():
            _write_synced(tmp / name, data)
        # A directory cannot be atomically replaced by another when it is not empty: move the old
        # one aside first. A crash in between leaves the complete old model in `.NAME.old-*`.
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    log.info("saved model to %s (weights sha256 %s)", out_dir, meta["weights_sha256"][:12])
    return out_dir


def _read_model_json(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / MODEL_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelIntegrityError(path, f"{MODEL_FILE} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ModelIntegrityError(path, f"{MODEL_FILE} has format {found!r}, expected {FORMAT!r}")
    for key in ("unet_config", "label_names", "weights_sha256", "files_sha256"):
        if key not in meta:
            raise ModelIntegrityError(path, f"{MODEL_FILE} lacks the key {key!r}")
    folds = meta.get("folds", 1)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
        raise ModelIntegrityError(path, f"{MODEL_FILE} has folds {folds!r}, expected a positive integer")
    return meta


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Verify and load a folder written by `save_model_dir`; the model comes back in eval mode.

    Raises `ModelIntegrityError` (naming the folder and the file) when a file is missing or its
    sha256 differs from the one recorded in model.json. Never unpickles anything.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelIntegrityError(path, "no such model folder")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise ModelIntegrityError(path, f"missing file(s) {', '.join(missing)}")
    meta = _read_model_json(path)

    contents: dict[str, bytes] = {}
    expected_hashes = {**meta["files_sha256"], WEIGHTS_FILE: meta["weights_sha256"]}
    for name in (WEIGHTS_FILE, PLAN_FILE, CONFIG_FILE):
        data = (path / name).read_bytes()  # hash the very bytes that are then parsed
        found = sha256_bytes(data)
        if found != expected_hashes.get(name):
            raise ModelIntegrityError(
                path,
                f"{name} has sha256 {found} but {MODEL_FILE} records {expected_hashes.get(name)} "
                f"({len(data)} bytes read)",
            )
        contents[name] = data

    unet_config = UNetConfig.from_dict(meta["unet_config"])
    folds = meta.get("folds", 1)
    model: UNet | UNetEnsemble = (
        UNetEnsemble([UNet(unet_config) for _ in range(folds)]) if folds > 1 else UNet(unet_config)
    )
    try:
        state = load_safetensors_bytes(contents[WEIGHTS_FILE])
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError) as exc:
        raise ModelIntegrityError(
            path, f"{WEIGHTS_FILE} does not fit the recorded UNetConfig and {folds} fold(s) ({exc})"
        ) from exc
    model = model.to(resolve_device(device) if isinstance(device, str) else device).eval()
    return LoadedModel(
        model=model,
        unet_config=unet_config,
        plan=json.loads(contents[PLAN_FILE]),
        config=json.loads(contents[CONFIG_FILE]),
        label_names={int(k): v for k, v in meta["label_names"].items()},
        sha256=meta["weights_sha256"],
        path=path,
        metadata=meta,
    )
