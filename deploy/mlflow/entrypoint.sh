#!/bin/sh
# Start the MLflow tracking server with basic auth. Every secret comes from the environment:
# the auth config is written at start-up (configparser has no variable interpolation), and the
# artifact bucket is created if missing.
set -eu
: "${MLFLOW_DB_PASSWORD:?set it}" "${MLFLOW_AUTH_ADMIN_PASSWORD:?set it}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set it}" "${AWS_ACCESS_KEY_ID:?set it}" "${AWS_SECRET_ACCESS_KEY:?set it}"
DB_HOST="${MLFLOW_DB_HOST:-postgres}"
BUCKET="${MLFLOW_ARTIFACT_BUCKET:-mlflow}"

export MLFLOW_AUTH_CONFIG_PATH="$HOME/basic_auth.ini"
umask 077
cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = READ
database_uri = postgresql://mlflow:${MLFLOW_DB_PASSWORD}@${DB_HOST}:5432/mlflow_auth
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI

python - "$BUCKET" <<'PY'
import os
import sys

import boto3
from botocore.exceptions import ClientError

bucket = sys.argv[1]
s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
try:
    s3.head_bucket(Bucket=bucket)
except ClientError:
    s3.create_bucket(Bucket=bucket)
    print(f"created artifact bucket {bucket}")
PY

# Through the environment (click's envvar), so the password is not on the process command line.
# The password must be URL-safe (hex): it is part of a URL here.
export MLFLOW_BACKEND_STORE_URI="postgresql://mlflow:${MLFLOW_DB_PASSWORD}@${DB_HOST}:5432/mlflow"
exec mlflow server \
    --host 0.0.0.0 --port 5000 \
    --artifacts-destination "s3://${BUCKET}" \
    --serve-artifacts \
    --app-name basic-auth
