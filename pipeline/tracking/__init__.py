"""MLflow only: runs, the pyfunc, the registry. The only package of the pipeline that imports MLflow.

- `runs`: the `Tracker` (one run: params, metrics, the dataset input, system metrics, the model);
- `pyfunc`: the logged model as MLflow serves it (a volume in, its label mask out);
- `model_registry`: versions with descriptions, aliases (the champion gate), loading;
- `datasets`: the staged dataset as an MLflow dataset input;
- `store`: where the store lives, tag names, redaction of credentials and identifiers;
- `release`: train -> log -> register -> champion gate (import it from `pipeline.tracking.release`:
  it sits above the training stage, so the names below leave it out);
- `batch`: a finished predict batch as one run (`track_batch`; import it from
  `pipeline.tracking.batch`: it reads the inference stage's batch folder).

The names below are the package's interface; import them from `pipeline.tracking`.
"""

from pipeline.tracking.model_registry import (
    _registry_notices_to_debug,
    load_registered,
    model_version_run_id,
    promote,
    register,
    resolve_model_version,
    version_description,
)
from pipeline.tracking.runs import Tracker
from pipeline.tracking.store import (
    CHALLENGER,
    CHAMPION,
    DEFAULT_EXPERIMENT,
    MODEL_DIR_ARTIFACT,
    MODEL_NAME_IN_RUN,
    TAG_CODE_VERSION,
    TAG_DATASET_SHA,
    TAG_END_REASON,
    TAG_LABELS,
    TAG_MODALITIES,
    TAG_MODEL_NAME,
    TAG_MODEL_VERSION,
    TAG_PREFECT_FLOW_RUN_ID,
    TAG_PREFECT_FLOW_RUN_URL,
    TAG_SCORE,
    TAG_SPACING,
    TAG_VAL_CASES_SHA,
    TAG_VAL_DICE_MEAN,
    TAG_WEIGHTS_SHA,
    TrackingError,
    dataset_sha256,
    flatten,
    mlflow_ui_command,
    model_version_page_url,
    redact,
    run_page_url,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "DEFAULT_EXPERIMENT",
    "MODEL_DIR_ARTIFACT",
    "MODEL_NAME_IN_RUN",
    "TAG_CODE_VERSION",
    "TAG_DATASET_SHA",
    "TAG_END_REASON",
    "TAG_LABELS",
    "TAG_MODALITIES",
    "TAG_MODEL_NAME",
    "TAG_MODEL_VERSION",
    "TAG_PREFECT_FLOW_RUN_ID",
    "TAG_PREFECT_FLOW_RUN_URL",
    "TAG_SCORE",
    "TAG_SPACING",
    "TAG_VAL_CASES_SHA",
    "TAG_VAL_DICE_MEAN",
    "TAG_WEIGHTS_SHA",
    "Tracker",
    "TrackingError",
    "_registry_notices_to_debug",
    "dataset_sha256",
    "flatten",
    "load_registered",
    "mlflow_ui_command",
    "model_version_page_url",
    "model_version_run_id",
    "promote",
    "redact",
    "register",
    "resolve_model_version",
    "run_page_url",
    "version_description",
]
