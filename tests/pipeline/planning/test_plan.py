import json

import numpy as np
import pytest

from pipeline.config import PreprocessConfig
from pipeline.planning.plan import (
    CaseFingerprint,
    Fingerprint,
    Plan,
    context_indices,
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


@pytest.mark.parametrize(
    ("spacing", "context", "why"),
    [
        ((0.8, 0.8, 0.8), 3, "1.0x the in-plane 0.8 mm (<= 3x"),  # isotropic
        ((0.9, 0.9, 2.5), 3, "2.8x the in-plane 0.9 mm (<= 3x"),  # the demo's thin-slice CT and MR
        ((1.0, 1.0, 3.0), 3, "3.0x the in-plane 1 mm (<= 3x"),  # the rule's edge counts as close
        ((0.7, 0.7, 5.0), 1, "7.1x the in-plane 0.7 mm (> 3x: neighbours show other anatomy)"),
        ((0.5, 6.0, 0.5), 1, "12.0x"),  # thick coronal slices: the spacing along each case's own axis
    ],
)
def test_context_is_planned_from_the_slice_spacing_and_says_why(spacing, context, why):
    plan = make_plan(_fp([spacing] * 3, [(64, 64, 20)] * 3))
    assert plan.context_slices == context
    assert why in plan.reasons["context_slices"]
    assert plan.fingerprint_summary["median_slice_spacing"] == pytest.approx(max(spacing))


def test_context_follows_the_median_case():
    """Two thin-slice cases and one thick one: the median slice spacing (2.5 mm) decides."""
    plan = make_plan(_fp([(1, 1, 2.0), (1, 1, 2.5), (1, 1, 8.0)], [(64, 64, 20)] * 3))
    assert plan.context_slices == 3 and plan.reasons["context_slices"].startswith(
        "the median slice spacing 2.5 mm"
    )


@pytest.mark.parametrize(("configured", "automatic"), [(1, 3), (5, 3), (3, 1)])
def test_a_configured_context_beats_the_plan_and_the_reason_says_so(configured, automatic):
    thin, thick = (1.0, 1.0, 2.0), (1.0, 1.0, 6.0)
    fp = _fp([thin if automatic == 3 else thick] * 3, [(64, 64, 20)] * 3)
    plan = make_plan(fp, PreprocessConfig(context_slices=configured))
    assert plan.context_slices == configured
    assert plan.reasons["context_slices"].startswith(
        "preprocess.context_slices set in the config (explicit beats automatic; the plan would choose "
        f"{automatic}:"
    )


def test_a_plan_from_before_the_context_reads_as_one_slice_and_bad_contexts_are_refused(tmp_path):
    data = make_plan(_fp([(1, 1, 2)] * 2, [(64, 64, 10)] * 2)).to_dict()
    assert data["context_slices"] == 3
    del data["context_slices"]
    assert Plan.from_dict(data).context_slices == 1
    for bad in (0, 2, -1, 1.5, True):
        with pytest.raises(ValueError, match="context_slices must be an odd positive integer"):
            Plan.from_dict({**data, "context_slices": bad})


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("num_slices", [1, 2, 7])
def test_context_indices_are_the_neighbours_with_the_edge_slices_repeated(k, num_slices):
    got = context_indices(range(num_slices), num_slices, k)
    assert got.shape == (num_slices, k)
    for centre in range(num_slices):
        expected = [min(max(centre + o, 0), num_slices - 1) for o in range(-(k // 2), k // 2 + 1)]
        assert got[centre].tolist() == expected
    assert got[:, k // 2].tolist() == list(range(num_slices))  # the centre in the middle


def test_context_indices_refuse_an_even_context():
    with pytest.raises(ValueError, match="odd positive"):
        context_indices([0], 4, 2)


def test_new_plans_z_score_and_crop_by_the_body_and_older_plans_keep_otsu():
    data = make_plan(_fp([(1, 1, 2)] * 2, [(64, 64, 10)] * 2)).to_dict()
    assert data["zscore_mask"] == data["crop_mask"] == "body"
    del data["zscore_mask"], data["crop_mask"]  # a plan saved before the rules were plan fields
    old = Plan.from_dict(data)
    assert old.zscore_mask == old.crop_mask == "otsu"
    for name in ("zscore_mask", "crop_mask"):
        with pytest.raises(ValueError, match=f"{name} must be one of body, otsu"):
            Plan.from_dict({**data, name: "nonzero"})
