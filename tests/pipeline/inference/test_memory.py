"""Memory while predicting: the lookup restore, loading ahead within a budget, cases in flight."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from pipeline.io.volume import Volume


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "oblique"])
@pytest.mark.parametrize("spacing", [(0.7, 2.5), (1.3, 5.0), (0.93, 1.0)])
@pytest.mark.parametrize("flip", [False, True])
def test_restore_by_lookup_equals_spatial_resample_away_from_ties(orientation, spacing, flip):
    """restore_labels' index lookup (no float sampling grid) against MONAI's SpatialResample:
    equal wherever the nearest voxel is not an exact tie (x.5), which float error decides."""
    import torch

    from pipeline.planning.plan import Plan
    from pipeline.planning.transforms import _restore_axis_aligned, preprocess_volume, restore
    from tests.pipeline.ingest.staging_fixture import _affine

    plan = Plan(
        slice_axis=2,
        target_spacing=0.8,
        patch_size=96,
        normalization={"CT": {"scheme": "ct", "clip": [-1000.0, 1000.0], "mean": 0.0, "std": 300.0}},
        labels={"background": 0, "organ": 1, "lesion": 2},
        class_weights=[1.0, 1.0, 1.0],
    )
    rng = np.random.default_rng(0)
    affine = _affine(orientation, *spacing) @ np.diag([-1.0 if flip else 1.0, 1, 1, 1])
    shape = (33, 37, 9)
    data = rng.normal(0, 300, shape).astype(np.float32)
    slices, info = preprocess_volume(Volume(data, affine, "CT"), plan)
    labels = torch.as_tensor(rng.integers(0, 3, (slices.shape[0], *slices.shape[2:]))).to(torch.uint8)
    fast = _restore_axis_aligned(labels, info)
    assert fast is not None and fast.dtype == np.uint8 and fast.shape == shape
    ref = restore(labels[:, None].float(), info, mode="nearest")[0].round().to(torch.uint8).numpy()
    m = np.linalg.inv(info.affine) @ info.original_affine
    tie = np.zeros(shape, bool)
    for i in range(3):
        j = int(np.argmax(np.abs(m[:3, i])))
        coord = m[j, i] * np.arange(shape[i]) + m[j, 3]
        tie |= (np.abs(coord - np.floor(coord) - 0.5) < 1e-4).reshape([-1 if k == i else 1 for k in range(3)])
    assert not ((fast != ref) & ~tie).any()
    assert (fast == ref).mean() > 0.5


def _tracked_loads():
    """A load function recording how many loaded cases are alive at once (taken, not finished)."""
    lock = threading.Lock()
    alive: set[int] = set()
    started = {i: threading.Event() for i in range(16)}
    peak = [0]

    def load(i: int) -> int:
        with lock:
            alive.add(i)
            peak[0] = max(peak[0], len(alive))
        started[i].set()
        return i

    def finish(i: int) -> None:
        with lock:
            alive.discard(i)

    return load, finish, started, peak


def test_prefetch_holds_one_case_when_two_do_not_fit_the_budget():
    from pipeline.inference.memory import prefetch

    load, finish, _, peak = _tracked_loads()
    seen = []
    for item, pending in prefetch(list(range(6)), load, cost=lambda i: 10, budget=19):
        assert pending.take() == item
        seen.append(item)
        finish(item)
    assert seen == list(range(6)) and peak[0] == 1


def test_prefetch_loads_the_next_case_ahead_when_both_fit():
    from pipeline.inference.memory import prefetch

    load, finish, started, peak = _tracked_loads()
    for item, pending in prefetch(list(range(4)), load, cost=lambda i: 10, budget=20):
        assert pending.take() == item
        if item + 1 < 4:  # the next one is being loaded while this one is held
            assert started[item + 1].wait(timeout=30)
        finish(item)
    assert peak[0] == 2


def test_prefetch_runs_a_case_larger_than_the_budget_alone():
    from pipeline.inference.memory import prefetch

    load, finish, _, peak = _tracked_loads()
    costs = {0: 5, 1: 500, 2: 5, 3: 5}
    out = []
    for item, pending in prefetch(list(range(4)), load, cost=costs.__getitem__, budget=100):
        out.append(pending.take())
        finish(item)
    assert out == [0, 1, 2, 3] and peak[0] <= 2


def test_prefetch_sets_its_loader_thread_up_before_the_first_load():
    import threading

    from pipeline.inference.memory import prefetch

    started_in: list[str] = []
    loaded_in: list[str] = []

    def load(item: int) -> int:
        assert started_in, "a load ran before on_start"
        loaded_in.append(threading.current_thread().name)
        return item

    on_start = lambda: started_in.append(threading.current_thread().name)  # noqa: E731
    loads = prefetch(list(range(3)), load, cost=lambda i: 1, budget=10, on_start=on_start)
    got = [pending.take() for _, pending in loads]
    assert got == [0, 1, 2]
    assert len(started_in) == 1 and set(loaded_in) == set(started_in)  # once, in the loader's thread
    assert started_in[0] != threading.current_thread().name


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_peak_memory_of_a_volume_at_a_reduced_voxel_limit_stays_within_the_plan(tmp_path):
    """bench/predict_memory.py's measurement on a 256 x 256 x 80 CT with the voxel limit set to
    exactly its size: the process's peak grows by at most the planned case bytes (the figure the
    prefetch budget uses) plus 96 MiB for one batch of activations and allocator slack."""
    from bench.predict_memory import measure
    from pipeline.inference.memory import PEAK_BYTES_PER_PREPROCESSED_VOXEL, PEAK_BYTES_PER_VOXEL

    figures = measure(tmp_path, slices=80, size=256, batch_size=1)
    assert figures["voxels"] == 256 * 256 * 80
    assert figures["peak_over_start_mib"] <= figures["planned_mib"] + 96, figures
    assert PEAK_BYTES_PER_VOXEL + PEAK_BYTES_PER_PREPROCESSED_VOXEL <= 40  # the stated 10x float32 volume


@pytest.mark.parametrize(
    ("sizes", "budget", "cap", "expected"),
    [
        ([10, 10, 10, 10], 25, 8, 2),  # two of the largest fit, three do not
        ([10, 10, 10, 10], 100, 3, 3),  # the core count caps it
        ([50, 5, 5], 40, 4, 1),  # the largest case alone exceeds the budget: it runs alone
        ([30, 20, 5, 5], 54, 4, 2),  # any two must fit (50); the three largest (55) do not
        ([], 10, 4, 4),
    ],
)
def test_cases_in_flight_follow_the_budget_and_planned_sizes(sizes, budget, cap, expected):
    from pipeline.inference.memory import max_cases_in_flight

    assert max_cases_in_flight(sizes, budget, cap) == expected
