"""Configuration: where the embedded stores live (the work directory) and, later, the YAML config."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

WORKDIR_ENV = "UNET_PIPELINE_WORKDIR"
DEFAULT_WORKDIR = Path.home() / ".unet-pipeline"


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
