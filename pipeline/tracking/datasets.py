"""The staged dataset as an MLflow dataset input: identified by its manifest, described by counts.

Only the manifest's location, hash and counts travel to MLflow: case IDs are pseudonymous and
no source path, image or label leaves the staging folder.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource

from pipeline.io.manifest import read_manifest
from pipeline.tracking.store import dataset_sha256

# MLflow keeps at most 36 characters of a digest (its datasets table); the first 32 hex
# characters of the manifest's sha256 identify it as well in practice, and the profile and the
# run's dataset_manifest_sha256 tag carry the whole hash.
DIGEST_CHARS = 32
CONTEXT_TRAINING = "training"  # the mlflow.data.context input tag


class StagedDataset(MetaDataset):
    """A MetaDataset with a profile (MetaDataset itself has none)."""

    def __init__(self, source: LocalArtifactDatasetSource, *, name: str, digest: str, profile: dict) -> None:
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        config["profile"] = json.dumps(self._profile, sort_keys=True)
        return config


def manifest_dataset(staging: str | Path, split: Mapping[str, Sequence[str]] | None = None) -> StagedDataset:
    """The staging folder's dataset: digest from manifest.jsonl, profile of counts and the split.

    Profile: cases, labelled cases, cases per modality, and the number of cases in each split
    part (e.g. {"train": 9, "val": 3}); the name is the staging folder's name.
    """
    staging = Path(staging).resolve()
    manifest = staging / "manifest.jsonl"
    sha = dataset_sha256(manifest)
    rows = read_manifest(staging)
    profile: dict[str, Any] = {
        "cases": len(rows),
        "labelled_cases": sum(1 for r in rows if r.get("label")),
        "modalities": dict(sorted(Counter(str(r.get("modality") or "unknown") for r in rows).items())),
        "manifest_sha256": sha,
    }
    if split:
        profile["split"] = {part: len(ids) for part, ids in split.items()}
    return StagedDataset(
        LocalArtifactDatasetSource(manifest.as_uri()),
        name=staging.name,
        digest=sha[:DIGEST_CHARS],
        profile=profile,
    )
