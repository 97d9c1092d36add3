"""Configuration: where the embedded stores live (the work directory) and the typed YAML config.

`PipelineConfig` is the one configuration object: sections data, preprocess, model, train, infer
and tracking, loaded from YAML by `load_config`. Unknown keys are rejected with the valid options;
bad values are rejected naming the field and the value (`ConfigError`). Training ends on its
epoch count or when validation stops improving (patience with a minimum improvement); a wall-clock
budget applies only when `train.time_budget_minutes` asks for one, so the same command gives the same
model on a busy machine. The demo and the tests pass budgets of their own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

WORKDIR_ENV = "UNET_PIPELINE_WORKDIR"
DEFAULT_WORKDIR = Path.home() / ".unet-pipeline"
MAX_CONTEXT_SLICES = 15  # preprocess.context_slices: beyond this the neighbours are other anatomy


@dataclass(frozen=True)
class Workdir:
    """The folder holding a deployment's embedded state when no servers are configured."""

    root: Path

    @classmethod
    def resolve(cls, path: str | Path | None = None) -> Workdir:
        """An explicit path, else $UNET_PIPELINE_WORKDIR, else ~/.unet-pipeline."""
        chosen = path or os.environ.get(WORKDIR_ENV) or DEFAULT_WORKDIR
        return cls(Path(chosen).expanduser().resolve())

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def secret_file(self) -> Path:
        """The site secret that keys pseudonymous case IDs."""
        return self.root / "site-secret"

    def mlflow_tracking_uri(self) -> str:
        """$MLFLOW_TRACKING_URI when set (a tracking server), else this folder's SQLite store."""
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.mlflow_db}"

    def prefect_api(self) -> str:
        """$PREFECT_API_URL when set (a Prefect server), else Prefect's ephemeral API on this folder."""
        url = os.environ.get("PREFECT_API_URL")
        return url or f"ephemeral (PREFECT_HOME={self.prefect_home})"


# --------------------------------------------------------------------------------------------
# The typed pipeline configuration


