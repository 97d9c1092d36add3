import pytest
import torch

from pipeline.training.data import split_cases

IDS = [f"case_{i:02d}" for i in range(10)]


def test_holdout_split_is_disjoint_complete_and_seeded():
    train, val = split_cases(IDS, val_fraction=0.2, seed=3)
    assert not set(train) & set(val) and sorted(train + val) == IDS and len(val) == 2
    assert split_cases(list(reversed(IDS)), val_fraction=0.2, seed=3) == (train, val)
    assert split_cases(IDS, val_fraction=0.2, seed=4) != (train, val)


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_kfold_validates_every_case_exactly_once(folds):
    vals = [split_cases(IDS, folds=folds, fold=f, seed=0)[1] for f in range(folds)]
    assert sorted(c for v in vals for c in v) == IDS
    for f in range(folds):
        train, val = split_cases(IDS, folds=folds, fold=f, seed=0)
        assert not set(train) & set(val)


@pytest.mark.parametrize(
    ("ids", "kwargs", "match"),
    [
        (["a"], {}, "at least 2"),
        (["a", "a", "b"], {}, "unique"),
        (IDS, {"folds": 11}, "exceeds"),
        (IDS, {"folds": 3, "fold": 3}, "fold must be"),
    ],
)
def test_bad_splits_are_rejected(ids, kwargs, match):
    with pytest.raises(ValueError, match=match):
        split_cases(ids, **kwargs)


def test_tiny_sets_keep_a_training_case():
    train, val = split_cases(["a", "b"], val_fraction=0.9)
    assert len(train) == 1 and len(val) == 1


class _Volumes(torch.utils.data.Dataset):
    """Four items of one slice each; item `bad` raises like a failing transform."""

    def __init__(self, bad: int | None = None) -> None:
        self.bad = bad

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        if i == self.bad:
            raise ValueError(f"transform failed on item {i}")
        return [{"image": torch.full((1, 16, 16), float(i))}]


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_gives_every_volume_each_pass(workers):
    from pipeline.training.data import infinite_batches, make_loader

    loader, sampler = make_loader(_Volumes(), volumes_per_batch=2, seed=0, workers=workers)
    batches = infinite_batches(loader, sampler)
    seen = sorted(int(v) for _ in range(2) for v in next(batches)["image"][:, 0, 0, 0])
    assert seen == [0, 1, 2, 3]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's
@pytest.mark.parametrize("workers", [0, 1])
def test_a_failing_transform_stops_training_instead_of_ending_the_pass_silently(workers):
    from pipeline.training.data import infinite_batches, make_loader

    loader, sampler = make_loader(_Volumes(bad=2), volumes_per_batch=1, seed=0, workers=workers)
    batches = infinite_batches(loader, sampler)
    with pytest.raises(RuntimeError, match=r"stopped after [0-3] of 4 batches: a transform failed"):
        for _ in range(12):  # MONAI's thread would otherwise end each pass early, forever
            next(batches)


def test_loader_workers_follow_the_setting_or_the_device(monkeypatch):
    import os

    from pipeline.training.data import loader_workers

    assert loader_workers(0, "cuda") == 0 and loader_workers(3, "cpu") == 3
    assert loader_workers(None, "cpu") == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    assert loader_workers(None, "cuda") == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    assert loader_workers(None, "cuda") == 1
