"""Dataset fingerprint and the automatic preprocessing plan (nnU-Net's idea, for 2D slices).

`fingerprint_dataset(staging)` reads every staged case once: spacings and shapes in the RAS frame,
per-modality intensity statistics of the labelled foreground, and voxel counts per label.
`make_plan(fingerprint, config.preprocess)` turns it into the decisions training and inference share:

- slice axis: the lowest-resolution (largest-spacing) RAS axis, by the dataset median; a case
  whose own spacing is clearly anisotropic is sliced along its own coarsest axis (mixed
  axial/sagittal/coronal acquisitions are each sliced as acquired, never across thick slices);
- target in-plane spacing: the median in-plane spacing; the slice spacing is never resampled;
- normalization by modality: CT is clipped to the 0.5/99.5 percentiles of the labelled
  foreground of all CT cases and z-scored with that foreground's mean and std; MR and any other
  modality are z-scored per case over the body (`zscore_mask`: every voxel brighter than the
  background, see `transforms.zscore_mask`);
- patch size: the median in-plane size after resampling, rounded up to a multiple of 16, capped;
- 2.5-D context (`plan_context`): the network's input is the slice and its neighbours along the
  slice axis, k = 3 slices when the median slice spacing is at most `CONTEXT_MAX_SPACING_RATIO` x
  the in-plane target (neighbours close enough to show the same anatomy), else 1;
- base width and batch size: for the training device (`planning.network.plan_network`);
- class weights: inverse square root of each label's voxel share, normalised to mean 1.

The plan is computed once, saved as JSON into the model folder and inference loads exactly it.
Its `reasons` say why each of the choices that depend on the data and the device was made (or
that the config set it).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from pipeline.io.atomic import write_text
from pipeline.io.manifest import read_manifest

log = logging.getLogger(__name__)

PLAN_VERSION = 1
PATCH_MULTIPLE = 16  # the U-Net (depth 4) halves 4 times; patches are padded to this multiple
ANISOTROPY_RATIO = 1.5  # a case's coarsest axis is "its" slice axis when this much coarser than the others
FINGERPRINT_PERCENTILES = (0.5, 1, 2, 5, 50, 95, 98, 99, 99.5)  # foreground percentiles kept
SAMPLES_PER_CASE = 20_000  # foreground intensities sampled per case for the CT statistics
# 2.5-D context: neighbours count as the same anatomy up to this slice spacing / in-plane spacing.
CONTEXT_MAX_SPACING_RATIO = 3.0
CONTEXT_SLICES = 3  # the planned context when the slices are close enough: the slice and one each side
MASK_RULES = ("body", "otsu")  # of Plan.zscore_mask and Plan.crop_mask: the first is what new plans use


@dataclass(frozen=True)
class CaseFingerprint:
    """What the plan needs of one case, in the RAS frame."""

    case_id: str
    modality: str
    shape: tuple[int, int, int]  # voxels along R, A, S after reorientation
    spacing: tuple[float, float, float]  # mm along R, A, S
    label_counts: dict[int, int]  # voxels per label value (0 included)


@dataclass
class Fingerprint:
    """The dataset fingerprint: per-case geometry plus per-modality foreground intensities."""

    cases: list[CaseFingerprint]
    labels: dict[str, int]  # name -> value, from dataset.json
    intensity: dict[str, dict[str, float]]  # modality -> mean, std, p00_5, p99_5, ... of labelled voxels

    @property
    def modalities(self) -> list[str]:
        return sorted({c.modality for c in self.cases})


@dataclass(frozen=True)
class Plan:
    """The preprocessing decisions, shared by training and inference (JSON round-trip)."""

    slice_axis: int  # RAS axis (0 R, 1 A, 2 S) that slices are taken across, by the dataset median
    target_spacing: float  # in-plane mm of every slice
    patch_size: int  # training patch side (multiple of 16); inference takes whole slices
    normalization: dict[str, dict[str, Any]]  # modality -> {"scheme": "ct"|"zscore", ...}; "default" too
    labels: dict[str, int]  # name -> value, background included
    class_weights: list[float]  # per label value 0..num_classes-1, mean 1
    crop_foreground: bool = True  # crop to the body bounding box before slicing
    anisotropy_ratio: float = ANISOTROPY_RATIO  # see `case_slice_axis`
    median_shape: tuple[int, int, int] = (0, 0, 0)  # RAS voxels after resampling, for reference
    version: int = PLAN_VERSION
    fingerprint_summary: dict[str, Any] = field(default_factory=dict)
    base_channels: int | None = None  # U-Net first-level width for training (`plan_network`)
    batch_size: int | None = None  # 2D slices per training step (`plan_network`)
    reasons: dict[str, str] = field(default_factory=dict)  # decision (patch_size, ...) -> why
    # Input channels: the slice and its (k - 1) / 2 neighbours on each side along the slice axis
    # (`plan_context`); 1: the slice alone (plans from before 2.5-D context read as 1).
    context_slices: int = 1
    # The voxels a per-case z-score takes its mean and std from (`transforms.zscore_mask`): "body"
    # (new plans) or "otsu", the rule of plans from before it, kept so their models see exactly
    # the inputs they were trained on.
    zscore_mask: str = "otsu"
    # The mask the foreground crop takes its box from (`transforms.crop_mask`): "body" (new plans)
    # or "otsu", the rule of plans from before it.
    crop_mask: str = "otsu"

    def __post_init__(self) -> None:
        k = self.context_slices
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"plan context_slices must be an odd positive integer (1: off); got {k!r}")
        for name in ("zscore_mask", "crop_mask"):
            if getattr(self, name) not in MASK_RULES:
                raise ValueError(
                    f"plan {name} must be one of {', '.join(MASK_RULES)}; got {getattr(self, name)!r}"
                )

    @property
    def num_classes(self) -> int:
        return max(self.labels.values()) + 1

    @property
    def label_names(self) -> dict[int, str]:
        return {v: k for k, v in self.labels.items()}

    def normalization_for(self, modality: str) -> dict[str, Any]:
        """CT uses the dataset's CT statistics; every other modality is z-scored per case."""
        return self.normalization.get(modality.upper(), {"scheme": "zscore"})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["median_shape"] = list(self.median_shape)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        data = dict(data)
        version = data.get("version")
        if version != PLAN_VERSION:
            raise ValueError(
                f"plan version {version!r} is not supported (this code reads version {PLAN_VERSION}); "
                "re-plan the dataset or use the matching pipeline version"
            )
        valid = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(
                f"unknown plan key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}"
            )
        data["median_shape"] = tuple(data.get("median_shape", (0, 0, 0)))
        return cls(**data)

    def case_slice_axis(self, spacing: tuple[float, float, float] | np.ndarray) -> int:
        """The axis one case is sliced across: its own coarsest axis when clearly anisotropic.

        Near-isotropic cases (coarsest < `anisotropy_ratio` x the finest) use the dataset's axis.
        """
        sp = np.asarray(spacing, float)
        order = np.argsort(sp)
        if sp[order[-1]] >= self.anisotropy_ratio * sp[order[-2]]:
            return int(order[-1])
        return self.slice_axis


