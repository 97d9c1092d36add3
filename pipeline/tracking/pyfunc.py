"""The registered model as an MLflow pyfunc: a volume in, its label mask out, anywhere MLflow runs.

Input: a table, one row per volume, with either

- ``path``: a NIfTI file (.nii / .nii.gz) readable where the model runs, or
- ``image`` (a 3-D array, or 4-D with one channel last) and ``affine`` (4 x 4, voxel -> RAS mm);

and optionally ``modality`` (CT, MR, ...: picks the plan's intensity normalization; default
"unknown", which is what `unet-pipeline predict` uses for NIfTI inputs) and ``out`` (a new
.nii/.nii.gz file in an existing folder: the mask is also written there, atomically, as predict
writes seg.nii.gz; an existing file is never replaced).

Output: one row per input row: ``mask``, the uint8 label volume on the input's own grid (same
shape; the input's affine applies), and ``mask_path``, the file written for ``out`` (else None).

The work is `pipeline.inference.predictor.predict_volume`, the function `unet-pipeline predict` runs for
each case: the model's own plan, preprocessing, slice-wise prediction, post-processing as the
training config's infer section says, and the return to the input's grid. So the pyfunc's mask
is predict's mask, voxel for voxel.

``params={"level": "slices"}`` keeps the bare network available: ``image`` is then a float32
(N, C, H, W) batch of already normalized slices (C: the plan's `context_slices`, each slice
between its neighbours) and the output column ``logits`` holds the (N, num_classes, H, W) logits.
A cross-validation model (the folds' `UNetEnsemble`) is one network too: its ``logits`` are the
log of the folds' mean softmax, so their softmax is the ensemble's probabilities.

The model is logged "from code" (MLflow runs `_MODEL_CODE`, which imports this module; nothing is
pickled) with the project's own packages as `code_paths` and pinned `pip_requirements` that a
package index satisfies, so a fresh environment built from the model's requirements.txt serves
it without this checkout.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import AnyType, ColSpec, DataType, ParamSchema, ParamSpec, Schema

import pipeline
import unet_model
from pipeline.tracking.store import MODEL_DIR_ARTIFACT

log = logging.getLogger(__name__)

LEVEL_VOLUME = "volume"  # params["level"]: a volume in, its label mask out (the default)
LEVEL_SLICES = "slices"  # params["level"]: normalized slices in, logits out (the bare network)
LEVELS = (LEVEL_VOLUME, LEVEL_SLICES)

# Input columns.
PATH, IMAGE, AFFINE, MODALITY, OUT = "path", "image", "affine", "modality", "out"
# Output columns.
MASK, MASK_PATH, LOGITS = "mask", "mask_path", "logits"

# The distributions the logged code (pipeline/ and unet_model/) imports while serving: the
# project's dependencies without the orchestration and database clients that only flows and
# servers use. Pinned to the versions installed at log time. A test checks this list against
# pyproject.toml, and the fresh-venv test checks that it is enough.
SERVING_DISTRIBUTIONS = (
    "mlflow",
    "torch",
    "numpy",
    "monai",
    "nibabel",
    "pydicom",
    "highdicom",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "safetensors",
    "pyyaml",
    "isal",
    "scipy",
    "matplotlib",
    "tqdm",
)
# Orchestration, the database client, the CLI, NVML bindings for training's system metrics, and
# the PACS clients (pipeline.pacs is logged with the code but never imported by the model).
NOT_SERVED = (
    "prefect",
    "prefect-dask",
    "psycopg2-binary",
    "typer",
    "nvidia-ml-py",
    "dicomweb-client",
    "pynetdicom",
)

# The packages logged as code_paths (never flows/: it imports Prefect, and nothing imports it).
CODE_PACKAGES = (pipeline, unet_model)

# "Models from code": MLflow executes this file to build the pyfunc model when loading it, so the
# model class is imported by reference and nothing is pickled.
_MODEL_CODE = '''"""MLflow models-from-code entry point of unet-pipeline (see pipeline.tracking.pyfunc)."""

from pipeline.tracking.pyfunc import set_pyfunc_model

set_pyfunc_model()
'''


def model_signature() -> ModelSignature:
    """The volume contract of the module docstring, with the `level` switch as a param."""
    optional = {"required": False}
    return ModelSignature(
        inputs=Schema(
            [
                ColSpec(DataType.string, PATH, **optional),
                # Any: 3-D or 4-D arrays of any numeric type (nested lists over JSON); checked
                # by the model with messages that name the row.
                ColSpec(AnyType(), IMAGE, **optional),
                ColSpec(AnyType(), AFFINE, **optional),
                ColSpec(DataType.string, MODALITY, **optional),
                ColSpec(DataType.string, OUT, **optional),
            ]
        ),
        outputs=Schema(
            [
                ColSpec(AnyType(), MASK, **optional),
                ColSpec(DataType.string, MASK_PATH, **optional),
                ColSpec(AnyType(), LOGITS, **optional),
            ]
        ),
        params=ParamSchema([ParamSpec("level", DataType.string, LEVEL_VOLUME)]),
    )


def input_example(plan: Mapping[str, Any], modality: str | None = None) -> pd.DataFrame:
    """A small synthetic volume (seeded noise, nothing from any patient) on the plan's spacing.

    Stored with the model as its input example, and run through the model by MLflow when it is
    logged, so a broken model is noticed then.
    """
    spacing = float(plan["target_spacing"])
    affine = np.diag([spacing, spacing, 2.0 * spacing, 1.0])
    image = np.random.default_rng(0).normal(0.0, 1.0, (24, 20, 5)).round(3).astype(np.float32)
    if modality is None:
        named = sorted(k for k in plan.get("normalization", {}) if k != "default")
        modality = named[0] if named else "unknown"
    return pd.DataFrame({IMAGE: [image.tolist()], AFFINE: [affine.tolist()], MODALITY: [modality]})


def pip_requirements() -> list[str]:
    """`SERVING_DISTRIBUTIONS` pinned to the installed versions; local build tags dropped.

    torch's "+cpu" is dropped: `torch==2.13.0` resolves to the CPU wheel where a CPU index or
    wheel folder is configured (this project's machines) and to PyPI's CUDA build elsewhere, so
    the same model serves on both.
    """
    reqs = []
    for name in SERVING_DISTRIBUTIONS:
        try:
            reqs.append(f"{name}=={package_version(name).split('+')[0]}")
        except PackageNotFoundError as exc:
            raise RuntimeError(
                f"{name} is not installed, so the model's requirements cannot be pinned; "
                f"install the project's dependencies (make test) before logging a model"
            ) from exc
    return reqs


@contextmanager
def code_paths() -> Iterator[list[str]]:
    """Copies of the project's packages (without caches) to log as the model's `code_paths`."""
    with tempfile.TemporaryDirectory(prefix="unet-code-") as tmp:
        paths = []
        for package in CODE_PACKAGES:
            src = Path(package.__file__).resolve().parent
            dst = Path(tmp, src.name)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            paths.append(str(dst))
        yield paths


@contextmanager
def model_code_file() -> Iterator[str]:
    """The models-from-code file, in a temporary folder while the model is logged."""
    with tempfile.TemporaryDirectory(prefix="unet-pyfunc-") as tmp:
        code = Path(tmp, "unet_pyfunc_model.py")
        code.write_text(_MODEL_CODE, encoding="utf-8")
        yield str(code)


# ---------------------------------------------------------------------------------------------
# The model


def _bad_input(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE: the scoring server answers 400 with this message, not 500.
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _given(value: Any) -> bool:
    """A cell that holds something (DataFrames fill absent cells with None or NaN)."""
    if value is None:
        return False
    return not (isinstance(value, float) and math.isnan(value))


class SegmentationPyfunc(mlflow.pyfunc.PythonModel):
    """See the module docstring for the contract."""

    def load_context(self, context) -> None:
        from pipeline.config import PipelineConfig
        from pipeline.inference.model import ModelHandle
        from pipeline.inference.predictor import PredictOptions
        from pipeline.io.model_dir import load_model_dir
        from pipeline.runtime import configure_threads, prepare_model, resolve_device

        self.device = resolve_device("auto")
        loaded = load_model_dir(context.artifacts[MODEL_DIR_ARTIFACT], device=self.device)  # sha256 checked
        configure_threads()
        # As predict prepares its network (channels_last): the same kernels, the same mask.
        net = prepare_model(loaded.model, self.device, channels_last=True).eval()
        loaded = dataclasses.replace(loaded, model=net)
        self.handle = ModelHandle(
            loaded=loaded, uri="pyfunc", name="pyfunc", version="logged", sha256=loaded.sha256
        )
        try:
            infer = PipelineConfig.from_dict(loaded.config or {}).infer
        except ValueError:  # a config from another code version: predict falls back the same way
            infer = PipelineConfig().infer
        self.options = PredictOptions.from_config(infer)  # as predict builds them

    # The input is a DataFrame after MLflow's schema enforcement (the signature is column-based).
    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        level = (params or {}).get("level") or LEVEL_VOLUME
        if level not in LEVELS:
            raise _bad_input(f"params['level'] is {level!r}; valid levels: {', '.join(LEVELS)}")
        rows = model_input.to_dict("records") if isinstance(model_input, pd.DataFrame) else list(model_input)
        if level == LEVEL_SLICES:
            return pd.DataFrame([{LOGITS: self._logits(i, row)} for i, row in enumerate(rows)])
        return pd.DataFrame([self._segment(i, row) for i, row in enumerate(rows)])

    def _logits(self, i: int, row: Mapping[str, Any]) -> np.ndarray:
        if not _given(row.get(IMAGE)):
            raise _bad_input(f"row {i}: level 'slices' needs an {IMAGE!r} of shape (N, C, H, W)")
        batch = np.asarray(row[IMAGE], dtype=np.float32)
        channels = self.handle.loaded.unet_config.in_channels
        if batch.ndim != 4 or batch.shape[1] != channels:
            raise _bad_input(
                f"row {i}: level 'slices' takes normalized slices of shape (N, {channels}, H, W), "
                f"got {batch.shape}"
            )
        net = self.handle.loaded.model
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            return net(x).float().cpu().numpy()

    def _volume(self, i: int, row: Mapping[str, Any]):
        from pipeline.errors import InputRejected
        from pipeline.ingest import IngestLimits
        from pipeline.io.nifti import load_nifti
        from pipeline.io.volume import Volume

        has_path, has_image = _given(row.get(PATH)), _given(row.get(IMAGE))
        if has_path == has_image:
            raise _bad_input(
                f"row {i}: give either {PATH!r} (a NIfTI file) or {IMAGE!r} with {AFFINE!r}, not "
                f"{'both' if has_path else 'neither'}"
            )
        modality = str(row[MODALITY]).upper() if _given(row.get(MODALITY)) else "unknown"
        if has_path:
            path = Path(str(row[PATH]))
            if not path.is_file():
                raise _bad_input(f"row {i}: {path} is not a file that the model's process can read")
            limits = IngestLimits()
            try:  # the validated reader predict uses for NIfTI inputs
                volume = load_nifti(path, path.name, max_voxels=limits.max_voxels, max_bytes=limits.max_bytes)
            except InputRejected as err:
                raise _bad_input(f"row {i}: {path} refused ({err.reason.value}): {err.message}") from err
        else:
            if not _given(row.get(AFFINE)):
                raise _bad_input(f"row {i}: an {IMAGE!r} needs its {AFFINE!r} (4 x 4, voxel -> RAS mm)")
            data, affine = np.asarray(row[IMAGE]), np.asarray(row[AFFINE], dtype=np.float64)
            if data.ndim == 4 and data.shape[-1] == 1:
                data = data[..., 0]
            if data.ndim != 3 or data.dtype.kind not in "uif":
                raise _bad_input(
                    f"row {i}: {IMAGE!r} must be a numeric 3-D array (or 4-D with one channel last), "
                    f"got shape {data.shape} of {data.dtype}"
                )
            if (
                affine.shape != (4, 4)
                or not np.all(np.isfinite(affine))
                or abs(np.linalg.det(affine[:3, :3])) < 1e-9
            ):
                raise _bad_input(f"row {i}: {AFFINE!r} must be a finite, invertible 4 x 4 matrix")
            if data.dtype.kind == "f" and not np.isfinite(data).all():
                raise _bad_input(f"row {i}: {IMAGE!r} holds NaN or infinite voxels (NON_FINITE_VOXELS)")
            volume = Volume(data.astype(np.float32) if data.dtype.kind == "f" else data, affine)
        volume.modality = modality
        return volume

    def _segment(self, i: int, row: Mapping[str, Any]) -> dict[str, Any]:
        from pipeline.inference.predictor import predict_volume
        from pipeline.outputs import masks

        target = _out_path(i, row)
        volume = self._volume(i, row)
        mask = predict_volume(self.handle, volume, self.options, device=self.device)
        written = None
        if target is not None:
            written = str(masks.write_mask_nifti(target, mask, volume.affine))
        return {MASK: mask, MASK_PATH: written}


def _out_path(i: int, row: Mapping[str, Any]) -> Path | None:
    """The row's `out`, checked before any work: a new .nii/.nii.gz file in an existing folder.

    A served model writes with its server's permissions on behalf of whoever can reach it, so
    it only ever creates NIfTI files and never replaces a file that is already there.
    """
    if not _given(row.get(OUT)):
        return None
    target = Path(str(row[OUT]))
    if not target.name.endswith((".nii", ".nii.gz")):
        raise _bad_input(f"row {i}: {OUT!r} must name a .nii or .nii.gz file, got {target.name!r}")
    if not target.parent.is_dir():
        raise _bad_input(f"row {i}: the folder of {OUT!r} ({target.parent}) does not exist")
    if target.exists():
        raise _bad_input(f"row {i}: {target} exists; the model never replaces a file, choose a new name")
    return target


def set_pyfunc_model() -> None:
    """Called by the models-from-code file when MLflow loads the model."""
    mlflow.models.set_model(SegmentationPyfunc())