class ConfigError(ValueError):
    """A configuration file or mapping that does not validate; the message names every problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DataConfig(_Section):
    """Where cases come from and how they are split and cached."""

    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # share of labelled cases held out (folds == 1)
    folds: int = Field(1, ge=1)  # 1: one seeded hold-out split; k > 1: k-fold cross-validation by case
    fold: int = Field(0, ge=0)  # the fold one `loop.train` run validates on (cross-validation sets each)
    split_seed: int = 0  # seed of the case split (independent of the training seed)
    cache: Literal["memory", "disk", "none"] = "memory"  # CacheDataset, PersistentDataset, or none
    cache_dir: str | None = None  # PersistentDataset folder (default <out_dir>/cache) when cache: disk
    loader_buffer: int = Field(2, ge=1)  # ThreadDataLoader prefetch depth (batches)
    # Processes for slice sampling/augmentation (0: in the loader thread); None: 1 on CPU (the
    # step needs the cores), up to 4 on a GPU (one worker cannot keep a GPU fed).
    loader_workers: int | None = Field(None, ge=0)
    # Ingest: a DICOM series some of whose files were refused one by one is refused as a whole
    # (SERIES_INCOMPLETE); true stages the rest, marked partial in the manifest and the report.
    accept_partial_series: bool = False

    @model_validator(mode="after")
    def _fold_in_range(self) -> DataConfig:
        if self.folds > 1 and self.fold >= self.folds:
            raise ValueError(
                f"data.fold must be in 0..{self.folds - 1} for folds={self.folds}; got {self.fold}"
            )
        return self


class PreprocessConfig(_Section):
    """Overrides of the automatic plan, and the training augmentation."""

    target_spacing: float | None = Field(None, gt=0.0)  # in-plane mm; None: the dataset median
    patch_size: int | None = Field(None, ge=16, multiple_of=16)  # None: planned from the data
    max_patch_size: int = Field(96, ge=16, multiple_of=16)  # cap of the planned patch (memory, speed)
    # 2.5-D context: the network sees k neighbouring slices as input channels, centred on the slice
    # it segments (edge slices repeated). None: planned from the slice spacing (the plan's `reasons`
    # say why); 1: off (one slice); an odd k >= 3: always k.
    context_slices: int | None = Field(None, ge=1, le=MAX_CONTEXT_SLICES)
    ct_clip_percentiles: tuple[float, float] = (0.5, 99.5)  # CT foreground clip (nnU-Net)
    foreground_ratio: float = Field(0.67, ge=0.0, le=1.0)  # share of slices centred on a labelled voxel
    # foreground centres drawn per class (each label as likely as the others, as nnU-Net samples):
    # a small lesion is seen as often as the organ around it; False: per voxel (large labels dominate)
    balance_classes: bool = True
    crop_foreground: bool = True  # crop each volume to its body's box (transforms.crop_mask)
    augment: bool = True  # random flips, rotation/scaling, noise, contrast and intensity shift
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)  # per in-plane axis
    rotate_degrees: float = Field(15.0, ge=0.0, le=180.0)  # +- in-plane rotation
    scale_range: float = Field(0.1, ge=0.0, lt=1.0)  # +- zoom fraction
    noise_std: float = Field(0.05, ge=0.0)  # Gaussian noise std on the normalized image
    contrast_gamma: tuple[float, float] = (0.8, 1.25)  # gamma range of the contrast change
    intensity_shift: float = Field(0.1, ge=0.0)  # +- offset on the normalized image

    @model_validator(mode="after")
    def _ranges(self) -> PreprocessConfig:
        lo, hi = self.ct_clip_percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"preprocess.ct_clip_percentiles must be 0 <= lo < hi <= 100; got {[lo, hi]}")
        g0, g1 = self.contrast_gamma
        if not 0.0 < g0 <= g1:
            raise ValueError(f"preprocess.contrast_gamma must be 0 < lo <= hi; got {[g0, g1]}")
        if self.context_slices is not None and self.context_slices % 2 == 0:
            raise ValueError(
                f"preprocess.context_slices must be odd (the segmented slice in the middle, as many "
                f"neighbours on each side): 1 (off), 3, 5, ... or null (planned); got {self.context_slices}"
            )
        return self


class ModelConfig(_Section):
    """The U-Net (unet_model.UNetConfig); in/out channels come from the data."""

    # Width of the first level; level i has base * 2**i. None: planned for the device (the seed's
    # 64 on a GPU with the memory for it, 16 on CPU; the plan's `reasons` say why).
    base_channels: int | None = Field(None, ge=1)
    depth: int = Field(4, ge=1, le=6)  # max-pool steps; patches are padded to multiples of 16
    norm: Literal["batch", "instance", "none"] = "batch"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class TrainConfig(_Section):
    """The optimisation loop."""

    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    # auto: channels_last on CUDA; NCHW for training on CPU, where oneDNN's channels_last conv
    # backward measured ~3.5x slower than NCHW (AVX2); inference uses channels_last everywhere.
    channels_last: Literal["auto"] | bool = "auto"
    compile: bool = False  # torch.compile the model (slow first steps; pays off on long GPU runs)
    seed: int = 0
    deterministic: bool = False  # deterministic kernels (slower); seeding is always on
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd uses Nesterov momentum 0.99 and poly decay
    lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.99, ge=0.0, lt=1.0)  # sgd only
    warmup_epochs: int = Field(1, ge=0)  # linear warm-up, then cosine (adamw) or poly (sgd) decay
    grad_clip: float | None = Field(12.0, gt=0.0)  # max gradient norm; None: no clipping
    # An upper bound: patience (below) ends a run once validation has converged, which on the demo's
    # 48 cases took 100-118 epochs; 60 stopped short of it (validation 0.008 lower, held-out 0.015-0.06).
    epochs: int = Field(120, ge=1)
    steps_per_epoch: int = Field(25, ge=1)  # optimizer steps per epoch (an epoch is not a data pass)
    # 2D slices per step. None: planned from the device's memory and the data (8 on CPU: small
    # batches give more updates per CPU minute; the plan's `reasons` say why).
    batch_size: int | None = Field(None, ge=1)
    slices_per_volume: int = Field(4, ge=1)  # slices sampled from one cached volume per visit
    val_every: int = Field(2, ge=1)  # validate every N epochs (and at the last one)
    # Test-time mirroring in the loop's validations too (each costs 4x with both axes mirrored).
    # Off: they rank epochs without it, and the best weights are scored once more at the end
    # exactly as predict runs them (infer.mirror_axes): the score the model and the gate carry.
    val_mirroring: bool = False
    early_stopping_patience: int | None = Field(10, ge=1)  # validations without improvement; None: off
    # Mean validation Dice gain that counts as an improvement for patience (smaller gains still
    # keep the better weights but do not reset the count).
    early_stopping_min_delta: float = Field(0.001, ge=0.0)
    # Share of train.epochs before which a validation without that gain does not count towards
    # patience: the schedule's learning rate is still high there and validation swings by tenths
    # (a gain still resets the count). 0: patience counts from the first validation.
    early_stopping_start: float = Field(0.5, ge=0.0, le=1.0)
    # Stop cleanly after this many minutes; None (default): no budget, so the model does not depend
    # on how busy the machine was.
    time_budget_minutes: float | None = Field(None, gt=0.0)
    class_weighted_ce: bool = False  # weight the CE term by the plan's class weights
    # The Dice term over the whole batch of slices (nnU-Net's batch Dice for 2D) rather than per
    # slice, where a label absent from a slice scores 0 whatever its small probabilities there.
    # Off by default: on the demo data it scored no better (bench.accuracy, README).
    batch_dice: bool = False
    # The background's Dice in the Dice term (nnU-Net leaves it out; the CE term covers it).
    dice_background: bool = True
    # Auxiliary 1x1 heads on the lower decoder levels with a weighted loss over downsampled targets
    # (nnU-Net); the heads are dropped at export, so the model is the classic U-Net either way.
    deep_supervision: bool = True
    # Validate and export a moving average of the weights (and batch norm's statistics) rather
    # than the last step's: its n-th step's decay is min(ema_decay, (1 + n) / (10 + n)), so a run
    # shorter than 9 / (1 - ema_decay) steps averages about its last ninth (`training.ema`).
    # None: off (and for runs begun before it, which resume without it).
    ema_decay: float | None = Field(0.999, gt=0.0, lt=1.0)
    # Validation cases drawn as QC pictures (prediction of the best weights, ground truth dashed)
    # at the end of the run, into validation_qc/ and the MLflow run; 0: none.
    val_qc_cases: int = Field(4, ge=0)

    @model_validator(mode="after")
    def _batch(self) -> TrainConfig:
        if self.batch_size is not None and self.batch_size % self.slices_per_volume:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be a multiple of train.slices_per_volume "
                f"({self.slices_per_volume})"
            )
        return self


class InferConfig(_Section):
    """Prediction and its post-processing."""

    batch_size: int = Field(16, ge=1)  # slices per forward pass
    largest_component: bool = False  # keep only the largest connected component of each label
    fill_holes: bool = False  # fill enclosed holes of each label
    # Test-time mirroring (nnU-Net's default): the softmax of each slice and of its flips along
    # these in-plane axes (H: rows, W: columns of the preprocessed slice) averaged, each flip
    # undone, before the argmax: 2**len passes (4 with both); []: one plain pass. Training flips
    # along both axes (preprocess.flip_prob), so the network has seen every mirrored view.
    mirror_axes: tuple[Literal["H", "W"], ...] = ("H", "W")

    @model_validator(mode="after")
    def _distinct_axes(self) -> InferConfig:
        if len(set(self.mirror_axes)) != len(self.mirror_axes):
            raise ValueError(f"infer.mirror_axes must not repeat an axis; got {list(self.mirror_axes)}")
        return self


class TrackingConfig(_Section):
    """MLflow run and registry names (pipeline.tracking reads these)."""

    experiment_name: str = Field("unet-pipeline", min_length=1)
    registered_model_name: str = Field("unet-seg", min_length=1)
    champion_margin: float = Field(0.005, ge=0.0, le=1.0)  # challenger may be this much worse in mean Dice


class IngestConfig(_Section):
    """Ingest: its memory budget and the inputs that are refused unless opted in."""

    # Bytes all concurrent conversions may hold together, in GiB; None: 75 % of the machine's (or
    # container's) memory. The default size limits follow from it (pipeline.ingest.IngestLimits).
    memory_budget_gb: float | None = Field(None, gt=0.0)
    # Stage NIfTI files with qform_code = sform_code = 0 (left/right unknown), marked as such,
    # instead of refusing them as NO_ORIENTATION.
    allow_no_orientation: bool = False


class PipelineConfig(_Section):
    """The whole configuration; travels with the model (saved beside the plan)."""

    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    infer: InferConfig = InferConfig()
    tracking: TrackingConfig = TrackingConfig()
    ingest: IngestConfig = IngestConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, source: str = "configuration") -> PipelineConfig:
        """Validate a mapping; every problem is reported in one `ConfigError` naming `source`."""
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            raise ConfigError(_explain(exc, source)) from None

    def replace(self, **sections: dict[str, Any]) -> PipelineConfig:
        """A copy with some fields of some sections changed, e.g. `replace(train={"epochs": 2})`."""
        data = self.to_dict()
        for name, values in sections.items():
            if name not in data:
                raise ConfigError(f"unknown section {name!r}; valid sections: {', '.join(data)}")
            data[name].update(values)
        return PipelineConfig.from_dict(data)


def _valid_keys(path: tuple) -> list[str]:
    """The field names valid at `path` (the location of an unknown key)."""
    model: type[BaseModel] = PipelineConfig
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            break
        model = field.annotation
    return list(model.model_fields)


def _explain(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            section = ".".join(str(p) for p in loc[:-1]) or "top level"
            lines.append(
                f"unknown key {where!r}; valid keys in {section}: {', '.join(_valid_keys(loc[:-1]))}"
            )
        else:
            lines.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return f"invalid {source}:\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None = None) -> PipelineConfig:
    """The defaults, updated from the YAML file at `path` when given."""
    if path is None:
        return PipelineConfig()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections; found {type(data).__name__}")
    return PipelineConfig.from_dict(data, source=f"config file {path}")