def save_plan(plan: Plan, path: str | Path) -> Path:
    path = Path(path)
    write_text(path, json.dumps(plan.to_dict(), indent=2) + "\n")
    return path


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    try:
        return Plan.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read plan {path}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Staging manifest


def read_labels(staging: str | Path) -> dict[str, int]:
    """name -> value from STAGING/dataset.json (nnU-Net v2 style)."""
    path = Path(staging) / "dataset.json"
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))["labels"]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the labels of {path}: {exc!r}") from exc
    labels = {str(k): int(v) for k, v in labels.items()}
    if labels.get("background") != 0:
        raise ValueError(f"{path}: labels must map 'background' to 0; found {labels}")
    return labels


# --------------------------------------------------------------------------------------------
# Fingerprint


def _ras_geometry(
    img: nib.Nifti1Image,
) -> tuple[np.ndarray, tuple[int, int, int], tuple[float, float, float]]:
    """(axis permutation, shape, spacing) of an image once reoriented to RAS."""
    ornt = nib.orientations.io_orientation(img.affine)
    perm = ornt[:, 0].astype(int)  # voxel axis i goes to RAS axis perm[i]
    shape = [0, 0, 0]
    spacing = [0.0, 0.0, 0.0]
    zooms = np.linalg.norm(img.affine[:3, :3], axis=0)
    for i in range(3):
        shape[perm[i]] = int(img.shape[i])
        spacing[perm[i]] = float(zooms[i])
    return perm, tuple(shape), tuple(spacing)  # type: ignore[return-value]


