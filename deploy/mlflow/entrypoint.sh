#!/bin/sh
# Start the MLflow tracking server: basic auth, PostgreSQL stores, proxied artifacts. Every secret
# comes from the environment; the auth config is written at start-up (configparser has no
# variable interpolation). The stack test (tests/stack) runs this same script as a local process.
#
# Artifacts: MLFLOW_ARTIFACTS_DESTINATION is where the server itself stores them (clients only
# ever talk to the server: `--serve-artifacts`, so they need no storage credentials):
#   a folder (default /mlflow/artifacts, a volume of the single-server install), or
#   s3://BUCKET[/prefix] on the site's S3-compatible store, with MLFLOW_S3_ENDPOINT_URL,
#   AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY set (the bucket is created when missing).
set -eu
: "${MLFLOW_DB_PASSWORD:?set it}" "${MLFLOW_AUTH_ADMIN_PASSWORD:?set it}" "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set it}"
DB_HOST="${MLFLOW_DB_HOST:-postgres}"
DB_PORT="${MLFLOW_DB_PORT:-5432}"
DB_USER="${MLFLOW_DB_USER:-mlflow}"
DB_NAME="${MLFLOW_DB_NAME:-mlflow}"
AUTH_DB_NAME="${MLFLOW_AUTH_DB_NAME:-mlflow_auth}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-/mlflow/artifacts}"
# The driver is named: SQLAlchemy 2.1 maps a URI without one to psycopg 3, which is not installed.
DB_URL="postgresql+psycopg2://${DB_USER}:${MLFLOW_DB_PASSWORD}@${DB_HOST}:${DB_PORT}"

export MLFLOW_AUTH_CONFIG_PATH="$HOME/basic_auth.ini"
umask 077
cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = READ
database_uri = ${DB_URL}/${AUTH_DB_NAME}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI

case "$ARTIFACTS" in
s3://*)
    : "${MLFLOW_S3_ENDPOINT_URL:?set it for an s3:// destination}" "${AWS_ACCESS_KEY_ID:?set it}" "${AWS_SECRET_ACCESS_KEY:?set it}"
    python - "$ARTIFACTS" <<'PY'
import os
import sys

import boto3
from botocore.exceptions import ClientError

bucket = sys.argv[1].removeprefix("s3://").split("/", 1)[0]
s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
try:
    s3.head_bucket(Bucket=bucket)
except ClientError:
    s3.create_bucket(Bucket=bucket)
    print(f"created artifact bucket {bucket}")
PY
    ;;
*://*)
    echo "MLFLOW_ARTIFACTS_DESTINATION must be a folder or s3://BUCKET; got $ARTIFACTS" >&2
    exit 2
    ;;
*)
    mkdir -p "$ARTIFACTS"
    ;;
esac

# Through the environment (click's envvar), so the password is not on the process command line.
# The password must be URL-safe (hex): it is part of a URL here.
export MLFLOW_BACKEND_STORE_URI="${DB_URL}/${DB_NAME}"
exec mlflow server \
    --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-2}" \
    --artifacts-destination "$ARTIFACTS" \
    --serve-artifacts \
    --app-name basic-auth
