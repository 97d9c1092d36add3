import pytest

from pipeline.data import split_cases

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