def fingerprint_dataset(staging: str | Path, seed: int = 0) -> Fingerprint:
    """Read the labelled staged cases once and summarise them (see the module docstring)."""
    rows = [r for r in read_manifest(staging, resolve=True) if r.get("label")]
    if not rows:
        raise ValueError(f"{staging}: no labelled cases in manifest.jsonl; training needs labels")
    rng = np.random.default_rng(seed)
    cases: list[CaseFingerprint] = []
    samples: dict[str, list[np.ndarray]] = {}
    for row in rows:
        img = nib.load(row["image"])
        _perm, shape, spacing = _ras_geometry(img)
        label = np.asarray(nib.load(row["label"]).dataobj)
        if label.shape != img.shape:
            raise ValueError(f"case {row['case_id']}: label shape {label.shape} != image shape {img.shape}")
        values, counts = np.unique(label, return_counts=True)
        cases.append(
            CaseFingerprint(
                row["case_id"],
                row["modality"],
                shape,
                spacing,
                {int(v): int(c) for v, c in zip(values, counts, strict=True)},
            )
        )
        fg = np.asarray(img.dataobj, dtype=np.float32)[label > 0]
        if fg.size:
            pick = rng.choice(fg.size, size=min(SAMPLES_PER_CASE, fg.size), replace=False)
            samples.setdefault(row["modality"], []).append(fg[pick])
    intensity = {}
    for modality, parts in samples.items():
        v = np.concatenate(parts)
        intensity[modality] = {
            "mean": float(v.mean()),
            "std": float(v.std()),
            "min": float(v.min()),
            "max": float(v.max()),
            **{f"p{p:g}": float(np.percentile(v, p)) for p in FINGERPRINT_PERCENTILES},
        }
    return Fingerprint(cases, read_labels(staging), intensity)


# --------------------------------------------------------------------------------------------
# Plan


def _round_up(n: float, multiple: int) -> int:
    return int(multiple * math.ceil(n / multiple))


def make_plan(fingerprint: Fingerprint, preprocess: Any | None = None) -> Plan:
    """Decide the plan from a fingerprint; `preprocess` (PreprocessConfig) may override parts."""
    from pipeline.config import PreprocessConfig

    pre = preprocess or PreprocessConfig()
    if not fingerprint.cases:
        raise ValueError("cannot plan an empty dataset fingerprint")
    spacings = np.array([c.spacing for c in fingerprint.cases], float)  # (cases, 3) RAS
    shapes = np.array([c.shape for c in fingerprint.cases], float)
    median_spacing = np.median(spacings, axis=0)
    slice_axis = int(np.argmax(median_spacing))  # ties: the first (lowest) axis

    draft = Plan(
        slice_axis, 1.0, PATCH_MULTIPLE, {}, fingerprint.labels, [], anisotropy_ratio=ANISOTROPY_RATIO
    )
    in_plane_spacing, in_plane_size, slices, slice_spacing = [], [], [], []
    for sp, sh in zip(spacings, shapes, strict=True):
        axis = draft.case_slice_axis(sp)
        slices.append(sh[axis])
        slice_spacing.append(sp[axis])
        others = [a for a in range(3) if a != axis]
        in_plane_spacing.extend(sp[others])
        in_plane_size.append(sh[others] * sp[others])  # extent in mm
    target = float(pre.target_spacing or np.median(in_plane_spacing))
    sizes_px = np.concatenate(in_plane_size) / target
    median_px = float(np.median(sizes_px))
    rounded = _round_up(median_px, PATCH_MULTIPLE)
    automatic = min(rounded, int(pre.max_patch_size))
    patch_why = f"the median in-plane size {median_px:.0f} px at {target:g} mm, rounded up to {rounded}"
    if rounded > automatic:
        patch_why += f", capped at preprocess.max_patch_size {automatic}"
    if pre.patch_size is not None:
        patch = int(pre.patch_size)
        patch_why = (
            "preprocess.patch_size set in the config (explicit beats automatic; the plan would choose "
            f"{automatic}: {patch_why})"
        )
    else:
        patch = automatic

    lo_p, hi_p = pre.ct_clip_percentiles
    normalization: dict[str, dict[str, Any]] = {}
    for modality in fingerprint.modalities:
        stats = fingerprint.intensity.get(modality)
        if modality == "CT" and stats:
            keys = (f"p{lo_p:g}", f"p{hi_p:g}")
            if not all(k in stats for k in keys):
                raise ValueError(
                    f"preprocess.ct_clip_percentiles {[lo_p, hi_p]} must be among the fingerprint's "
                    f"percentiles {list(FINGERPRINT_PERCENTILES)}"
                )
            normalization["CT"] = {
                "scheme": "ct",
                "clip": [stats[keys[0]], stats[keys[1]]],
                "mean": stats["mean"],
                "std": max(stats["std"], 1e-6),
            }
        else:
            normalization[modality] = {"scheme": "zscore"}

    num_classes = max(fingerprint.labels.values()) + 1
    counts = np.zeros(num_classes)
    for c in fingerprint.cases:
        for v, n in c.label_counts.items():
            if 0 <= v < num_classes:
                counts[v] += n
    share = np.maximum(counts / max(counts.sum(), 1.0), 1e-6)
    weights = 1.0 / np.sqrt(share)
    weights = weights / weights.mean()

    median_shape = tuple(round(float(s)) for s in np.median(shapes * spacings, axis=0) / target)
    context, context_why = plan_context(float(np.median(slice_spacing)), target, pre.context_slices)
    return Plan(
        slice_axis=slice_axis,
        target_spacing=round(target, 4),
        patch_size=patch,
        normalization=normalization,
        labels=dict(fingerprint.labels),
        class_weights=[round(float(w), 4) for w in weights],
        crop_foreground=bool(pre.crop_foreground),
        median_shape=median_shape,  # type: ignore[arg-type]
        reasons={"patch_size": patch_why, "context_slices": context_why},
        context_slices=context,
        anisotropy_ratio=ANISOTROPY_RATIO,
        zscore_mask=MASK_RULES[0],
        crop_mask=MASK_RULES[0],
        fingerprint_summary={
            "cases": len(fingerprint.cases),
            "modalities": {
                m: sum(c.modality == m for c in fingerprint.cases) for m in fingerprint.modalities
            },
            "median_spacing_ras": [round(float(s), 4) for s in median_spacing],
            "median_in_plane_px": round(median_px, 1),
            "median_slices": int(np.median(slices)),  # along each case's own slice axis
            "median_slice_spacing": round(float(np.median(slice_spacing)), 4),  # mm, the same axis
            "intensity": fingerprint.intensity,
        },
    )


