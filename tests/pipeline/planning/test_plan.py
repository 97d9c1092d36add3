import json

import numpy as np
import pytest

from pipeline.config import PreprocessConfig
from pipeline.planning.plan import (
    CaseFingerprint,
    Fingerprint,
    Plan,
    load_plan,
    make_plan,
    plan_dataset,
    save_plan,
)
from tests.pipeline.ingest.staging_fixture import make_staging

LABELS = {"background": 0, "organ": 1, "lesion": 2}
CT_STATS = {"mean": 60.0, "std": 20.0, "min": -50.0, "max": 400.0, "p0.5": -10.0, "p99.5": 200.0, "p1": 0.0}
for p in ("p2", "p5", "p50", "p95", "p98", "p99"):
    CT_STATS.setdefault(p, 60.0)


def _fp(spacings, shapes, modalities=("CT",), counts=None):
    cases = [
        CaseFingerprint(f"c{i}", modalities[i % len(modalities)], sh, sp, counts or {0: 900, 1: 90, 2: 10})
        for i, (sp, sh) in enumerate(zip(spacings, shapes, strict=True))
    ]
    return Fingerprint(cases, LABELS, {"CT": CT_STATS})


@pytest.mark.parametrize(
    ("spacing", "axis"),
    [((0.8, 0.8, 3.0), 2), ((3.0, 0.8, 0.8), 0), ((0.7, 5.0, 0.7), 1)],
)
def test_slice_axis_is_the_lowest_resolution_axis(spacing, axis):
    plan = make_plan(_fp([spacing] * 3, [(100, 100, 30)] * 3))
    assert plan.slice_axis == axis


def test_target_spacing_is_the_in_plane_median_and_slice_spacing_is_excluded():
    spacings = [(0.7, 0.7, 5.0), (0.9, 0.9, 3.0), (1.1, 1.1, 2.5)]
    plan = make_plan(_fp(spacings, [(100, 100, 20)] * 3))
    assert plan.target_spacing == pytest.approx(0.9)


def test_mixed_acquisitions_are_sliced_as_acquired():
    """A sagittal case (thick along R) is sliced across R even when the dataset axis is S."""
    plan = make_plan(_fp([(1, 1, 3), (1, 1, 3), (3, 1, 1)], [(64, 64, 20)] * 3))
    assert plan.slice_axis == 2
    assert plan.case_slice_axis((3.0, 1.0, 1.0)) == 0
    assert plan.case_slice_axis((1.1, 1.0, 1.2)) == 2  # near isotropic: the dataset's axis


@pytest.mark.parametrize(
    ("size_px", "cap", "expected"), [(100, 256, 112), (33, 256, 48), (128, 256, 128), (300, 128, 128)]
)
def test_patch_is_a_multiple_of_16_covering_the_median_capped(size_px, cap, expected):
    plan = make_plan(
        _fp([(1.0, 1.0, 3.0)] * 3, [(size_px, size_px, 10)] * 3), PreprocessConfig(max_patch_size=cap)
    )
    assert plan.patch_size == expected and plan.patch_size % 16 == 0
    assert plan.reasons["patch_size"].startswith(f"the median in-plane size {size_px} px at 1 mm")
    assert ("capped at preprocess.max_patch_size" in plan.reasons["patch_size"]) == (size_px > cap)


def test_patch_and_spacing_overrides():
    plan = make_plan(
        _fp([(1.0, 1.0, 3.0)] * 3, [(100, 100, 10)] * 3), PreprocessConfig(patch_size=64, target_spacing=2.0)
    )
    assert (plan.patch_size, plan.target_spacing) == (64, 2.0)
    assert plan.reasons["patch_size"].startswith(
        "preprocess.patch_size set in the config (explicit beats automatic; the plan would choose 64:"
    )


def test_normalization_by_modality():
    plan = make_plan(_fp([(1, 1, 3)] * 4, [(64, 64, 10)] * 4, modalities=("CT", "MR")))
    ct = plan.normalization["CT"]
    assert ct["scheme"] == "ct" and ct["clip"] == [-10.0, 200.0]
    assert (ct["mean"], ct["std"]) == (60.0, 20.0)
    assert plan.normalization["MR"] == {"scheme": "zscore"}
    assert plan.normalization_for("PT") == {"scheme": "zscore"}


def test_class_weights_favour_rare_labels_and_average_one():
    plan = make_plan(_fp([(1, 1, 3)] * 2, [(64, 64, 10)] * 2))
    w = plan.class_weights
    assert w[0] < w[1] < w[2] and np.mean(w) == pytest.approx(1.0, abs=1e-3)


def test_plan_round_trips_and_rejects_unknown_keys(tmp_path):
    plan = make_plan(_fp([(1, 1, 3)] * 2, [(64, 64, 10)] * 2))
    path = save_plan(plan, tmp_path / "plan.json")
    assert load_plan(path) == plan
    data = json.loads(path.read_text())
    data["spacing"] = 1
    with pytest.raises(ValueError, match="unknown plan key"):
        Plan.from_dict(data)


def test_plan_of_a_staging_folder(tmp_path):
    plan = plan_dataset(make_staging(tmp_path, n_cases=4, size=32))
    assert plan.slice_axis == 2  # axial majority; the sagittal case is sliced along its own axis
    assert set(plan.normalization) == {"CT", "MR"}
    assert plan.num_classes == 3 and plan.label_names[2] == "lesion"
    assert 0.85 < plan.target_spacing < 1.15
