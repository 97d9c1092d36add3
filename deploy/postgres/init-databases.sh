#!/bin/bash
# Runs once, on the first start of an empty data volume (postgres image's initdb hook):
# one role and database for Prefect, one role with two databases (tracking, auth) for MLflow.
set -euo pipefail
: "${PREFECT_DB_PASSWORD:?set it}" "${MLFLOW_DB_PASSWORD:?set it}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v prefect_pw="$PREFECT_DB_PASSWORD" -v mlflow_pw="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_pw';
CREATE DATABASE prefect OWNER prefect;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
SQL