def context_indices(centres: np.ndarray | range | list[int], num_slices: int, k: int) -> np.ndarray:
    """(len(centres), k) slice indices of each centre's 2.5-D context: the (k - 1) / 2 slices
    before it, itself, the ones after, clamped to 0..num_slices - 1 (an edge slice repeats).

    Training samples and inference stacks its input channels with this one rule.
    """
    if k < 1 or k % 2 == 0:
        raise ValueError(f"context slices must be an odd positive integer; got {k}")
    offsets = np.arange(k, dtype=np.int64) - k // 2
    return np.clip(np.asarray(centres, dtype=np.int64)[:, None] + offsets, 0, num_slices - 1)


def plan_context(slice_spacing: float, target_spacing: float, configured: int | None) -> tuple[int, str]:
    """(k, why): the input slices of the 2.5-D context for a median slice spacing (mm).

    k = CONTEXT_SLICES when the slices are at most CONTEXT_MAX_SPACING_RATIO x the in-plane spacing
    apart, else 1 (thick slices: a neighbour shows other anatomy). `configured`
    (preprocess.context_slices) wins when set.
    """
    ratio = slice_spacing / target_spacing
    close = ratio <= CONTEXT_MAX_SPACING_RATIO
    automatic = CONTEXT_SLICES if close else 1
    why = (
        f"the median slice spacing {slice_spacing:g} mm is {ratio:.1f}x the in-plane {target_spacing:g} mm "
        + (
            f"(<= {CONTEXT_MAX_SPACING_RATIO:g}x: neighbours show the same anatomy): the slice and "
            f"{(CONTEXT_SLICES - 1) // 2} neighbour(s) each side, {CONTEXT_SLICES} input channels"
            if close
            else f"(> {CONTEXT_MAX_SPACING_RATIO:g}x: neighbours show other anatomy): the slice alone"
        )
    )
    if configured is None:
        return automatic, why
    return configured, (
        f"preprocess.context_slices set in the config (explicit beats automatic; the plan would choose "
        f"{automatic}: {why})"
    )


def plan_dataset(staging: str | Path, preprocess: Any | None = None) -> Plan:
    """Fingerprint then plan: the one call training makes."""
    plan = make_plan(fingerprint_dataset(staging), preprocess)
    log.info(
        "plan: slice axis %d, in-plane %.3f mm, patch %d, context %d slice(s), normalization %s",
        plan.slice_axis,
        plan.target_spacing,
        plan.patch_size,
        plan.context_slices,
        {m: n["scheme"] for m, n in plan.normalization.items()},
    )
    return plan
