"""Case splits and the training data pipeline (cached volumes, threaded loading).

Splits are by case, never by slice, so no slice of a validation case is trained on. Volumes
are preprocessed once by the deterministic part of the chain and cached (in memory by
CacheDataset, or on disk by PersistentDataset for data larger than memory); random slice
sampling and augmentation run per step in persistent loader worker processes behind a
ThreadDataLoader, so the model never waits and never competes with them for the GIL.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import (
    CacheDataset,
    Dataset,
    PersistentDataset,
    ThreadDataLoader,
    list_data_collate,
    set_track_meta,
)
from monai.data.utils import worker_init_fn as monai_worker_init_fn
from torch.utils.data import DistributedSampler

from pipeline.system import available_cores

log = logging.getLogger(__name__)


def split_cases(
    case_ids: Sequence[str], *, val_fraction: float = 0.2, folds: int = 1, fold: int = 0, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(train ids, validation ids), disjoint, decided by `seed` only (not by input order).

    folds == 1: a random `val_fraction` of the cases (at least one) validates. folds = k > 1: the
    shuffled cases are dealt into k folds and fold `fold` validates. At least one case trains.
    """
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise ValueError("case ids must be unique; found duplicates")
    if len(ids) < 2:
        raise ValueError(f"need at least 2 labelled cases to split into train and validation; got {len(ids)}")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    if folds > 1:
        if folds > len(ids):
            raise ValueError(f"folds={folds} exceeds the {len(ids)} labelled cases")
        if not 0 <= fold < folds:
            raise ValueError(f"fold must be in 0..{folds - 1}; got {fold}")
        val = order[fold::folds]
    else:
        n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
        val = order[:n_val]
    val_set = set(val)
    return [c for c in order if c not in val_set], sorted(val)


def make_train_dataset(
    items: list[dict[str, Any]], transform, *, cache: str = "memory", cache_dir: str | Path | None = None
) -> Dataset:
    """CacheDataset (memory), PersistentDataset (disk, `cache_dir`) or a plain Dataset ('none')."""
    if cache == "memory":
        # copy_cache=False: the random part crops views of the cached volume and every later
        # step (flips, affine, intensity, padding) returns new tensors, never writing into the
        # cache; deep-copying whole volumes and their sample indices on every access would
        # take more time than all the augmentation (test_transforms pins that it stays intact).
        return CacheDataset(items, transform, cache_rate=1.0, num_workers=0, progress=False, copy_cache=False)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("cache 'disk' needs a cache_dir (data.cache_dir)")
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return PersistentDataset(items, transform, cache_dir=cache_dir)
    if cache == "none":
        return Dataset(items, transform)
    raise ValueError(f"cache must be one of memory, disk, none; got {cache!r}")


def make_loader(
    dataset: Dataset,
    *,
    volumes_per_batch: int,
    seed: int,
    buffer_size: int = 2,
    distributed: bool = False,
    workers: int = 1,
) -> tuple[ThreadDataLoader, DistributedSampler | None]:
    """A shuffling threaded loader; each item is a list of slices, flattened into one batch.

    With `workers` > 0 the random sampling and augmentation run in that many persistent worker
    processes (forked: the cache is shared, not copied), and the thread only moves finished
    batches. In the trainer's own process they would hold the GIL against every operator the
    training step dispatches. MONAI's metadata tracking, which the random transforms do not need,
    triples their cost: workers over an in-memory CacheDataset (only the random part runs there)
    turn it off (`set_track_meta(False)` is per process); disk or no caching keeps it, since the
    loading chain runs in the worker too.
    """
    sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False) if distributed else None
    loader = ThreadDataLoader(
        dataset,
        batch_size=volumes_per_batch,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=(
            functools.partial(_init_worker, untracked=isinstance(dataset, CacheDataset)) if workers else None
        ),
        buffer_size=buffer_size,
        collate_fn=list_data_collate,
        drop_last=False,
    )
    return loader, sampler


def loader_workers(setting: int | None, device_type: str) -> int:
    """Loader worker processes: `setting`, or by device when None (see DataConfig)."""
    if setting is not None:
        return setting
    if device_type == "cuda":
        return max(1, min(4, available_cores() // 2))
    return 1


def _init_worker(worker_id: int, untracked: bool) -> None:
    if untracked:
        set_track_meta(False)
    monai_worker_init_fn(worker_id)  # seeds the random transforms of this worker


def infinite_batches(
    loader: ThreadDataLoader, sampler: DistributedSampler | None, start: int = 0
) -> Iterator:
    """Batches forever: passes over the volumes back to back (epochs are counted in steps).

    MONAI's ThreadDataLoader ends a pass early and silently when its thread dies (a transform
    raised): a short pass is an error here, not a new epoch.
    """
    n = start
    expected = len(loader)
    while True:
        if sampler is not None:
            sampler.set_epoch(n)
        got = 0
        for batch in loader:
            got += 1
            yield batch
        if got < expected:
            raise RuntimeError(
                f"the training loader stopped after {got} of {expected} batches: a transform "
                "failed on a training case (its traceback is printed above)"
            )
        n += 1


def split_holdout(staging: str | Path, fraction: float, seed: int, out: str | Path) -> tuple[Path, Path]:
    """Split a staging folder by case into (train, test) staging views under `out`.

    Labelled cases are split (seeded); unlabelled cases go to neither. Each view is a staging
    folder of its own (manifest subset, dataset.json, links to the images and labels), so the
    test cases never reach training and can be predicted and evaluated as unseen data.
    """
    import json
    import random

    from pipeline.io.atomic import write_text

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction!r}")
    staging, out = Path(staging).resolve(), Path(out)
    lines = [
        json.loads(x) for x in (staging / "manifest.jsonl").read_text(encoding="utf-8").splitlines() if x
    ]
    labelled = sorted((r for r in lines if r.get("label")), key=lambda r: r["case_id"])
    if len(labelled) < 3:
        raise ValueError(f"{staging} has {len(labelled)} labelled cases; a holdout split needs at least 3")
    order = labelled[:]
    random.Random(seed).shuffle(order)
    n_test = max(1, round(fraction * len(order)))
    views = {"train": order[n_test:], "test": order[:n_test]}
    paths = []
    for name, rows in views.items():
        view = out / name
        for sub in ("images", "labels"):
            (view / sub).mkdir(parents=True, exist_ok=True)
        for row in rows:
            for key in ("image", "label"):
                link = view / row[key]
                if not link.exists():
                    link.symlink_to(staging / row[key])
        manifest = "".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["case_id"]))
        write_text(view / "manifest.jsonl", manifest)
        write_text(view / "dataset.json", (staging / "dataset.json").read_text(encoding="utf-8"))
        paths.append(view)
    return paths[0], paths[1]
