"""The MLflow model registry: versions, aliases (the champion/challenger gate) and loading.

- `register` makes a logged model a new version of a registered model, with the logged model's
  facts (labels, plan, code version, validation Dice) as version tags and a two-line description,
  so a reviewer can decide from the MLflow UI alone.
- `load_registered` downloads a model and reads it with `load_model_dir` (sha256-checked, no
  pickle, no code from the store executed).
- `promote` is the champion/challenger gate on registry aliases.
"""

from __future__ import annotations

import logging
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow.models import Model

from pipeline.io.model_dir import LoadedModel, ModelIntegrityError, load_model_dir
from pipeline.tracking.store import (
    CHALLENGER,
    CHAMPION,
    MODEL_DIR_ARTIFACT,
    TAG_CODE_VERSION,
    TAG_LABELS,
    TAG_MODALITIES,
    TAG_SCORE,
    TAG_SPACING,
    TAG_VAL_CASES_SHA,
    TAG_VAL_DICE_MEAN,
    TAG_VAL_DICE_PREFIX,
    TAG_WEIGHTS_SHA,
    TrackingError,
    refuse_identifiers,
    use_store,
)

log = logging.getLogger(__name__)

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


# Logged-model tags (set by Tracker.log_model) that every registered version carries too.
VERSION_FACTS = (
    TAG_WEIGHTS_SHA,
    TAG_CODE_VERSION,
    TAG_LABELS,
    TAG_MODALITIES,
    TAG_SPACING,
    TAG_VAL_DICE_MEAN,
)


def version_description(facts: Mapping[str, str]) -> str:
    """Two lines for the model version page: what it segments and how it was checked."""
    labels = facts.get(TAG_LABELS) or "unknown labels"
    names = (
        ", ".join(part.split("=", 1)[-1] for part in labels.split(", ")) if TAG_LABELS in facts else labels
    )
    modalities = facts.get(TAG_MODALITIES) or "any"
    # The plan names modalities as staged; "UNKNOWN" (NIfTI inputs carry none) is z-scored per case.
    modalities = modalities.replace("UNKNOWN", "unlabelled-modality").replace("any", "any-modality")
    spacing = facts.get(TAG_SPACING)
    dice_parts = [
        f"{key.removeprefix(TAG_VAL_DICE_PREFIX)} {float(value):.3f}"
        for key, value in sorted(facts.items())
        if key.startswith(TAG_VAL_DICE_PREFIX) and key != TAG_VAL_DICE_MEAN
    ]
    dice = facts.get(TAG_VAL_DICE_MEAN)
    dice_text = f"mean validation Dice {float(dice):.3f}" if dice else "no validation Dice recorded"
    if dice and dice_parts:
        dice_text += f" ({', '.join(dice_parts)})"
    return (
        f"Segments {names} in {modalities} volumes: a 2D U-Net on slices resampled to "
        f"{spacing or '?'} mm in-plane; a NIfTI path or an image + affine in, the label mask on the "
        f"input's grid out.\n"
        f"Labels {labels}; {dice_text}; code {facts.get(TAG_CODE_VERSION) or 'unknown'}."
    )


def register(
    model_uri: str,
    name: str,
    *,
    tags: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> int:
    """Register `model_uri` (from `Tracker.log_model`) as a new version of `name`; return the version.

    The logged model's facts (`VERSION_FACTS`: weights sha256, labels, code version, plan
    spacing and modalities, validation Dice) are copied onto the version as tags, and the
    version's description says them in two lines (`version_description`).
    """
    use_store(tracking_uri)
    client = mlflow.MlflowClient()
    all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    if model_uri.startswith("models:/m-"):
        logged = client.get_logged_model(model_uri.removeprefix("models:/"))
        for key, value in logged.tags.items():
            if key in VERSION_FACTS or key.startswith(TAG_VAL_DICE_PREFIX):
                all_tags.setdefault(key, value)
    refuse_identifiers(all_tags)
    with _registry_notices_to_debug():
        version = mlflow.register_model(model_uri, name, tags=all_tags or None)
    client.update_model_version(name, version.version, description=version_description(all_tags))
    model = client.get_registered_model(name)
    if not model.description:
        client.update_registered_model(
            name,
            description=(
                "unet-pipeline segmentation model. Load `models:/" + name + "@champion` with "
                "mlflow.pyfunc.load_model: a NIfTI path (or an image + affine) in, the label mask out; "
                "each version's description gives its labels, plan and validation Dice."
            ),
        )
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
    use_store(tracking_uri)
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
    use_store(tracking_uri)
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
    use_store(tracking_uri)
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
    uri = use_store(tracking_uri)
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
