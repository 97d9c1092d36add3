"""Write the three pinned requirement files from one resolved set, so they cannot drift (`make lock`).

    python deploy/lock.py FULL_FREEZE

FULL_FREEZE is `pip freeze` of a venv holding the project with its dev extra (the dev set). From
it, pip resolves (dry run, nothing installed) the project alone and the MLflow server's packages,
each constrained to the dev set's exact versions, and this writes:

- requirements.lock: the runtime set, what the pipeline image installs;
- requirements-dev.lock: `-r requirements.lock` plus the test and lint tools (what `make test`
  installs into .venv);
- deploy/mlflow/requirements.txt: the MLflow server image's set (no torch, no pipeline code).

Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Packaging tools come with every venv; `pip freeze` leaves them out too.
TOOLS = {"pip", "setuptools", "wheel"}
# What the MLflow server image runs: basic auth (Flask-WTF), PostgreSQL (psycopg2), S3 (boto3).
MLFLOW_SERVER = ["mlflow[auth]", "psycopg2-binary", "boto3"]


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """`name==version` lines of a freeze, keyed by normalised name."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-")) and "==" in line:
            name, version = line.split("==", 1)
            pins[_key(name)] = f"{name}=={version}"
    return pins


def resolve(requirements: list[str], constraints: Path) -> dict[str, str]:
    """What pip would install for `requirements` from scratch under `constraints` (nothing installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        argv = [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed"]
        argv += ["--report", str(report), "-c", str(constraints), *requirements]
        subprocess.run(
            argv,
            check=True,
            cwd=ROOT,
        )
        installs = json.loads(report.read_text())["install"]
    pins = {}
    for item in installs:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if _key(name) not in TOOLS | {"unet-pipeline"}:
            pins[_key(name)] = f"{name}=={version}"
    return pins


def _write(path: Path, header: list[str], lines) -> None:
    body = sorted(lines, key=lambda line: line.split("==")[0].lower())
    path.write_text("\n".join([*header, *body]) + "\n")


def main(full_freeze: str) -> None:
    full = read_pins(Path(full_freeze))
    torch = full["torch"]
    runtime = resolve([torch, "."], Path(full_freeze))
    missing = set(runtime) - set(full)
    if missing:
        raise SystemExit(f"the runtime set needs {sorted(missing)}, absent from the dev set {full_freeze}")
    server = resolve(
        [f"{r}=={full[_key(r.split('[')[0])].split('==')[1]}" for r in MLFLOW_SERVER], Path(full_freeze)
    )
    _write(
        ROOT / "requirements.lock",
        [
            "# The runtime set: what the pipeline image installs. Pinned, tested together on Python 3.11",
            "# (CPU). Regenerate with: make lock (writes requirements-dev.lock from the same resolution).",
            "# torch is the CPU build; on a CUDA machine see README (GPU install).",
        ],
        runtime.values(),
    )
    _write(
        ROOT / "requirements-dev.lock",
        [
            "# The runtime set plus the test and lint tools: what `make test` installs into .venv.",
            "# Resolved together with requirements.lock by `make lock`; never edit one without the other.",
            "-r requirements.lock",
        ],
        (pin for key, pin in full.items() if key not in runtime),
    )
    _write(
        ROOT / "deploy" / "mlflow" / "requirements.txt",
        [
            "# The MLflow tracking server image (deploy/mlflow/Dockerfile): basic auth, PostgreSQL, S3.",
            "# Resolved by `make lock` under the same versions as requirements-dev.lock.",
        ],
        server.values(),
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
