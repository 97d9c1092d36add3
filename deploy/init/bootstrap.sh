#!/bin/sh
# One-shot set-up against the running servers (compose service `init`; safe to run again): work
# pools, the `gpu` tag concurrency limit, and the MLflow account the workers use. Compose starts
# it once both servers are healthy, so nothing here waits or polls.
set -eu
: "${PREFECT_API_URL:?set it}" "${MLFLOW_TRACKING_URI:?set it}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set it}" "${MLFLOW_TRACKING_USERNAME:?set it}" "${MLFLOW_TRACKING_PASSWORD:?set it}"
# The repository root (/opt/unet-pipeline in the image): the pool templates are read from it.
cd "$(dirname "$0")/../.."

# Process pools: on this single server, flow runs are subprocesses of the compose workers.
prefect work-pool create gpu-pool --type process --base-job-template deploy/work-pools/process.json --overwrite
prefect work-pool create cpu-pool --type process --base-job-template deploy/work-pools/process.json --overwrite
# Task runs tagged `gpu` run one at a time (one GPU on this server; raise it with more GPUs).
prefect concurrency-limit create gpu "${UNET_GPU_CONCURRENCY:-1}"

echo "creating the MLflow account '$MLFLOW_TRACKING_USERNAME' for the workers (if missing)"
python - <<'PY'
import os

import requests

uri = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
admin = (os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin", os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"])
user, password = os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
found = requests.get(f"{uri}/api/2.0/mlflow/users/get", params={"username": user}, auth=admin, timeout=30)
if found.status_code == 200:
    print(f"MLflow user {user} exists")
else:
    made = requests.post(
        f"{uri}/api/2.0/mlflow/users/create", json={"username": user, "password": password}, auth=admin, timeout=30
    )
    made.raise_for_status()
    print(f"MLflow user {user} created")
PY
echo "set-up done; next: prefect --no-prompt deploy --all --prefect-file deploy/prefect.yaml"
